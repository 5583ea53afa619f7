"""Triton kernel for :func:`sparseflash.ops.prefill.dropped_blocks.dropped_block_attention` (the CUDA path).

One program per (tile of ``BLOCK_M`` query rows, batch * query head). It walks the pooled tokens ``J`` (one per
``POOL`` keys: one per layout block by default, or several per block) in tiles of ``BLOCK_KB`` from the means
``k_mean, v_mean`` ``(B, Hkv, Kp, D)``, computed beforehand by
:func:`~sparseflash.ops.prefill.dropped_blocks.block_means` in float32. ``k_mean`` stays float32; for fp16/bf16
inputs each tile is split into a q-dtype high part and the q-dtype remainder, two tensor-core dots whose sum is
as accurate as a float32 mean (a bf16-rounded mean alone would move the logits by up to ``2**-9`` of their size,
more than the reference tolerance of the lse). ``v_mean`` is stored in q's dtype, and ``p`` is rounded to it
before ``p @ v_mean`` as in the prefill kernel. fp32 inputs: fp32 means and IEEE fp32 dots (no tensor cores,
still small). For each row the loop keeps the blocks that are

* in a block dropped by the layout: the layout's dense keep mask ``(B or 1, H', Qb, Kb)``, ``H'`` in ``{1, Hkv, Hq}``,
  read in place (query head ``h`` reads layout head ``h // (Hq / H')``, batch stride 0 for a shared layout), and
* wholly before the row block's first query under bottom-right causality (computed here from positions; the
  loop stops at the last block that can qualify, so on average it reads half of the ``Kb`` blocks).

Logit ``scale * q . k_mean_J + log n_J`` (``n_J = POOL``, the last pool ``Sk - (Kp - 1) * POOL``); online
softmax in base 2 with fp32 running max and sum; ``acc += p @ v_mean``. A row with no eligible block writes
out 0 and lse -inf. Non-finite means are not special-cased (as in the PyTorch path): a NaN mean of an eligible
block makes its row NaN, and so does a NaN value mean of a skipped block inside a visited tile (``0 * NaN`` in
``p @ v_mean``); blocks past the row's last whole block are never read (the PyTorch path multiplies them all).

``BLOCK_M`` (64, or ``block_q`` when smaller; block sizes are powers of two) divides ``block_q``, so every row of
a program shares one layout row: one ``[BLOCK_KB]`` eligibility vector per step, broadcast over the rows.

Expected cost (an estimate, not measured): ``2 * Sq * Kb_eligible * D`` flops per head for each of the three
dots (32K, 12 heads, d = 128, block 128, about 128 eligible-range blocks per row on average: about 39 GFLOP per
layer, well under 0.1 ms on an H200's tensor cores) plus one read of q and one write of out (about 100 MB each at
that shape, about 20 us each at HBM bandwidth); the block means read k and v once more, in PyTorch. Against about
10 ms per layer for the chunked PyTorch path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparseflash.ops.triton_common import LN2, LOG2E

_BLOCK_M = 64  # query rows per program (at most; block_q when smaller)
_BLOCK_KB = 64  # pooled key blocks per inner step


@triton.jit
def dropped_blocks_fwd_kernel(
    Q,
    KM,
    VM,
    KEEP,
    O,
    LSE,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kj,
    stride_kd,
    stride_mb,
    stride_mh,
    stride_mi,
    stride_mj,
    stride_ob,
    stride_oh,
    stride_os,
    stride_od,
    stride_lb,
    stride_lh,
    stride_ls,
    HQ,
    G,
    LAYOUT_DIV,
    S_Q,
    S_K,
    KP,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_KB: tl.constexpr,
    LAYOUT_BLOCK_Q: tl.constexpr,
    LAYOUT_BLOCK_K: tl.constexpr,
    POOL: tl.constexpr,
    OFFS_64: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HQ
    h = bh % HQ
    b64 = b.to(tl.int64)
    kv_head = (h // G).to(tl.int64)
    layout_head = (h // LAYOUT_DIV).to(tl.int64)

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_kb = tl.arange(0, BLOCK_KB)
    row_ok = offs_m < S_Q
    d_ok = offs_d < HEAD_DIM
    causal_offset = S_K - S_Q
    row_block = (tile * BLOCK_M) // LAYOUT_BLOCK_Q  # the layout row of every row of this program
    first_query = row_block * LAYOUT_BLOCK_Q + causal_offset  # its first query position
    # keys [0, reach) precede the first query: the whole blocks are the first reach // block_k, or all of them
    # when reach is Sk (the ragged last block ends at Sk). Every block the loop visits is whole: only the keep mask
    # is read per pooled token (of the block holding it)
    reach = first_query + 1
    per_block: tl.constexpr = LAYOUT_BLOCK_K // POOL
    hi = tl.where(reach >= S_K, KP, (tl.maximum(reach, 0) // LAYOUT_BLOCK_K) * per_block)

    if OFFS_64:
        q_row = offs_m.to(tl.int64)
        head = h.to(tl.int64)
    else:
        q_row = offs_m
        head = h
    q_ptrs = Q + b64 * stride_qb + head * stride_qh + q_row[:, None] * stride_qs + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    KM_head = KM + b64 * stride_kb + kv_head * stride_kh
    VM_head = VM + b64 * stride_kb + kv_head * stride_kh
    KEEP_row = KEEP + b64 * stride_mb + layout_head * stride_mh + row_block.to(tl.int64) * stride_mi

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for j0 in range(0, hi, BLOCK_KB):
        offs_j = j0 + offs_kb
        j_ok = offs_j < hi
        tile_ok = j_ok[:, None] & d_ok[None, :]
        km = tl.load(KM_head + offs_j[:, None] * stride_kj + offs_d[None, :] * stride_kd, mask=tile_ok, other=0.0)
        if SPLIT_K:  # float32 means as two q-dtype halves: logits as exact as a float32 mean, on tensor cores
            k_hi = km.to(q.dtype)
            k_lo = (km - k_hi.to(tl.float32)).to(q.dtype)
            s = tl.dot(q, tl.trans(k_lo))
            s = tl.dot(q, tl.trans(k_hi), s)
        else:
            s = tl.dot(q, tl.trans(km), input_precision="ieee")
        s = s * qk_scale  # [BLOCK_M, BLOCK_KB], base 2
        pool_end = tl.minimum((offs_j + 1) * POOL, S_K)
        s += tl.log2(tl.maximum(pool_end - offs_j * POOL, 1).to(tl.float32))[None, :]  # log2 n_J
        kept = tl.load(KEEP_row + (offs_j // per_block) * stride_mj, mask=j_ok, other=1)
        eligible = (kept == 0) & j_ok  # [BLOCK_KB]
        s = tl.where(eligible[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vm = tl.load(VM_head + offs_j[:, None] * stride_kj + offs_d[None, :] * stride_kd, mask=tile_ok, other=0.0)
        if SPLIT_K:
            acc = tl.dot(p.to(vm.dtype), vm, acc * alpha[:, None])
        else:
            acc = tl.dot(p, vm, acc * alpha[:, None], input_precision="ieee")
        m_i = m_new

    empty = l_i == 0.0  # no eligible block (a NaN row keeps l NaN and stays NaN)
    out = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, l_i)[:, None])
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * LN2)
    o_ptrs = O + b64 * stride_ob + head * stride_oh + q_row[:, None] * stride_os + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + b64 * stride_lb + head * stride_lh + q_row * stride_ls, lse, mask=row_ok)


def dropped_blocks_triton(
    q: torch.Tensor,
    k_mean: torch.Tensor,
    v_mean: torch.Tensor,
    keep: torch.Tensor,
    *,
    seq_len_k: int,
    block_size: tuple[int, int],
    pool_size: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel on checked inputs.

    Args:
        q: ``(B, Hq, Sq, D)``, any strides. k_mean, v_mean: ``(B, Hkv, Kp, D)`` contiguous means over pools of
            ``pool_size`` keys (``Kp = ceil(Sk / pool_size)``); k_mean float32, v_mean in q's dtype.
        keep: bool ``(B or 1, H', Qb, Kb)``, the layout's dense keep mask (``BlockLayout.to_dense()``).
        seq_len_k: ``Sk`` (the last pool holds ``Sk - (Kp - 1) * pool_size`` keys). block_size: the layout's.
        pool_size: keys per pooled token, a power of two dividing ``block_size[1]``.

    Returns:
        out ``(B, Hq, Sq, D)`` in q's dtype, lse ``(B, Hq, Sq)`` float32 (natural log).
    """
    from sparseflash.ops.prefill.launcher import _needs_int64

    batch, num_heads, seq_len_q, head_dim = q.shape
    num_kv_heads, num_pools = k_mean.shape[1], k_mean.shape[2]
    assert k_mean.dtype == torch.float32 and v_mean.dtype == q.dtype
    assert k_mean.is_contiguous() and v_mean.shape == k_mean.shape and v_mean.stride() == k_mean.stride()
    block_q, block_k = block_size
    assert block_k % pool_size == 0
    out = torch.empty(batch, num_heads, seq_len_q, head_dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, num_heads, seq_len_q, dtype=torch.float32, device=q.device)
    keep = keep.view(torch.uint8)  # same bytes, a dtype every Triton version loads
    block_m = min(_BLOCK_M, block_q)
    assert block_q % block_m == 0, "layout block sizes are powers of two >= 16"
    m_strides = (keep.stride(0) if keep.shape[0] > 1 else 0, *keep.stride()[1:])
    grid = (triton.cdiv(seq_len_q, block_m), batch * num_heads)
    dropped_blocks_fwd_kernel[grid](
        q,
        k_mean,
        v_mean,
        keep,
        out,
        lse,
        scale * LOG2E,
        *q.stride(),
        *k_mean.stride(),
        *m_strides,
        *out.stride(),
        *lse.stride(),
        num_heads,
        num_heads // num_kv_heads,
        num_heads // keep.shape[1],
        seq_len_q,
        seq_len_k,
        num_pools,
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_M=block_m,
        BLOCK_KB=_BLOCK_KB,
        LAYOUT_BLOCK_Q=block_q,
        LAYOUT_BLOCK_K=block_k,
        POOL=pool_size,
        OFFS_64=_needs_int64(q, out),
        SPLIT_K=q.dtype != torch.float32,
        num_warps=8 if head_dim > 128 else 4,
        num_stages=2,
    )
    return out, lse
