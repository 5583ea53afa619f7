"""FlexPrefill's layout from its per-head selections, assembled in one kernel (steps 6 to 8 of
:mod:`sparseflash.patterns.flexprefill`).

Per query-block row ``I`` of a layout head the kept key blocks are, over the query heads ``h`` of that layout head
(one, or the GQA group with ``heads='kv'``: their union), the causal blocks among: the kept vertical columns of
``h``, the blocks ``(I, J)`` whose diagonal group ``J - diag(I) + last_diag`` is a kept slash group of ``h``, the
blocks ``h`` covers where ``h`` is query-aware, and the diagonal blocks. :func:`flexprefill_layout_reference`
builds that bool ``(B, H, Qb, Kb)`` mask with PyTorch and compresses it (:meth:`BlockLayout.from_dense`: a sort);
:func:`flexprefill_layout_triton` computes each row in registers and writes it in the layout's format (kept key
blocks ascending, then the dropped ones ascending; the count in ``kv_num_blocks``) with a prefix sum, one program
per row: no mask, no sort, about fifteen launches fewer. Both are boolean logic on the same inputs: equal layouts.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from sparseflash._validate import check_backend
from sparseflash.layouts import BlockLayout
from sparseflash.layouts import geometry as geo
from sparseflash.patterns import selection as sel
from sparseflash.patterns.row_kernels import layout_row, store_layout_row

MAX_KEY_BLOCKS = 16384  # a row of key blocks held in registers (2M tokens at 128-token blocks); longer: PyTorch


@functools.lru_cache(maxsize=64)
def slash_geometry(seq_len_q: int, seq_len_k: int, block: int, device: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Made once per shape and device, **read-only**: the diagonal group of every block flattened and clamped into
    ``[0, Kb)`` (int64 ``(Qb * Kb,)``), where it is a real group of an allowed block (bool ``(Qb, Kb)``), and the
    number of query blocks with an allowed block (a Python int, from the shapes alone: no tensor read)."""
    num_q_blocks, num_k_blocks = -(-seq_len_q // block), -(-seq_len_k // block)
    allowed = geo.causal_block_mask(seq_len_q, seq_len_k, (block, block), device=device)
    last_diag = (seq_len_k - 1) // block
    q_last_pos = torch.clamp((torch.arange(num_q_blocks, device=device) + 1) * block, max=seq_len_q) - 1
    q_last_pos = q_last_pos + seq_len_k - seq_len_q  # bottom-right aligned
    diag_block = torch.div(q_last_pos, block, rounding_mode="floor")  # key block of each row block's last query
    group = torch.arange(num_k_blocks, device=device)[None, :] - diag_block[:, None] + last_diag  # (Qb, Kb)
    in_range = (group >= 0) & (group <= last_diag) & allowed
    # a row block sees a key iff its last query's position, Sk - Sq + min((I + 1) * B, Sq) - 1, is >= 0
    rows_with_blocks = sum(seq_len_k - seq_len_q + min((i + 1) * block, seq_len_q) > 0 for i in range(num_q_blocks))
    return group.clamp(0, num_k_blocks - 1).flatten(), in_range, rows_with_blocks


@triton.jit
def _flexprefill_layout_kernel(
    LINES,  # (2, B, H, Kb) uint8 contiguous: kept vertical columns, kept slash groups
    COVER,  # (B, H, Qb, Kb) uint8, any strides: covered blocks
    QUERY_AWARE,  # (B, H) uint8 contiguous
    ALLOWED,  # (Qb, Kb) uint8 contiguous
    FORCED,  # (Qb, Kb) uint8 contiguous: the diagonal blocks
    IN_RANGE,  # (Qb, Kb) uint8 contiguous: the block's diagonal group exists
    GROUP,  # (Qb * Kb,) int64: the block's diagonal group, clamped into [0, Kb)
    KV_NUM,  # (B, HL, Qb) int32 contiguous
    KV_IDX,  # (B, HL, Qb, Kb) int32 contiguous
    batch,
    num_heads,
    layout_heads,
    num_q_blocks,
    num_k_blocks,
    stride_cb,
    stride_ch,
    stride_cq,
    stride_ck,
    BLOCK_K: tl.constexpr,
):
    b, hl, qb, offs, inb = layout_row(num_q_blocks, layout_heads, num_k_blocks, BLOCK_K)  # hl: the layout head
    cell = qb.to(tl.int64) * num_k_blocks + offs
    allowed = (tl.load(ALLOWED + cell, mask=inb, other=0) != 0) & inb
    in_range = tl.load(IN_RANGE + cell, mask=inb, other=0) != 0
    group = tl.load(GROUP + cell, mask=inb, other=0)
    keep = tl.load(FORCED + cell, mask=inb, other=0) != 0
    heads_per_layout = num_heads // layout_heads
    for j in range(heads_per_layout):
        h = hl * heads_per_layout + j
        bh_q = b.to(tl.int64) * num_heads + h
        vertical = tl.load(LINES + bh_q * num_k_blocks + offs, mask=inb, other=0) != 0
        slash_base = LINES + (batch * num_heads + bh_q) * num_k_blocks
        slash = tl.load(slash_base + group, mask=inb & in_range, other=0) != 0
        cover_base = COVER + b.to(tl.int64) * stride_cb + h.to(tl.int64) * stride_ch + qb.to(tl.int64) * stride_cq
        covered = tl.load(cover_base + offs * stride_ck, mask=inb, other=0) != 0
        aware = tl.load(QUERY_AWARE + bh_q) != 0
        keep = keep | vertical | slash | (covered & aware)
    store_layout_row(KV_NUM, KV_IDX, tl.program_id(0), keep & allowed, offs, inb, num_k_blocks)


def _check(
    line_keep: torch.Tensor, coverage: torch.Tensor, query_aware: torch.Tensor, num_q_blocks: int, layout_heads: int
) -> None:
    if line_keep.dtype != torch.bool or line_keep.dim() != 4 or line_keep.shape[0] != 2:
        raise ValueError(f"line_keep: expected bool (2, B, H, Kb), got {line_keep.dtype} {tuple(line_keep.shape)}")
    batch, num_heads, num_k_blocks = line_keep.shape[1:]
    if coverage.dtype != torch.bool or tuple(coverage.shape) != (batch, num_heads, num_q_blocks, num_k_blocks):
        raise ValueError(
            f"coverage: expected bool {(batch, num_heads, num_q_blocks, num_k_blocks)}, "
            f"got {coverage.dtype} {tuple(coverage.shape)}"
        )
    if query_aware.dtype != torch.bool or tuple(query_aware.shape) != (batch, num_heads):
        raise ValueError(
            f"query_aware: expected bool {(batch, num_heads)}, got {query_aware.dtype} {tuple(query_aware.shape)}"
        )
    if layout_heads < 1 or num_heads % layout_heads:
        raise ValueError(f"layout_heads: expected a divisor of {num_heads} (query heads), got {layout_heads}")


def flexprefill_layout_reference(
    line_keep: torch.Tensor,
    coverage: torch.Tensor,
    query_aware: torch.Tensor,
    *,
    seq_len_q: int,
    seq_len_k: int,
    block: int,
    layout_heads: int,
) -> BlockLayout:
    """The PyTorch path: the bool mask of steps 6 to 8, its union over GQA groups, :meth:`BlockLayout.from_dense`.

    Args:
        line_keep: bool ``(2, B, H, Kb)``: the kept vertical key blocks, then the kept diagonal groups (group ``g``
            is ``g - last_diag`` key blocks from each row block's diagonal block).
        coverage: bool ``(B, H, Qb, Kb)`` (any strides): the blocks the query-aware branch covers.
        query_aware: bool ``(B, H)``: heads whose covered blocks are kept.
        seq_len_q, seq_len_k, block: the geometry (square blocks, causal, bottom-right aligned).
        layout_heads: ``H`` (a layout per query head) or the number of KV heads (the union over each group).

    Returns:
        A :class:`BlockLayout` with ``kv_num_blocks (B, layout_heads, Qb)`` and ``kv_indices (..., Kb)`` int32.
    """
    num_q_blocks = -(-seq_len_q // block)
    _check(line_keep, coverage, query_aware, num_q_blocks, layout_heads)
    batch, num_heads, num_k_blocks = line_keep.shape[1:]
    device = line_keep.device
    allowed, forced = sel.selection_geometry(seq_len_q, seq_len_k, (block, block), device=device)
    group, in_range, _ = slash_geometry(seq_len_q, seq_len_k, block, str(device))
    mask = line_keep[0][:, :, None, :] & allowed
    picked = line_keep[1].gather(-1, group.expand(batch, num_heads, -1))
    mask |= picked.view(batch, num_heads, num_q_blocks, num_k_blocks) & in_range
    mask |= coverage & allowed & query_aware[:, :, None, None]
    mask = (mask | forced) & allowed
    if layout_heads != num_heads:
        mask = sel.group_heads(mask, layout_heads)
    return sel.to_layout(mask, seq_len_q, seq_len_k, (block, block))


def flexprefill_layout_triton(
    line_keep: torch.Tensor,
    coverage: torch.Tensor,
    query_aware: torch.Tensor,
    *,
    seq_len_q: int,
    seq_len_k: int,
    block: int,
    layout_heads: int,
) -> BlockLayout:
    """Triton version of :func:`flexprefill_layout_reference` (same arguments, the same layout); rows of at most
    :data:`MAX_KEY_BLOCKS` key blocks."""
    num_q_blocks = -(-seq_len_q // block)
    _check(line_keep, coverage, query_aware, num_q_blocks, layout_heads)
    batch, num_heads, num_k_blocks = line_keep.shape[1:]
    if num_k_blocks > MAX_KEY_BLOCKS:
        raise ValueError(f"line_keep: expected at most {MAX_KEY_BLOCKS} key blocks, got {num_k_blocks}")
    device = line_keep.device
    allowed, forced = sel.selection_geometry(seq_len_q, seq_len_k, (block, block), device=device)
    group, in_range, _ = slash_geometry(seq_len_q, seq_len_k, block, str(device))
    kv_num = torch.empty(batch, layout_heads, num_q_blocks, dtype=torch.int32, device=device)
    kv_idx = torch.empty(batch, layout_heads, num_q_blocks, num_k_blocks, dtype=torch.int32, device=device)
    rows = batch * layout_heads * num_q_blocks
    cover = coverage.view(torch.uint8)
    block_k = max(16, triton.next_power_of_2(num_k_blocks))
    if rows:
        _flexprefill_layout_kernel[(rows,)](
            line_keep.contiguous().view(torch.uint8),
            cover,
            query_aware.contiguous().view(torch.uint8),
            allowed.view(torch.uint8),
            forced.view(torch.uint8),
            in_range.view(torch.uint8),
            group,
            kv_num,
            kv_idx,
            batch,
            num_heads,
            layout_heads,
            num_q_blocks,
            num_k_blocks,
            *cover.stride(),
            BLOCK_K=block_k,
            num_warps=4 if block_k <= 1024 else 8,
        )
    return BlockLayout(kv_num, kv_idx, seq_len_q, seq_len_k, (block, block))


def flexprefill_layout(
    line_keep: torch.Tensor,
    coverage: torch.Tensor,
    query_aware: torch.Tensor,
    *,
    seq_len_q: int,
    seq_len_k: int,
    block: int,
    layout_heads: int,
    backend: str = "auto",
) -> BlockLayout:
    """:func:`flexprefill_layout_reference` or, with the Triton backend and rows that fit, its kernel."""
    args = dict(seq_len_q=seq_len_q, seq_len_k=seq_len_k, block=block, layout_heads=layout_heads)
    if check_backend(backend, line_keep.device) == "triton" and line_keep.shape[-1] <= MAX_KEY_BLOCKS:
        return flexprefill_layout_triton(line_keep, coverage, query_aware, **args)
    return flexprefill_layout_reference(line_keep, coverage, query_aware, **args)
