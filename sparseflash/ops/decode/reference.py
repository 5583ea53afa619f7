"""Plain-PyTorch decoding over a KV cache: the reference the decode kernel is tested against, and the CPU path.

Semantics shared with :func:`sparseflash.decode_attention`:

* q ``(B, Hq, Sq_new, D)`` holds the new tokens of each sequence; ``Hq = G * Hkv``, query head ``h`` reads KV
  head ``h // G``.
* the cache is contiguous, k/v ``(B, Hkv, S_max, D)``, or paged: pages ``(num_pages, Hkv, page_size, D)`` plus
  ``page_table`` ``(B, max_pages)`` int32; token ``j`` of sequence ``b`` lives at slot ``j % page_size`` of page
  ``page_table[b, j // page_size]``. Capacity ``S_max`` or ``max_pages * page_size``.
* ``cache_seqlens`` ``(B,)`` int32 counts the valid tokens of each sequence, the new ones included: new token
  ``i`` sits at position ``p_i = L_b - Sq_new + i`` and attends keys ``j <= p_i`` (causal among the new tokens,
  bottom-right aligned like the prefill)::

      L=6, Sq_new=2:  keys 0 1 2 3 4 5 | 6 7 (past L: never read)
          token 0      1 1 1 1 1 0
          token 1      1 1 1 1 1 1

* sparse: ``kv_block_indices`` ``(B, Hkv, C)`` int32 and ``kv_block_counts`` ``(B, Hkv)`` int32 list, per
  sequence and KV head, the key blocks of ``block_size`` tokens to read (the first ``count`` entries; distinct;
  any order). The blocks holding the new tokens, from ``max(L_b - Sq_new, 0) // block_size`` on, are always
  read; a listed block among them adds nothing.
* a new token with no key to attend (``p_i < 0``) gives output 0 and log-sum-exp ``-inf``.
"""

from __future__ import annotations

import torch

from sparseflash.ops.prefill.reference import masked_attention


def gather_pages(pages: torch.Tensor, page_table: torch.Tensor) -> torch.Tensor:
    """A paged cache as a contiguous one.

    Args:
        pages: (num_pages, Hkv, page_size, D).
        page_table: (B, max_pages) int; entries outside ``[0, num_pages)`` (unused slots) read page 0.

    Returns:
        (B, Hkv, max_pages * page_size, D), a copy in ``pages``' dtype.
    """
    num_pages, num_kv_heads, page_size, head_dim = pages.shape
    batch, max_pages = page_table.shape
    ids = page_table.long().clamp(0, num_pages - 1)
    gathered = pages[ids]  # (B, max_pages, Hkv, page_size, D)
    return gathered.permute(0, 2, 1, 3, 4).reshape(batch, num_kv_heads, max_pages * page_size, head_dim)


def decode_key_mask(
    cache_seqlens: torch.Tensor,
    seq_len_q: int,
    capacity: int,
    *,
    kv_block_indices: torch.Tensor | None = None,
    kv_block_counts: torch.Tensor | None = None,
    block_size: int | None = None,
) -> torch.Tensor:
    """Boolean mask ``(B, Hkv or 1, Sq_new, capacity)``: True where new token ``i`` attends key ``j``.

    Args:
        cache_seqlens: (B,) int, valid length of each sequence (new tokens included).
        seq_len_q: Sq_new, the new tokens per sequence.
        capacity: key positions of the cache (S_max, or max_pages * page_size).
        kv_block_indices: optional (B, Hkv, C) int, listed key blocks (first ``count`` entries valid, in range).
        kv_block_counts: (B, Hkv) int, with ``kv_block_indices``.
        block_size: tokens per listed block, with ``kv_block_indices``.
    """
    device = cache_seqlens.device
    lengths = cache_seqlens.long()
    q_pos = lengths[:, None] - seq_len_q + torch.arange(seq_len_q, device=device)[None, :]  # (B, Sq)
    k_pos = torch.arange(capacity, device=device)
    mask = (k_pos[None, None, :] <= q_pos[:, :, None])[:, None]  # (B, 1, Sq, S): j <= p_i < L
    if kv_block_indices is None:
        return mask
    batch, num_kv_heads, slots = kv_block_indices.shape
    num_blocks = -(-capacity // block_size)
    valid = torch.arange(slots, device=device) < kv_block_counts.long()[..., None]  # (B, Hkv, C)
    ids = torch.where(valid, kv_block_indices.long(), num_blocks)  # invalid entries -> a dump slot
    listed = torch.zeros(batch, num_kv_heads, num_blocks + 1, dtype=torch.bool, device=device)
    listed.scatter_(2, ids, True)
    tail_first = (lengths - seq_len_q).clamp_min(0) // block_size  # (B,)
    blocks = torch.arange(num_blocks, device=device)
    keep = listed[..., :num_blocks] | (blocks[None, None, :] >= tail_first[:, None, None])  # (B, Hkv, Kb)
    keep = keep.repeat_interleave(block_size, dim=-1)[..., :capacity]
    return mask & keep[:, :, None, :]


def decode_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    scale: float | None = None,
    page_table: torch.Tensor | None = None,
    kv_block_indices: torch.Tensor | None = None,
    kv_block_counts: torch.Tensor | None = None,
    block_size: int | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention in ``dtype`` (float64 by default): gather the valid cache, build the mask, softmax.

    Args:
        q: (B, Hq, Sq_new, D). k_cache, v_cache: (B, Hkv, S_max, D), or pages (num_pages, Hkv, page_size, D)
            with ``page_table`` (B, max_pages) int.
        cache_seqlens: (B,) int, valid tokens per sequence, new ones included (read on the host: one sync).
        scale: softmax scale, default ``1/sqrt(D)``.
        kv_block_indices, kv_block_counts, block_size: optional sparse block lists (module docstring).
        dtype: compute dtype.

    Returns:
        out (B, Hq, Sq_new, D) and natural-log lse (B, Hq, Sq_new), both in ``dtype``; a token with nothing
        to attend gives 0 and -inf.
    """
    batch, num_heads, seq_len_q, head_dim = q.shape
    scale = head_dim**-0.5 if scale is None else scale
    if page_table is not None:
        k_cache, v_cache = gather_pages(k_cache, page_table), gather_pages(v_cache, page_table)
    capacity = k_cache.shape[2]
    mask = decode_key_mask(
        cache_seqlens,
        seq_len_q,
        capacity,
        kv_block_indices=kv_block_indices,
        kv_block_counts=kv_block_counts,
        block_size=block_size,
    )
    out = torch.zeros(q.shape, dtype=dtype, device=q.device)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=dtype, device=q.device)
    for b, length in enumerate(cache_seqlens.tolist()):
        if length <= 0:
            continue
        k = k_cache[b : b + 1, :, :length].to(dtype)  # (1, Hkv, L, D): only the valid cache is read
        v = v_cache[b : b + 1, :, :length].to(dtype)
        # masked_attention keeps NaN/inf of keys a token skips (unlisted blocks, later new tokens) out of it
        row_out, row_lse = masked_attention(q[b : b + 1].to(dtype), k, v, mask[b : b + 1, ..., :length], scale)
        out[b], lse[b] = row_out[0], row_lse[0]
    return out, lse
