"""Plain-PyTorch attention: the reference every kernel is tested against, and the CPU path.

Semantics shared by every prefill entry point (dense and block-sparse):

* q ``(B, Hq, Sq, D)``, k and v ``(B, Hkv, Sk, D)``, ``Hq = G * Hkv``; query head ``h`` reads KV head ``h // G``.
* causal masks are aligned bottom-right (FlashAttention): query ``i`` sees key ``j`` iff ``j <= i + Sk - Sq``::

      Sq=2, Sk=5:  1 1 1 1 0        Sq=5, Sk=2:  0 0
                   1 1 1 1 1                     0 0
                                                 0 0
                                                 1 0
                                                 1 1
* a block layout keeps key block ``J`` for query block ``I`` (see :class:`sparseflash.BlockLayout`);
* ``seq_lens`` (B,) marks the valid tokens of a padded batch (``Sq == Sk``): ``[0, len)`` when right-padded,
  ``[S - len, S)`` when left-padded; padded tokens neither attend nor are attended;
* a query row with no key to attend to gives output 0 and log-sum-exp ``-inf``;
* a key or value a row does not attend never reaches that row, whatever it holds: NaN or inf in padding, in
  keys past a row's causal horizon or in dropped blocks leave it finite. A row that does attend a non-finite
  value gets NaN (and a NaN lse when the key is non-finite), as the plain formula would give.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sparseflash.layout import BlockLayout


def valid_range(seq_lens: torch.Tensor, seq_len: int, padding_side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """First and one-past-last valid position per sequence, each ``(B,)`` int32."""
    seq_lens = seq_lens.to(torch.int32)
    if padding_side == "left":
        return (seq_len - seq_lens).to(torch.int32), torch.full_like(seq_lens, seq_len)
    return torch.zeros_like(seq_lens), seq_lens


def token_mask(
    rows: range,
    seq_len_q: int,
    seq_len_k: int,
    *,
    num_heads: int,
    causal: bool,
    blocks: torch.Tensor | None = None,
    block_size: tuple[int, int] = (128, 128),
    seq_lens: torch.Tensor | None = None,
    padding_side: str = "right",
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Boolean mask ``(B or 1, Hq or 1, len(rows), Sk)``; True where query ``rows[i]`` may attend key ``j``.

    ``blocks`` is a dense block mask ``(B or 1, H or 1, Qb, Kb)`` (``BlockLayout.to_dense()``) of
    ``block_size`` blocks; H is 1, the KV heads or the query heads.
    """
    q_pos = torch.arange(rows.start, rows.stop, device=device)
    k_pos = torch.arange(seq_len_k, device=device)
    mask = torch.ones(1, 1, len(rows), seq_len_k, dtype=torch.bool, device=device)
    if causal:
        mask = mask & (k_pos[None, :] <= q_pos[:, None] + (seq_len_k - seq_len_q))
    if seq_lens is not None:
        lo, hi = valid_range(seq_lens.to(device), seq_len_k, padding_side)
        k_ok = (k_pos[None, :] >= lo[:, None]) & (k_pos[None, :] < hi[:, None])  # (B, Sk)
        q_ok = (q_pos[None, :] >= lo[:, None]) & (q_pos[None, :] < hi[:, None])  # (B, rows)
        mask = mask & (q_ok[:, None, :, None] & k_ok[:, None, None, :])
    if blocks is not None:
        block_q, block_k = block_size
        keep = blocks.to(device)[:, :, q_pos // block_q, :]  # (Bl, Hl, rows, Kb)
        keep = keep.repeat_interleave(block_k, dim=-1)[..., :seq_len_k]
        if keep.shape[1] not in (1, num_heads):
            keep = keep.repeat_interleave(num_heads // keep.shape[1], dim=1)
        mask = mask & keep
    return mask


def _block_args(layout: BlockLayout | None) -> dict:
    if layout is None:
        return {}
    return {"blocks": layout.to_dense(), "block_size": layout.block_size}


def _group_mask(mask: torch.Tensor, num_kv_heads: int, group: int) -> torch.Tensor:
    """A mask ``(B or 1, 1 / Hkv / Hq, M or 1, Sk)`` as ``(B or 1, Hkv or 1, G or 1, M or 1, Sk)``."""
    heads = mask.shape[1]
    if heads == num_kv_heads * group:
        return mask.unflatten(1, (num_kv_heads, group))
    if heads in (1, num_kv_heads):
        return mask.unsqueeze(2)
    raise ValueError(f"mask: expected 1, {num_kv_heads} or {num_kv_heads * group} heads, got {heads}")


def _non_finite_keys(t: torch.Tensor) -> torch.Tensor | None:
    """Bool (B, H, S) marking the key rows of ``t`` holding NaN/inf, or None when there is none (one sync)."""
    if bool(torch.isfinite(t.sum(dtype=torch.float64))):  # one cheap pass: a NaN/inf anywhere makes it non-finite
        return None
    bad = ~torch.isfinite(t).all(-1)
    return bad if bool(bad.any()) else None  # the sum may only have overflowed


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention under an explicit mask, in the dtype of the inputs.

    Non-finite keys/values are zeroed before the products (so ``0 * NaN`` never happens and gradients stay
    finite); the rows that do attend one are set to NaN afterwards (module docstring). Checking K/V for them
    syncs with the host once.

    Args:
        q: (B, Hq, M, D). k, v: (B, Hkv, Sk, D), Hq a multiple of Hkv (no K/V copy: heads are grouped).
        mask: bool (B or 1, 1 / Hkv / Hq, M or 1, Sk); True = attend.
        scale: softmax scale.

    Returns:
        out (B, Hq, M, D) and natural-log lse (B, Hq, M); rows with nothing to attend: 0 and -inf.
    """
    batch, num_heads, rows, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    qg = q.reshape(batch, num_kv_heads, group, rows, head_dim)
    mask = _group_mask(mask, num_kv_heads, group)  # (B|1, Hkv|1, G|1, M|1, Sk)
    k_bad, v_bad = _non_finite_keys(k), _non_finite_keys(v)
    if k_bad is not None:
        k = k.masked_fill(k_bad.unsqueeze(-1), 0.0)
    if v_bad is not None:
        v = v.masked_fill(v_bad.unsqueeze(-1), 0.0)
    scores = torch.matmul(qg * scale, k.unsqueeze(2).transpose(-1, -2))  # (B, Hkv, G, M, Sk)
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # -inf on empty rows
    probs = torch.exp(scores - lse.masked_fill(lse == float("-inf"), 0.0).unsqueeze(-1))
    out = torch.matmul(probs, v.unsqueeze(2))
    # rows attending a non-finite key (NaN out and lse) or value (NaN out)
    if k_bad is not None:
        k_hit = (mask & k_bad[:, :, None, None, :]).any(-1)
        lse = lse.masked_fill(k_hit, float("nan"))
        out = out.masked_fill(k_hit.unsqueeze(-1), float("nan"))
    if v_bad is not None:
        out = out.masked_fill((mask & v_bad[:, :, None, None, :]).any(-1).unsqueeze(-1), float("nan"))
    return out.reshape(batch, num_heads, rows, head_dim), lse.reshape(batch, num_heads, rows)


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    layout: BlockLayout | None = None,
    seq_lens: torch.Tensor | None = None,
    padding_side: str = "right",
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention in ``dtype`` (float64 by default) with the whole mask built explicitly.

    Returns out (B, Hq, Sq, D) and lse (B, Hq, Sq) in ``dtype``. For tests on small shapes.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mask = token_mask(
        range(q.shape[2]), q.shape[2], k.shape[2], num_heads=q.shape[1], causal=causal,
        **_block_args(layout), seq_lens=seq_lens, padding_side=padding_side, device=q.device,
    )
    return masked_attention(q.to(dtype), k.to(dtype), v.to(dtype), mask, scale)


def attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    seq_lens: torch.Tensor | None = None,
    padding_side: str = "right",
    chunk_rows: int = 512,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention in float32, queries in chunks so memory stays O(chunk x Sk); differentiable.

    The PyTorch path's general case (it gives the lse; :func:`sparseflash.flash_attention` takes SDPA when
    the lse is not wanted). Returns out (B, Hq, Sq, D) in q's dtype and lse (B, Hq, Sq) float32.
    """
    seq_len_q, seq_len_k = q.shape[2], k.shape[2]
    k32, v32 = k.float(), v.float()
    outs, lses = [], []
    for start in range(0, seq_len_q, chunk_rows):
        rows = range(start, min(start + chunk_rows, seq_len_q))
        mask = token_mask(
            rows, seq_len_q, seq_len_k, num_heads=q.shape[1], causal=causal, seq_lens=seq_lens,
            padding_side=padding_side, device=q.device,
        )
        o, l = masked_attention(q[:, :, rows.start : rows.stop].float(), k32, v32, mask, scale)
        outs.append(o.to(q.dtype))
        lses.append(l)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)
