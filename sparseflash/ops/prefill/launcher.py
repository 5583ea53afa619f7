"""Launcher for :mod:`sparseflash.ops.prefill.kernel`: tile choice, GQA packing, scheduling, int64 offsets.

Tuning (tile config, sparse prefetch, TMA loads, lazy rescaling) comes from :mod:`sparseflash.ops.tuning`, read
at each launch, or from the ``config`` argument. :func:`tile_geometry` is the program shape a launch uses, which block
skipping (``skip_threshold``) depends on; the PyTorch path of skipping replays it
(:mod:`sparseflash.ops.prefill.reference_skip`).
"""

from __future__ import annotations

import torch
import triton

from sparseflash._validate import GPU_DTYPES
from sparseflash.layouts import BlockLayout
from sparseflash.ops.prefill.kernel import prefill_fwd_kernel
from sparseflash.ops.prefill.reference import block_sparse_torch, valid_range
from sparseflash.ops.prefill.reference_skip import TileGeometry, skip_attention_reference
from sparseflash.ops.prefill.tma import ensure_allocator, tma_usable
from sparseflash.ops.triton_common import LOG2E
from sparseflash.ops.tuning import TileConfig, get_tuning

INT32_MAX = 2**31 - 1


# head_dim ceiling -> config on Hopper, dense launches. d <= 128: benchmarks/bench_dense_configs.py on an H200
# (benchmarks/results/prefill_explore_h200/): at d = 128, 128x128 tiles were 2-5 % faster than 128x64 for dense
# causal and non-causal prefill at 16K and 64K; at d = 64, 128x64 with 4 warps beat 8 warps and 128x128 by 9-27 %.
_DEFAULT_CONFIGS: tuple[tuple[int, TileConfig], ...] = (
    (64, TileConfig(128, 64, 4, 3)),
    (128, TileConfig(128, 128, 8, 3)),
    (256, TileConfig(64, 64, 4, 2)),
)
# Block-sparse launches at d = 128 keep 128x64: with 128x128 (benchmarks/results/sparse_h200/tile128x128/ against
# sparse_h200/, same benchmark) layouts of 5-10 % density were up to 15 % slower at 16K and density 1.0 up to 2.4 %
# slower at 128K, on real layouts (layer_q15/) the two were within -3..+2 %.
_SPARSE_D128 = TileConfig(128, 64, 8, 3)


def default_config(head_dim: int, *, sparse: bool = False) -> TileConfig:
    """The library's tile config for ``head_dim`` (:attr:`~sparseflash.ops.tuning.Tuning.prefill` overrides it);
    ``sparse``: for a block-sparse launch."""
    if sparse and 64 < head_dim <= 128:
        return _SPARSE_D128
    for ceiling, config in _DEFAULT_CONFIGS:
        if head_dim <= ceiling:
            return config
    raise ValueError(f"head_dim: expected at most 256, got {head_dim}")


def _needs_int64(*tensors: torch.Tensor) -> bool:
    """True if an offset inside one (batch) slab of any tensor can pass int32."""
    for t in tensors:
        reach = sum((size - 1) * stride for size, stride in zip(t.shape[1:], t.stride()[1:], strict=True))
        if reach > INT32_MAX:
            return True
    return False


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def sparse_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    *,
    causal: bool,
    scale: float,
    backend: str,
    seq_lens: torch.Tensor | None = None,
    padding_side: str = "right",
    return_lse: bool = False,
    pack_gqa: bool | None = None,
    skip_threshold: float | None = None,
    skip_stats: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Block-sparse attention on checked inputs with a resolved ``backend`` ('torch' or 'triton').

    'torch' runs :func:`~sparseflash.ops.prefill.reference.block_sparse_torch` (with ``skip_threshold``,
    :func:`skip_attention_torch`); 'triton' :func:`prefill_forward` (fp16/bf16 only). Returns ``(out, lse)``, lse
    None without ``return_lse``.
    """
    if backend == "torch" and skip_threshold is not None:
        return skip_attention_torch(
            q,
            k,
            v,
            causal=causal,
            scale=scale,
            layout=layout,
            seq_lens=seq_lens,
            padding_side=padding_side,
            return_lse=return_lse,
            pack_gqa=pack_gqa,
            skip_threshold=skip_threshold,
            skip_stats=skip_stats,
        )
    if backend == "torch":
        return block_sparse_torch(
            q,
            k,
            v,
            layout,
            causal=causal,
            scale=scale,
            seq_lens=seq_lens,
            padding_side=padding_side,
            return_lse=return_lse,
        )
    if q.dtype not in GPU_DTYPES:
        raise TypeError(f"q: expected float16 or bfloat16 for the Triton kernel, got {q.dtype}")
    return prefill_forward(
        q,
        k,
        v,
        causal=causal,
        scale=scale,
        layout=layout,
        seq_lens=seq_lens,
        padding_side=padding_side,
        return_lse=return_lse,
        pack_gqa=pack_gqa,
        skip_threshold=skip_threshold,
        skip_stats=skip_stats,
    )


def tile_geometry(
    num_heads: int,
    num_kv_heads: int,
    seq_len_q: int,
    config: TileConfig,
    *,
    layout: BlockLayout | None = None,
    pack_gqa: bool | None = None,
) -> TileGeometry:
    """Rows per program, keys per tile and packed GQA heads of a launch with tile ``config``.

    ``pack_gqa`` None: pack a GQA group into one program for a layout shared by the group with a power-of-two
    group size, and densely for prompts shorter than ``config.block_m``. Raises ``ValueError`` for
    ``pack_gqa=True`` with a layout that cannot be packed.
    """
    group = num_heads // num_kv_heads
    sparse = layout is not None
    if pack_gqa is None:
        if sparse:
            pack_gqa = group > 1 and layout.num_heads in (1, num_kv_heads) and _is_pow2(group)
        else:
            pack_gqa = group > 1 and seq_len_q < config.block_m
    if pack_gqa and sparse and (layout.num_heads not in (1, num_kv_heads) or not _is_pow2(group)):
        raise ValueError(
            "pack_gqa: packing a GQA group into one tile needs a layout shared by the group (heads 1 or "
            f"{num_kv_heads}) and a power-of-two group size, got layout heads {layout.num_heads}, group {group}"
        )
    pack = group if pack_gqa else 1
    block_m, block_n = config.block_m, config.block_n
    if pack > block_m:
        block_m = triton.next_power_of_2(pack)
    if sparse:
        block_q, block_k = layout.block_size
        block_m = min(block_m, block_q * pack)
        block_n = min(block_n, block_k)
    return TileGeometry(block_m, block_n, pack)


def skip_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    skip_threshold: float,
    layout: BlockLayout | None = None,
    seq_lens: torch.Tensor | None = None,
    padding_side: str = "right",
    return_lse: bool = False,
    pack_gqa: bool | None = None,
    skip_stats: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The PyTorch path of block skipping: the kernel's tile walk (the geometry a launch would use) in float32.

    Returns ``(out, lse)`` as :func:`prefill_forward`; adds the skipped / visited tile counts to ``skip_stats``.
    """
    config = get_tuning().prefill or default_config(q.shape[3], sparse=layout is not None)
    geometry = tile_geometry(q.shape[1], k.shape[1], q.shape[2], config, layout=layout, pack_gqa=pack_gqa)
    out, lse, counts = skip_attention_reference(
        q,
        k,
        v,
        skip_threshold=skip_threshold,
        geometry=geometry,
        causal=causal,
        scale=scale,
        layout=layout,
        seq_lens=seq_lens,
        padding_side=padding_side,
        dtype=torch.float32,
    )
    if skip_stats is not None:
        skip_stats += counts.to(device=skip_stats.device, dtype=skip_stats.dtype)
    return out.to(q.dtype), lse if return_lse else None


def prefill_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    layout: BlockLayout | None = None,
    seq_lens: torch.Tensor | None = None,
    padding_side: str = "right",
    return_lse: bool = False,
    pack_gqa: bool | None = None,
    config: TileConfig | None = None,
    skip_threshold: float | None = None,
    skip_stats: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the Triton kernel on validated inputs.

    ``skip_threshold`` (natural log, >= 0) turns on block skipping (:mod:`.tile`); ``skip_stats``, int32 ``(2,)``
    on q's device, then receives the skipped and visited key-tile counts (added to what it holds).

    Returns ``out`` ``(B, Hq, Sq, D)`` in q's dtype, a view of ``(B, Sq, Hq, D)`` memory (so
    ``out.transpose(1, 2)`` is contiguous, the layout transformers wants back), and ``lse`` ``(B, Hq, Sq)``
    float32 or None.
    """
    batch, num_heads, seq_len_q, head_dim = q.shape
    num_kv_heads, seq_len_k = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    tuning = get_tuning()
    config = config or tuning.prefill or default_config(head_dim, sparse=layout is not None)
    sparse = layout is not None
    block_m, block_n, pack = tile_geometry(num_heads, num_kv_heads, seq_len_q, config, layout=layout, pack_gqa=pack_gqa)
    queries_per_tile = block_m // pack
    num_tiles = triton.cdiv(seq_len_q, queries_per_tile)
    num_packs = num_heads // pack
    num_bh = batch * num_packs

    out_bshd = torch.empty(batch, seq_len_q, num_heads, head_dim, dtype=q.dtype, device=q.device)
    out = out_bshd.transpose(1, 2)
    lse = torch.empty(batch, num_heads, seq_len_q, dtype=torch.float32, device=q.device) if return_lse else None
    dummy = torch.empty(1, dtype=torch.int32, device=q.device)

    if seq_lens is not None:
        seq_lo, seq_hi = valid_range(seq_lens, seq_len_k, padding_side)
    else:
        seq_lo = seq_hi = dummy

    if sparse:
        num, idx = layout.kv_num_blocks, layout.kv_indices
        layout_div = num_heads // layout.num_heads
        n_strides = (num.stride(0) if layout.batch > 1 else 0, num.stride(1), num.stride(2))
        i_strides = (idx.stride(0) if layout.batch > 1 else 0, idx.stride(1), idx.stride(2), idx.stride(3))
        capacity_pow2 = triton.next_power_of_2(layout.capacity)
        # work per query block in keys: kept blocks times block_k, plus the gathered columns
        work = num * layout.block_size[1] + (layout.col_counts if layout.has_columns else 0)
        work_order = _longest_first(
            work, batch, num_packs, pack, layout_div, num_tiles, queries_per_tile, layout.block_size[0]
        )
        layout_block = layout.block_size
    else:
        num = idx = work_order = dummy
        layout_div, n_strides, i_strides, capacity_pow2, layout_block = 1, (0, 0, 0), (0, 0, 0, 0), 1, (16, 16)
    has_cols = sparse and layout.has_columns
    if has_cols:
        col_num, col_idx = layout.col_counts, layout.col_indices
        cn_strides = (col_num.stride(0) if layout.batch > 1 else 0, col_num.stride(1), col_num.stride(2))
        ci_strides = (col_idx.stride(0) if layout.batch > 1 else 0, *col_idx.stride()[1:])
    else:
        col_num = col_idx = dummy
        cn_strides, ci_strides = (0, 0, 0), (0, 0, 0, 0)

    # TMA where it applies (else the pointer path); a device-side descriptor needs Triton's scratch allocator.
    # Lazy rescaling keeps a stale running maximum, which skipping compares against: off when skipping.
    use_tma = tuning.tma and tma_usable(k, v, head_dim)
    if use_tma and q.device.type == "cuda":
        ensure_allocator()
    grid = (num_tiles * num_bh,)
    prefill_fwd_kernel[grid](
        q,
        k,
        v,
        out,
        lse if lse is not None else dummy,
        num,
        idx,
        col_num,
        col_idx,
        work_order,
        seq_lo,
        seq_hi,
        skip_stats if skip_stats is not None else dummy,
        scale * LOG2E,
        0.0 if skip_threshold is None else skip_threshold * LOG2E,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *out.stride(),
        *n_strides,
        *i_strides,
        *cn_strides,
        *ci_strides,
        num_heads,
        group,
        layout_div,
        seq_len_q,
        seq_len_k,
        num_tiles,
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        PACK=pack,
        CAUSAL=causal,
        SPARSE=sparse,
        LAYOUT_BLOCK_Q=layout_block[0],
        LAYOUT_BLOCK_K=layout_block[1],
        CAPACITY_POW2=capacity_pow2,
        HAS_COLS=has_cols,
        HAS_SEQ_LENS=seq_lens is not None,
        RETURN_LSE=return_lse,
        OFFS_64=_needs_int64(q, k, v, out),
        PREFETCH=tuning.sparse_prefetch,
        SKIP=skip_threshold is not None,
        STATS=skip_stats is not None,
        USE_TMA=use_tma,
        LAZY_RESCALE=tuning.lazy_rescale and skip_threshold is None,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out, lse


def _longest_first(
    work_per_block: torch.Tensor,
    batch: int,
    num_packs: int,
    pack: int,
    layout_div: int,
    num_tiles: int,
    queries_per_tile: int,
    block_q: int,
) -> torch.Tensor:
    """Program ids ``(b * num_packs + hp) * num_tiles + t`` ordered by work (``(B, H, Qb)``: kept blocks, or keys
    with columns), most first (int32, on GPU)."""
    device = work_per_block.device
    layout_heads = (torch.arange(num_packs, device=device) * pack) // layout_div
    q_blocks = (torch.arange(num_tiles, device=device) * queries_per_tile) // block_q
    work = work_per_block[:, layout_heads][:, :, q_blocks].expand(batch, num_packs, num_tiles)
    return torch.argsort(work.reshape(-1), descending=True, stable=True).to(torch.int32)
