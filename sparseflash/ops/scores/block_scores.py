"""Exact per-block statistics of the attention scores: block maxima (BSFA) and block softmax mass (oracle).

For query block ``I`` and key block ``J`` over the allowed pairs (inside both sequences and, with ``causal``,
key position <= query position, bottom-right aligned), with ``s = q . k * scale``:

* ``block_max[I, J] = max s`` (``-inf`` when the block holds no allowed pair);
* ``block_mass[I, J] = sum exp(s - lse_i)`` with ``lse_i`` the dense row log-sum-exp, i.e. the dense
  softmax mass of the block; a row sums to the number of its queries that see a key.

Both are computed blockwise, never as an ``Sq x Sk`` tensor: :func:`block_scores_triton` (one program per
(query block, batch*head), a loop over the key blocks up to the causal end, ``QK^T`` per tile) and
:func:`block_scores_reference` (PyTorch over chunks of query blocks; the CPU path and the test oracle). Cost:
the ``QK^T`` half of causal attention (the mass also needs the dense lse, one more dense pass).

Kernel symbols: BLOCK_M x BLOCK_N the (query, key) block, G = Hq / Hkv, KB key blocks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparseflash import _options as opt
from sparseflash._validate import check_backend, check_qk

LOG2E = 1.4426950408889634
_LOG2E: tl.constexpr = tl.constexpr(LOG2E)  # kernels may read only constexpr globals
_CHUNK_ELEMS = 1 << 26  # logits per chunk in the reference


@triton.jit
def _block_scores_kernel(
    Q,
    K,
    LSE,
    OUT,
    HQ,
    G,
    S_Q,
    S_K,
    KB,
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASS: tl.constexpr,
):
    """Program (query block I, batch*head): OUT[bh, I, J] for J up to the causal end of the block."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HQ
    h = bh % HQ
    kv_head = h // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] chunk rows
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < S_Q
    d_ok = offs_d < HEAD_DIM
    offset = S_K - S_Q
    q = tl.load(
        Q
        + b.to(tl.int64) * stride_qb
        + h.to(tl.int64) * stride_qh
        + offs_m[:, None].to(tl.int64) * stride_qs
        + offs_d[None, :] * stride_qd,
        mask=m_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # [BLOCK_M, BLOCK_D]
    k_base = K + b.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    if MASS:
        lse = tl.load(LSE + bh.to(tl.int64) * S_Q + offs_m, mask=m_ok, other=float("-inf")) * _LOG2E
        lse = tl.where(lse == float("-inf"), float("inf"), lse)  # rows seeing nothing contribute 0
    if CAUSAL:
        last = tl.minimum(pid_m * BLOCK_M + BLOCK_M, S_Q) - 1
        key_end = tl.minimum(tl.maximum(last + offset + 1, 0), S_K)
    else:
        key_end = S_K
    out_row = OUT + (bh.to(tl.int64) * tl.cdiv(S_Q, BLOCK_M) + pid_m) * KB
    for j in range(0, tl.cdiv(key_end, BLOCK_N)):
        offs_n = j * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < S_K
        k = tl.load(
            k_base + offs_n[None, :].to(tl.int64) * stride_ks + offs_d[:, None] * stride_kd,
            mask=d_ok[:, None] & n_ok[None, :],
            other=0.0,
        )  # [BLOCK_D, BLOCK_N]
        s = tl.dot(q, k) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
        ok = m_ok[:, None] & n_ok[None, :]
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= offs_m[:, None] + offset)
        if MASS:
            val = tl.sum(tl.sum(tl.where(ok, tl.math.exp2(s - lse[:, None]), 0.0), 1), 0)
        else:
            val = tl.max(tl.max(tl.where(ok, s, float("-inf")), 1), 0) / _LOG2E
        tl.store(out_row + j, val)


def _check(q: torch.Tensor, k: torch.Tensor, block_size: object, mode: str, lse: torch.Tensor | None):
    dims = check_qk("block_scores", q, k)
    bs = opt.check_block_size("block_scores", block_size)
    opt.check_choice("mode", mode, ("max", "mass"))
    if mode == "mass" and lse is not None and (lse.shape != q.shape[:3] or lse.device != q.device):
        raise ValueError(
            f"lse: expected shape {tuple(q.shape[:3])} on {q.device} (from q), got {tuple(lse.shape)} on {lse.device}"
        )
    return dims, bs


def dense_lse_reference(
    q: torch.Tensor, k: torch.Tensor, *, causal: bool = True, scale: float | None = None
) -> torch.Tensor:
    """Float32 ``(B, Hq, Sq)`` natural-log row log-sum-exp of the dense attention, in query chunks."""
    batch, num_heads, num_kv_heads, seq_len_q, seq_len_k, head_dim = check_qk("dense_lse", q, k)
    scale = head_dim**-0.5 if scale is None else scale
    group = num_heads // num_kv_heads
    kf = k.float().unsqueeze(2)
    out = torch.empty(batch, num_heads, seq_len_q, dtype=torch.float32, device=q.device)
    step = max(1, _CHUNK_ELEMS // max(1, batch * num_heads * seq_len_k))
    j = torch.arange(seq_len_k, device=q.device)
    for start in range(0, seq_len_q, step):
        stop = min(seq_len_q, start + step)
        qc = q[:, :, start:stop].float().reshape(batch, num_kv_heads, group, stop - start, head_dim)
        s = (qc @ kf.transpose(-1, -2)) * scale
        if causal:
            i = torch.arange(start, stop, device=q.device) + seq_len_k - seq_len_q
            s = s.masked_fill(j[None, :] > i[:, None], float("-inf"))
        out[:, :, start:stop] = torch.logsumexp(s, -1).reshape(batch, num_heads, stop - start)
    return out


def block_scores_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: tuple[int, int] = (128, 128),
    mode: str = "max",
    causal: bool = True,
    scale: float | None = None,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block maxima (``mode="max"``) or block softmax masses (``"mass"``) in PyTorch (module docstring).

    Args:
        q: ``(B, Hq, Sq, D)``. k: ``(B, Hkv, Sk, D)``.
        block_size: ``(block_q, block_k)``.
        mode: ``"max"`` (max scaled logit, natural units) or ``"mass"`` (dense softmax mass).
        causal: bottom-right causal masking.
        scale: softmax scale, default ``1 / sqrt(D)``.
        lse: for ``"mass"``, the dense row lse ``(B, Hq, Sq)`` float32 (computed when None).

    Returns:
        float32 ``(B, Hq, Qb, Kb)``; ``-inf`` (max) or 0 (mass) where a block holds no allowed pair.
    """
    (batch, num_heads, num_kv_heads, seq_len_q, seq_len_k, head_dim), (block_q, block_k) = _check(
        q, k, block_size, mode, lse
    )
    scale = head_dim**-0.5 if scale is None else scale
    if mode == "mass" and lse is None:
        lse = dense_lse_reference(q, k, causal=causal, scale=scale)
    group = num_heads // num_kv_heads
    num_q_blocks, num_k_blocks = -(-seq_len_q // block_q), -(-seq_len_k // block_k)
    kf = torch.nn.functional.pad(k.float(), (0, 0, 0, num_k_blocks * block_k - seq_len_k)).unsqueeze(2)
    j = torch.arange(num_k_blocks * block_k, device=q.device)
    out = torch.empty(batch, num_heads, num_q_blocks, num_k_blocks, dtype=torch.float32, device=q.device)
    step = max(1, _CHUNK_ELEMS // max(1, batch * num_heads * block_q * num_k_blocks * block_k))
    for first in range(0, num_q_blocks, step):
        last = min(num_q_blocks, first + step)
        start, stop = first * block_q, min(seq_len_q, last * block_q)
        rows = (last - first) * block_q
        qc = torch.nn.functional.pad(q[:, :, start:stop].float(), (0, 0, 0, rows - (stop - start)))
        s = (qc.reshape(batch, num_kv_heads, group, rows, head_dim) @ kf.transpose(-1, -2)) * scale
        s = s.reshape(batch, num_heads, rows, -1)
        i = torch.arange(start, start + rows, device=q.device)
        ok = (i[:, None] < seq_len_q) & (j[None, :] < seq_len_k)
        if causal:
            ok &= j[None, :] <= i[:, None] + seq_len_k - seq_len_q
        shape = (batch, num_heads, last - first, block_q, num_k_blocks, block_k)
        if mode == "max":
            red = torch.where(ok, s, float("-inf")).view(shape).amax((3, 5))
        else:
            row_lse = torch.nn.functional.pad(lse[:, :, start:stop], (0, rows - (stop - start)))
            row_ok = torch.isfinite(row_lse)[..., None]
            p = torch.where(ok & row_ok, torch.exp(s - torch.where(row_ok, row_lse[..., None], 0.0)), 0.0)
            red = p.view(shape).sum((3, 5))
        out[:, :, first:last] = red
    return out


def block_scores_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: tuple[int, int] = (128, 128),
    mode: str = "max",
    causal: bool = True,
    scale: float | None = None,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton version of :func:`block_scores_reference` (same arguments and result).

    With ``mode="mass"`` and no ``lse``, the lse comes from :func:`sparseflash.flash_attention` (a dense pass).
    """
    (batch, num_heads, num_kv_heads, seq_len_q, seq_len_k, head_dim), (block_q, block_k) = _check(
        q, k, block_size, mode, lse
    )
    scale = head_dim**-0.5 if scale is None else scale
    if mode == "mass" and lse is None:
        from sparseflash.ops.prefill.dense import flash_attention

        _, lse = flash_attention(q, k, k, causal=causal, scale=scale, return_lse=True)
    num_q_blocks, num_k_blocks = -(-seq_len_q // block_q), -(-seq_len_k // block_k)
    fill = float("-inf") if mode == "max" else 0.0
    out = torch.full((batch, num_heads, num_q_blocks, num_k_blocks), fill, dtype=torch.float32, device=q.device)
    lse_arg = lse.float().contiguous() if mode == "mass" else out
    grid = (num_q_blocks, batch * num_heads)
    _block_scores_kernel[grid](
        q,
        k,
        lse_arg,
        out,
        num_heads,
        num_heads // num_kv_heads,
        seq_len_q,
        seq_len_k,
        num_k_blocks,
        scale * LOG2E,
        *q.stride(),
        *k.stride(),
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_M=block_q,
        BLOCK_N=block_k,
        CAUSAL=causal,
        MASS=mode == "mass",
        num_warps=4 if block_q * block_k <= 8192 else 8,
    )
    return out


def block_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: tuple[int, int] = (128, 128),
    mode: str = "max",
    causal: bool = True,
    scale: float | None = None,
    lse: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Block maxima or masses; ``backend`` 'auto' (Triton on CUDA, PyTorch on CPU), 'triton' or 'torch'."""
    check_qk("block_scores", q, k)
    fn = block_scores_triton if check_backend(backend, q.device) == "triton" else block_scores_reference
    return fn(q, k, block_size=block_size, mode=mode, causal=causal, scale=scale, lse=lse)
