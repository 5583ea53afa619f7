"""Gamma coverage of long rows without sorting: the largest entries whose running sum stays ``<= target``.

The rule (FlexPrefill's ``score_cover_topk`` and its global block coverage) is
:func:`cover_select_reference` (the sort path; the CPU path and the test oracle): per row, sort the entries
descending (stably: equal entries by increasing position), take the cumulative sums ``S_1 <= S_2 <= ...`` and
*cover* entry ``m`` iff ``S_m <= target``; the covered entries are a prefix of the sorted row, ``count`` is its
length (the entry that crosses ``target`` is not covered; FlexPrefill's budget is ``count + 1``).

:func:`cover_select_triton` finds the same prefix by its cut value instead of sorting. With ``G(x)`` the mass of
the entries strictly above ``x`` (non-increasing in ``x``), the cut ``c`` is the smallest ``x >= 0`` with
``G(x) <= target``: every entry above ``c`` is covered, none below, and the row's entries equal to ``c`` (the tie)
are covered while the running sum allows, ``r = min(floor((target - G(c)) / c), t - 1)`` of the ``t`` tied entries
(all of them when ``c = 0``). ``c`` is searched over the bit patterns of non-negative float32 values (their integer
order is their value order) most significant digit first, a radix select of 8 digits of 4 bits: launch ``j``
takes a 16-bin histogram of entry mass over digit ``j`` among the entries whose higher digits match the cut's, one
program per chunk of a row (a row of 64K or 262K entries is far too long for one program to pass over 32 times),
and the next launch reads the row's histograms to fix digit ``j``: the smallest bin whose mass, plus the mass of
the higher bins and of the entries above, is ``<= target``. A last launch fixes digit 7 and writes ``count``
and the covered mask. No sort, no cumsum over the row, no host synchronisation; 9 launches whatever the length.

**Tie rule.** Of the entries equal to the cut value, the ``r`` with the lowest positions are covered, exactly what
the stable sort takes; ``count`` does not depend on which. So the result equals the sort path's whenever the
values at the cut are distinct (then ``r = 0``), and equals the stable sort path's with ties too.

Differences from the sort path: the sums are added in another order (the sort path's own order differs between
the CPU's sequential cumsum and the GPU's scan), so a row whose running sum at the cut equals ``target`` to
float32 rounding may cover other entries there. That is rare for ``target`` below the row's mass; at ``target``
equal to it (``gamma = 1`` on a distribution) the tail of entries smaller than the sum's rounding is covered or
not by rounding alone, in either path. Values must be non-negative (probabilities): negative entries count as 0
here, where the sort path lets them lower the running sum. NaN and ``+inf`` are handled as the sort path handles
them: they sort first and make every later running sum NaN or ``+inf``, so a row holding a NaN covers nothing
(``count = 0``), nor does a row holding ``+inf`` unless ``target`` is ``+inf``; a negative or NaN target covers
nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparseflash._validate import check_backend, check_tensor

CHUNK = 8192  # entries of a row per program (a power of two, a multiple of SUB)
SUB = 256  # entries per loop step: a (SUB, 16) one-hot tile
CHUNK_TILE = 32  # chunks' histograms read per step when a row's histograms are summed
NUM_ROUNDS = 8  # 32 key bits, 4 per round (the sign bit is 0: the first round has 8 populated bins)
_LAST_ROUND = tl.constexpr(NUM_ROUNDS - 1)


@triton.jit
def _row_histogram(PTR, num_chunks, CHUNK_TILE: tl.constexpr):
    """Sum over a row's chunks of their 16-bin histograms stored at ``PTR`` as (num_chunks, 16): (16,)."""
    bins = tl.arange(0, 16)
    tiles = tl.arange(0, CHUNK_TILE)
    acc = tl.zeros([CHUNK_TILE, 16], dtype=PTR.dtype.element_ty)
    for start in range(0, num_chunks, CHUNK_TILE):
        ch = start + tiles
        acc += tl.load(PTR + ch[:, None].to(tl.int64) * 16 + bins[None, :], mask=ch[:, None] < num_chunks, other=0)
    return tl.sum(acc, axis=0)


@triton.jit
def _pick_digit(prefix, above, sums, target):
    """The next digit of the cut: the smallest bin ``d`` with ``above + mass(bins > d) <= target``.

    Returns the cut's key prefix with the digit appended, the mass above the new prefix's range, and the digit.
    Bin 15 when no bin qualifies (a negative or NaN target: the row is marked as covering nothing).
    """
    bins = tl.arange(0, 16)
    higher = tl.sum(tl.where(bins[None, :] > bins[:, None], sums[None, :], 0.0), axis=1)  # mass of bins > d
    mass = above + higher
    digit = tl.min(tl.where(mass <= target, bins, 15), axis=0)
    new_above = tl.sum(tl.where(bins == digit, mass, 0.0), axis=0)
    return prefix * 16 + digit, new_above, digit


@triton.jit
def _program_row(TARGET, target_scalar, PER_ROW: tl.constexpr):
    """This program's ``(row, chunk, target)``: grid ``(rows, chunks)``, the target per row or one for all."""
    row = tl.program_id(0)
    if PER_ROW:
        target = tl.load(TARGET + row)
    else:
        target = target_scalar
    return row, tl.program_id(1), target


@triton.jit(do_not_specialize=["rnd"])
def _cover_round_kernel(
    X,  # (R, N) float, any strides
    TARGET,  # (R,) float32 per-row targets (PER_ROW) or unused
    SUMS,  # (NUM_ROUNDS, R, C, 16) float32: per round, row and chunk the mass per digit
    COUNTS,  # (R, C, 16) int32: last round, entries per digit
    NGT,  # (R, C) int32: last round, entries above the prefix's range
    BAD,  # (R, C) int32: 2 if the chunk holds a NaN, else 1 if a +inf, else 0
    PREFIX,  # (NUM_ROUNDS, R) int32: the cut's key prefix after round j's digit (j digits)
    ABOVE,  # (NUM_ROUNDS, R) float32: the mass above that prefix's range
    target_scalar,
    num_rows,
    num_cols,
    num_chunks,
    stride_xr,
    stride_xc,
    rnd,
    PER_ROW: tl.constexpr,
    LAST: tl.constexpr,
    CHUNK: tl.constexpr,
    SUB: tl.constexpr,
    CHUNK_TILE: tl.constexpr,
):
    """Round ``rnd``: fix digit ``rnd - 1`` of the cut from the previous histograms, histogram digit ``rnd``."""
    row, chunk, target = _program_row(TARGET, target_scalar, PER_ROW)
    row64 = row.to(tl.int64)
    prefix = row * 0
    above = tl.zeros([], dtype=tl.float32)
    if rnd > 0:
        state = (rnd - 1) * num_rows + row
        sums = _row_histogram(SUMS + (state.to(tl.int64) * num_chunks) * 16, num_chunks, CHUNK_TILE)
        prefix, above, _ = _pick_digit(tl.load(PREFIX + state), tl.load(ABOVE + state), sums, target)
    if chunk == 0:
        tl.store(PREFIX + rnd * num_rows + row, prefix)
        tl.store(ABOVE + rnd * num_rows + row, above)
    shift = 28 - 4 * rnd
    bins = tl.arange(0, 16)
    acc = tl.zeros([SUB, 16], dtype=tl.float32)
    cnt = tl.zeros([SUB, 16], dtype=tl.int32)
    ngt = tl.zeros([SUB], dtype=tl.int32)
    bad = tl.zeros([SUB], dtype=tl.int32)
    start = chunk.to(tl.int64) * CHUNK
    stop = tl.minimum(start + CHUNK, num_cols)
    base = X + row64 * stride_xr
    for lo in range(start, stop, SUB):
        offs = lo + tl.arange(0, SUB)
        inb = offs < stop
        raw = tl.load(base + offs * stride_xc, mask=inb, other=0.0).to(tl.float32)
        bad = tl.maximum(bad, tl.where(raw != raw, 2, tl.where(raw == float("inf"), 1, 0)))
        value = tl.where(raw > 0.0, raw, 0.0)  # negatives, -0 and NaN count as +0
        key = value.to(tl.int32, bitcast=True)  # non-negative: integer order is value order
        high = key >> shift
        digit = tl.where(inb & ((high >> 4) == prefix), high & 15, 16)  # 16: outside the prefix's range
        if tl.min(digit, axis=0) < 16:
            hit = digit[:, None] == bins[None, :]
            acc += tl.where(hit, value[:, None], 0.0)
            if LAST:
                cnt += hit.to(tl.int32)
        if LAST:
            ngt += (inb & ((high >> 4) > prefix)).to(tl.int32)
    out = (rnd * num_rows + row64) * num_chunks + chunk
    tl.store(SUMS + out * 16 + bins, tl.sum(acc, axis=0))
    tl.store(BAD + row64 * num_chunks + chunk, tl.max(bad, axis=0))
    if LAST:
        tl.store(COUNTS + (row64 * num_chunks + chunk) * 16 + bins, tl.sum(cnt, axis=0))
        tl.store(NGT + row64 * num_chunks + chunk, tl.sum(ngt, axis=0))


@triton.jit
def _cover_write_kernel(
    X,
    TARGET,
    SUMS,
    COUNTS,
    NGT,
    BAD,
    PREFIX,
    ABOVE,
    COUNT_OUT,  # (R,) int64
    KEEP,  # (R, N) uint8 contiguous
    target_scalar,
    num_rows,
    num_cols,
    num_chunks,
    stride_xr,
    stride_xc,
    PER_ROW: tl.constexpr,
    CHUNK: tl.constexpr,
    SUB: tl.constexpr,
    CHUNK_TILE: tl.constexpr,
):
    """Fix the last digit: the cut ``c``, the tie share ``r``; write ``count`` and the covered mask of a chunk."""
    row, chunk, target = _program_row(TARGET, target_scalar, PER_ROW)
    row64 = row.to(tl.int64)
    state = _LAST_ROUND * num_rows + row
    sums = _row_histogram(SUMS + (state.to(tl.int64) * num_chunks) * 16, num_chunks, CHUNK_TILE)
    cut, above, digit = _pick_digit(tl.load(PREFIX + state), tl.load(ABOVE + state), sums, target)
    counts = _row_histogram(COUNTS + row64 * num_chunks * 16, num_chunks, CHUNK_TILE)
    bins = tl.arange(0, 16)
    ties = tl.sum(tl.where(bins == digit, counts, 0), axis=0)
    n_above = tl.sum(tl.where(bins > digit, counts, 0), axis=0)
    ties_before = ties * 0
    bad = ties * 0
    tiles = tl.arange(0, CHUNK_TILE)
    for lo in range(0, num_chunks, CHUNK_TILE):
        ch = lo + tiles
        inside = ch < num_chunks
        n_above += tl.sum(tl.load(NGT + row64 * num_chunks + ch, mask=inside, other=0), axis=0)
        bad = tl.maximum(bad, tl.max(tl.load(BAD + row64 * num_chunks + ch, mask=inside, other=0), axis=0))
        before = tl.load(COUNTS + (row64 * num_chunks + ch) * 16 + digit, mask=inside & (ch < chunk), other=0)
        ties_before += tl.sum(before, axis=0)
    # the sort path covers nothing after a NaN, nor after a +inf unless the target is +inf too
    bad = (bad == 2) | ((bad == 1) & (target < float("inf"))) | ~(target >= 0.0)
    # tied entries the running sum still allows: floor((target - G(c)) / c), at most ties - 1 (all of them at c = 0)
    cut_value = tl.where(cut > 0, cut, 1).to(tl.float32, bitcast=True)
    rest = target - above
    most = tl.maximum(ties - 1, 0).to(tl.float32)
    share = tl.where(rest >= most * cut_value, most, tl.floor(tl.minimum(rest, most * cut_value) / cut_value))
    taken = tl.where(cut > 0, tl.maximum(share, 0.0).to(tl.int32), ties)
    if chunk == 0:
        tl.store(COUNT_OUT + row, tl.where(bad, 0, n_above + taken).to(tl.int64))
    start = chunk.to(tl.int64) * CHUNK
    base = X + row64 * stride_xr
    running = ties_before
    stop = tl.minimum(start + CHUNK, num_cols)
    for lo in range(start, stop, SUB):
        offs = lo + tl.arange(0, SUB)
        inb = offs < stop
        raw = tl.load(base + offs * stride_xc, mask=inb, other=0.0).to(tl.float32)
        key = tl.where(raw > 0.0, raw, 0.0).to(tl.int32, bitcast=True)
        tie = inb & (key == cut)
        rank = running + tl.cumsum(tie.to(tl.int32), axis=0) - 1
        keep = inb & ((key > cut) | (tie & (rank < taken))) & ~bad
        tl.store(KEEP + row64 * num_cols + offs, keep.to(tl.uint8), mask=inb)
        running += tl.sum(tie.to(tl.int32), axis=0)


def _check_args(values: torch.Tensor, target: float | torch.Tensor) -> float | torch.Tensor:
    """Validate; return the target as a float or as float32 ``(R,)`` on ``values``' device."""
    check_tensor("values", values, ndim=2)
    if not values.is_floating_point():
        raise TypeError(f"values: expected a floating-point tensor, got {values.dtype}")
    rows = values.shape[0]
    if isinstance(target, torch.Tensor):
        if not target.is_floating_point() or target.numel() != rows or target.dim() > 1:
            raise ValueError(f"target: expected a float or a float tensor of {rows} values, got {tuple(target.shape)}")
        return target.to(device=values.device, dtype=torch.float32).reshape(rows)
    if isinstance(target, bool) or not isinstance(target, (int, float)):
        raise TypeError(f"target: expected a float or a tensor, got {type(target).__name__}")
    return float(target)


def cover_select_reference(values: torch.Tensor, target: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The sort path: per row, a stable descending sort, its cumulative sums, covered where ``<= target``.

    Args:
        values: ``(R, N)`` float, non-negative in the intended use (any float dtype and strides; summed in float32).
        target: a float, or float ``(R,)``: the mass the covered entries may reach (compared in float32).

    Returns:
        ``count`` int64 ``(R,)``, the covered prefix's length, and ``keep`` bool ``(R, N)``, the covered entries.
    """
    target = _check_args(values, target)
    sorted_s, order = torch.sort(values.float(), dim=-1, descending=True, stable=True)
    covered = sorted_s.cumsum(-1) <= (target[:, None] if isinstance(target, torch.Tensor) else target)
    keep = torch.zeros_like(covered).scatter_(-1, order, covered)
    return covered.sum(-1), keep


def cover_select_triton(
    values: torch.Tensor, target: float | torch.Tensor, *, chunk: int = CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`cover_select_reference` (the same results but for float rounding of the sums; the
    tie rule in the module docstring).

    Args:
        values, target: as :func:`cover_select_reference`; ``values`` on a device Triton runs on.
        chunk: entries of a row per program, a power of two ``>= 256`` (default 8192; tests use small ones).
    """
    target = _check_args(values, target)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < SUB or chunk & (chunk - 1):
        raise ValueError(f"chunk: expected a power of two >= {SUB}, got {chunk!r}")
    rows, cols = values.shape
    device = values.device
    count = torch.empty(rows, dtype=torch.int64, device=device)
    keep = torch.empty(rows, cols, dtype=torch.bool, device=device)
    if rows == 0 or cols == 0:
        return count.zero_(), keep
    num_chunks = triton.cdiv(cols, chunk)
    sums = torch.empty(NUM_ROUNDS, rows, num_chunks, 16, dtype=torch.float32, device=device)
    counts = torch.empty(rows, num_chunks, 16, dtype=torch.int32, device=device)
    small = torch.empty(2, rows, num_chunks, dtype=torch.int32, device=device)  # NGT, BAD
    prefix = torch.empty(NUM_ROUNDS, rows, dtype=torch.int32, device=device)
    above = torch.empty(NUM_ROUNDS, rows, dtype=torch.float32, device=device)
    per_row = isinstance(target, torch.Tensor)
    scalar = 0.0 if per_row else target
    args = (values, target if per_row else above, sums, counts, small[0], small[1], prefix, above)  # unused: above
    dims = (rows, cols, num_chunks, values.stride(0), values.stride(1))
    meta = dict(PER_ROW=per_row, CHUNK=chunk, SUB=SUB, CHUNK_TILE=CHUNK_TILE, num_warps=4)
    grid = (rows, num_chunks)
    for rnd in range(NUM_ROUNDS):
        _cover_round_kernel[grid](*args, scalar, *dims, rnd, LAST=rnd == NUM_ROUNDS - 1, **meta)
    _cover_write_kernel[grid](*args, count, keep.view(torch.uint8), scalar, *dims, **meta)
    return count, keep


def cover_select(
    values: torch.Tensor, target: float | torch.Tensor, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Covered prefix per row (:func:`cover_select_reference`); ``backend`` 'auto' (Triton on CUDA, the sort path
    on the CPU), 'triton' or 'torch'."""
    check_tensor("values", values, ndim=2)
    if check_backend(backend, values.device) == "triton":
        return cover_select_triton(values, target)
    return cover_select_reference(values, target)
