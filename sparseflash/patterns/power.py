"""PowerAttention (methods.md §2.4): sink, local window and key blocks at power-of-two block distances.

Static: reads only the shapes of q and k and returns one layout shared by every batch element and head
(layout ``B = H = 1``). The rule is our reconstruction of the paper (the official code was not available):
distances are counted in blocks, from the key block holding the row's last query (``D``; the row index ``I``
when ``Sq = Sk`` and the blocks are square).
"""

from __future__ import annotations

import math

import torch

from sparseflash import _options as opt
from sparseflash._validate import check_qk
from sparseflash.layouts import BlockLayout
from sparseflash.layouts import geometry as geo
from sparseflash.patterns import selection as sel
from sparseflash.patterns.registry import register
from sparseflash.patterns.static import _last_diagonal_block, _shared_layout


@register("power", kind="static", heads="shared")
def power(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: tuple[int, int] = (128, 128),
    causal: bool = True,
    sink_blocks: int = 1,
    local_blocks: int = 0,
    max_power: int | None = None,
) -> BlockLayout:
    """PowerAttention layout: row ``I`` keeps ``J = D - 2**e`` for ``e = 0, 1, ...`` plus sink and local blocks.

    Per row: key blocks ``0 .. sink_blocks - 1``; the diagonal block(s) and ``local_blocks`` blocks before
    them (the paper's window ``w = local_blocks + 1`` blocks, diagonal included); and ``D - 2**e`` for every
    ``e <= max_power`` with ``2**e <= D``. A row holds about ``sink + w + log2(D)`` blocks, so density at
    128K tokens with 128-blocks is about 2.3 % (methods.md §2.4). Shared by all heads.

    Args:
        q: ``(B, Hq, Sq, D)``; only its shape and device are read.
        k: ``(B, Hkv, Sk, D)``.
        block_size: ``(block_q, block_k)``.
        causal: must be True.
        sink_blocks: leading key blocks always kept (default 1, ``>= 0``).
        local_blocks: dense blocks before the diagonal (default 0: diagonal only, ``>= 0``).
        max_power: largest exponent ``e`` (``>= 0``); None: no limit.
    """
    _, _, _, seq_len_q, seq_len_k, _ = check_qk("power", q, k)
    bs = opt.check_block_size("power", block_size)
    opt.check_causal("power", causal, causal_only=True)
    sink = opt.check_nonnegative_int("power: sink_blocks", sink_blocks)
    local = opt.check_nonnegative_int("power: local_blocks", local_blocks)
    num_k_blocks = -(-seq_len_k // bs[1])
    max_e = max(num_k_blocks, 1).bit_length()  # 2**max_e > Kb: every reachable distance
    if max_power is not None:
        max_e = min(max_e, opt.check_nonnegative_int("power: max_power", max_power))
    last_diag = _last_diagonal_block(seq_len_q, seq_len_k, bs, q.device)
    cols = torch.arange(num_k_blocks, device=q.device)
    dist = last_diag[:, None] - cols[None, :]
    is_pow2 = (dist > 0) & ((dist & (dist - 1)) == 0) & (dist <= 2**max_e)
    forced = sel.forced_mask(seq_len_q, seq_len_k, bs, sink_blocks=sink, local_blocks=local, device=q.device)
    mask = (is_pow2 | forced) & geo.causal_block_mask(seq_len_q, seq_len_k, bs, device=q.device)
    cap = sink + local + 2 + max_e + 1 + math.ceil(bs[0] / bs[1])
    return _shared_layout(mask, seq_len_q, seq_len_k, bs, cap)
