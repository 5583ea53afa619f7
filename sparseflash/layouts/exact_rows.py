"""A layout whose last query rows attend every allowed key: the exact tail of a sparse prefill in the same launch.

A patched model computes the last ``dense_last_queries`` rows of every sparse prefill exactly (the question and the
answer prefix). As a separate dense call over those rows the work is small, but it runs on a few programs only
(256 rows of 12 heads: 24 tiles of 128 rows for 132 SMs) and costs 19 % of SDPA's whole attention at 16K on an
H200 (``benchmarks/results/accuracy_h200/qwen2.5-coder-1.5b/layer_q15/``). Marking those query blocks fully kept
lets the block-sparse kernel compute them among its other tiles (longest first), with the same result: a fully
kept causal row is exact attention over its keys.
"""

from __future__ import annotations

import functools

import torch

from sparseflash.layouts.block import BlockLayout
from sparseflash.layouts.geometry import causal_block_mask


@functools.lru_cache(maxsize=64)
def _allowed_counts(
    seq_len_q: int, seq_len_k: int, block_size: tuple[int, int], causal: bool, device: str
) -> torch.Tensor:
    """int32 ``(Qb,)``: key blocks each query block may attend (read-only, cached per geometry and device)."""
    allowed = causal_block_mask(seq_len_q, seq_len_k, block_size, causal=causal, device=device)
    return allowed.sum(-1, dtype=torch.int32)


def first_exact_block(layout: BlockLayout, num_rows: int) -> int:
    """The first query block holding one of the last ``num_rows`` query rows (``Qb`` when ``num_rows <= 0``).

    ``layout``: anything with ``num_q_blocks``, ``seq_len_q`` and ``block_size`` (a :class:`PermutedLayout` reads
    them through to its blocks).
    """
    if num_rows <= 0:
        return layout.num_q_blocks
    return max(0, layout.seq_len_q - num_rows) // layout.block_size[0]


def exact_row_count(layout: BlockLayout, num_rows: int) -> int:
    """``num_rows`` final query rows rounded up to whole query blocks of ``layout`` (at most ``seq_len_q``; 0 when
    ``num_rows <= 0``)."""
    return layout.seq_len_q - min(first_exact_block(layout, num_rows) * layout.block_size[0], layout.seq_len_q)


def can_take_exact_rows(layout: object) -> bool:
    """Whether :func:`with_exact_rows` applies: a plain :class:`BlockLayout` (not a permuted one), without token
    columns (a column inside a fully kept row would count twice), holding every key block per row."""
    return isinstance(layout, BlockLayout) and not layout.has_columns and layout.capacity == layout.num_k_blocks


def with_exact_rows(layout: BlockLayout, num_rows: int, *, causal: bool = True) -> BlockLayout:
    """``layout`` with every query block holding one of the last ``num_rows`` rows keeping all its allowed blocks.

    Causal allowed key blocks form a prefix ``[0, c)`` of each row, so such a row lists ``0 .. Kb-1`` (kept ones
    ascending, then the rest: the :meth:`BlockLayout.from_dense` order) with count ``c``. The input is not
    modified (a layout may be shared); the result is a new layout. No host sync.

    Args:
        layout: a layout accepted by :func:`can_take_exact_rows`, ``(B, H, Qb, Kb)``.
        num_rows: rows from the end computed exactly; ``<= 0`` returns ``layout`` unchanged.
        causal: the layout's masking (bottom-right causal, or full: then every key block is allowed).

    Raises:
        ValueError: a layout :func:`can_take_exact_rows` refuses.
    """
    if not can_take_exact_rows(layout):
        raise ValueError(
            "layout: expected a BlockLayout without token columns and with capacity = key blocks, got "
            f"{type(layout).__name__}"
        )
    first = first_exact_block(layout, num_rows)
    if first >= layout.num_q_blocks:
        return layout
    device = layout.device
    counts = _allowed_counts(layout.seq_len_q, layout.seq_len_k, layout.block_size, bool(causal), str(device))
    kv_num = layout.kv_num_blocks.clone()
    kv_num[:, :, first:] = counts[first:]
    kv_idx = layout.kv_indices.clone()
    kv_idx[:, :, first:, :] = torch.arange(layout.num_k_blocks, device=device, dtype=torch.int32)
    return BlockLayout(kv_num, kv_idx, layout.seq_len_q, layout.seq_len_k, layout.block_size)
