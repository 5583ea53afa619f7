"""PBS-Attn's layout from its block probabilities in one kernel (step 3 of :mod:`sparseflash.patterns.pbs`).

Per query-block row ``I`` of a layout head, over the query heads ``h`` of that layout head (one, or the GQA group
with ``heads='kv'``: their union), the kept key blocks of ``K'`` are: the blocks of earlier segments taken by
decreasing probability while the mass before them is below ``threshold`` of the row's mass (the crossing block
kept, zero-mass blocks never: :func:`~sparseflash.patterns.selection.select_by_cumulative_mass`), the block holding
original token 0 when it lies in an earlier segment (``force_sink``), and the causal blocks of the row's own
segment. :func:`pbs_layout_reference` builds that bool ``(B, H, Qb, Kb)`` mask with PyTorch (a sort and a cumsum
per row) and compresses it (:meth:`BlockLayout.from_dense`: another sort).

:func:`pbs_layout_triton` holds each row in registers, one program per row: the kept blocks of a head are those
above the cut ``c``, the smallest float32 value (searched by bisection over the bit patterns of non-negative
values, 31 steps) whose mass strictly above is below the target; of the blocks equal to ``c`` the
``ceil((target - mass above c) / c)`` with the lowest indices are kept (**tie rule**: what a stable sort keeps;
with distinct values at the cut, exactly the sort path's blocks). The row is then written in the layout's format
(kept key blocks ascending, then the dropped ones ascending) with a prefix sum: no sort, no mask.

Differences from the sort path: the row sums are added in another order, so a row whose mass before a block equals
``threshold`` times the total to float32 rounding may keep one block more or less; the probabilities must be
finite (a NaN among the earlier blocks selects nothing there, as in the sort path).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from sparseflash._validate import check_backend
from sparseflash.layouts import BlockLayout, causal_block_mask
from sparseflash.patterns import selection as sel
from sparseflash.patterns.row_kernels import layout_row, mass_cut, store_layout_row

MAX_KEY_BLOCKS = 16384  # a row of key blocks held in registers (2M tokens at 128-token blocks); longer: PyTorch


@functools.lru_cache(maxsize=64)
def segment_geometry(
    seq_len: int, block: int, segment_size: int, device: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Made once per shape and device, **read-only** bool ``(Qb, Kb)``: blocks of earlier segments, blocks outside
    them, and the causal blocks of the query's own segment."""
    num_blocks = -(-seq_len // block)
    seg = torch.arange(num_blocks, device=device) // (segment_size // block)
    earlier = seg[None, :] < seg[:, None]
    allowed = causal_block_mask(seq_len, seq_len, (block, block), device=device)
    return earlier, ~earlier, (seg[None, :] == seg[:, None]) & allowed


@triton.jit
def _pbs_layout_kernel(
    PROBS,  # (B, H, Qb, Kb) float, any strides
    SINK,  # (B, H) int64 contiguous: the key block of K' holding token 0, or unused
    EARLIER,  # (Qb, Kb) uint8 contiguous
    OWN,  # (Qb, Kb) uint8 contiguous
    KV_NUM,  # (B, HL, Qb) int32 contiguous
    KV_IDX,  # (B, HL, Qb, Kb) int32 contiguous
    threshold,
    num_heads,
    layout_heads,
    num_q_blocks,
    num_k_blocks,
    stride_pb,
    stride_ph,
    stride_pq,
    stride_pk,
    FORCE_SINK: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    b, hl, qb, offs, inb = layout_row(num_q_blocks, layout_heads, num_k_blocks, BLOCK_K)  # hl: the layout head
    cell = qb.to(tl.int64) * num_k_blocks + offs
    earlier = (tl.load(EARLIER + cell, mask=inb, other=0) != 0) & inb
    keep = tl.load(OWN + cell, mask=inb, other=0) != 0
    heads_per_layout = num_heads // layout_heads
    for j in range(heads_per_layout):
        h = hl * heads_per_layout + j
        base = PROBS + b.to(tl.int64) * stride_pb + h.to(tl.int64) * stride_ph + qb.to(tl.int64) * stride_pq
        raw = tl.load(base + offs * stride_pk, mask=earlier, other=0.0).to(tl.float32)
        nan = tl.max((raw != raw).to(tl.int32), axis=0) > 0  # the sort path's total is NaN: nothing selected
        s = tl.where(raw > 0.0, raw, 0.0)
        target = threshold * tl.sum(s, axis=0)
        cut = mass_cut(s, 0.0, target)  # the smallest x >= 0 whose mass strictly above, G(x), is below the target
        above = tl.sum(tl.where(s > cut, s, 0.0), axis=0)
        tie = (s == cut) & (s > 0.0)
        ties = tl.sum(tie.to(tl.int32), axis=0)
        # tie rule: the j-th tied block (by index) is kept while above + (j - 1) * cut < target
        cut_value = tl.where(cut > 0.0, cut, 1.0)
        rest = target - above
        most = ties.to(tl.float32)
        share = tl.where(rest >= most * cut_value, most, tl.ceil(tl.minimum(rest, most * cut_value) / cut_value))
        rank = tl.cumsum(tie.to(tl.int32), axis=0) - 1
        picked = (s > cut) | (tie & (rank < share.to(tl.int32)))
        active = (target > 0.0) & ~nan  # a target of 0 (or NaN) selects nothing, as in the sort path
        keep = keep | tl.where(active, picked & (s > 0.0), False)
        if FORCE_SINK:
            keep = keep | ((offs == tl.load(SINK + b.to(tl.int64) * num_heads + h)) & earlier)
    store_layout_row(KV_NUM, KV_IDX, tl.program_id(0), keep, offs, inb, num_k_blocks)


def _check(probs: torch.Tensor, sink_block: torch.Tensor | None, layout_heads: int) -> None:
    if not isinstance(probs, torch.Tensor) or probs.dim() != 4 or not probs.is_floating_point():
        got = f"{probs.dtype} {tuple(probs.shape)}" if isinstance(probs, torch.Tensor) else type(probs).__name__
        raise ValueError(f"probs: expected a float tensor (B, H, Qb, Kb), got {got}")
    batch, num_heads = probs.shape[:2]
    if sink_block is not None and (sink_block.dtype != torch.int64 or tuple(sink_block.shape) != (batch, num_heads)):
        raise ValueError(
            f"sink_block: expected int64 {(batch, num_heads)} or None, got {sink_block.dtype} {tuple(sink_block.shape)}"
        )
    if layout_heads < 1 or num_heads % layout_heads:
        raise ValueError(f"layout_heads: expected a divisor of {num_heads} (query heads), got {layout_heads}")


def pbs_layout_reference(
    probs: torch.Tensor,
    threshold: float,
    sink_block: torch.Tensor | None,
    *,
    seq_len: int,
    block: int,
    segment_size: int,
    layout_heads: int,
) -> BlockLayout:
    """The PyTorch path: the bool mask of step 3, its union over GQA groups, :meth:`BlockLayout.from_dense`.

    Args:
        probs: ``(B, H, Qb, Kb)`` block probabilities over the earlier segments (finite, 0 elsewhere).
        threshold: the mass each row's selection reaches, in ``[0, 1]``.
        sink_block: int64 ``(B, H)``, the key block of ``K'`` holding token 0 (kept where it is earlier), or None.
        seq_len, block, segment_size: the geometry (square blocks, causal, ``segment_size`` a multiple of ``block``).
        layout_heads: ``H`` (a layout per query head) or the number of KV heads (the union over each group).

    Returns:
        A :class:`BlockLayout` with ``kv_num_blocks (B, layout_heads, Qb)`` and ``kv_indices (..., Kb)`` int32.
    """
    _check(probs, sink_block, layout_heads)
    num_blocks = probs.shape[-1]
    earlier, _, own = segment_geometry(seq_len, block, segment_size, str(probs.device))
    mask = sel.select_by_cumulative_mass(probs, threshold, earlier)
    if sink_block is not None:
        is_sink = torch.arange(num_blocks, device=probs.device) == sink_block[..., None]  # (B, H, Kb)
        mask |= is_sink[:, :, None, :] & earlier
    mask |= own
    if layout_heads != probs.shape[1]:
        mask = sel.group_heads(mask, layout_heads)
    return sel.to_layout(mask, seq_len, seq_len, (block, block))


def pbs_layout_triton(
    probs: torch.Tensor,
    threshold: float,
    sink_block: torch.Tensor | None,
    *,
    seq_len: int,
    block: int,
    segment_size: int,
    layout_heads: int,
) -> BlockLayout:
    """Triton version of :func:`pbs_layout_reference` (same arguments; the same layout but for float rounding of
    the row sums, tie rule in the module docstring); rows of at most :data:`MAX_KEY_BLOCKS` key blocks."""
    _check(probs, sink_block, layout_heads)
    batch, num_heads, num_q_blocks, num_k_blocks = probs.shape
    if num_k_blocks > MAX_KEY_BLOCKS:
        raise ValueError(f"probs: expected at most {MAX_KEY_BLOCKS} key blocks, got {num_k_blocks}")
    device = probs.device
    earlier, _, own = segment_geometry(seq_len, block, segment_size, str(device))
    kv_num = torch.empty(batch, layout_heads, num_q_blocks, dtype=torch.int32, device=device)
    kv_idx = torch.empty(batch, layout_heads, num_q_blocks, num_k_blocks, dtype=torch.int32, device=device)
    rows = batch * layout_heads * num_q_blocks
    block_k = max(16, triton.next_power_of_2(num_k_blocks))
    if rows:
        _pbs_layout_kernel[(rows,)](
            probs,
            kv_num if sink_block is None else sink_block.contiguous(),  # unused pointer without a sink
            earlier.view(torch.uint8),
            own.view(torch.uint8),
            kv_num,
            kv_idx,
            float(threshold),
            num_heads,
            layout_heads,
            num_q_blocks,
            num_k_blocks,
            *probs.stride(),
            FORCE_SINK=sink_block is not None,
            BLOCK_K=block_k,
            num_warps=4 if block_k <= 1024 else 8,
        )
    return BlockLayout(kv_num, kv_idx, seq_len, seq_len, (block, block))


def pbs_layout(
    probs: torch.Tensor,
    threshold: float,
    sink_block: torch.Tensor | None,
    *,
    seq_len: int,
    block: int,
    segment_size: int,
    layout_heads: int,
    backend: str = "auto",
) -> BlockLayout:
    """:func:`pbs_layout_reference` or, with the Triton backend and rows that fit, its kernel."""
    args = dict(seq_len=seq_len, block=block, segment_size=segment_size, layout_heads=layout_heads)
    if check_backend(backend, probs.device) == "triton" and probs.shape[-1] <= MAX_KEY_BLOCKS:
        return pbs_layout_triton(probs, threshold, sink_block, **args)
    return pbs_layout_reference(probs, threshold, sink_block, **args)
