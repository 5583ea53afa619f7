"""Cumulative-mass selection straight into a :class:`BlockLayout`: one Triton kernel, no sort (issue 14).

The rule is :func:`sparseflash.patterns.selection.select_by_cumulative_mass` followed by
:meth:`BlockLayout.from_dense` (that pair is the reference, and the CPU path): per row of block scores, the forced
entries are kept and their mass counted first, then the other allowed entries by decreasing score while the mass
before them is below ``threshold x`` the row's allowed mass (the crossing entry kept), then ``extra`` more.

Instead of sorting each row, the kernel searches the cut value: the mass of the entries strictly above a value
``x``, ``G(x)``, falls as ``x`` rises, and an entry of score ``v`` is kept iff ``acc + G(v) < threshold * total``.
So the kept entries are those at or above the smallest ``x`` with ``acc + G(x) < threshold * total``, found by a
bisection over the bit patterns of nonnegative float32 values (their integer order is their value order): 31 steps
give the exact cut, each a masked sum over the row held in registers. Then the row is written in the layout's
format (kept key blocks ascending, then the dropped ones ascending; the count in ``kv_num_blocks``) with a prefix
sum, so the bool ``(B, H, Qb, Kb)`` mask, the sort and the compression pass of the PyTorch path never exist.

Differences from the reference: entries tied at the cut value are all kept (the sort keeps an arbitrary subset
of a tie that straddles the threshold), and the row sums are accumulated in another order, so a row whose mass
before an entry equals ``threshold * total`` to float32 rounding may keep one entry more or less.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparseflash.layouts.block import BlockLayout
from sparseflash.patterns.row_kernels import layout_row, mass_cut, store_layout_row

MAX_KEY_BLOCKS = 16384  # a row of key blocks held in registers (2M tokens at 128-token blocks); longer: PyTorch


@triton.jit
def _mass_select_kernel(
    SCORES,  # (B, H, Qb, Kb) float, any strides
    THR,  # (H,) float32 per-head thresholds (PER_HEAD) or unused
    ALLOWED,  # (Qb, Kb) uint8 contiguous
    FORCED,  # (Qb, Kb) uint8 contiguous
    KV_NUM,  # (B, H, Qb) int32 contiguous
    KV_IDX,  # (B, H, Qb, Kb) int32 contiguous
    thr_scalar,
    num_heads,
    num_q_blocks,
    num_k_blocks,
    stride_sb,
    stride_sh,
    stride_sq,
    stride_sk,
    PER_HEAD: tl.constexpr,
    EXTRA: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    b, h, qb, offs, inb = layout_row(num_q_blocks, num_heads, num_k_blocks, BLOCK_K)
    ptrs = SCORES + b.to(tl.int64) * stride_sb + h.to(tl.int64) * stride_sh + qb.to(tl.int64) * stride_sq
    s = tl.load(ptrs + offs.to(tl.int64) * stride_sk, mask=inb, other=0.0).to(tl.float32)
    geo = qb.to(tl.int64) * num_k_blocks + offs
    allowed = (tl.load(ALLOWED + geo, mask=inb, other=0) != 0) & inb
    forced = (tl.load(FORCED + geo, mask=inb, other=0) != 0) & allowed
    s = tl.where(allowed & (s == s), tl.maximum(s, 0.0), 0.0)  # NaN and outside allowed: no mass, never kept
    total = tl.sum(s, axis=0)
    acc = tl.sum(tl.where(forced, s, 0.0), axis=0)
    rest = tl.where(forced, 0.0, s)
    if PER_HEAD:
        thr = tl.load(THR + h)
    else:
        thr = thr_scalar
    target = thr * total
    cut = mass_cut(rest, acc, target)  # smallest x with acc + G(x) < target, G(x) = mass of the rest above x
    cut = tl.where(acc < target, cut, float("inf"))  # forced mass reaches the target: nothing else
    for _ in range(EXTRA):  # the next-largest positive entry below the cut (a tie: all of it)
        nxt = tl.max(tl.where((rest < cut) & (rest > 0.0), rest, -1.0), axis=0)
        cut = tl.where(nxt > 0.0, nxt, cut)
    keep = forced | ((rest >= cut) & (rest > 0.0))
    store_layout_row(KV_NUM, KV_IDX, tl.program_id(0), keep, offs, inb, num_k_blocks)


def mass_select_layout_reference(
    scores: torch.Tensor,
    threshold: float | torch.Tensor,
    allowed: torch.Tensor,
    forced: torch.Tensor,
    *,
    extra: int,
    seq_len_q: int,
    seq_len_k: int,
    block_size: tuple[int, int],
) -> BlockLayout:
    """The PyTorch path: :func:`~sparseflash.patterns.selection.select_by_cumulative_mass` then the layout."""
    from sparseflash.patterns.selection import select_by_cumulative_mass

    keep = select_by_cumulative_mass(scores, threshold, allowed, forced=forced, extra=extra)
    return BlockLayout.from_dense(keep.contiguous(), seq_len_q=seq_len_q, seq_len_k=seq_len_k, block_size=block_size)


def _as_bytes(mask: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A bool mask as contiguous uint8 on ``device`` (a view when it already is contiguous there)."""
    mask = mask.to(device=device).contiguous()
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask.to(torch.uint8)


def fused_selection_fits(scores: torch.Tensor, threshold: float | torch.Tensor) -> bool:
    """Whether :func:`mass_select_layout_triton` takes these: ``(B, H, Qb, Kb)`` scores with ``Kb`` at most
    :data:`MAX_KEY_BLOCKS`, a float threshold or one per head (``(H,)`` or ``(H, 1)``)."""
    if scores.dim() != 4 or scores.shape[-1] > MAX_KEY_BLOCKS:
        return False
    if isinstance(threshold, torch.Tensor):
        return threshold.numel() == scores.shape[1] and threshold.dim() <= 2 and threshold.shape[0] == scores.shape[1]
    return True


def mass_select_layout_triton(
    scores: torch.Tensor,
    threshold: float | torch.Tensor,
    allowed: torch.Tensor,
    forced: torch.Tensor,
    *,
    extra: int,
    seq_len_q: int,
    seq_len_k: int,
    block_size: tuple[int, int],
) -> BlockLayout:
    """Triton version of :func:`mass_select_layout_reference` (same layout; ties at the cut all kept, see the
    module docstring).

    Args:
        scores: ``(B, H, Qb, Kb)`` nonnegative block scores, any float dtype and strides.
        threshold: a float in ``[0, 1]`` or one per query head, ``(H,)`` or ``(H, 1)``.
        allowed, forced: bool ``(Qb, Kb)`` (:func:`~sparseflash.patterns.selection.selection_geometry`).
        extra: next-best entries kept per row after the threshold, ``>= 0``.
        seq_len_q, seq_len_k, block_size: the layout's geometry.

    Returns:
        A :class:`BlockLayout` with ``kv_num_blocks (B, H, Qb)`` and ``kv_indices (B, H, Qb, Kb)`` int32.
    """
    if not fused_selection_fits(scores, threshold):
        raise ValueError(
            f"scores: expected (B, H, Qb, Kb) with Kb <= {MAX_KEY_BLOCKS} and a float or per-head threshold, "
            f"got {tuple(scores.shape)}"
        )
    batch, num_heads, num_q_blocks, num_k_blocks = scores.shape
    if tuple(allowed.shape) != (num_q_blocks, num_k_blocks) or tuple(forced.shape) != (num_q_blocks, num_k_blocks):
        raise ValueError(
            f"allowed/forced: expected ({num_q_blocks}, {num_k_blocks}), got {tuple(allowed.shape)} and "
            f"{tuple(forced.shape)}"
        )
    device = scores.device
    per_head = isinstance(threshold, torch.Tensor)
    thr = threshold.to(device=device, dtype=torch.float32).reshape(num_heads).contiguous() if per_head else None
    kv_num = torch.empty(batch, num_heads, num_q_blocks, dtype=torch.int32, device=device)
    kv_idx = torch.empty(batch, num_heads, num_q_blocks, num_k_blocks, dtype=torch.int32, device=device)
    block = max(16, triton.next_power_of_2(num_k_blocks))
    rows = batch * num_heads * num_q_blocks
    if rows:
        _mass_select_kernel[(rows,)](
            scores,
            thr if per_head else kv_num,  # unused pointer when the threshold is a scalar
            _as_bytes(allowed, device),
            _as_bytes(forced, device),
            kv_num,
            kv_idx,
            0.0 if per_head else float(threshold),
            num_heads,
            num_q_blocks,
            num_k_blocks,
            *scores.stride(),
            PER_HEAD=per_head,
            EXTRA=int(extra),
            BLOCK_K=block,
            num_warps=4 if block <= 1024 else 8,
        )
    return BlockLayout(kv_num, kv_idx, seq_len_q, seq_len_k, tuple(block_size))
