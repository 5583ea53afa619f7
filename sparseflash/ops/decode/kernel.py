"""Triton kernels for decoding over a KV cache: split-KV flash decoding, dense or sparse, contiguous or paged.

Symbols: B batch, HKV KV heads, G = HQ / HKV query heads per KV head, S_Q new tokens per sequence, D head dim,
L the valid length of one sequence (``cache_seqlens[b]``, the new tokens included), NS the number of KV splits,
ROWS = S_Q * G the query rows of one KV-head group (row ``r`` is new token ``r // G`` of query head
``hkv * G + r % G``), BLOCK_M rows per program, BLOCK_N keys per inner step.

``decode_split_kernel``: one program per (split, row tile, batch, KV head). All G query heads of the group (and
all S_Q new tokens) are rows of one tile, so each K/V byte is read once per group. The program walks its share
of the sequence and writes either the final output (NS == 1) or a partial output normalised by its own sum
plus its log2-sum-exp, fp32, to ``O_PART (B, HKV, NS, ROWS, D)`` / ``LSE_PART (B, HKV, NS, ROWS)``.

* dense: split ``s`` reads keys ``[s * chunk, (s + 1) * chunk) & [0, L)`` with ``chunk`` a multiple of BLOCK_N
  sized from L on the device (so a short sequence in a long cache still spreads over every split). Tiles that
  every row sees run unmasked; the tiles holding the new tokens apply the causal mask.
* sparse: the work list of (batch, KV head) is its ``count`` listed blocks followed by the "tail", the blocks
  from ``max(L - S_Q, 0) // SPARSE_BLOCK`` to the end of the sequence (the blocks holding the new tokens,
  always read); split ``s`` takes an equal run of that list. A listed block at or past the tail adds nothing
  (its loads are predicated off), so a list may hold any distinct block ids below the cache capacity.
* paged: token ``j`` of sequence ``b`` lives at slot ``j % PAGE_SIZE`` of page ``PAGE_TABLE[b, j // PAGE_SIZE]``;
  when PAGE_SIZE is a multiple of BLOCK_N a tile sits in one page (one page-table load per tile), otherwise
  each key row looks its page up (:mod:`.tile`). With PREFETCH the loops over tiles every row sees (dense) and
  over listed blocks (sparse) look up the next tile's pages (and listed block) one step ahead, so that the K/V
  loads of a step hang on loop-carried values only and pipeline as deep as a contiguous cache's; without it,
  each step looks up its own (a dependent load the pipeliner spends a stage on). The tiles holding the new
  tokens (at most a few per split) always look up their own.

``decode_combine_kernel`` (:mod:`.combine`): one program per (batch, KV head, row); merges the NS partials by
log-sum-exp.

Non-finite K/V: keys at or past L, unlisted blocks and listed blocks inside the tail are never loaded; in the
tiles holding the new tokens a non-finite value is zeroed before the P @ V product and only the rows attending
it turn NaN.

Softmax in base 2 with the scale folded in (``qk_scale = scale * log2(e)``); fp32 accumulators; base offsets
of batch, page and key row in int64 (a cache may exceed 2**31 elements); a row with nothing to attend writes
0 and lse -inf (natural log in the final output).
"""

from __future__ import annotations

import triton
import triton.language as tl

from sparseflash.ops.decode.tile import attend_tile, key_rows, tile_pages
from sparseflash.ops.triton_common import LN2


@triton.jit
def decode_split_kernel(
    Q,
    K,
    V,
    SEQLENS,
    PAGE_TABLE,
    BLOCK_IDX,
    BLOCK_CNT,
    O,
    LSE,
    O_PART,
    LSE_PART,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_vd,
    stride_ptb,
    stride_ptp,
    stride_ib,
    stride_ih,
    stride_ic,
    stride_cb,
    stride_ch,
    stride_ob,
    stride_oh,
    stride_os,
    stride_od,
    NUM_KV_HEADS,
    G,
    S_Q,
    ROWS,
    NUM_ROW_TILES,
    NUM_SPLITS,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGED: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    SPARSE: tl.constexpr,
    SPARSE_BLOCK: tl.constexpr,
    SPLIT: tl.constexpr,
    RETURN_LSE: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """Partial (SPLIT) or final attention of one (split, row tile, batch, KV head).

    Q (B, HQ, S_Q, D); K/V (B, HKV, S_max, D), or pages (num_pages, HKV, PAGE_SIZE, D) with PAGE_TABLE
    (B, max_pages) int32 (then stride_kb / stride_vb are the page strides); SEQLENS (B,) int32; BLOCK_IDX
    (B, HKV, C) and BLOCK_CNT (B, HKV) int32 when SPARSE. O (B, HQ, S_Q, D) in Q's dtype and LSE (B, HQ, S_Q)
    fp32 when not SPLIT; else O_PART (B, HKV, NUM_SPLITS, ROWS, D) and LSE_PART (B, HKV, NUM_SPLITS, ROWS) fp32.
    """
    pid = tl.program_id(0)
    split = pid % NUM_SPLITS
    rest = pid // NUM_SPLITS
    row_tile = rest % NUM_ROW_TILES
    bh = rest // NUM_ROW_TILES
    b = bh // NUM_KV_HEADS
    h = bh % NUM_KV_HEADS
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)

    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    rows = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    row_ok = rows < ROWS
    t = rows // G  # new token of the row
    head = (h * G + rows % G).to(tl.int64)  # query head of the row
    seq_len = tl.load(SEQLENS + b)
    q_pos = seq_len - S_Q + t  # position of the row's token in its sequence

    q = tl.load(
        Q + b64 * stride_qb + head[:, None] * stride_qh + t[:, None] * stride_qs + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    if PAGED:
        K_h = K + h64 * stride_kh
        V_h = V + h64 * stride_vh
    else:
        K_h = K + b64 * stride_kb + h64 * stride_kh
        V_h = V + b64 * stride_vb + h64 * stride_vh
    PT_row = PAGE_TABLE + b64 * stride_ptb
    K_ROWS_FIRST: tl.constexpr = PAGED and PREFETCH  # K in V's layout: one page-id layout for both
    all_n = offs_n < BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if SPARSE:
        count = tl.load(BLOCK_CNT + b64 * stride_cb + h64 * stride_ch)
        idx_row = BLOCK_IDX + b64 * stride_ib + h64 * stride_ih
        tail_first = tl.maximum(seq_len - S_Q, 0) // SPARSE_BLOCK  # first block holding a new token
        n_tail = (seq_len - tail_first * SPARSE_BLOCK + SPARSE_BLOCK - 1) // SPARSE_BLOCK
        total = count + n_tail
        per_split = (total + NUM_SPLITS - 1) // NUM_SPLITS
        item_lo = split * per_split
        item_hi = tl.minimum(item_lo + per_split, total)
        SUBS: tl.constexpr = SPARSE_BLOCK // BLOCK_N
        # listed blocks: every key of a block before the tail is visible to every row
        it_lo = item_lo * SUBS
        it_hi = tl.minimum(item_hi, count) * SUBS
        if PREFETCH:  # step it + 1's block, start and pages are looked up during step it
            blk = tl.load(idx_row + (it_lo // SUBS) * stride_ic, mask=it_lo < it_hi, other=0)
            next_n = blk * SPARSE_BLOCK + (it_lo % SUBS) * BLOCK_N
            next_live = (blk < tail_first) & (it_lo < it_hi)
            next_pages = tile_pages(PT_row, next_n, next_live, all_n, stride_ptp, PAGE_SIZE, BLOCK_N) if PAGED else 0
        for it in range(it_lo, it_hi):
            if PREFETCH:
                start_n, live, pages = next_n, next_live, next_pages
                blk = tl.load(idx_row + ((it + 1) // SUBS) * stride_ic, mask=it + 1 < it_hi, other=0)
                next_n = blk * SPARSE_BLOCK + ((it + 1) % SUBS) * BLOCK_N
                next_live = (blk < tail_first) & (it + 1 < it_hi)
                if PAGED:
                    next_pages = tile_pages(PT_row, next_n, next_live, all_n, stride_ptp, PAGE_SIZE, BLOCK_N)
            else:
                blk = tl.load(idx_row + (it // SUBS) * stride_ic)
                start_n = blk * SPARSE_BLOCK + (it % SUBS) * BLOCK_N
                live = blk < tail_first
                pages = tile_pages(PT_row, start_n, live, all_n, stride_ptp, PAGE_SIZE, BLOCK_N) if PAGED else 0
            acc, l_i, m_i = attend_tile(
                acc,
                l_i,
                m_i,
                q,
                K_h,
                V_h,
                key_rows(pages, start_n, stride_kb, stride_ks, PAGED, PAGE_SIZE, BLOCK_N),
                key_rows(pages, start_n, stride_vb, stride_vs, PAGED, PAGE_SIZE, BLOCK_N),
                start_n,
                all_n & live,
                q_pos,
                qk_scale,
                stride_kd,
                stride_vd,
                1,
                K_ROWS_FIRST,
                HEAD_DIM,
                BLOCK_D,
                BLOCK_N,
            )
        # the tail: causal mask and sequence end
        tail_lo = tl.maximum(item_lo, count) * SUBS
        tail_hi = item_hi * SUBS
        tail_base = (tail_first - count) * SPARSE_BLOCK
    else:
        chunk = ((seq_len + NUM_SPLITS - 1) // NUM_SPLITS + BLOCK_N - 1) // BLOCK_N * BLOCK_N
        lo = split * chunk
        hi = tl.minimum(lo + chunk, seq_len)
        all_see = tl.minimum(hi, seq_len - S_Q + 1)  # keys [0, L - S_Q] are visible to every row
        full_hi = lo + tl.maximum(all_see - lo, 0) // BLOCK_N * BLOCK_N
        if PAGED and PREFETCH:  # step start_n + BLOCK_N's pages are looked up during step start_n
            next_pages = tile_pages(PT_row, lo, lo < full_hi, all_n, stride_ptp, PAGE_SIZE, BLOCK_N)
        for start_n in range(lo, full_hi, BLOCK_N):
            if PAGED and PREFETCH:
                pages = next_pages
                more = start_n + BLOCK_N < full_hi
                next_pages = tile_pages(PT_row, start_n + BLOCK_N, more, all_n, stride_ptp, PAGE_SIZE, BLOCK_N)
            else:
                pages = tile_pages(PT_row, start_n, True, all_n, stride_ptp, PAGE_SIZE, BLOCK_N) if PAGED else 0
            acc, l_i, m_i = attend_tile(
                acc,
                l_i,
                m_i,
                q,
                K_h,
                V_h,
                key_rows(pages, start_n, stride_kb, stride_ks, PAGED, PAGE_SIZE, BLOCK_N),
                key_rows(pages, start_n, stride_vb, stride_vs, PAGED, PAGE_SIZE, BLOCK_N),
                start_n,
                all_n,
                q_pos,
                qk_scale,
                stride_kd,
                stride_vd,
                0,
                K_ROWS_FIRST,
                HEAD_DIM,
                BLOCK_D,
                BLOCK_N,
            )
        # the tiles holding the new tokens: causal mask and split end
        tail_lo = full_hi
        tail_hi = hi
        tail_base = 0
    # the tail (sparse: items tail_lo..tail_hi of SUBS sub-tiles; dense: keys tail_lo..tail_hi)
    for it in range(tail_lo, tail_hi, 1 if SPARSE else BLOCK_N):
        if SPARSE:
            start_n = tail_base + (it // SUBS) * SPARSE_BLOCK + (it % SUBS) * BLOCK_N
            kv_ok = start_n + offs_n < seq_len
            live = start_n < seq_len
        else:
            start_n = it
            kv_ok = start_n + offs_n < tail_hi
            live = start_n < tail_hi
        pages = tile_pages(PT_row, start_n, live, kv_ok, stride_ptp, PAGE_SIZE, BLOCK_N) if PAGED else 0
        acc, l_i, m_i = attend_tile(
            acc,
            l_i,
            m_i,
            q,
            K_h,
            V_h,
            key_rows(pages, start_n, stride_kb, stride_ks, PAGED, PAGE_SIZE, BLOCK_N),
            key_rows(pages, start_n, stride_vb, stride_vs, PAGED, PAGE_SIZE, BLOCK_N),
            start_n,
            kv_ok,
            q_pos,
            qk_scale,
            stride_kd,
            stride_vd,
            2,
            K_ROWS_FIRST,
            HEAD_DIM,
            BLOCK_D,
            BLOCK_N,
        )

    empty = l_i == 0.0  # nothing attended; a NaN l_i (NaN input) stays NaN in out and lse
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse2 = tl.where(empty, float("-inf"), m_i + tl.math.log2(l_safe))
    if SPLIT:
        part_row = (bh.to(tl.int64) * NUM_SPLITS + split) * ROWS + rows  # [BLOCK_M] int64
        tl.store(O_PART + part_row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=row_ok[:, None] & d_ok[None, :])
        tl.store(LSE_PART + part_row, lse2, mask=row_ok)
    else:
        tl.store(
            O + b64 * stride_ob + head[:, None] * stride_oh + t[:, None] * stride_os + offs_d[None, :] * stride_od,
            out.to(O.dtype.element_ty),
            mask=row_ok[:, None] & d_ok[None, :],
        )
        if RETURN_LSE:
            tl.store(LSE + (b64 * NUM_KV_HEADS * G + head) * S_Q + t, lse2 * LN2, mask=row_ok)
