"""Token columns of a :class:`~sparseflash.BlockLayout`: the format, building them, checks and counts.

Token columns (MInference's vertical lines, optional): besides whole blocks, query block ``I`` may keep single
key positions, gathered by the prefill kernel in tiles of its key width:

* ``col_counts`` int32 ``(B, H, Qb)``: how many columns query block ``I`` keeps;
* ``col_indices`` int32 ``(B, H, Qb, Ccol)``: their token positions in ``[0, Sk)``, strictly ascending in the
  first ``col_counts[b, h, I]`` entries, and none inside one of ``I``'s kept blocks (a key is counted once);
  the rest of the row is ignored. :func:`with_columns` builds them (dropping columns that lie in kept blocks);
  :meth:`BlockLayout.check_indices` rejects a layout that breaks these rules.

A column is attended by query ``i`` of block ``I`` under the same element mask as a block key: bottom-right
causal (``j <= i + Sk - Sq``) and the sequence ends. ``to_dense`` and ``density`` describe the blocks only;
:meth:`BlockLayout.token_density` counts blocks and columns in (query, key) pairs.

The functions here take the layout (:class:`~sparseflash.layouts.block.BlockLayout` calls them from its methods;
this module does not import it).
"""

from __future__ import annotations

from typing import Any

import torch


def check_metadata(layout: Any) -> None:
    """Types, shapes and device of a layout's column tensors (no value read); both or neither given."""
    counts, cols = layout.col_counts, layout.col_indices
    if counts is None and cols is None:
        return
    if counts is None or cols is None:
        given, missing = ("col_indices", "col_counts") if counts is None else ("col_counts", "col_indices")
        raise ValueError(f"{missing}: expected a tensor together with {given}, got None")
    for name, t in (("col_counts", counts), ("col_indices", cols)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.int32:
            raise TypeError(f"{name}: expected dtype torch.int32, got {t.dtype}")
        if t.device != layout.kv_num_blocks.device:
            raise ValueError(
                f"{name}: expected device {layout.kv_num_blocks.device} (from kv_num_blocks), got {t.device}"
            )
    if counts.shape != layout.kv_num_blocks.shape:
        raise ValueError(
            f"col_counts: expected shape {tuple(layout.kv_num_blocks.shape)} (from kv_num_blocks), "
            f"got {tuple(counts.shape)}"
        )
    if cols.dim() != 4 or cols.shape[:3] != counts.shape or cols.shape[3] < 1:
        raise ValueError(
            f"col_indices: expected shape {tuple(counts.shape)} + (capacity >= 1,) (from col_counts), "
            f"got {tuple(cols.shape)}"
        )


def check_indices(layout: Any) -> None:
    """Raise ``ValueError`` unless column counts lie in [0, Ccol] and used positions ascend strictly within
    ``[0, Sk)``, none inside a block its query block keeps (no key counted twice). One host sync; nothing
    without columns."""
    if not layout.has_columns:
        return
    num, idx, capacity = layout.col_counts, layout.col_indices, layout.col_capacity
    used = torch.arange(capacity, device=layout.device) < num.unsqueeze(-1)
    block_of = (idx.long() // layout.block_size[1]).clamp(0, layout.num_k_blocks - 1)
    checks = [
        (((num < 0) | (num > capacity)).any(), f"layout.col_counts: expected counts in [0, {capacity}]"),
        (
            (used & ((idx < 0) | (idx >= layout.seq_len_k))).any(),
            f"layout.col_indices: expected token positions in [0, {layout.seq_len_k})",
        ),
        (
            (used[..., 1:] & (idx[..., 1:] <= idx[..., :-1])).any(),
            "layout.col_indices: expected strictly ascending positions in each row",
        ),
        (
            (used & layout.to_dense().gather(-1, block_of)).any(),
            "layout.col_indices: expected columns outside the row's kept blocks (a key counted once), got a column "
            "inside a kept block: build the columns with sparseflash.layouts.with_columns",
        ),
    ]
    flags = torch.stack([flag for flag, _ in checks]).tolist()
    for bad, (_, message) in zip(flags, checks, strict=True):
        if bad:
            raise ValueError(message if "got" in message else f"{message}, got values outside")


def token_density(layout: Any, *, causal: bool = True) -> float:
    """Kept (query, key) pairs over allowed pairs, averaged over batch and heads; blocks and columns.

    A kept block counts the pairs of it inside the allowed region (the causal part when ``causal``, the
    real rows and keys of ragged end blocks), a token column the rows of its query block that see it; the
    denominator is the allowed pair count (``Sq * Sk`` without ``causal``). This is the work a kernel
    gathering columns does, in keys per row, where :meth:`BlockLayout.density` counts whole blocks. Exact, in float64,
    with one host sync; it never builds an ``Sq x Sk`` tensor.
    """
    block_q, block_k = layout.block_size
    device, offset = layout.device, layout.seq_len_k - layout.seq_len_q
    rows_lo = torch.arange(layout.num_q_blocks, device=device, dtype=torch.float64) * block_q
    rows_hi = torch.clamp(rows_lo + block_q, max=layout.seq_len_q)
    keys_lo = torch.arange(layout.num_k_blocks, device=device, dtype=torch.float64) * block_k
    keys_hi = torch.clamp(keys_lo + block_k, max=layout.seq_len_k)
    if causal:
        pairs = torch.zeros(layout.num_q_blocks, layout.num_k_blocks, dtype=torch.float64, device=device)
        for r in range(block_q):  # row r of every query block at once
            row = rows_lo + r
            seen = (torch.minimum(row[:, None] + offset + 1, keys_hi[None, :]) - keys_lo[None, :]).clamp(min=0)
            pairs += seen * (row < rows_hi)[:, None]
    else:
        pairs = (rows_hi - rows_lo)[:, None] * (keys_hi - keys_lo)[None, :]
    kept = (layout.to_dense().to(torch.float64) * pairs).sum()
    if layout.has_columns:
        used = torch.arange(layout.col_capacity, device=device) < layout.col_counts.unsqueeze(-1)
        lo, hi = rows_lo[:, None], rows_hi[:, None]  # (Qb, 1)
        if causal:  # rows i of block I with j <= i + offset
            seeing = (hi - torch.maximum(lo, layout.col_indices.to(torch.float64) - offset)).clamp(min=0)
        else:
            seeing = (hi - lo).expand(layout.col_indices.shape)
        kept = kept + (seeing * used).sum()
    return float(kept / (pairs.sum() * layout.batch * layout.num_heads))


def columns_to_dense(layout: Any) -> torch.Tensor | None:
    """Bool ``(B, H, Qb, Sk)``, True where query block ``I`` keeps token column ``j``; None without columns.

    Memory ``Qb * Sk`` per head: for references and tests on small shapes.
    """
    if not layout.has_columns:
        return None
    used = torch.arange(layout.col_capacity, device=layout.device) < layout.col_counts.unsqueeze(-1).long()
    target = torch.where(used, layout.col_indices.long().clamp(0, layout.seq_len_k), layout.seq_len_k)
    dense = torch.zeros(*layout.col_counts.shape, layout.seq_len_k + 1, dtype=torch.bool, device=layout.device)
    dense.scatter_(-1, target, used)
    return dense[..., : layout.seq_len_k]


def with_columns(
    layout: Any,
    col_indices: torch.Tensor,
    col_counts: torch.Tensor | None = None,
    *,
    check: bool = True,
) -> Any:
    """``layout``'s blocks plus token columns per query block (replacing any columns it holds).

    Columns inside a block their query block keeps are dropped (a key is counted once), duplicates merged, and
    each row sorted ascending; unused slots hold 0. No host sync unless ``check``.

    Args:
        layout: the block layout, ``(B, H, Qb)`` counts.
        col_indices: integer ``(B, H, Qb, C)``, token positions per query block, in any order.
        col_counts: optional integer ``(B, H, Qb)``: only the first ``col_counts`` slots of each row are used
            (default: all ``C``).
        check: check on the host (one sync) that the used positions lie in ``[0, Sk)`` and the counts in
            ``[0, C]``; without it, positions outside ``[0, Sk)`` are dropped.

    Returns:
        A :class:`BlockLayout` with ``col_counts`` int32 ``(B, H, Qb)`` and ``col_indices`` int32 ``(B, H, Qb, C)``.

    Raises:
        TypeError: ``layout`` not a BlockLayout, or non-integer column tensors.
        ValueError: shapes or devices that do not match the layout; with ``check``, values out of range.
    """
    if not callable(getattr(layout, "without_columns", None)):  # duck-typed: this module does not import block.py
        raise TypeError(f"layout: expected a BlockLayout, got {type(layout).__name__}")
    lead = tuple(layout.kv_num_blocks.shape)
    for name, t, ndim in (("col_indices", col_indices, 4), ("col_counts", col_counts, 3)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"{name}: expected an integer tensor, got {got}")
        if t.dim() != ndim or tuple(t.shape[:3]) != lead or (ndim == 4 and t.shape[3] < 1):
            raise ValueError(
                f"{name}: expected shape {lead}{' + (C >= 1,)' if ndim == 4 else ''} (the layout's counts), "
                f"got {tuple(t.shape)}"
            )
        if t.device != layout.device:
            raise ValueError(f"{name}: expected device {layout.device} (the layout's), got {t.device}")
    seq_len_k, capacity = layout.seq_len_k, col_indices.shape[3]
    cols = col_indices.long()
    used = torch.ones_like(cols, dtype=torch.bool)
    if col_counts is not None:
        used = torch.arange(capacity, device=layout.device) < col_counts.long().unsqueeze(-1)
    if check:
        bad_count = col_counts is not None and ((col_counts < 0) | (col_counts > capacity)).any()
        flags = torch.stack(
            [torch.as_tensor(bad_count, device=layout.device), (used & ((cols < 0) | (cols >= seq_len_k))).any()]
        ).tolist()
        if flags[0]:
            raise ValueError(f"col_counts: expected counts in [0, {capacity}], got values outside")
        if flags[1]:
            raise ValueError(f"col_indices: expected token positions in [0, {seq_len_k}), got values outside")
    valid = used & (cols >= 0) & (cols < seq_len_k)
    block_of = (cols // layout.block_size[1]).clamp(0, layout.num_k_blocks - 1)
    valid &= ~layout.to_dense().gather(-1, block_of)
    # sort with Sk as the sentinel of a dropped slot, then drop repeats and sort again
    vals = torch.where(valid, cols, seq_len_k).sort(-1).values
    repeat = torch.zeros_like(valid)
    repeat[..., 1:] = vals[..., 1:] == vals[..., :-1]
    vals = torch.where(repeat, seq_len_k, vals).sort(-1).values
    kept = vals < seq_len_k
    return type(layout)(
        layout.kv_num_blocks,
        layout.kv_indices,
        layout.seq_len_q,
        layout.seq_len_k,
        layout.block_size,
        col_counts=kept.sum(-1, dtype=torch.int32),
        col_indices=torch.where(kept, vals, 0).to(torch.int32).contiguous(),
    )


__all__ = ["with_columns"]
