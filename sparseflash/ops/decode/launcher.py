"""``decode_attention``: attention of a few new tokens over a KV cache (split-KV flash decoding), dense or sparse.

The Triton path (:mod:`sparseflash.ops.decode.kernel`) is two launches with static shapes for a given batch:
a split kernel (grid ``num_splits * row_tiles * B * Hkv``) and, when ``num_splits > 1``, a combine kernel. It
reads no tensor value on the host, so it can be captured in a CUDA graph (pass ``check_values=False`` there).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton

from sparseflash._validate import (
    GPU_DTYPES,
    check_backend,
    check_grad,
    check_scale,
)
from sparseflash.ops.decode.checks import (
    DecodeDims,
    as_int32_lengths,
    check_decode_inputs,
    check_decode_values,
)
from sparseflash.ops.decode.reference import decode_reference

MAX_SPLITS = 128
MAX_ROWS_PER_TILE = 64


@dataclass(frozen=True)
class DecodeConfig:
    """Tile shape and pipelining of the split kernel."""

    block_n: int
    num_warps: int
    num_stages: int


def default_config(head_dim: int) -> DecodeConfig:
    """Config for ``head_dim`` unless ``SPARSEFLASH_DECODE_CONFIG=BLOCK_N,WARPS,STAGES`` is set.

    Untuned first choice (FlexDecoding's 64-key steps); benchmarks/bench_decode.py ``--sweep`` measures others.
    """
    override = os.environ.get("SPARSEFLASH_DECODE_CONFIG")
    if override:
        block_n, warps, stages = (int(x) for x in override.split(","))
        return DecodeConfig(block_n, warps, stages)
    if head_dim <= 128:
        return DecodeConfig(64, 4, 3)
    return DecodeConfig(32, 4, 2)


def choose_num_splits(
    batch: int,
    num_kv_heads: int,
    kv_len: int,
    num_sms: int,
    *,
    block_n: int = 64,
    row_tiles: int = 1,
    ctas_per_sm: int | None = None,
    max_splits: int = MAX_SPLITS,
    min_tiles_per_split: int = 4,
) -> int:
    """KV splits per (batch, KV head) so that the split kernel fills the GPU without over-splitting.

    FA3's rule (hopper/heuristics.h) on ``num_sms * ctas_per_sm`` program slots: no split once the unsplit
    grid already fills 80 % of the slots; otherwise the smallest split count whose wave efficiency
    ``waves / ceil(waves)`` is within 95 % of the best, each split keeping at least ``min_tiles_per_split``
    key tiles. Only host-known sizes enter (``kv_len`` is the capacity, or the listed work for sparse
    decode), so the launch shape is static for a given batch. Override ``ctas_per_sm`` (default 2) with
    ``SPARSEFLASH_DECODE_CTAS_PER_SM``.

    Examples (132 SMs, Hkv=8, 128K keys): B=1 -> 32 splits, B=8 -> 4, B=64 -> 1.
    """
    if ctas_per_sm is None:
        ctas_per_sm = int(os.environ.get("SPARSEFLASH_DECODE_CTAS_PER_SM", "2"))
    slots = num_sms * ctas_per_sm
    programs = batch * num_kv_heads * row_tiles
    if programs >= 0.8 * slots:
        return 1
    n_tiles = triton.cdiv(max(kv_len, 1), block_n)
    limit = max(1, min(max_splits, n_tiles // min_tiles_per_split))

    def efficiency(splits: int) -> float:
        waves = programs * splits / slots
        return waves / math.ceil(waves)

    best = max(efficiency(s) for s in range(1, limit + 1))
    return next(s for s in range(1, limit + 1) if efficiency(s) >= 0.95 * best)


# ------------------------------------------------------------------------------------------- launcher
def decode_forward(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    dims: DecodeDims,
    *,
    scale: float,
    page_table: torch.Tensor | None = None,
    kv_block_indices: torch.Tensor | None = None,
    kv_block_counts: torch.Tensor | None = None,
    num_splits: int | None = None,
    return_lse: bool = False,
    config: DecodeConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the Triton kernels on validated inputs; no host sync.

    Returns out (B, Hq, Sq_new, D) in q's dtype (contiguous) and lse (B, Hq, Sq_new) float32 or None.
    """
    from sparseflash.ops._triton_env import num_sms
    from sparseflash.ops.decode.kernel import LOG2E, decode_combine_kernel, decode_split_kernel

    config = config or default_config(dims.head_dim)
    sparse = kv_block_indices is not None
    block_n = min(config.block_n, dims.block_size) if sparse else config.block_n
    rows = dims.seq_len_q * dims.group_size
    block_m = min(MAX_ROWS_PER_TILE, max(16, triton.next_power_of_2(rows)))
    row_tiles = triton.cdiv(rows, block_m)
    if num_splits is None:
        # sparse work is bounded by the listed blocks plus the (at most two) blocks of the new tokens
        work = dims.capacity
        if sparse:
            tail = triton.cdiv(dims.seq_len_q - 1, dims.block_size) + 1
            work = min(work, (dims.list_capacity + tail) * dims.block_size)
        num_splits = choose_num_splits(dims.batch, dims.num_kv_heads, work, num_sms(q.device), block_n=block_n,
                                       row_tiles=row_tiles)
    split = num_splits > 1

    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device) if return_lse else None
    dummy_f = torch.empty(1, dtype=torch.float32, device=q.device)
    dummy_i = torch.zeros(1, dtype=torch.int32, device=q.device)
    if split:
        o_part = torch.empty(dims.batch, dims.num_kv_heads, num_splits, rows, dims.head_dim, dtype=torch.float32,
                             device=q.device)
        lse_part = torch.empty(dims.batch, dims.num_kv_heads, num_splits, rows, dtype=torch.float32,
                               device=q.device)
    else:
        o_part = lse_part = dummy_f
    paged = page_table is not None
    pt = page_table if paged else dummy_i
    pt_strides = page_table.stride() if paged else (0, 0)
    if sparse:
        idx, cnt = kv_block_indices, kv_block_counts
        i_strides, c_strides = idx.stride(), cnt.stride()
    else:
        idx = cnt = dummy_i
        i_strides, c_strides = (0, 0, 0), (0, 0)
    block_d = max(16, triton.next_power_of_2(dims.head_dim))

    grid = (num_splits * row_tiles * dims.batch * dims.num_kv_heads,)
    decode_split_kernel[grid](
        q, k_cache, v_cache, cache_seqlens, pt, idx, cnt,
        out, lse if lse is not None else dummy_f, o_part, lse_part,
        scale * LOG2E,
        *q.stride(), *k_cache.stride(), *v_cache.stride(),
        *pt_strides, *i_strides, *c_strides, *out.stride(),
        dims.num_kv_heads, dims.group_size, dims.seq_len_q, rows, row_tiles, num_splits,
        HEAD_DIM=dims.head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
        PAGED=paged, PAGE_SIZE=max(dims.page_size, 1), SPARSE=sparse, SPARSE_BLOCK=max(dims.block_size, 1),
        SPLIT=split, RETURN_LSE=return_lse,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if split:
        splits_pow2 = triton.next_power_of_2(num_splits)
        decode_combine_kernel[(dims.batch * dims.num_kv_heads * rows,)](
            o_part, lse_part, out, lse if lse is not None else dummy_f,
            *out.stride(),
            dims.num_kv_heads, dims.group_size, dims.seq_len_q, rows, num_splits,
            HEAD_DIM=dims.head_dim, BLOCK_D=block_d, SPLITS_POW2=splits_pow2, SPLIT_CHUNK=min(16, splits_pow2),
            RETURN_LSE=return_lse,
            num_warps=4,
        )
    return out, lse


# --------------------------------------------------------------------------------------------- public
def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor | list[int] | tuple[int, ...],
    *,
    scale: float | None = None,
    page_table: torch.Tensor | None = None,
    kv_block_indices: torch.Tensor | None = None,
    kv_block_counts: torch.Tensor | None = None,
    block_size: int | None = None,
    num_splits: int | None = None,
    return_lse: bool = False,
    check_values: bool = True,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of the newest ``Sq_new`` tokens of each sequence over its KV cache (decode / verification).

    The KV length is cut into ``num_splits`` chunks read in parallel and merged by log-sum-exp; the query heads
    of a GQA group share one program, so each K/V byte is read once. With block lists only those blocks (plus
    the blocks holding the new tokens) are read. Semantics in :mod:`sparseflash.ops.decode.reference`::

        cache_seqlens = [6], Sq_new = 2: token 0 (position 4) sees keys 0..4, token 1 (position 5) keys 0..5

    Args:
        q: (batch, num_heads, seq_len_q, head_dim), float16/bfloat16 (float32 on the torch backend); the new
            tokens, already written into the cache at positions ``cache_seqlens - seq_len_q + i``.
        k_cache, v_cache: (batch, num_kv_heads, max_seq_len, head_dim) in q's dtype, or with ``page_table``
            pages (num_pages, num_kv_heads, page_size, head_dim) (page sizes 16-256 are the usual ones; any
            size works). Any strides.
        cache_seqlens: (batch,) int32 or int64 tensor on q's device, or a list/tuple of Python ints (as
            transformers holds them): valid tokens per sequence, the new ones included; converted to int32 on
            the device (a list's values are always checked). A sequence shorter than seq_len_q leaves its first
            tokens nothing to attend (0, lse -inf); 0 marks an idle slot.
        scale: softmax scale, default ``1/sqrt(head_dim)``.
        page_table: (batch, max_pages) int32; token ``j`` of sequence ``b`` is slot ``j % page_size`` of page
            ``page_table[b, j // page_size]``. Only pages holding valid tokens are read (others may be -1).
        kv_block_indices: (batch, num_kv_heads, C) int32, key blocks of ``block_size`` tokens each KV head reads
            (the first ``kv_block_counts`` entries; distinct; any order; ids below ``ceil(capacity /
            block_size)``). The blocks holding the new tokens are always read, listed or not.
        kv_block_counts: (batch, num_kv_heads) int32, valid entries of each list, in [0, C].
        block_size: tokens per listed block, a power of two >= 16 (with the block lists only).
        num_splits: KV splits per (sequence, KV head); default from the batch, heads, capacity and SM count
            (:func:`choose_num_splits`). Fixed for fixed shapes, so a captured graph stays valid.
        return_lse: also return the log-sum-exp (natural log), e.g. to merge with attention over other keys.
        check_values: check index values (cache_seqlens within the capacity, page ids of used pages, block
            ids and counts) before launch, one host sync. Pass False inside CUDA graph capture or a hot loop
            whose indices are already known good: out-of-range values then read out of bounds.
        backend: 'auto' (Triton on CUDA, PyTorch on CPU), 'triton' or 'torch' (the float32 reference path,
            which syncs).

    Autograd: only the 'torch' backend is differentiable. The Triton kernels have no backward, so a call that
    would build a graph on them (grad mode on and an input with ``requires_grad``) raises ``ValueError``: wrap
    decoding in ``torch.no_grad()`` or pass ``backend='torch'``.

    Non-finite inputs: positions at or past ``cache_seqlens`` and blocks not read are never loaded, and a NaN/inf
    at a later new token's key never reaches an earlier token; a token attending one comes out non-finite.

    Returns:
        out (batch, num_heads, seq_len_q, head_dim) in q's dtype, and with ``return_lse`` lse (batch, num_heads,
        seq_len_q) float32.

    Raises:
        TypeError: wrong tensor types or dtypes (int32 index tensors, int32/int64 or ints for cache_seqlens;
            Triton needs float16/bfloat16).
        ValueError: shapes, devices, Hq not a multiple of Hkv, head dims, block sizes, inputs requiring grad on
            the Triton backend, a listed cache_seqlens outside the cache, and (``check_values``) tensor
            cache_seqlens beyond the cache, page ids out of range, bad block lists.
    """
    dims = check_decode_inputs(q, k_cache, v_cache, cache_seqlens, page_table, kv_block_indices, kv_block_counts,
                               block_size, num_splits)
    scale = check_scale(scale, dims.head_dim)
    backend = check_backend(backend, q.device)
    check_grad(backend, q=q, k_cache=k_cache, v_cache=v_cache)
    if backend == "triton" and q.dtype not in GPU_DTYPES:
        raise TypeError(f"q: expected float16 or bfloat16 for the Triton kernel, got {q.dtype}")
    lengths = as_int32_lengths(cache_seqlens, dims, q.device)  # a list's values are checked here
    if check_values:  # an int64 tensor is checked before its int32 copy is used
        check_decode_values(dims, cache_seqlens if isinstance(cache_seqlens, torch.Tensor) else lengths, page_table,
                            kv_block_indices, kv_block_counts)
    cache_seqlens = lengths
    if backend == "torch":
        out, lse = decode_reference(q, k_cache, v_cache, cache_seqlens, scale=scale, page_table=page_table,
                                    kv_block_indices=kv_block_indices, kv_block_counts=kv_block_counts,
                                    block_size=block_size, dtype=torch.float32)
        out = out.to(q.dtype)
    else:
        out, lse = decode_forward(q, k_cache, v_cache, cache_seqlens, dims, scale=scale, page_table=page_table,
                                  kv_block_indices=kv_block_indices, kv_block_counts=kv_block_counts,
                                  num_splits=num_splits, return_lse=return_lse)
    return (out, lse) if return_lse else out
