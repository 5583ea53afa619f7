"""``decode_attention``: attention of a few new tokens over a KV cache (split-KV flash decoding), dense or sparse.

Checks every argument (:mod:`.checks`), then runs the Triton launcher (:mod:`.launcher`) or the PyTorch
reference (:mod:`.reference`). Sparse decode takes a :class:`~sparseflash.BlockLayout` (``layout=``) or the block
lists themselves (``kv_block_indices=``, ``kv_block_counts=``, ``block_size=``).
"""

from __future__ import annotations

from typing import Literal, overload

import torch

from sparseflash._validate import GPU_DTYPES, check_backend, check_grad, check_scale, check_tensor
from sparseflash.layouts import BlockLayout
from sparseflash.ops.decode.checks import as_int32_lengths, check_decode_inputs, check_decode_values
from sparseflash.ops.decode.launcher import decode_forward
from sparseflash.ops.decode.reference import decode_reference


@overload
def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor | list[int] | tuple[int, ...],
    *,
    scale: float | None = ...,
    page_table: torch.Tensor | None = ...,
    kv_block_indices: torch.Tensor | None = ...,
    kv_block_counts: torch.Tensor | None = ...,
    block_size: int | None = ...,
    layout: BlockLayout | None = ...,
    num_splits: int | None = ...,
    return_lse: Literal[False] = ...,
    check_values: bool = ...,
    backend: str = ...,
) -> torch.Tensor: ...


@overload
def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor | list[int] | tuple[int, ...],
    *,
    scale: float | None = ...,
    page_table: torch.Tensor | None = ...,
    kv_block_indices: torch.Tensor | None = ...,
    kv_block_counts: torch.Tensor | None = ...,
    block_size: int | None = ...,
    layout: BlockLayout | None = ...,
    num_splits: int | None = ...,
    return_lse: Literal[True],
    check_values: bool = ...,
    backend: str = ...,
) -> tuple[torch.Tensor, torch.Tensor]: ...


@overload
def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor | list[int] | tuple[int, ...],
    *,
    scale: float | None = ...,
    page_table: torch.Tensor | None = ...,
    kv_block_indices: torch.Tensor | None = ...,
    kv_block_counts: torch.Tensor | None = ...,
    block_size: int | None = ...,
    layout: BlockLayout | None = ...,
    num_splits: int | None = ...,
    return_lse: bool = ...,
    check_values: bool = ...,
    backend: str = ...,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...


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
    layout: BlockLayout | None = None,
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
        layout: instead of the three above, a :class:`~sparseflash.BlockLayout` with one query block (from a
            pattern run on the new tokens against the cache, e.g. ``patterns.select(name, q, k_cache)``), turned
            into block lists by :meth:`~sparseflash.BlockLayout.to_block_lists` (a per-query-head layout gives
            each KV head the union of its group's blocks).
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
            cache_seqlens beyond the cache, page ids out of range, bad block lists; ``layout`` together with
            block lists, or a layout with more than one query block.
    """
    if layout is not None:
        kv_block_indices, kv_block_counts, block_size = _layout_block_lists(
            layout, q, k_cache, kv_block_indices, kv_block_counts, block_size
        )
    dims = check_decode_inputs(
        q, k_cache, v_cache, cache_seqlens, page_table, kv_block_indices, kv_block_counts, block_size, num_splits
    )
    scale = check_scale(scale, dims.head_dim)
    backend = check_backend(backend, q.device)
    check_grad(backend, q=q, k_cache=k_cache, v_cache=v_cache)
    if backend == "triton" and q.dtype not in GPU_DTYPES:
        raise TypeError(f"q: expected float16 or bfloat16 for the Triton kernel, got {q.dtype}")
    lengths = as_int32_lengths(cache_seqlens, dims, q.device)  # a list's values are checked here
    if check_values:  # an int64 tensor is checked before its int32 copy is used
        check_decode_values(
            dims,
            cache_seqlens if isinstance(cache_seqlens, torch.Tensor) else lengths,
            page_table,
            kv_block_indices,
            kv_block_counts,
        )
    cache_seqlens = lengths
    if backend == "torch":
        out, lse = decode_reference(
            q,
            k_cache,
            v_cache,
            cache_seqlens,
            scale=scale,
            page_table=page_table,
            kv_block_indices=kv_block_indices,
            kv_block_counts=kv_block_counts,
            block_size=block_size,
            dtype=torch.float32,
        )
        out = out.to(q.dtype)
    else:
        out, lse = decode_forward(
            q,
            k_cache,
            v_cache,
            cache_seqlens,
            dims,
            scale=scale,
            page_table=page_table,
            kv_block_indices=kv_block_indices,
            kv_block_counts=kv_block_counts,
            num_splits=num_splits,
            return_lse=return_lse,
        )
    return (out, lse) if return_lse else out


def _layout_block_lists(
    layout: object,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    kv_block_indices: torch.Tensor | None,
    kv_block_counts: torch.Tensor | None,
    block_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``layout`` as the decode kernel's block lists (checked: a BlockLayout, no block lists given as well)."""
    if kv_block_indices is not None or kv_block_counts is not None or block_size is not None:
        raise ValueError("layout: expected either layout or kv_block_indices/kv_block_counts/block_size, got both")
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout: expected a sparseflash.BlockLayout, got {type(layout).__name__}")
    check_tensor("q", q, ndim=4)
    check_tensor("k_cache", k_cache, ndim=4)
    return layout.to_block_lists(batch=q.shape[0], num_heads=q.shape[1], num_kv_heads=k_cache.shape[1])
