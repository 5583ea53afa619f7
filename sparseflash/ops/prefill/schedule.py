"""The order in which the dense prefill grid visits (batch, head pack, query tile): one jit helper of the kernel.

Programs launched together should read the same K/V, so that it is read from device memory once and from L2
after: the head packs of one KV head are the fastest axis, then its query tiles (causal: the longest, last tiles
first, so the short ones fill the tail of the grid), then KV heads and batches. At 64K keys one KV head's K and V
are 32 MB (d = 128, bf16): the programs running at once then touch one or two KV heads, which fit in an H200's
60 MB L2; with all heads of one tile rank running together (the order before) they touched all 8 KV heads.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def dense_program(pid, NUM_TILES, HQ, G, PACK: tl.constexpr, CAUSAL: tl.constexpr):
    """``(bh, tile)`` of program ``pid``: ``bh = b * (HQ // PACK) + head pack``, ``tile`` a query tile index.

    PACK is 1 or G (a whole GQA group packed into one program), so ``G // PACK`` packs share a KV head.
    """
    packs_per_kv = G // PACK
    kv_tiles = NUM_TILES * packs_per_kv  # programs per (batch, KV head)
    rest = pid % kv_tiles
    kv_bh = pid // kv_tiles  # b * HKV + KV head
    tile = rest // packs_per_kv
    if CAUSAL:
        tile = NUM_TILES - 1 - tile
    return kv_bh * packs_per_kv + rest % packs_per_kv, tile
