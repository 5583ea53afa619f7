"""The decode kernel's per-KV-head block lists of a one-query-block :class:`~sparseflash.BlockLayout`.

The body of :meth:`BlockLayout.to_block_lists` (its docstring says what the arguments do).
"""

from __future__ import annotations

from typing import Any

import torch


def decode_block_lists(
    layout: Any, *, batch: int, num_heads: int, num_kv_heads: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """:meth:`BlockLayout.to_block_lists`: ``(indices, counts, block_k)``; ``ValueError`` where it cannot serve."""
    if layout.has_columns:
        raise ValueError(
            "layout: expected a layout without token columns (col_counts/col_indices) for decode, got one with "
            f"{layout.col_capacity} column slots"
        )
    if layout.num_q_blocks != 1:
        raise ValueError(
            f"layout: expected one query block (a decode layout, seq_len_q <= block_q), got {layout.num_q_blocks}"
        )
    if (
        layout.batch not in (1, batch)
        or layout.num_heads not in (1, num_kv_heads, num_heads)
        or (num_kv_heads < 1 or num_heads % num_kv_heads)
    ):
        raise ValueError(
            f"layout: expected batch 1 or {batch} and heads 1, {num_kv_heads} or {num_heads}, got batch "
            f"{layout.batch} and heads {layout.num_heads}"
        )
    keep = layout.to_dense()[:, :, 0]  # (B or 1, H, Kb) with H in (1, Hkv, Hq)
    if keep.shape[1] == num_heads and num_heads != num_kv_heads:
        keep = keep.reshape(keep.shape[0], num_kv_heads, num_heads // num_kv_heads, -1).any(2)
    keep = keep.expand(batch, num_kv_heads, keep.shape[-1])
    counts = keep.sum(-1, dtype=torch.int32)
    order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices  # kept block ids first, ascending
    return order.to(torch.int32).contiguous(), counts.contiguous(), layout.block_size[1]
