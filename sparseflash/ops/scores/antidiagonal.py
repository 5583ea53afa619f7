"""XAttention's antidiagonal block-mass estimate (methods.md §2.1), Triton kernel and PyTorch reference.

Estimator. Queries and keys are grouped in runs of ``S`` tokens (strided row ``t``: chunk rows
``[tS, tS + S)``; strided column ``u``: keys ``[uS, uS + S)``). The score of sub-tile ``(t, u)`` is the mean of
the ``S`` logits on its antidiagonal, ``A[t, u] = mean_j q[tS + S - 1 - j] . k[uS + j] * scale``, over the
pairs that are allowed (inside both sequences and, with ``causal``, key position <= query position,
bottom-right aligned). The official code divides by ``S`` and keeps the future pairs of the diagonal
sub-tile; we mask them (methods.md §2.1 pitfalls) and average over the pairs left. ``A`` is softmaxed per
strided row in fp32 (a row with no allowed pair is all zero) and summed per (query block, key block):
``E[I, J] = sum_{t in I} sum_{u in J} softmax(A)[t, u]`` (row total: the number of strided rows in ``I``).

Two estimator implementations with one contract: :func:`xattention_scores_triton` and
:func:`xattention_scores_reference` (PyTorch; the CPU path and the test oracle). The Triton kernel, per tile of
strided rows: the ``S`` products of a tile form one matmul of inner dimension ``S * d`` (fp32 accumulation, no mask
on the tiles strictly below the causal edge), tiles past the causal end skipped, an online softmax that stores
per-(row, key block) partial sums with the running max, then a second sweep that rescales them by the row's final
log-sum-exp and sums the ``R`` strided rows of each query block straight into ``E``. The key-tile loop is flattened
with the antidiagonal loop inside it (one software pipeline across tiles), and programs run longest first (heads the
fast grid axis, the bottom row tiles first), which cut the kernel's time by 22 % at 16K and 5-15 % at 32K-128K on an
H200 (``benchmarks/results/selection_h200/``). The only temporaries are
``(B*H, Sq/S, Kb + tiles)`` floats, built in head chunks. Cost: ``Sq*Sk*d/S`` MACs per head (``1/(2S)`` of causal
attention's FLOPs).

Kernel symbols: T strided query rows (``ceil(Sq / S)``), U strided key columns, R = block / S strided rows per
block, BLOCK_T x BLOCK_U tile of A, JB = BLOCK_U / R key blocks per tile, G = Hq / Hkv.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparseflash import _options as opt
from sparseflash._validate import check_backend, check_qk

LOG2E = 1.4426950408889634
STRIDES = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_STRIDE = 16  # FastPrefillConfig's default (methods.md §2.1)
_BUFFER_BYTES = 1 << 30  # cap on the partial-sum buffer per launch (heads are chunked to fit)


@triton.jit
def _antidiag_tile(
    q_base,
    k_base,
    offs_t,
    tile,
    S_Q,
    S_K,
    offset,
    qk_scale,
    stride_qs,
    stride_qd,
    stride_ks,
    stride_kd,
    STRIDE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_U: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASKED: tl.constexpr,
):
    """``A`` (log2 units) of one ``[BLOCK_T, BLOCK_U]`` tile; ``-inf`` where no pair of the antidiagonal is allowed.

    The ``S`` products form one matmul with inner dimension ``S * d`` (strided query row ``t`` = its ``S`` rows in
    reverse order, strided key column ``u`` = its ``S`` keys), accumulated in fp32. ``MASKED`` (tiles crossing the
    causal edge or a sequence end): each pair is masked and ``A`` is the mean over the allowed ones; otherwise every
    pair is allowed and ``A = sum / S``.
    """
    offs_u = tile * BLOCK_U + tl.arange(0, BLOCK_U)  # strided columns  [BLOCK_U]
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    acc = tl.zeros([BLOCK_T, BLOCK_U], tl.float32)
    if MASKED:
        cnt = tl.zeros([BLOCK_T, BLOCK_U], tl.float32)
    for j in range(STRIDE):
        q_row = offs_t * STRIDE + (STRIDE - 1 - j)  # [BLOCK_T] chunk rows on the antidiagonal
        k_pos = offs_u * STRIDE + j  # [BLOCK_U] keys on the antidiagonal
        q_ptrs = q_base + q_row[:, None].to(tl.int64) * stride_qs + offs_d[None, :] * stride_qd
        k_ptrs = k_base + k_pos[None, :].to(tl.int64) * stride_ks + offs_d[:, None] * stride_kd
        if MASKED:
            q_ok = q_row < S_Q
            k_ok = k_pos < S_K
            q = tl.load(q_ptrs, mask=q_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_T, BLOCK_D]
            k = tl.load(k_ptrs, mask=d_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_D, BLOCK_U]
            ok = q_ok[:, None] & k_ok[None, :]
            if CAUSAL:
                ok = ok & (k_pos[None, :] <= q_row[:, None] + offset)
            acc += tl.where(ok, tl.dot(q, k), 0.0)
            cnt += ok.to(tl.float32)
        else:
            if BLOCK_D == HEAD_DIM:
                q = tl.load(q_ptrs)
                k = tl.load(k_ptrs)
            else:
                q = tl.load(q_ptrs, mask=d_ok[None, :], other=0.0)
                k = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
            acc = tl.dot(q, k, acc)
    if MASKED:
        a = tl.where(cnt > 0, acc / tl.maximum(cnt, 1.0) * qk_scale, float("-inf"))
    else:
        a = acc * (qk_scale / STRIDE)
    return a


@triton.jit
def _online_partials(
    a, m_i, l_i, tile, P_BUF, M_BUF, row_base, t_ok, KB, NUM_TILES,
    BLOCK_T: tl.constexpr, BLOCK_U: tl.constexpr, R: tl.constexpr,
):  # fmt: skip
    """Online-softmax step over one tile of ``A``: store its per-key-block partial sums and running max."""
    m_new = tl.maximum(m_i, tl.max(a, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    e = tl.math.exp2(a - m_use[:, None])  # 0 where a = -inf  [BLOCK_T, BLOCK_U]
    l_i = l_i * tl.math.exp2(m_i - m_use) + tl.sum(e, 1)
    part = tl.sum(tl.reshape(e, (BLOCK_T, BLOCK_U // R, R)), 2)  # [BLOCK_T, JB] per key block
    offs_j = tile * (BLOCK_U // R) + tl.arange(0, BLOCK_U // R)
    tl.store(P_BUF + row_base[:, None] * KB + offs_j[None, :], part, mask=t_ok[:, None] & (offs_j[None, :] < KB))
    tl.store(M_BUF + row_base * NUM_TILES + tile, m_use, mask=t_ok)
    return m_new, l_i


@triton.jit
def _antidiag_kernel(
    Q,
    K,
    P_BUF,
    M_BUF,
    OUT,
    bh_start,
    HQ,
    G,
    S_Q,
    S_K,
    T,
    QB,
    KB,
    NUM_TILES,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_kd,
    STRIDE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_U: tl.constexpr,
    R: tl.constexpr,
    CAUSAL: tl.constexpr,
    FLATTEN: tl.constexpr,
):
    """One (batch*head, strided-row tile) program: ``E`` of its ``BLOCK_T / R`` query blocks, in two sweeps.

    Sweep 1 (online softmax of ``A`` over the key tiles): ``P_BUF[bh, t, J] = sum_{u in J} exp2(A[t, u] - m_t)``
    with ``m_t`` the running max after the tile holding ``J`` (kept in ``M_BUF[bh, t, tile]``); the leading tiles
    that need no mask take the unmasked path. Sweep 2: each partial sum rescaled by ``exp2(m_t - lse_t)`` and
    summed over the ``R`` strided rows of its query block into ``OUT[bh, I, J]`` (zero-filled by the caller; blocks
    past the causal end are never written). ``BLOCK_T`` is a multiple of ``R``. Programs run longest first: the
    heads are the fast grid axis and row tiles are taken from the bottom (causal rows see the most keys).
    ``FLATTEN``: the key-tile loop and the antidiagonal loop inside it are pipelined as one loop (Triton's
    ``flatten``), so the loads of the next tile overlap the softmax step of this one.
    """
    pid_t = tl.num_programs(1) - 1 - tl.program_id(1)
    bh_local = tl.program_id(0)
    bh = bh_start + bh_local
    b = bh // HQ
    h = bh % HQ
    kv_head = h // G
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # strided rows  [BLOCK_T]
    offset = S_K - S_Q  # bottom-right causal offset
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    # key range this tile of rows may see
    last_row = tl.minimum(pid_t * BLOCK_T + BLOCK_T, T) * STRIDE - 1
    last_row = tl.minimum(last_row, S_Q - 1)
    if CAUSAL:
        key_end = tl.minimum(tl.maximum(last_row + offset + 1, 0), S_K)
    else:
        key_end = S_K
    n_tiles = tl.cdiv(tl.cdiv(key_end, STRIDE), BLOCK_U)
    # leading tiles where every pair of every antidiagonal is allowed: rows inside S_Q, keys inside S_K and (causal)
    # the tile's last key, (tile + 1) * BLOCK_U * S - 1, at or before the first row's first query, pid_t * BLOCK_T * S
    span = BLOCK_U * STRIDE
    n_full = tl.minimum(S_K // span, n_tiles)
    if CAUSAL:
        n_full = tl.minimum(n_full, tl.maximum(pid_t * BLOCK_T * STRIDE + offset + 1, 0) // span)
    if (pid_t + 1) * BLOCK_T * STRIDE > S_Q:
        n_full = 0
    m_i = tl.full([BLOCK_T], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_T], tl.float32)
    t_ok = offs_t < T
    row_base = bh_local.to(tl.int64) * T + offs_t  # [BLOCK_T] rows of the chunk's buffers
    JB: tl.constexpr = BLOCK_U // R
    for tile in tl.range(0, n_full, flatten=FLATTEN):
        a = _antidiag_tile(
            q_base, k_base, offs_t, tile, S_Q, S_K, offset, qk_scale, stride_qs, stride_qd, stride_ks, stride_kd,
            STRIDE, HEAD_DIM, BLOCK_D, BLOCK_T, BLOCK_U, CAUSAL, False,
        )  # fmt: skip
        m_i, l_i = _online_partials(a, m_i, l_i, tile, P_BUF, M_BUF, row_base, t_ok, KB, NUM_TILES, BLOCK_T, BLOCK_U, R)
    for tile in range(n_full, n_tiles):
        a = _antidiag_tile(
            q_base, k_base, offs_t, tile, S_Q, S_K, offset, qk_scale, stride_qs, stride_qd, stride_ks, stride_kd,
            STRIDE, HEAD_DIM, BLOCK_D, BLOCK_T, BLOCK_U, CAUSAL, True,
        )  # fmt: skip
        m_i, l_i = _online_partials(a, m_i, l_i, tile, P_BUF, M_BUF, row_base, t_ok, KB, NUM_TILES, BLOCK_T, BLOCK_U, R)
    # log2-sum-exp2 of each strided row; rows that see no key (or lie past T) contribute nothing
    lse = tl.where(l_i > 0, m_i + tl.math.log2(tl.where(l_i > 0, l_i, 1.0)), float("inf"))
    tl.debug_barrier()  # sweep 2 reads partial sums other threads of this program stored
    QPB: tl.constexpr = BLOCK_T // R  # query blocks per program
    offs_i = pid_t * QPB + tl.arange(0, QPB)
    out_rows = OUT + (bh.to(tl.int64) * QB + offs_i) * KB  # [QPB]
    for tile in range(0, n_tiles):
        offs_j = tile * JB + tl.arange(0, JB)
        j_ok = offs_j < KB
        part = tl.load(P_BUF + row_base[:, None] * KB + offs_j[None, :], mask=t_ok[:, None] & j_ok[None, :], other=0.0)
        m_t = tl.load(M_BUF + row_base * NUM_TILES + tile, mask=t_ok, other=0.0)
        probs = part * tl.math.exp2(m_t - lse)[:, None]  # [BLOCK_T, JB]; lse = inf gives 0
        blocks = tl.sum(tl.reshape(probs, (QPB, R, JB)), 1)  # [QPB, JB]
        tl.store(out_rows[:, None] + offs_j[None, :], blocks, mask=(offs_i[:, None] < QB) & j_ok[None, :])


def _tile_config(rows: int, r: int, device: torch.device) -> tuple[int, int, int, int]:
    """``(BLOCK_T, BLOCK_U, num_warps, num_stages)``, each block a multiple of the ``r = block / stride`` strided rows
    of a block. On a GPU (``benchmarks/results/selection_h200/``, H200, flattened loop): 64 x 64 tiles up to 2048
    strided rows (16K tokens at stride 8), 64 x 128 up to 8191, 128 x 128 from 8192 (64K tokens at stride 8: 6-10 %
    faster there, 6-23 % slower below); 16 x 64 for short inputs and the CPU interpreter."""
    if device.type != "cuda" or rows <= 64:
        return max(16, r), max(64, r), 4, 1
    if rows <= 2048:
        return max(64, r), max(64, r), 4, 3
    if rows < 8192:
        return max(64, r), max(128, r), 8, 3
    return max(128, r), max(128, r), 8, 3


def _check_scoring(q: torch.Tensor, k: torch.Tensor, stride: object, block_size: object) -> tuple[int, int]:
    check_qk("xattention", q, k)
    stride = opt.check_stride("xattention: stride", stride, STRIDES)
    bs = opt.check_block_size("xattention", block_size, square=True, multiple_of=stride)
    return stride, bs[0]


def xattention_scores_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    stride: int = DEFAULT_STRIDE,
    block_size: int | tuple[int, int] = 128,
    causal: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """Block masses ``E`` estimated by antidiagonal scoring (module docstring), in plain PyTorch.

    Args:
        q: ``(B, Hq, Sq, D)``. k: ``(B, Hkv, Sk, D)``, ``Hq`` a multiple of ``Hkv``.
        stride: ``S``, a power of two dividing the block size.
        block_size: square block (int or pair).
        causal: bottom-right causal masking.
        scale: softmax scale, default ``1 / sqrt(D)``.

    Returns:
        float32 ``(B, Hq, Qb, Kb)``; row ``I`` sums to the number of strided rows of ``I`` that see a key.
    """
    stride, block = _check_scoring(q, k, stride, block_size)
    batch, num_heads, seq_len_q, head_dim = q.shape
    num_kv_heads, seq_len_k = k.shape[1], k.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    group = num_heads // num_kv_heads
    rows, cols = -(-seq_len_q // stride), -(-seq_len_k // stride)
    qp = torch.nn.functional.pad(q.float(), (0, 0, 0, rows * stride - seq_len_q))
    kp = torch.nn.functional.pad(k.float(), (0, 0, 0, cols * stride - seq_len_k))
    qs = qp.view(batch, num_kv_heads, group, rows, stride, head_dim)
    ks = kp.view(batch, num_kv_heads, 1, cols, stride, head_dim)
    t, u = torch.arange(rows, device=q.device), torch.arange(cols, device=q.device)
    acc = torch.zeros(batch, num_kv_heads, group, rows, cols, device=q.device)
    cnt = torch.zeros(rows, cols, device=q.device)
    for j in range(stride):
        q_row = t * stride + stride - 1 - j
        k_pos = u * stride + j
        ok = (q_row[:, None] < seq_len_q) & (k_pos[None, :] < seq_len_k)
        if causal:
            ok &= k_pos[None, :] <= q_row[:, None] + seq_len_k - seq_len_q
        logits = qs[..., stride - 1 - j, :] @ ks[..., j, :].transpose(-1, -2)
        acc += torch.where(ok, logits, 0.0)
        cnt += ok
    a = torch.where(cnt > 0, acc / cnt.clamp_min(1) * scale, float("-inf"))
    probs = torch.softmax(a, dim=-1).nan_to_num(0.0)  # rows with no allowed pair: zero
    r = block // stride
    num_q_blocks, num_k_blocks = -(-seq_len_q // block), -(-seq_len_k // block)
    probs = torch.nn.functional.pad(probs, (0, num_k_blocks * r - cols, 0, num_q_blocks * r - rows))
    est = probs.view(batch, num_kv_heads, group, num_q_blocks, r, num_k_blocks, r).sum((4, 6))
    return est.reshape(batch, num_heads, num_q_blocks, num_k_blocks)


def xattention_scores_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    stride: int = DEFAULT_STRIDE,
    block_size: int | tuple[int, int] = 128,
    causal: bool = True,
    scale: float | None = None,
    config: tuple[int, int, int, int] | None = None,
    flatten: bool = True,
) -> torch.Tensor:
    """Triton version of :func:`xattention_scores_reference` (same arguments and result).

    ``config``: ``(BLOCK_T, BLOCK_U, num_warps, num_stages)`` (both blocks multiples of ``block / stride``) instead
    of :func:`_tile_config`'s choice, for benchmarks. ``flatten``: pipeline the key-tile loop as one flattened loop
    (the kernel's ``FLATTEN``, default; 1-4 % faster on an H200), False for benchmarks.
    """
    if not isinstance(flatten, bool):
        raise TypeError(f"flatten: expected a bool, got {type(flatten).__name__}")
    stride, block = _check_scoring(q, k, stride, block_size)
    batch, num_heads, seq_len_q, head_dim = q.shape
    num_kv_heads, seq_len_k = k.shape[1], k.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    r = block // stride
    rows, cols = -(-seq_len_q // stride), -(-seq_len_k // stride)
    num_q_blocks, num_k_blocks = -(-seq_len_q // block), -(-seq_len_k // block)
    if config is not None and (
        not isinstance(config, (tuple, list))
        or len(config) != 4
        or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in config)
    ):
        raise ValueError(f"config: expected (BLOCK_T, BLOCK_U, num_warps, num_stages), positive ints, got {config!r}")
    block_t, block_u, num_warps, num_stages = _tile_config(rows, r, q.device) if config is None else config
    if block_t % r or block_u % r:
        raise ValueError(f"config: expected BLOCK_T and BLOCK_U multiples of block / stride = {r}, got {config}")
    block_d = max(16, triton.next_power_of_2(head_dim))
    num_tiles = triton.cdiv(cols, block_u)
    bh_total = batch * num_heads
    per_head = rows * (num_k_blocks + num_tiles) * 4
    chunk = max(1, min(bh_total, _BUFFER_BYTES // max(per_head, 1)))
    part = torch.empty(chunk, rows, num_k_blocks, dtype=torch.float32, device=q.device)
    m_tile = torch.empty(chunk, rows, num_tiles, dtype=torch.float32, device=q.device)
    out = torch.zeros(bh_total, num_q_blocks, num_k_blocks, dtype=torch.float32, device=q.device)
    for start in range(0, bh_total, chunk):
        n = min(chunk, bh_total - start)
        grid = (n, triton.cdiv(rows, block_t))
        _antidiag_kernel[grid](
            q,
            k,
            part,
            m_tile,
            out,
            start,
            num_heads,
            num_heads // num_kv_heads,
            seq_len_q,
            seq_len_k,
            rows,
            num_q_blocks,
            num_k_blocks,
            num_tiles,
            scale * LOG2E,
            *q.stride(),
            *k.stride(),
            STRIDE=stride,
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            BLOCK_T=block_t,
            BLOCK_U=block_u,
            R=r,
            CAUSAL=causal,
            FLATTEN=flatten,
            num_warps=num_warps,
            num_stages=num_stages,
        )
    return out.view(batch, num_heads, num_q_blocks, num_k_blocks)


def xattention_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    stride: int = DEFAULT_STRIDE,
    block_size: int | tuple[int, int] = 128,
    causal: bool = True,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Antidiagonal block-mass estimate; ``backend`` 'auto' (Triton on CUDA, PyTorch on CPU), 'triton', 'torch'."""
    check_qk("xattention", q, k)
    fn = xattention_scores_triton if check_backend(backend, q.device) == "triton" else xattention_scores_reference
    return fn(q, k, stride=stride, block_size=block_size, causal=causal, scale=scale)
