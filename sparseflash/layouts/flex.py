"""FlexAttention interop of :class:`~sparseflash.BlockLayout`: the bodies of ``from_flex`` and ``to_flex``.

Flex's ``BlockMask`` keeps blocks that need no element mask ("full") apart from those that do ("partial");
sparseflash keeps one ordered list (its only element masks are positional). Torch's flex module is imported only
when a conversion runs.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch


def read_flex_block_mask(
    block_mask: object,
) -> tuple[torch.Tensor, torch.Tensor, int, int, tuple[int, int], tuple[torch.Tensor, torch.Tensor] | None]:
    """``(kv_num_blocks, kv_indices, seq_len_q, seq_len_k, block_size, (full_num, full_idx) or None)`` of a
    FlexAttention ``BlockMask``; ``TypeError`` for anything else."""
    from torch.nn.attention.flex_attention import BlockMask

    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"block_mask: expected a flex_attention.BlockMask, got {type(block_mask).__name__}")
    seq_len_q, seq_len_k = block_mask.seq_lengths
    block_size = tuple(block_mask.BLOCK_SIZE)
    full = None
    if block_mask.full_kv_num_blocks is not None:
        full = (block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    return block_mask.kv_num_blocks, block_mask.kv_indices, seq_len_q, seq_len_k, block_size, full


def to_flex_block_mask(layout: Any, *, causal: bool, num_heads: int | None, block_lookup: bool) -> object:
    """:meth:`BlockLayout.to_flex` (its docstring says what the arguments do)."""
    from torch.nn.attention.flex_attention import BlockMask

    if layout.has_columns:
        raise ValueError(
            f"layout: a layout with token columns (col_counts/col_indices, capacity {layout.col_capacity}) has no "
            "FlexAttention BlockMask form (Flex keeps whole blocks); use layout.without_columns() for the blocks"
        )
    if num_heads is not None:
        if isinstance(num_heads, bool) or not isinstance(num_heads, int):
            raise TypeError(f"num_heads: expected a positive int (query heads) or None, got {num_heads!r}")
        if num_heads < 1:
            raise ValueError(f"num_heads: expected a positive int (query heads) or None, got {num_heads}")
    partial_num, partial_idx, full_num, full_idx = layout.split_full(causal=causal)
    if num_heads is not None and layout.num_heads not in (1, num_heads):
        if num_heads % layout.num_heads:
            raise ValueError(
                f"num_heads: expected a multiple of the layout's {layout.num_heads} heads, got {num_heads}"
            )
        rep = num_heads // layout.num_heads
        partial_num, partial_idx, full_num, full_idx = (
            t.repeat_interleave(rep, dim=1) for t in (partial_num, partial_idx, full_num, full_idx)
        )
    # Flex defines the function by mask_mod (block lists only skip work), so it carries the layout too
    block_q, block_k = layout.block_size
    offset = layout.seq_len_k - layout.seq_len_q
    if block_lookup:
        keep = layout.to_dense()
        if num_heads is not None and layout.num_heads not in (1, num_heads):
            keep = keep.repeat_interleave(num_heads // layout.num_heads, dim=1)
        per_batch, per_head = keep.shape[0] > 1, keep.shape[1] > 1

    def layout_mask(b, h, q_idx, kv_idx):
        kept = keep[b if per_batch else 0, h if per_head else 0, q_idx // block_q, kv_idx // block_k]
        return kept & (kv_idx <= q_idx + offset) if causal else kept

    def causal_only(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + offset if causal else q_idx >= 0

    kwargs = {}
    if "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters:
        kwargs["compute_q_blocks"] = False  # forward only: skip the transposed copy
    return BlockMask.from_kv_blocks(
        partial_num,
        partial_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=layout.block_size,
        mask_mod=layout_mask if block_lookup else causal_only,
        seq_lengths=(layout.seq_len_q, layout.seq_len_k),
        **kwargs,
    )
