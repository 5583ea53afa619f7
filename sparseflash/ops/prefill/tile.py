"""One key tile of the prefill kernel (:mod:`.kernel`): the online-softmax step, optionally skipping the tile.

Symbols as in :mod:`.kernel`. Softmax in base 2 with the scale folded in (``qk_scale = scale * log2(e)``):
``m_i`` is each row's running maximum of ``qk * qk_scale``, ``l_i`` its running sum of ``exp2(. - m_i)``,
``acc`` the running ``P @ V``, all fp32.

In-kernel block skipping (``SKIP``, Block-Sparse FlashAttention's design, methods.md §2.5): after ``Q K^T`` of
an unmasked tile, when every stored row's tile maximum lies more than ``skip_thr`` (base 2) below its running
maximum, the tile is dropped: no V load, no ``P @ V``, and ``m_i``, ``l_i``, ``acc`` unchanged. A NaN row
maximum is never "below", so such a tile is kept. Masked tiles (causal diagonal, sequence end, padding) are
always computed. ``SKIP`` is a constexpr: without it the code is the kernel's plain step.

Two switches act on unmasked tiles only (masked tiles keep the exact step and pointer loads):

* ``USE_TMA`` (:mod:`.tma`): K and V come through tensor descriptors (``K_src``/``V_src``) instead of pointers.
* ``LAZY_RESCALE`` (FlashAttention-4): the running maximum ``m_i`` is raised, and ``acc``/``l_i`` rescaled, only
  when some row's tile maximum exceeds it by more than ``LAZY_THRESH`` (base 2), one program-wide branch;
  otherwise ``p = exp2(qk * qk_scale - m_i)`` against the stale ``m_i``, so ``p <= 2**LAZY_THRESH`` (256, far
  below fp16's 65504 for the ``P @ V`` operand) and ``acc``, ``l_i`` stay consistent with ``m_i``: ``acc / l_i``
  and ``lse = (m_i + log2 l_i) ln 2`` are exact up to rounding. The first tile (``m_i = -inf``) always takes
  the update. ``m_i`` is then at most ``LAZY_THRESH`` below the true running maximum, so a ``SKIP`` decision
  made against it would be more conservative than the exact one :mod:`.reference_skip` replays: the launcher
  turns ``LAZY_RESCALE`` off when skipping.

Token columns (:func:`_attend_gathered`): a tile of single keys gathered by position from a layout's column list,
always masked per pair, never skipped.
"""

from __future__ import annotations

import triton
import triton.language as tl

from sparseflash.ops.triton_common import guarded_pv

LAZY_THRESH: tl.constexpr = tl.constexpr(8.0)  # base 2: p <= 256 between lazy rescales


@triton.jit
def kv_sources(
    K_head, V_head, S_K, stride_ks, stride_vs, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, USE_TMA: tl.constexpr
):
    """What the unmasked tiles load K and V from: ``(S_K, BLOCK_D)`` tensor descriptors of the head with
    ``[BLOCK_N, BLOCK_D]`` boxes (``USE_TMA``), else the head's base pointers unchanged."""
    if USE_TMA:
        k_src = tl.make_tensor_descriptor(K_head, [S_K, BLOCK_D], [stride_ks, 1], [BLOCK_N, BLOCK_D])
        v_src = tl.make_tensor_descriptor(V_head, [S_K, BLOCK_D], [stride_vs, 1], [BLOCK_N, BLOCK_D])
    else:
        k_src = K_head
        v_src = V_head
    return k_src, v_src


@triton.jit
def _load_v(V_src, start_n, k_row, kv_ok, offs_d, d_ok, stride_vs, stride_vd, TMA: tl.constexpr):
    """V rows of the tile, ``[BLOCK_N, BLOCK_D]``: through the descriptor ``V_src`` (``TMA``) or by pointer."""
    if TMA:
        v = V_src.load([start_n, 0])
    else:
        v = tl.load(
            V_src + k_row[:, None] * stride_vs + offs_d[None, :] * stride_vd,
            mask=kv_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
    return v


@triton.jit
def _rescale_and_pv(
    acc, l_i, p, alpha, V_src, start_n, k_row, kv_ok, offs_d, d_ok, stride_vs, stride_vd, guard, TMA: tl.constexpr
):
    """``l_i`` and ``acc`` rescaled by ``alpha``, then ``acc += p @ V[tile]``; ``guard``: NaN-safe product."""
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    v = _load_v(V_src, start_n, k_row, kv_ok, offs_d, d_ok, stride_vs, stride_vd, TMA)  # [BLOCK_N, BLOCK_D]
    if guard:
        # a key some stored row of the tile does not attend (past its causal horizon, or any key for a padded
        # row) may hold NaN/inf: zero it so 0 * NaN never enters the product, and mark NaN the rows that do
        # attend a non-finite value
        acc = guarded_pv(acc, p, v)
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i


@triton.jit
def _lazy_step(
    acc, l_i, m_i, qk, m_tile, qk_scale, V_src, start_n, k_row, kv_ok, offs_d, d_ok, stride_vs, stride_vd, TMA
):
    """The lazy online-softmax step of an unmasked tile (``LAZY_RESCALE``, see the module): ``(acc, l_i, m_i)``."""
    # one branch for the program: a -inf m_i (first tile) gives +inf, always taken; a NaN row never takes it
    if tl.max(m_tile - m_i, 0) > LAZY_THRESH:
        m_new = tl.maximum(m_i, m_tile)
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha
        acc = acc * alpha[:, None]
        m_i = m_new
    p = tl.math.exp2(qk * qk_scale - m_i[:, None])  # <= 2**LAZY_THRESH
    l_i = l_i + tl.sum(p, 1)
    v = _load_v(V_src, start_n, k_row, kv_ok, offs_d, d_ok, stride_vs, stride_vd, TMA)
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_i


@triton.jit
def _masked_step(qk, kv_ok, row_ok, k_pos, q_pos, causal_offset, m_i, qk_scale, CAUSAL: tl.constexpr):
    """Online-softmax step of a tile that needs a mask: ``(p, alpha, m_new)``. Pairs outside the stored rows, the
    valid keys ``kv_ok`` and (``CAUSAL``) the bottom-right horizon get -inf; rows with nothing seen yet stay at 0."""
    ok = kv_ok[None, :] & row_ok[:, None]
    if CAUSAL:
        ok = ok & (k_pos[None, :] <= q_pos[:, None] + causal_offset)
    qk = tl.where(ok, qk * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    return p, alpha, m_new


@triton.jit
def _attend_tile(
    acc,
    l_i,
    m_i,
    q,
    K_src,
    V_src,
    start_n,
    q_pos,
    row_ok,
    seq_lo,
    seq_hi,
    guard_from,
    stride_ks,
    stride_kd,
    stride_vs,
    stride_vd,
    S_K,
    causal_offset,
    qk_scale,
    skip_thr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_SEQ_LENS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    OFFS_64: tl.constexpr,
    SKIP: tl.constexpr,
    USE_TMA: tl.constexpr = False,
    LAZY_RESCALE: tl.constexpr = False,
):
    """Key tile ``[start_n, start_n + BLOCK_N)``: returns ``(acc, l_i, m_i, skipped)``, skipped 0 or 1.

    ``K_src``/``V_src``: the head's K/V base pointers, or with ``USE_TMA`` (unmasked tiles only) its descriptors.
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_pos = start_n + offs_n  # [BLOCK_N]
    if OFFS_64:
        k_row = k_pos.to(tl.int64)
    else:
        k_row = k_pos
    d_ok = offs_d < HEAD_DIM
    if MASKED:
        kv_ok = k_pos < S_K
        if HAS_SEQ_LENS:  # padding is never loaded: whatever it holds cannot reach a row
            kv_ok = kv_ok & (k_pos >= seq_lo) & (k_pos < seq_hi)
    else:
        kv_ok = offs_n < BLOCK_N
    TMA: tl.constexpr = USE_TMA and not MASKED
    if TMA:
        k = tl.trans(K_src.load([start_n, 0]))  # [BLOCK_D, BLOCK_N]
    else:
        k = tl.load(
            K_src + offs_d[:, None] * stride_kd + k_row[None, :] * stride_ks,
            mask=d_ok[:, None] & kv_ok[None, :],
            other=0.0,
        )
    qk = tl.dot(q, k)  # [BLOCK_M, BLOCK_N] fp32
    skipped = 0
    if MASKED:
        p, alpha, m_new = _masked_step(qk, kv_ok, row_ok, k_pos, q_pos, causal_offset, m_i, qk_scale, CAUSAL)
        guard = start_n + BLOCK_N > guard_from
        acc, l_i = _rescale_and_pv(
            acc, l_i, p, alpha, V_src, start_n, k_row, kv_ok, offs_d, d_ok, stride_vs, stride_vd, guard, False
        )
        m_i = m_new
    else:
        m_tile = tl.max(qk, 1) * qk_scale  # [BLOCK_M]
        keep = 1  # a Python constant without SKIP: the branch below is resolved when compiling
        if SKIP:
            # kept unless every stored row is below (the first tile, m_i = -inf, never is; NaN is never below)
            keep = tl.max((row_ok & ~(m_tile < m_i - skip_thr)).to(tl.int32), 0)
        if keep > 0:
            if LAZY_RESCALE:
                acc, l_i, m_i = _lazy_step(
                    acc,
                    l_i,
                    m_i,
                    qk,
                    m_tile,
                    qk_scale,
                    V_src,
                    start_n,
                    k_row,
                    kv_ok,
                    offs_d,
                    d_ok,
                    stride_vs,
                    stride_vd,
                    TMA,
                )
            else:
                m_new = tl.maximum(m_i, m_tile)
                p = tl.math.exp2(qk * qk_scale - m_new[:, None])
                alpha = tl.math.exp2(m_i - m_new)
                acc, l_i = _rescale_and_pv(
                    acc, l_i, p, alpha, V_src, start_n, k_row, kv_ok, offs_d, d_ok, stride_vs, stride_vd, False, TMA
                )
                m_i = m_new
        skipped = 1 - keep
    return acc, l_i, m_i, skipped


@triton.jit
def _attend_gathered(
    acc,
    l_i,
    m_i,
    q,
    K_head,
    V_head,
    col_row,
    start_c,
    n_cols,
    stride_ck,
    q_pos,
    row_ok,
    seq_lo,
    seq_hi,
    guard_from,
    stride_ks,
    stride_kd,
    stride_vs,
    stride_vd,
    S_K,
    causal_offset,
    qk_scale,
    CAUSAL: tl.constexpr,
    HAS_SEQ_LENS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    OFFS_64: tl.constexpr,
):
    """Token columns ``[start_c, start_c + BLOCK_N)`` of a query block's column list ``col_row`` (``n_cols``
    used): their K/V rows are gathered (one pointer per key) into one tile, masked per (row, key) pair like the
    masked path of :func:`_attend_tile` (causal, sequence ends, slots past ``n_cols``). Returns ``(acc, l_i, m_i)``.

    The NaN guard of the product is on when a gathered key lies at or past ``guard_from`` (a key some stored row
    does not attend); a non-finite key is masked to -inf for the rows that skip it.
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    slot = start_c + offs_n
    kv_ok = slot < n_cols
    k_pos = tl.load(col_row + slot * stride_ck, mask=kv_ok, other=0)  # [BLOCK_N] gathered key positions
    kv_ok = kv_ok & (k_pos >= 0) & (k_pos < S_K)
    if HAS_SEQ_LENS:  # padding is never loaded
        kv_ok = kv_ok & (k_pos >= seq_lo) & (k_pos < seq_hi)
    if OFFS_64:
        k_row = k_pos.to(tl.int64)
    else:
        k_row = k_pos
    d_ok = offs_d < HEAD_DIM
    # [BLOCK_D, BLOCK_N]: one column of K per gathered key
    k = tl.load(
        K_head + offs_d[:, None] * stride_kd + k_row[None, :] * stride_ks,
        mask=d_ok[:, None] & kv_ok[None, :],
        other=0.0,
    )
    qk = tl.dot(q, k)  # [BLOCK_M, BLOCK_N] fp32
    p, alpha, m_new = _masked_step(qk, kv_ok, row_ok, k_pos, q_pos, causal_offset, m_i, qk_scale, CAUSAL)
    guard = tl.max(tl.where(kv_ok, k_pos, -1), 0) >= guard_from
    acc, l_i = _rescale_and_pv(
        acc, l_i, p, alpha, V_head, start_c, k_row, kv_ok, offs_d, d_ok, stride_vs, stride_vd, guard, False
    )
    return acc, l_i, m_new
