"""One key tile of the decode split kernel (:mod:`.kernel`): where its K/V rows are, and its online-softmax step.

* :func:`tile_pages`: page ids of a tile's keys, one scalar when the tile sits in one page (PAGE_SIZE a multiple
  of BLOCK_N), else one per key row;
* :func:`key_rows`: int64 offsets of a tile's key rows in one KV head of the cache (contiguous or paged);
* :func:`attend_tile`: one BLOCK_N-key step of the online softmax over given key rows.

Address and softmax steps are apart so that the split kernel's loops can look pages up one tile ahead
(``PREFETCH``): then the K/V loads of a step depend on loop-carried values only, not on a load of the same step,
and Triton's software pipeliner buffers them as deep as the contiguous loads (``num_stages - 1`` tiles in flight).
A page-table load in the same step is an indirect load to the pipeliner: it spends a stage on it, and with
``num_stages = 3`` the K/V tiles of a paged cache were single-buffered (one tile in flight).
"""

from __future__ import annotations

import triton
import triton.language as tl

from sparseflash.ops.triton_common import guarded_pv


@triton.jit
def tile_pages(PT_row, start_n, live, kv_ok, stride_ptp, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Page ids (int32) of keys ``start_n + [0, BLOCK_N)``: a scalar if PAGE_SIZE is a multiple of BLOCK_N, else
    ``[BLOCK_N]``. Predicated by ``live`` (scalar) and ``kv_ok`` (``[BLOCK_N]``); a predicated-off id is 0.
    """
    if PAGE_SIZE % BLOCK_N == 0:  # the whole tile sits in one page (start_n is a multiple of BLOCK_N)
        return tl.load(PT_row + (start_n // PAGE_SIZE) * stride_ptp, mask=live, other=0)
    else:
        k_pos = start_n + tl.arange(0, BLOCK_N)
        return tl.load(PT_row + (k_pos // PAGE_SIZE) * stride_ptp, mask=kv_ok & live, other=0)


@triton.jit
def key_rows(pages, start_n, stride_p, stride_s, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """int64 offsets ``[BLOCK_N]`` of keys ``start_n + [0, BLOCK_N)`` from the base of one KV head.

    Paged: key ``j`` is slot ``j % PAGE_SIZE`` of page ``pages`` (from :func:`tile_pages`), ``stride_p`` the page
    stride; contiguous: row ``j``. ``start_n`` is a multiple of BLOCK_N (every loop of the kernel steps so), so
    when pages divide the tile the slots are the same every step: the compiler hoists them out of the loop (for
    pages of BLOCK_N or more, hoisting the slot offsets cost registers on sm_90: 181 instead of 136 per thread).
    """
    offs_n = tl.arange(0, BLOCK_N)
    if PAGED:
        if PAGE_SIZE < BLOCK_N and BLOCK_N % PAGE_SIZE == 0:  # the same slots every step: hoisted
            return pages.to(tl.int64) * stride_p + (offs_n % PAGE_SIZE).to(tl.int64) * stride_s
        else:
            return pages.to(tl.int64) * stride_p + ((start_n + offs_n) % PAGE_SIZE).to(tl.int64) * stride_s
    else:
        return (start_n + offs_n).to(tl.int64) * stride_s


@triton.jit
def attend_tile(
    acc,
    l_i,
    m_i,
    q,
    K_h,
    V_h,
    k_rows,
    v_rows,
    start_n,
    kv_ok,
    q_pos,
    qk_scale,
    stride_kd,
    stride_vd,
    MASK: tl.constexpr,
    K_ROWS_FIRST: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One BLOCK_N-key step of the online softmax over keys ``start_n + [0, BLOCK_N)`` at rows ``k_rows`` of K_h
    and ``v_rows`` of V_h (int64 ``[BLOCK_N]``, :func:`key_rows`).

    MASK: 0 no mask (every row sees every key), 1 keys predicated by ``kv_ok`` only, 2 ``kv_ok`` and causal
    (key ``j`` visible to a row iff ``j <= q_pos``). K_ROWS_FIRST: K is loaded ``[BLOCK_N, BLOCK_D]`` (the
    layout of V, so both share one row-offset layout) and transposed for the product; else ``[BLOCK_D, BLOCK_N]``.
    """
    offs_d = tl.arange(0, BLOCK_D)
    k_pos = start_n + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    d_ok = offs_d < HEAD_DIM
    if K_ROWS_FIRST:
        k_ptrs = K_h + k_rows[:, None] + offs_d[None, :] * stride_kd  # [BLOCK_N, BLOCK_D]
        k_ok = kv_ok[:, None] & d_ok[None, :]
        k_ok_d = d_ok[None, :]
    else:
        k_ptrs = K_h + k_rows[None, :] + offs_d[:, None] * stride_kd  # [BLOCK_D, BLOCK_N]
        k_ok = d_ok[:, None] & kv_ok[None, :]
        k_ok_d = d_ok[:, None]
    v_ptrs = V_h + v_rows[:, None] + offs_d[None, :] * stride_vd  # [BLOCK_N, BLOCK_D]
    if MASK == 0:
        if EVEN_D:
            k = tl.load(k_ptrs)
        else:
            k = tl.load(k_ptrs, mask=k_ok_d, other=0.0)
    else:
        k = tl.load(k_ptrs, mask=k_ok, other=0.0)
    if K_ROWS_FIRST:
        k = tl.trans(k)
    qk = tl.dot(q, k)  # [BLOCK_M, BLOCK_N] fp32
    if MASK == 0:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
    else:
        ok = kv_ok[None, :]
        if MASK == 2:
            ok = ok & (k_pos[None, :] <= q_pos[:, None])
        qk = tl.where(ok, qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing seen yet stay at 0
        p = tl.math.exp2(qk - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if MASK == 0:
        if EVEN_D:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
    else:
        v = tl.load(v_ptrs, mask=kv_ok[:, None] & d_ok[None, :], other=0.0)
    if MASK == 2:
        # a key past some row's position may hold NaN/inf: zero it so 0 * NaN never enters the product, and
        # mark NaN the rows that do attend a non-finite value
        acc = guarded_pv(acc, p, v)
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new
