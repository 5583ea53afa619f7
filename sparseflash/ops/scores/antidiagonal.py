"""XAttention's antidiagonal block-mass estimate (methods.md §2.1), Triton kernel and PyTorch reference.

Estimator. Queries and keys are grouped in runs of ``S`` tokens (strided row ``t``: chunk rows
``[tS, tS + S)``; strided column ``u``: keys ``[uS, uS + S)``). The score of sub-tile ``(t, u)`` is the mean of
the ``S`` logits on its antidiagonal, ``A[t, u] = mean_j q[tS + S - 1 - j] . k[uS + j] * scale``, over the
pairs that are allowed (inside both sequences and, with ``causal``, key position <= query position,
bottom-right aligned). The official code divides by ``S`` and keeps the future pairs of the diagonal
sub-tile; we mask them (methods.md §2.1 pitfalls) and average over the pairs left. ``A`` is softmaxed per
strided row in fp32 (a row with no allowed pair is all zero) and summed per (query block, key block):
``E[I, J] = sum_{t in I} sum_{u in J} softmax(A)[t, u]`` (row total: the number of strided rows in ``I``).

Two estimator implementations with one contract: :func:`xattention_scores_triton` (one Triton pass, ``S``
dots of length ``d`` per output, tiles past the causal end skipped, online softmax, per-(row, key block)
partial sums; the only temporary is ``(B*H, Sq/S, Kb)`` floats, built in head chunks) and
:func:`xattention_scores_reference` (PyTorch; the CPU path and the test oracle). Cost: ``Sq*Sk*d/S`` MACs per
head (``1/(2S)`` of causal attention's FLOPs).

Kernel symbols: T strided query rows (``ceil(Sq / S)``), U strided key columns, R = block / S strided rows per
block, BLOCK_T x BLOCK_U tile of A, JB = BLOCK_U / R key blocks per tile, G = Hq / Hkv.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparseflash import _options as opt
from sparseflash._validate import check_backend, check_qk
from sparseflash.layouts import geometry as geo

LOG2E = 1.4426950408889634
STRIDES = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_STRIDE = 16  # FastPrefillConfig's default (methods.md §2.1)
_BUFFER_BYTES = 1 << 30  # cap on the partial-sum buffer per launch (heads are chunked to fit)


@triton.jit
def _antidiag_kernel(
    Q,
    K,
    P_OUT,
    M_OUT,
    LSE_OUT,
    bh_start,
    HQ,
    G,
    S_Q,
    S_K,
    T,
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
):
    """One (strided-row tile, batch*head) program: online softmax of A over key tiles, block partial sums.

    Writes ``P_OUT[bh, t, J] = sum_{u in J} exp2(A[t, u] - m_t)`` with ``m_t`` the running max after the
    tile holding ``J`` (stored in ``M_OUT[bh, t, tile]``), and ``LSE_OUT[bh, t]`` (log2 units).
    """
    pid_t = tl.program_id(0)
    bh_local = tl.program_id(1)
    bh = bh_start + bh_local
    b = bh // HQ
    h = bh % HQ
    kv_head = h // G
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # strided rows  [BLOCK_T]
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
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
    m_i = tl.full([BLOCK_T], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_T], tl.float32)
    row_base = bh_local.to(tl.int64) * T + offs_t  # [BLOCK_T] rows of the chunk's buffers
    for tile in range(0, n_tiles):
        offs_u = tile * BLOCK_U + tl.arange(0, BLOCK_U)  # strided columns  [BLOCK_U]
        acc = tl.zeros([BLOCK_T, BLOCK_U], tl.float32)
        cnt = tl.zeros([BLOCK_T, BLOCK_U], tl.float32)
        for j in range(STRIDE):
            q_row = offs_t * STRIDE + (STRIDE - 1 - j)  # [BLOCK_T] chunk rows on the antidiagonal
            k_pos = offs_u * STRIDE + j  # [BLOCK_U] keys on the antidiagonal
            q_ok = q_row < S_Q
            k_ok = k_pos < S_K
            # [BLOCK_T, BLOCK_D]
            q = tl.load(
                q_base + q_row[:, None].to(tl.int64) * stride_qs + offs_d[None, :] * stride_qd,
                mask=q_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            # [BLOCK_D, BLOCK_U]
            k = tl.load(
                k_base + k_pos[None, :].to(tl.int64) * stride_ks + offs_d[:, None] * stride_kd,
                mask=d_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            ok = q_ok[:, None] & k_ok[None, :]
            if CAUSAL:
                ok = ok & (k_pos[None, :] <= q_row[:, None] + offset)
            acc += tl.where(ok, tl.dot(q, k), 0.0)
            cnt += ok.to(tl.float32)
        a = tl.where(cnt > 0, acc / tl.maximum(cnt, 1.0) * qk_scale, float("-inf"))  # log2 units
        m_new = tl.maximum(m_i, tl.max(a, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        e = tl.where(cnt > 0, tl.math.exp2(a - m_use[:, None]), 0.0)  # [BLOCK_T, BLOCK_U]
        l_i = l_i * tl.math.exp2(m_i - m_use) + tl.sum(e, 1)
        m_i = m_new
        part = tl.sum(tl.reshape(e, (BLOCK_T, BLOCK_U // R, R)), 2)  # [BLOCK_T, JB] per key block
        offs_j = tile * (BLOCK_U // R) + tl.arange(0, BLOCK_U // R)
        t_ok = offs_t < T
        tl.store(P_OUT + row_base[:, None] * KB + offs_j[None, :], part, mask=t_ok[:, None] & (offs_j[None, :] < KB))
        tl.store(M_OUT + row_base * NUM_TILES + tile, m_use, mask=t_ok)
    lse = tl.where(l_i > 0, m_i + tl.math.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    tl.store(LSE_OUT + row_base, lse, mask=offs_t < T)


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
) -> torch.Tensor:
    """Triton version of :func:`xattention_scores_reference` (same arguments and result)."""
    stride, block = _check_scoring(q, k, stride, block_size)
    batch, num_heads, seq_len_q, head_dim = q.shape
    num_kv_heads, seq_len_k = k.shape[1], k.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    r = block // stride
    rows, cols = -(-seq_len_q // stride), -(-seq_len_k // stride)
    num_q_blocks, num_k_blocks = -(-seq_len_q // block), -(-seq_len_k // block)
    block_t = 64 if rows > 32 else 16
    block_u = max(r, 64)
    block_d = max(16, triton.next_power_of_2(head_dim))
    num_tiles = triton.cdiv(cols, block_u)
    bh_total = batch * num_heads
    per_head = rows * (num_k_blocks + num_tiles + 1) * 4
    chunk = max(1, min(bh_total, _BUFFER_BYTES // max(per_head, 1)))
    part = torch.empty(chunk, rows, num_k_blocks, dtype=torch.float32, device=q.device)
    m_tile = torch.empty(chunk, rows, num_tiles, dtype=torch.float32, device=q.device)
    lse2 = torch.empty(chunk, rows, dtype=torch.float32, device=q.device)
    allowed = geo.causal_block_mask(seq_len_q, seq_len_k, (block, block), causal=causal, device=q.device)
    tile_of_block = torch.arange(num_k_blocks, device=q.device) // (block_u // r)
    out = torch.empty(bh_total, num_q_blocks, num_k_blocks, dtype=torch.float32, device=q.device)
    for start in range(0, bh_total, chunk):
        n = min(chunk, bh_total - start)
        grid = (triton.cdiv(rows, block_t), n)
        _antidiag_kernel[grid](
            q,
            k,
            part,
            m_tile,
            lse2,
            start,
            num_heads,
            num_heads // num_kv_heads,
            seq_len_q,
            seq_len_k,
            rows,
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
            num_warps=4,
        )
        lse = lse2[:n, :, None]
        factor = torch.exp2(m_tile[:n][..., tile_of_block] - torch.where(torch.isfinite(lse), lse, 0.0))
        # rows of strided queries onto query blocks; blocks never written (past the causal end) are not allowed
        row_block = torch.arange(rows, device=q.device) // r
        ok = allowed[row_block] & torch.isfinite(lse)
        probs = torch.where(ok, part[:n] * factor, 0.0)  # (n, rows, Kb)
        out[start : start + n] = torch.zeros(n, num_q_blocks, num_k_blocks, device=q.device).index_add_(
            1, row_block, probs
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
