"""Triton steps shared by the selection kernels that decide a layout row by row.

:mod:`~sparseflash.patterns.mass_select_kernel`, :mod:`~sparseflash.patterns.flexprefill_layout` and
:mod:`~sparseflash.patterns.pbs_layout` each decide, per layout row, a keep mask over its ``Kb`` key blocks
(:func:`layout_row` gives its position; the first and the last by a cumulative-mass cut, :func:`mass_cut`) and
store it as the
:class:`~sparseflash.layouts.BlockLayout` lists (:func:`store_layout_row`): ``kv_num_blocks[row]`` and
``kv_indices[row]`` with the kept blocks first in increasing order, then the dropped ones (the layout's padding
convention).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def layout_row(num_q_blocks, num_heads, num_k_blocks, BLOCK_K: tl.constexpr):
    """This program's layout row, rows flattened as ``(b, head, qb)`` with ``qb`` fastest: ``(b, head, qb, offs,
    inb)``, ``offs`` the block ids ``0..BLOCK_K-1`` and ``inb`` those inside the row's ``num_k_blocks``."""
    row = tl.program_id(0)
    qb = row % num_q_blocks
    bh = row // num_q_blocks
    offs = tl.arange(0, BLOCK_K)
    return bh // num_heads, bh % num_heads, qb, offs, offs < num_k_blocks


@triton.jit
def store_layout_row(KV_NUM, KV_IDX, row, keep, offs, inb, num_k_blocks):
    """Store one row's lists. keep, inb: [BLOCK_K] bool (kept; inside the row's ``num_k_blocks``), offs: [BLOCK_K]
    block ids ``0..BLOCK_K-1``; ``KV_NUM`` int32 (rows,), ``KV_IDX`` int32 (rows, num_k_blocks)."""
    keep = keep & inb
    kept = keep.to(tl.int32)
    num_kept = tl.sum(kept, axis=0)
    dropped = (inb & ~keep).to(tl.int32)
    pos = tl.where(keep, tl.cumsum(kept, axis=0) - 1, num_kept + tl.cumsum(dropped, axis=0) - 1)
    tl.store(KV_NUM + row, num_kept)
    tl.store(KV_IDX + row.to(tl.int64) * num_k_blocks + pos, offs, mask=inb)


@triton.jit
def mass_cut(values, acc, target):
    """The cut of a cumulative-mass selection without sorting: the smallest ``x >= 0`` with ``acc + G(x) < target``,
    ``G(x)`` the sum of the ``values`` strictly above ``x``; 0.0 when all of them fit (``acc + G(0) < target``).

    values: [BLOCK_K] float32, >= 0 (0 where not selectable). Found by bisection over the bit patterns of float32
    values (their integer order is their value order for ``x >= 0``): 31 masked sums, no sort.
    """
    hi = tl.max(values, axis=0).to(tl.int32, bitcast=True)  # G(max) = 0
    lo = hi * 0  # x = 0.0
    fits = acc + tl.sum(values, axis=0) < target
    for _ in range(31):
        mid = lo + (hi - lo) // 2
        ok = (acc + tl.sum(tl.where(values > mid.to(tl.float32, bitcast=True), values, 0.0), axis=0)) < target
        hi = tl.where(ok, mid, hi)
        lo = tl.where(ok, lo, mid)
    return tl.where(fits, 0.0, hi.to(tl.float32, bitcast=True))
