"""``decode_attention``: attention of a few new tokens over a KV cache (split-KV flash decoding), dense or sparse.

The Triton path (:mod:`sparseflash.ops.decode.kernel`) is two launches with static shapes for a given batch:
a split kernel (grid ``num_splits * row_tiles * B * Hkv``) and, when ``num_splits > 1``, a combine kernel. It
reads no tensor value on the host, so it can be captured in a CUDA graph (pass ``check_values=False`` there).
"""

from __future__ import annotations

import math

import torch
import triton

from sparseflash.ops.decode.checks import (
    DecodeDims,
)
from sparseflash.ops.tuning import DecodeConfig, get_tuning

MAX_SPLITS = 128
MAX_ROWS_PER_TILE = 64


def default_config(head_dim: int) -> DecodeConfig:
    """The library's config for ``head_dim`` (:attr:`~sparseflash.ops.tuning.Tuning.decode` overrides it).

    Untuned first choice (FlexDecoding's 64-key steps); benchmarks/bench_decode.py ``--sweep`` measures others.
    """
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
    decode), so the launch shape is static for a given batch. ``ctas_per_sm`` defaults to
    :attr:`~sparseflash.ops.tuning.Tuning.decode_ctas_per_sm` (2).

    Examples (132 SMs, Hkv=8, 128K keys): B=1 -> 32 splits, B=8 -> 4, B=64 -> 1.
    """
    if ctas_per_sm is None:
        ctas_per_sm = get_tuning().decode_ctas_per_sm
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
    prefetch: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the Triton kernels on validated inputs; no host sync.

    ``prefetch``: look pages and listed blocks up one tile ahead (:mod:`.kernel`'s PREFETCH); False keeps the
    per-tile lookup (benchmarks/bench_decode.py compares the two).

    Returns out (B, Hq, Sq_new, D) in q's dtype (contiguous) and lse (B, Hq, Sq_new) float32 or None.
    """
    from sparseflash.ops._triton_env import num_sms
    from sparseflash.ops.decode.combine import decode_combine_kernel
    from sparseflash.ops.decode.kernel import decode_split_kernel
    from sparseflash.ops.triton_common import LOG2E

    config = config or get_tuning().decode or default_config(dims.head_dim)
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
        num_splits = choose_num_splits(
            dims.batch, dims.num_kv_heads, work, num_sms(q.device), block_n=block_n, row_tiles=row_tiles
        )
    split = num_splits > 1

    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device) if return_lse else None
    dummy_f = torch.empty(1, dtype=torch.float32, device=q.device)
    dummy_i = torch.zeros(1, dtype=torch.int32, device=q.device)
    if split:
        o_part = torch.empty(
            dims.batch, dims.num_kv_heads, num_splits, rows, dims.head_dim, dtype=torch.float32, device=q.device
        )
        lse_part = torch.empty(dims.batch, dims.num_kv_heads, num_splits, rows, dtype=torch.float32, device=q.device)
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
        q,
        k_cache,
        v_cache,
        cache_seqlens,
        pt,
        idx,
        cnt,
        out,
        lse if lse is not None else dummy_f,
        o_part,
        lse_part,
        scale * LOG2E,
        *q.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        *pt_strides,
        *i_strides,
        *c_strides,
        *out.stride(),
        dims.num_kv_heads,
        dims.group_size,
        dims.seq_len_q,
        rows,
        row_tiles,
        num_splits,
        HEAD_DIM=dims.head_dim,
        BLOCK_D=block_d,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        PAGED=paged,
        PAGE_SIZE=max(dims.page_size, 1),
        SPARSE=sparse,
        SPARSE_BLOCK=max(dims.block_size, 1),
        SPLIT=split,
        RETURN_LSE=return_lse,
        PREFETCH=prefetch,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if split:
        splits_pow2 = triton.next_power_of_2(num_splits)
        decode_combine_kernel[(dims.batch * dims.num_kv_heads * rows,)](
            o_part,
            lse_part,
            out,
            lse if lse is not None else dummy_f,
            *out.stride(),
            dims.num_kv_heads,
            dims.group_size,
            dims.seq_len_q,
            rows,
            num_splits,
            HEAD_DIM=dims.head_dim,
            BLOCK_D=block_d,
            SPLITS_POW2=splits_pow2,
            SPLIT_CHUNK=min(16, splits_pow2),
            RETURN_LSE=return_lse,
            num_warps=4,
        )
    return out, lse
