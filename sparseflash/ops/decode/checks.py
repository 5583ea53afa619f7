"""The checks of :func:`sparseflash.ops.decode.decode_attention`'s arguments: shapes, dtypes, devices, and the
values (lengths, page tables, block lists) when the caller asks for them (they cost a host sync).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from sparseflash._validate import (
    SUPPORTED_DTYPES,
    check_head_dim,
    check_tensor,
)


class DecodeDims(NamedTuple):
    """Sizes of one decode call."""

    batch: int
    num_heads: int
    num_kv_heads: int
    seq_len_q: int
    head_dim: int
    capacity: int  # key positions per sequence: S_max, or max_pages * page_size
    page_size: int  # 0 for a contiguous cache
    num_pages: int  # 0 for a contiguous cache
    block_size: int  # 0 when dense
    list_capacity: int  # C, slots per sparse block list (0 when dense)

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


def _int32(name: str, t: object, shape: tuple[int, ...], device: torch.device, what: str) -> None:
    check_tensor(name, t, ndim=len(shape))
    if t.dtype != torch.int32:
        raise TypeError(f"{name}: expected dtype torch.int32, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape} ({what}), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: expected device {device} (from q), got {t.device}")


def _check_lengths(cache_seqlens: object, batch: int, device: torch.device) -> None:
    """``cache_seqlens``: an int32/int64 tensor (batch,) on q's device, or a list/tuple of ``batch`` Python ints."""
    if isinstance(cache_seqlens, (list, tuple)):
        odd = next((x for x in cache_seqlens if isinstance(x, bool) or not isinstance(x, int)), None)
        if odd is not None:
            raise TypeError(
                f"cache_seqlens: expected a list of Python ints (or an int32/int64 tensor), got a "
                f"{type(cache_seqlens).__name__} holding {type(odd).__name__} {odd!r}"
            )
        if len(cache_seqlens) != batch:
            raise ValueError(
                f"cache_seqlens: expected shape ({batch},) (batch from q), got a {type(cache_seqlens).__name__} "
                f"of {len(cache_seqlens)}"
            )
        return
    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(
            f"cache_seqlens: expected an int32/int64 tensor or a list of ints, got {type(cache_seqlens).__name__}"
        )
    if cache_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(
            f"cache_seqlens: expected dtype torch.int32 or torch.int64 (or a list of ints), got {cache_seqlens.dtype}"
        )
    if tuple(cache_seqlens.shape) != (batch,):
        raise ValueError(f"cache_seqlens: expected shape ({batch},) (batch from q), got {tuple(cache_seqlens.shape)}")
    if cache_seqlens.device != device:
        raise ValueError(f"cache_seqlens: expected device {device} (from q), got {cache_seqlens.device}")


def as_int32_lengths(
    cache_seqlens: torch.Tensor | list[int] | tuple[int, ...], dims: DecodeDims, device: torch.device
) -> torch.Tensor:
    """``cache_seqlens`` (checked by :func:`check_decode_inputs`) as an int32 tensor on ``device``.

    A list's values are on the host already, so they are always checked against ``[0, capacity]``; a tensor's
    are checked by :func:`check_decode_values` (before this conversion, so an int64 past int32 cannot wrap).
    """
    if isinstance(cache_seqlens, torch.Tensor):
        return cache_seqlens.to(torch.int32)
    if cache_seqlens and not 0 <= min(cache_seqlens) <= max(cache_seqlens) <= dims.capacity:
        raise ValueError(
            f"cache_seqlens: expected values in [0, {dims.capacity}] (the cache capacity), got min "
            f"{min(cache_seqlens)}, max {max(cache_seqlens)}"
        )
    return torch.tensor(cache_seqlens, dtype=torch.int32, device=device)


def check_decode_inputs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor | list[int] | tuple[int, ...],
    page_table: torch.Tensor | None,
    kv_block_indices: torch.Tensor | None,
    kv_block_counts: torch.Tensor | None,
    block_size: int | None,
    num_splits: int | None,
) -> DecodeDims:
    """Check types, dtypes, shapes and devices (no tensor value is read); return the sizes.

    Raises:
        TypeError: a non-tensor, a wrong dtype (q/caches not float16/bfloat16/float32 or not alike; int32 for
            page_table and the block lists; int32/int64 or a list of ints for cache_seqlens), a non-int
            block_size/num_splits.
        ValueError: wrong rank or shape, mismatched devices, Hq not a multiple of Hkv, an unsupported head dim,
            block lists given by halves, a block_size that is not a power of two >= 16.
    """
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(name, t, ndim=4)
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}: expected dtype float16, bfloat16 or float32, got {t.dtype}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(
            f"k_cache, v_cache: expected dtype {q.dtype} (from q), got k_cache {k_cache.dtype} and "
            f"v_cache {v_cache.dtype}"
        )
    device = q.device
    if k_cache.device != device or v_cache.device != device:
        raise ValueError(
            f"k_cache, v_cache: expected device {device} (from q), got {k_cache.device} and {v_cache.device}"
        )
    batch, num_heads, seq_len_q, head_dim = q.shape
    if min(batch, num_heads, seq_len_q) == 0:
        raise ValueError(f"q: expected non-empty batch, heads and new tokens, got shape {tuple(q.shape)}")
    check_head_dim("q", head_dim)
    if page_table is None:
        if k_cache.shape[0] != batch or k_cache.shape[3] != head_dim or k_cache.shape[2] == 0:
            raise ValueError(
                f"k_cache: expected shape ({batch}, num_kv_heads, max_seq_len >= 1, {head_dim}) (batch and "
                f"head_dim from q; pass page_table for a paged cache), got {tuple(k_cache.shape)}"
            )
        capacity, page_size, num_pages = k_cache.shape[2], 0, 0
    else:
        check_tensor("page_table", page_table, ndim=2)
        if page_table.dtype != torch.int32:
            raise TypeError(f"page_table: expected dtype torch.int32, got {page_table.dtype}")
        if page_table.shape[0] != batch or page_table.shape[1] == 0:
            raise ValueError(
                f"page_table: expected shape ({batch}, max_pages >= 1) (batch from q), got {tuple(page_table.shape)}"
            )
        if page_table.device != device:
            raise ValueError(f"page_table: expected device {device} (from q), got {page_table.device}")
        if k_cache.shape[3] != head_dim or min(k_cache.shape[:3]) == 0:
            raise ValueError(
                f"k_cache: expected pages (num_pages, num_kv_heads, page_size, {head_dim}) (head_dim from q), "
                f"got {tuple(k_cache.shape)}"
            )
        num_pages, page_size = k_cache.shape[0], k_cache.shape[2]
        capacity = page_table.shape[1] * page_size
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache: expected shape {tuple(k_cache.shape)} (from k_cache), got {tuple(v_cache.shape)}")
    num_kv_heads = k_cache.shape[1]
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        raise ValueError(
            f"q: expected num_heads a multiple of k_cache's num_kv_heads={num_kv_heads} (GQA/MQA), got {num_heads}"
        )
    _check_lengths(cache_seqlens, batch, device)

    sparse = kv_block_indices is not None or kv_block_counts is not None
    if sparse and (kv_block_indices is None or kv_block_counts is None):
        raise ValueError(
            "kv_block_indices, kv_block_counts: expected both or neither, got "
            f"kv_block_indices {'None' if kv_block_indices is None else 'a tensor'} and "
            f"kv_block_counts {'None' if kv_block_counts is None else 'a tensor'}"
        )
    if not sparse:
        if block_size is not None:
            raise ValueError(f"block_size: expected None without kv_block_indices (dense decode), got {block_size}")
        list_capacity, block = 0, 0
    else:
        if isinstance(block_size, bool) or not isinstance(block_size, int):
            raise TypeError(f"block_size: expected an int with kv_block_indices, got {type(block_size).__name__}")
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"block_size: expected a power of two >= 16, got {block_size}")
        check_tensor("kv_block_indices", kv_block_indices, ndim=3)
        list_capacity, block = kv_block_indices.shape[2], block_size
        _int32(
            "kv_block_indices",
            kv_block_indices,
            (batch, num_kv_heads, list_capacity),
            device,
            "batch, num_kv_heads, slots",
        )
        _int32("kv_block_counts", kv_block_counts, (batch, num_kv_heads), device, "batch, num_kv_heads")
    if num_splits is not None:
        if isinstance(num_splits, bool) or not isinstance(num_splits, int):
            raise TypeError(f"num_splits: expected an int or None, got {type(num_splits).__name__}")
        if not 1 <= num_splits <= 4096:
            raise ValueError(f"num_splits: expected an int in [1, 4096], got {num_splits}")
    return DecodeDims(
        batch, num_heads, num_kv_heads, seq_len_q, head_dim, capacity, page_size, num_pages, block, list_capacity
    )


def check_decode_values(
    dims: DecodeDims,
    cache_seqlens: torch.Tensor,
    page_table: torch.Tensor | None,
    kv_block_indices: torch.Tensor | None,
    kv_block_counts: torch.Tensor | None,
) -> None:
    """Check the values of the index tensors with one host sync (never inside CUDA graph capture).

    Raises:
        ValueError: a cache_seqlens outside ``[0, capacity]``, a page of a valid token outside
            ``[0, num_pages)``, a count outside ``[0, C]``, a listed block outside ``[0, ceil(capacity /
            block_size))`` or listed twice.
    """
    if cache_seqlens.is_cuda and torch.cuda.is_current_stream_capturing():
        raise ValueError(
            "check_values: expected False inside CUDA graph capture (checking values syncs with the host), got True"
        )
    lengths = cache_seqlens.long()
    flags = [(lengths < 0).any() | (lengths > dims.capacity).any()]
    if page_table is not None:
        used_pages = -(-lengths // dims.page_size)  # (B,)
        used = torch.arange(page_table.shape[1], device=lengths.device)[None, :] < used_pages[:, None]
        flags.append((used & ((page_table < 0) | (page_table >= dims.num_pages))).any())
    if kv_block_indices is not None:
        counts = kv_block_counts.long()
        flags.append(((counts < 0) | (counts > dims.list_capacity)).any())
        num_blocks = -(-dims.capacity // dims.block_size)
        slots = torch.arange(dims.list_capacity, device=lengths.device)
        valid = slots < counts[..., None]
        ids = kv_block_indices.long()
        flags.append((valid & ((ids < 0) | (ids >= num_blocks))).any())
        # duplicates among the valid entries: invalid ones get distinct out-of-range sentinels
        ids = torch.where(valid, ids, num_blocks + slots)
        ordered = ids.sort(dim=-1).values
        flags.append((ordered[..., 1:] == ordered[..., :-1]).any())
    bad = torch.stack(flags).tolist()  # the one host sync
    if bad[0]:
        raise ValueError(
            f"cache_seqlens: expected values in [0, {dims.capacity}] (the cache capacity), got min "
            f"{int(lengths.min())}, max {int(lengths.max())}"
        )
    pos = 1
    if page_table is not None:
        if bad[pos]:
            ids = page_table[used]
            raise ValueError(
                f"page_table: expected page ids in [0, {dims.num_pages}) for every page holding a valid token, "
                f"got min {int(ids.min())}, max {int(ids.max())}"
            )
        pos += 1
    if kv_block_indices is not None:
        if bad[pos]:
            raise ValueError(
                f"kv_block_counts: expected values in [0, {dims.list_capacity}] (slots of kv_block_indices), "
                f"got min {int(counts.min())}, max {int(counts.max())}"
            )
        if bad[pos + 1]:
            listed = kv_block_indices[valid]
            raise ValueError(
                f"kv_block_indices: expected block ids in [0, {num_blocks}) (ceil(capacity / block_size)), "
                f"got min {int(listed.min())}, max {int(listed.max())}"
            )
        if bad[pos + 2]:
            raise ValueError("kv_block_indices: expected distinct block ids per (batch, KV head), got a repeat")


# ------------------------------------------------------------------------------------------ heuristics
