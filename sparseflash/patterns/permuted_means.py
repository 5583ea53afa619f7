"""Block means of permuted keys ``K' = K[perm]`` without building ``K'`` (PBS-Attn's pooled keys).

Key block ``J`` of ``K'`` holds the keys ``perm[J * B : (J + 1) * B]``; its mean is their sum over the real
tokens of a ragged last block. :func:`permuted_block_means_reference` (the CPU path and the test oracle) adds every
key into its block with ``scatter_add_`` on a float32 copy of ``k`` expanded over the query heads;
:func:`permuted_block_means_triton` gathers each block's ``B`` key rows straight from ``k`` (input dtype, summed in
float32), one program per (batch, permutation head, key block): no float32 copy of ``k``, no atomics, no expanded
source. The sums are added in another order (as the GPU's ``scatter_add_`` atomics already were), so the means
agree to float32 rounding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparseflash._validate import check_backend, check_tensor
from sparseflash.layouts.permuted import inverse_perm

ROWS = 32  # key rows gathered per loop step


@triton.jit
def _permuted_block_means_kernel(
    K,  # (B, Hkv, S, D) any float dtype and strides
    PERM,  # (B, Hp, S) int64, any strides
    OUT,  # (B, Hp, Kb, D) float32 contiguous
    perm_heads,
    group,
    seq_len,
    num_blocks,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_kd,
    stride_pb,
    stride_ph,
    stride_ps,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
):
    pid = tl.program_id(0)  # (b, hp, J) flattened, J fastest
    blk = pid % num_blocks
    bh = pid // num_blocks
    hp = bh % perm_heads
    b = bh // perm_heads
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    k_base = K + b.to(tl.int64) * stride_kb + (hp // group).to(tl.int64) * stride_kh
    p_base = PERM + b.to(tl.int64) * stride_pb + hp.to(tl.int64) * stride_ph
    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    for r in range(0, BLOCK, ROWS):
        slot = blk * BLOCK + r + tl.arange(0, ROWS)
        ok = slot < seq_len
        key = tl.load(p_base + slot.to(tl.int64) * stride_ps, mask=ok, other=0)
        ptrs = k_base + key[:, None] * stride_ks + offs_d[None, :] * stride_kd
        acc += tl.load(ptrs, mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    count = tl.minimum(seq_len - blk * BLOCK, BLOCK).to(tl.float32)
    tl.store(OUT + pid.to(tl.int64) * HEAD_DIM + offs_d, tl.sum(acc, axis=0) / count, mask=d_ok)


def _check(k: torch.Tensor, perm: torch.Tensor, block: int) -> None:
    check_tensor("k", k, ndim=4)
    check_tensor("perm", perm, ndim=3)
    batch, num_kv_heads, seq_len = k.shape[:3]
    if perm.dtype != torch.int64 or perm.shape[0] != batch or perm.shape[2] != seq_len:
        raise ValueError(f"perm: expected int64 ({batch}, perm_heads, {seq_len}), got {perm.dtype} {tuple(perm.shape)}")
    if perm.shape[1] % num_kv_heads:
        raise ValueError(f"perm: expected a multiple of {num_kv_heads} heads (k's), got {perm.shape[1]}")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block: expected a positive int, got {block!r}")


def permuted_block_means_reference(k: torch.Tensor, perm: torch.Tensor, block: int) -> torch.Tensor:
    """Block means of ``K' = k[perm]`` by ``scatter_add_``: float32 (batch, perm_heads, Kb, head_dim).

    Args:
        k: (batch, num_kv_heads, seq_len, head_dim). perm: int64 (batch, perm_heads, seq_len), ``perm_heads``
            a multiple of ``num_kv_heads`` (query heads of a group share their KV head's keys).
        block: tokens per key block (the last block ragged).
    """
    _check(k, perm, block)
    batch, num_kv_heads, seq_len, head_dim = k.shape
    perm_heads = perm.shape[1]
    group = perm_heads // num_kv_heads
    num_blocks = -(-seq_len // block)
    key_block = (inverse_perm(perm) // block).view(batch, num_kv_heads, group, seq_len, 1)
    src = k.float().unsqueeze(2).expand(batch, num_kv_heads, group, seq_len, head_dim)
    sums = torch.zeros(batch, num_kv_heads, group, num_blocks, head_dim, dtype=torch.float32, device=k.device)
    sums.scatter_add_(3, key_block.expand(-1, -1, -1, -1, head_dim), src)
    counts = torch.clamp(seq_len - torch.arange(num_blocks, device=k.device) * block, max=block)
    return (sums / counts[:, None].to(torch.float32)).view(batch, perm_heads, num_blocks, head_dim)


def permuted_block_means_triton(k: torch.Tensor, perm: torch.Tensor, block: int) -> torch.Tensor:
    """Triton version of :func:`permuted_block_means_reference` (same arguments and result, to float32 rounding)."""
    _check(k, perm, block)
    batch, num_kv_heads, seq_len, head_dim = k.shape
    perm_heads = perm.shape[1]
    num_blocks = -(-seq_len // block)
    out = torch.empty(batch, perm_heads, num_blocks, head_dim, dtype=torch.float32, device=k.device)
    programs = batch * perm_heads * num_blocks
    if programs:
        _permuted_block_means_kernel[(programs,)](
            k,
            perm,
            out,
            perm_heads,
            perm_heads // num_kv_heads,
            seq_len,
            num_blocks,
            *k.stride(),
            *perm.stride(),
            HEAD_DIM=head_dim,
            BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
            BLOCK=block,
            ROWS=min(ROWS, triton.next_power_of_2(block)),
            num_warps=4,
        )
    return out


def permuted_block_means(k: torch.Tensor, perm: torch.Tensor, block: int, *, backend: str = "auto") -> torch.Tensor:
    """Block means of ``K' = k[perm]`` (:func:`permuted_block_means_reference`); ``backend`` 'auto' (Triton on
    CUDA, PyTorch on the CPU), 'triton' or 'torch'."""
    check_tensor("k", k, ndim=4)
    if check_backend(backend, k.device) == "triton":
        return permuted_block_means_triton(k, perm, block)
    return permuted_block_means_reference(k, perm, block)
