"""Plain-PyTorch attention: the reference every kernel is tested against, and the CPU path.

Semantics shared by every prefill entry point (dense and block-sparse):

* q ``(B, Hq, Sq, D)``, k and v ``(B, Hkv, Sk, D)``, ``Hq = G * Hkv``; query head ``h`` reads KV head ``h // G``.
* causal masks are aligned bottom-right (FlashAttention): query ``i`` sees key ``j`` iff ``j <= i + Sk - Sq``::

      Sq=2, Sk=5:  1 1 1 1 0        Sq=5, Sk=2:  0 0
                   1 1 1 1 1                     0 0
                                                 0 0
                                                 1 0
                                                 1 1
* a block layout keeps key block ``J`` for query block ``I`` (see :class:`sparseflash.BlockLayout`), and with
  token columns also single keys ``j`` for query block ``I``; the causal and sequence-end masks apply to both;
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

from sparseflash.layouts.columns import columns_to_dense

if TYPE_CHECKING:
    from sparseflash.layouts import BlockLayout


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
    columns: torch.Tensor | None = None,
    seq_lens: torch.Tensor | None = None,
    padding_side: str = "right",
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Boolean mask ``(B or 1, Hq or 1, len(rows), Sk)``; True where query ``rows[i]`` may attend key ``j``.

    ``blocks`` is a dense block mask ``(B or 1, H or 1, Qb, Kb)`` (``BlockLayout.to_dense()``) of
    ``block_size`` blocks; H is 1, the KV heads or the query heads. ``columns`` (with ``blocks``) is the
    layout's token columns ``(B or 1, H, Qb, Sk)`` (:func:`sparseflash.layouts.columns.columns_to_dense`), kept
    besides the blocks.
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
        if columns is not None:
            keep = keep | columns.to(device)[:, :, q_pos // block_q, :]
        if keep.shape[1] not in (1, num_heads):
            keep = keep.repeat_interleave(num_heads // keep.shape[1], dim=1)
        mask = mask & keep
    return mask


def _block_args(layout: BlockLayout | None) -> dict:
    if layout is None:
        return {}
    return {"blocks": layout.to_dense(), "block_size": layout.block_size, "columns": columns_to_dense(layout)}


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
        range(q.shape[2]),
        q.shape[2],
        k.shape[2],
        num_heads=q.shape[1],
        causal=causal,
        **_block_args(layout),
        seq_lens=seq_lens,
        padding_side=padding_side,
        device=q.device,
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
            rows,
            seq_len_q,
            seq_len_k,
            num_heads=q.shape[1],
            causal=causal,
            seq_lens=seq_lens,
            padding_side=padding_side,
            device=q.device,
        )
        o, l = masked_attention(q[:, :, rows.start : rows.stop].float(), k32, v32, mask, scale)
        outs.append(o.to(q.dtype))
        lses.append(l)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


# ------------------------------------------------------------------- the block-sparse PyTorch path
def block_sparse_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    *,
    causal: bool,
    scale: float,
    seq_lens: torch.Tensor | None = None,
    padding_side: str = "right",
    return_lse: bool = True,
    max_scores: int = 2**23,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The PyTorch path: per run of query blocks, gather their kept key blocks and attend over those only.

    A layout's token columns are gathered too (single key rows, after the blocks), up to the widest column row
    of the run.

    Query blocks go in runs whose score tensor ``(B, Hq, rows, kept keys)`` stays under ``max_scores``
    elements and wastes at most a quarter on rows keeping fewer blocks than the widest. Slots past a row's
    count, keys past Sk and masked keys are masked. Without ``return_lse`` a run goes through SDPA when what
    it gathered is finite; otherwise (and for the lse) through float32
    :func:`sparseflash.ops.prefill.masked_attention`, which keeps non-finite values out of rows that do not
    attend them. Differentiable.

    Returns out (B, Hq, Sq, D) in q's dtype and lse (B, Hq, Sq) float32 (None without ``return_lse``).
    """
    widths = layout.kv_num_blocks.amax(dim=(0, 1)).clamp(1, layout.capacity).tolist()  # per query block
    col_widths = [0] * len(widths)
    if layout.has_columns:
        col_widths = layout.col_counts.amax(dim=(0, 1)).clamp(0, layout.col_capacity).tolist()
    block_q, block_k = layout.block_size
    per_block = q.shape[0] * q.shape[1] * block_q * block_k  # scores of one (query block, key block) pair
    # K/V as rows of whole key blocks (B * Hkv * Kb, block_k * D), the last block zero-padded: a gather copies
    # whole blocks (index_select of contiguous rows)
    pad = layout.num_k_blocks * block_k - k.shape[2]
    k_blocks, v_blocks = (torch.nn.functional.pad(t, (0, 0, 0, pad)).reshape(-1, block_k * t.shape[3]) for t in (k, v))
    outs, lses = [], []
    first = 0
    while first < len(widths):
        last, width = first + 1, widths[first]
        while last < len(widths):
            wider = max(width, widths[last])
            n = last + 1 - first
            if n * wider * per_block > max_scores or sum(widths[first : last + 1]) < 0.75 * n * wider:
                break
            last, width = last + 1, wider
        out, lse = _query_block_run(
            q,
            k_blocks,
            v_blocks,
            k.shape,
            layout,
            first,
            last,
            width,
            max(col_widths[first:last]),
            causal=causal,
            scale=scale,
            seq_lens=seq_lens,
            padding_side=padding_side,
            return_lse=return_lse,
        )
        outs.append(out)
        lses.append(lse)
        first = last
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2) if return_lse else None


def _query_block_run(
    q: torch.Tensor,
    k_blocks: torch.Tensor,
    v_blocks: torch.Tensor,
    k_shape: torch.Size,
    layout: BlockLayout,
    first: int,
    last: int,
    width: int,
    col_width: int,
    *,
    causal: bool,
    scale: float,
    seq_lens: torch.Tensor | None,
    padding_side: str,
    return_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Query blocks ``[first, last)`` over their first ``width`` kept key blocks and ``col_width`` token columns.

    The ``n = last - first`` query blocks join the batch dimension: q ``(B * n, Hq, block_q, D)`` against the
    gathered keys ``(B * n, heads, width * block_k, D)``, heads the KV heads when the layout is shared by each
    GQA group, else the query heads.
    """
    batch, num_heads, seq_len_q, head_dim = q.shape
    num_kv_heads, seq_len_k = k_shape[1], k_shape[2]
    block_q, block_k = layout.block_size
    n, device = last - first, q.device
    heads = num_kv_heads if layout.num_heads in (1, num_kv_heads) else num_heads

    def fold(t: torch.Tensor) -> torch.Tensor:  # (B or 1, H, n, ...) -> (B * n, H, ...)
        return t.expand(batch, *t.shape[1:]).transpose(1, 2).flatten(0, 1)

    # kept key blocks (Bl, Hl, n, width); unused slots read block 0 and are masked (zeroed if non-finite)
    used = torch.arange(width, device=device) < layout.kv_num_blocks[:, :, first:last, None]
    ids = layout.kv_indices[:, :, first:last, :width].long().masked_fill(~used, 0)
    pos = (ids[..., None] * block_k + torch.arange(block_k, device=device)).flatten(-2)  # (Bl, Hl, n, L)
    key_ok = used.repeat_interleave(block_k, dim=-1) & (pos < seq_len_k)
    if col_width:  # token columns after the blocks; unused slots read key 0 and are masked
        col_used = torch.arange(col_width, device=device) < layout.col_counts[:, :, first:last, None]
        col_pos = layout.col_indices[:, :, first:last, :col_width].long().masked_fill(~col_used, 0)
        pos = torch.cat([pos, col_pos], dim=-1)
        key_ok = torch.cat([key_ok, col_used & (col_pos < seq_len_k)], dim=-1)
    q_pos = (first * block_q + torch.arange(n * block_q, device=device)).view(n, block_q)
    mask = key_ok[..., None, :] & (q_pos < seq_len_q)[:, :, None]  # (Bl, Hl, n, block_q, L)
    if causal:
        mask = mask & (pos[..., None, :] <= q_pos[:, :, None] + (seq_len_k - seq_len_q))
    if seq_lens is not None:
        lo, hi = (t.long() for t in valid_range(seq_lens, seq_len_k, padding_side))
        in_range = lambda p, d: (p >= lo.view(-1, *[1] * d)) & (p < hi.view(-1, *[1] * d))  # noqa: E731
        mask = mask & in_range(pos, 3)[..., None, :] & in_range(q_pos, 2)[:, None, :, :, None]

    # rows of k_blocks to gather, (B * n, heads, width): row (b * Hkv + kv_head) * Kb + block id
    b_idx = torch.arange(batch, device=device).view(-1, 1, 1, 1)
    h_idx = (torch.arange(heads, device=device) * num_kv_heads // heads).view(1, -1, 1, 1)
    flat = fold((b_idx * num_kv_heads + h_idx) * layout.num_k_blocks + ids)
    k_sel, v_sel = (
        t.index_select(0, flat.flatten()).view(batch * n, heads, width * block_k, head_dim)
        for t in (k_blocks, v_blocks)
    )
    if col_width:  # single key rows of the padded (B * Hkv * Kb * block_k, D) view
        flat = fold((b_idx * num_kv_heads + h_idx) * (layout.num_k_blocks * block_k) + col_pos)
        k_col, v_col = (
            t.view(-1, head_dim).index_select(0, flat.flatten()).view(batch * n, heads, col_width, head_dim)
            for t in (k_blocks, v_blocks)
        )
        k_sel, v_sel = torch.cat([k_sel, k_col], dim=2), torch.cat([v_sel, v_col], dim=2)
    rows = q[:, :, first * block_q : last * block_q]
    rows = fold(torch.nn.functional.pad(rows, (0, 0, 0, n * block_q - rows.shape[2])).unflatten(2, (n, block_q)))
    mask = fold(mask)
    out = lse = None
    if not return_lse:
        out = _sdpa_run(rows, k_sel, v_sel, mask, fold(key_ok), scale)
    if out is None:
        out, lse = masked_attention(rows.float(), k_sel.float(), v_sel.float(), mask, scale)
    real = min(last * block_q, seq_len_q) - first * block_q
    unfold = lambda t: t.unflatten(0, (batch, n)).transpose(1, 2).flatten(2, 3)[:, :, :real]  # noqa: E731
    return unfold(out).to(q.dtype), None if lse is None else unfold(lse)


def _sdpa_run(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, key_ok: torch.Tensor, scale: float
) -> torch.Tensor | None:
    """One run through SDPA: q (N, Hq, M, D), k/v (N, H, L, D), mask (N, 1 or H, M, L), key_ok (N, 1 or H, L).

    Slots no row may read hold junk (block 0, or the zero padding past Sk) and are zeroed when anything read is
    non-finite; None when a key/value a row may skip is still non-finite (SDPA would spread it through
    ``0 * NaN``: :func:`masked_attention` handles that). Rows with nothing to attend see every slot,
    then come out 0, so SDPA meets no empty row.
    """

    def finite(*ts: torch.Tensor) -> bool:  # one pass each: a NaN/inf anywhere (or an overflow) shows in the sum
        return all(bool(torch.isfinite(t.sum(dtype=torch.float32))) for t in ts)

    if not finite(k, v):
        k, v = (t.masked_fill(~key_ok[..., None], 0.0) for t in (k, v))
        if not finite(k, v):
            return None
    if mask.shape[1] not in (1, q.shape[1]):
        mask = mask.repeat_interleave(q.shape[1] // mask.shape[1], dim=1)
    empty = ~mask.any(-1, keepdim=True)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask | empty, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
    return out.masked_fill(empty, 0.0)
