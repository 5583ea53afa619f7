"""Last-query line scores: the estimator shared by MInference, FlexPrefill and PBS-Attn.

The methods look at the softmax rows of the last ``L`` queries (MInference: 64, FlexPrefill and PBS-Attn: one
block of 128) against every key and sum them two ways:

* **vertical** ``vert[j] = sum_i P[i, j]``: how much the last queries attend key ``j`` (a column);
* **slash** ``slash[c] = sum_i P[i, c - (L - 1 - i)]``: the mass on the diagonal that meets key ``c`` in the
  last row, i.e. at distance ``delta = Sk - 1 - c`` (query position minus key position). ``c = Sk - 1`` is
  the main diagonal. Indexing by ``c`` (FlexPrefill's convention) lets both scores be pooled by key block.

``P`` is the float32 softmax of ``q[Sq - L:] . k[:num_keys]^T * scale`` with query ``i`` at absolute position
``Sk - L + i`` (bottom-right alignment) and, with ``causal``, keys after a query masked. Keys at or after
``num_keys`` are outside the softmax (PBS-Attn scores only complete segments) and get score 0.

Two implementations with the same contract: :func:`last_query_scores_triton` (two Triton passes: per-tile
row max/sum, then probabilities with column sums and skewed diagonal sums; never an ``L x Sk`` tensor) and
:func:`last_query_scores_reference` (plain PyTorch, materialises ``P``; the CPU path and the test oracle).
Cost per query head: ``2 x 2 * L * Sk * d`` FLOPs, ``L / Sk`` of causal attention counted the same way.

Kernel symbols: B batch, HQ query heads, G = HQ / HKV, S_K keys, L scored queries (BLOCK_L rows, a power of
two), BLOCK_N keys per program, BLOCK_D head dim rounded up to a power of two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparseflash._validate import check_backend, check_tensor
from sparseflash.ops.scores.last_queries_reference import check_last_query_args, last_query_scores_reference  # noqa: F401

LOG2E = 1.4426950408889634


@triton.jit
def _qk_tile(
    Q,
    K,
    bh,
    t,
    HQ,
    G,
    S_K,
    L,
    N_KEYS,
    q_start,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_kd,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    """Scores in log2 units ``[BLOCK_L, BLOCK_N]`` of key tile ``t``, -inf where not allowed, and the mask."""
    b = bh // HQ
    h = bh % HQ
    kv_head = h // G
    offs_l = tl.arange(0, BLOCK_L)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_pos = t * BLOCK_N + offs_n  # [BLOCK_N]
    row_ok = offs_l < L
    d_ok = offs_d < HEAD_DIM
    key_ok = k_pos < N_KEYS
    b64 = b.to(tl.int64)
    # [BLOCK_L, BLOCK_D]
    q = tl.load(
        Q
        + b64 * stride_qb
        + h.to(tl.int64) * stride_qh
        + (q_start + offs_l[:, None]) * stride_qs
        + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    # [BLOCK_D, BLOCK_N]
    k = tl.load(
        K
        + b64 * stride_kb
        + kv_head.to(tl.int64) * stride_kh
        + k_pos[None, :].to(tl.int64) * stride_ks
        + offs_d[:, None] * stride_kd,
        mask=d_ok[:, None] & key_ok[None, :],
        other=0.0,
    )
    s = tl.dot(q, k) * qk_scale  # [BLOCK_L, BLOCK_N] fp32
    ok = row_ok[:, None] & key_ok[None, :]
    if CAUSAL:
        q_pos = S_K - L + offs_l  # absolute positions of the scored queries
        ok = ok & (k_pos[None, :] <= q_pos[:, None])
    return tl.where(ok, s, float("-inf")), ok


@triton.jit
def _row_stats_kernel(
    Q,
    K,
    M_OUT,
    L_OUT,
    HQ,
    G,
    S_K,
    L,
    N_KEYS,
    q_start,
    qk_scale,
    num_tiles,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_kd,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    """Pass 1: per (batch*head, key tile) the row max and row sum of exp2 (log2 units) of the tile."""
    bh = tl.program_id(0)
    t = tl.program_id(1)
    s, ok = _qk_tile(
        Q,
        K,
        bh,
        t,
        HQ,
        G,
        S_K,
        L,
        N_KEYS,
        q_start,
        qk_scale,
        stride_qb,
        stride_qh,
        stride_qs,
        stride_qd,
        stride_kb,
        stride_kh,
        stride_ks,
        stride_kd,
        HEAD_DIM,
        BLOCK_D,
        BLOCK_L,
        BLOCK_N,
        CAUSAL,
    )
    m = tl.max(s, 1)  # [BLOCK_L]
    m_use = tl.where(m == float("-inf"), 0.0, m)
    l = tl.sum(tl.where(ok, tl.math.exp2(s - m_use[:, None]), 0.0), 1)
    offs_l = tl.arange(0, BLOCK_L)
    base = (bh.to(tl.int64) * num_tiles + t) * BLOCK_L
    tl.store(M_OUT + base + offs_l, m)
    tl.store(L_OUT + base + offs_l, l)


@triton.jit
def _line_sums_kernel(
    Q,
    K,
    LSE2,
    VERT,
    SLASH_PART,
    HQ,
    G,
    S_K,
    L,
    N_KEYS,
    q_start,
    qk_scale,
    num_tiles,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_kd,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    SLASH: tl.constexpr,
):
    """Pass 2: probabilities of the tile, their column sums and their sums along each diagonal."""
    bh = tl.program_id(0)
    t = tl.program_id(1)
    s, ok = _qk_tile(
        Q,
        K,
        bh,
        t,
        HQ,
        G,
        S_K,
        L,
        N_KEYS,
        q_start,
        qk_scale,
        stride_qb,
        stride_qh,
        stride_qs,
        stride_qd,
        stride_kb,
        stride_kh,
        stride_ks,
        stride_kd,
        HEAD_DIM,
        BLOCK_D,
        BLOCK_L,
        BLOCK_N,
        CAUSAL,
    )
    offs_l = tl.arange(0, BLOCK_L)
    offs_n = tl.arange(0, BLOCK_N)
    lse = tl.load(LSE2 + bh.to(tl.int64) * BLOCK_L + offs_l)  # [BLOCK_L], log2 units
    lse = tl.where(lse == float("-inf"), 0.0, lse)  # rows with no key: every entry is masked anyway
    p = tl.where(ok, tl.math.exp2(s - lse[:, None]), 0.0)  # [BLOCK_L, BLOCK_N]
    k_pos = t * BLOCK_N + offs_n
    tl.store(VERT + bh.to(tl.int64) * S_K + k_pos, tl.sum(p, 0), mask=k_pos < S_K)
    if SLASH:
        # skew: row i moves right by L - 1 - i, so entry (i, n) lands in column e = n + L - 1 - i < 2 * BLOCK_N
        offs_e = tl.arange(0, 2 * BLOCK_N)
        src = offs_e[None, :] - (L - 1 - offs_l)[:, None]  # [BLOCK_L, 2 * BLOCK_N]
        hit = (src >= 0) & (src < BLOCK_N)
        skewed = tl.gather(p, tl.minimum(tl.maximum(src, 0), BLOCK_N - 1), 1)
        part = tl.sum(tl.where(hit, skewed, 0.0), 0)  # [2 * BLOCK_N]
        tl.store(SLASH_PART + (bh.to(tl.int64) * num_tiles + t) * (2 * BLOCK_N) + offs_e, part)


def last_query_scores_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    num_queries: int,
    num_keys: int | None = None,
    causal: bool = True,
    scale: float | None = None,
    slash: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton version of :func:`last_query_scores_reference` (same arguments and results).

    Two launches over a ``(batch * num_heads, ceil(num_keys / BLOCK_N))`` grid; the per-tile statistics
    (``O(L * Sk / BLOCK_N)``) and the diagonal partial sums (``2 * Sk`` per head) are the only temporaries.
    """
    rows, num_keys = check_last_query_args(q, k, num_queries, num_keys)
    batch, num_heads, seq_len_q, head_dim = q.shape
    num_kv_heads, seq_len_k = k.shape[1], k.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    vert = torch.zeros(batch, num_heads, seq_len_k, dtype=torch.float32, device=q.device)
    if num_keys == 0:
        return vert, (torch.zeros_like(vert) if slash else None)
    block_l = max(16, triton.next_power_of_2(rows))
    block_n = max(block_l, 64 if block_l <= 64 else 128)  # L <= BLOCK_N keeps the skew inside 2 * BLOCK_N
    block_d = max(16, triton.next_power_of_2(head_dim))
    num_tiles = triton.cdiv(num_keys, block_n)
    bh = batch * num_heads
    grid = (bh, num_tiles)
    args = (
        num_heads,
        num_heads // num_kv_heads,
        seq_len_k,
        rows,
        num_keys,
        seq_len_q - rows,
        scale * LOG2E,
        num_tiles,
        *q.stride(),
        *k.stride(),
    )
    meta = dict(
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_L=block_l,
        BLOCK_N=block_n,
        CAUSAL=causal,
        num_warps=4 if block_l <= 64 else 8,
    )
    m_part = torch.empty(bh, num_tiles, block_l, dtype=torch.float32, device=q.device)
    l_part = torch.empty_like(m_part)
    _row_stats_kernel[grid](q, k, m_part, l_part, *args, **meta)
    m_max = m_part.amax(1, keepdim=True)
    m_use = torch.where(m_max == float("-inf"), 0.0, m_max)
    total = (l_part * torch.exp2(m_part - m_use)).sum(1)
    lse2 = torch.where(total > 0, m_use.squeeze(1) + torch.log2(total), float("-inf")).contiguous()
    if slash:
        part = torch.empty(bh, num_tiles, 2 * block_n, dtype=torch.float32, device=q.device)
    else:
        part = vert  # unused placeholder pointer
    _line_sums_kernel[grid](q, k, lse2, vert, part, *args, SLASH=slash, **meta)
    if not slash:
        return vert, None
    # tile t's column e is slash index t * BLOCK_N + e: fold the two halves onto consecutive tiles
    folded = torch.zeros(bh, num_tiles + 1, block_n, dtype=torch.float32, device=q.device)
    folded[:, :num_tiles] += part[..., :block_n]
    folded[:, 1:] += part[..., block_n:]
    slash_out = folded.reshape(bh, -1)[:, :seq_len_k]
    if slash_out.shape[1] < seq_len_k:  # keys past num_keys: no mass
        slash_out = torch.nn.functional.pad(slash_out, (0, seq_len_k - slash_out.shape[1]))
    return vert, slash_out.reshape(batch, num_heads, seq_len_k)


def last_query_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    num_queries: int,
    num_keys: int | None = None,
    causal: bool = True,
    scale: float | None = None,
    slash: bool = True,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Vertical and slash sums of the last ``num_queries`` rows; ``backend`` 'auto', 'triton' or 'torch'.

    'auto' runs the Triton kernels on CUDA and the PyTorch reference on the CPU. See
    :func:`last_query_scores_reference` for arguments and results.
    """
    check_tensor("q", q, ndim=4)
    if check_backend(backend, q.device) == "triton":
        return last_query_scores_triton(
            q, k, num_queries=num_queries, num_keys=num_keys, causal=causal, scale=scale, slash=slash
        )
    return last_query_scores_reference(
        q, k, num_queries=num_queries, num_keys=num_keys, causal=causal, scale=scale, slash=slash
    )
