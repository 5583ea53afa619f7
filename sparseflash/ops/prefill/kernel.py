"""The Triton prefill kernel: FlashAttention-2 forward, dense or driven by a block layout.

Symbols: B batch, HQ query heads, G = HQ / HKV query heads per KV head, S_Q / S_K lengths, D head dim,
BLOCK_M rows per program, BLOCK_N keys per inner step, PACK query heads packed into the rows of one program
(1, or G with GQA packing: row r is query ``t * QPT + r // PACK`` of head ``hp * PACK + r % PACK``, so the
heads of a group share each K/V tile), QPT = BLOCK_M // PACK queries per program.

Per program: one (batch, head-pack, query tile). The KV loop runs in two phases: key tiles that every row of the tile
may see, with no mask, then the tiles that need the causal / sequence-end / padding mask. With a block layout the loop
walks the tile's ordered block list; blocks needing no mask form a prefix of it. A layout with token columns
(``HAS_COLS``) adds a third loop after the blocks: the query block's columns in tiles of ``BLOCK_N`` gathered keys (K/V
rows loaded by position), each masked per (row, key) pair; every row of a packed GQA program shares its query block's
columns. Without columns the loop is compiled out. Softmax in base 2 with the scale folded in (``qk_scale = scale *
log2(e)``); fp32 accumulators; a row with nothing to attend writes 0 and lse -inf.

Non-finite K/V: keys outside ``[0, S_K)`` and outside the valid range of a padded sequence are never loaded,
nor are blocks a layout drops (nor column slots past a row's count); in the masked and gathered tiles a
non-finite value is zeroed before the P @ V product when some stored row does not attend its key, and only the
rows attending it turn NaN (a non-finite key is masked to -inf for the rows that skip it).

Block skipping (``SKIP``, :mod:`.tile`): an unmasked key tile whose logits lie, for every stored row, more than
``skip_thr`` (base 2) below the row's running maximum is dropped after ``Q K^T``: V is not loaded. Tiles are
visited in the order above (ascending keys; with a layout, its order), which the result then depends on. With
``STATS``, each program adds its skipped and visited key-tile counts to ``SKIP_STATS[0]`` and ``[1]``.
Two switches change the unmasked tiles only (:mod:`.tile`): ``USE_TMA`` (:mod:`.tma`) and ``LAZY_RESCALE``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from sparseflash.ops.prefill.schedule import dense_program
from sparseflash.ops.prefill.tile import _attend_gathered, _attend_tile, kv_sources
from sparseflash.ops.triton_common import LN2


@triton.jit
def prefill_fwd_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    KV_NUM,
    KV_IDX,
    COL_NUM,
    COL_IDX,
    WORK_ORDER,
    SEQ_LO,
    SEQ_HI,
    SKIP_STATS,
    qk_scale,
    skip_thr,
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
    stride_ob,
    stride_oh,
    stride_os,
    stride_od,
    stride_nb,
    stride_nh,
    stride_nm,
    stride_ib,
    stride_ih,
    stride_im,
    stride_ik,
    stride_cnb,
    stride_cnh,
    stride_cnm,
    stride_cib,
    stride_cih,
    stride_cim,
    stride_cik,
    HQ,
    G,
    LAYOUT_DIV,
    S_Q,
    S_K,
    NUM_TILES,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PACK: tl.constexpr,
    CAUSAL: tl.constexpr,
    SPARSE: tl.constexpr,
    LAYOUT_BLOCK_Q: tl.constexpr,
    LAYOUT_BLOCK_K: tl.constexpr,
    CAPACITY_POW2: tl.constexpr,
    HAS_COLS: tl.constexpr,
    HAS_SEQ_LENS: tl.constexpr,
    RETURN_LSE: tl.constexpr,
    OFFS_64: tl.constexpr,
    PREFETCH: tl.constexpr,
    SKIP: tl.constexpr,
    STATS: tl.constexpr,
    USE_TMA: tl.constexpr,
    LAZY_RESCALE: tl.constexpr,
):
    QPT: tl.constexpr = BLOCK_M // PACK
    pid = tl.program_id(0)
    if SPARSE:
        # longest-first order over (batch, head pack, tile), computed on the host side of the launch
        work = tl.load(WORK_ORDER + pid)
        tile = work % NUM_TILES
        bh = work // NUM_TILES
    else:  # the packs of one KV head fastest, then its tiles (causal: longest first): K/V shared in L2
        bh, tile = dense_program(pid, NUM_TILES, HQ, G, PACK, CAUSAL)
    num_packs = HQ // PACK
    b = bh // num_packs
    hp = bh % num_packs
    kv_head = (hp * PACK) // G

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_first = tile * QPT
    q_pos = q_first + offs_m // PACK  # [BLOCK_M]
    head = hp * PACK + offs_m % PACK  # [BLOCK_M]
    row_ok = (offs_m < QPT * PACK) & (q_pos < S_Q)
    q_last = tl.minimum(q_first + QPT, S_Q) - 1
    causal_offset = S_K - S_Q

    seq_lo = 0
    seq_hi = S_K
    if HAS_SEQ_LENS:
        seq_lo = tl.load(SEQ_LO + b)
        seq_hi = tl.load(SEQ_HI + b)
        row_ok = row_ok & (q_pos >= seq_lo) & (q_pos < seq_hi)

    b64 = b.to(tl.int64)
    if OFFS_64:
        q_row = q_pos.to(tl.int64)
        head_row = head.to(tl.int64)
    else:
        q_row = q_pos
        head_row = head
    d_ok = offs_d < HEAD_DIM
    q_ptrs = (
        Q + b64 * stride_qb + head_row[:, None] * stride_qh + q_row[:, None] * stride_qs + offs_d[None, :] * stride_qd
    )
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    K_head = K + b64 * stride_kb + kv_head.to(tl.int64) * stride_kh
    V_head = V + b64 * stride_vb + kv_head.to(tl.int64) * stride_vh
    k_src, v_src = kv_sources(K_head, V_head, S_K, stride_ks, stride_vs, BLOCK_N, BLOCK_D, USE_TMA)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_skip = tl.zeros([1], dtype=tl.int32)  # key tiles skipped / visited by this program (STATS only)
    n_tiles = tl.zeros([1], dtype=tl.int32)

    # keys every row of the tile may see: [0, all_see); some row may see: [0, any_see)
    if CAUSAL:
        all_see = tl.minimum(tl.maximum(q_first + causal_offset + 1, 0), S_K)
        any_see = tl.minimum(tl.maximum(q_last + causal_offset + 1, 0), S_K)
    else:
        all_see = S_K
        any_see = S_K
    # a tile reaching key guard_from holds keys some stored row skips: only such tiles need the NaN guard of
    # _attend_tile (every stored row attends every loaded key of the others)
    guard_from = all_see
    if HAS_SEQ_LENS:
        guard_from = tl.where((q_first < seq_lo) | (q_last >= seq_hi), 0, all_see)

    if SPARSE:
        layout_b = b64 * stride_nb
        layout_h = ((hp * PACK) // LAYOUT_DIV).to(tl.int64)
        q_block = q_first // LAYOUT_BLOCK_Q
        n_blocks = tl.load(KV_NUM + layout_b + layout_h * stride_nh + q_block * stride_nm)
        idx_row = KV_IDX + b64 * stride_ib + layout_h * stride_ih + q_block.to(tl.int64) * stride_im
        SUBS: tl.constexpr = LAYOUT_BLOCK_K // BLOCK_N
        offs_c = tl.arange(0, CAPACITY_POW2)
        ids = tl.load(idx_row + offs_c * stride_ik, mask=offs_c < n_blocks, other=2**30)
        n_full = tl.sum((ids + 1 <= all_see // LAYOUT_BLOCK_K).to(tl.int32), 0)
        if HAS_SEQ_LENS:
            n_full = 0
        n_iter = n_full * SUBS
        blk = tl.load(idx_row, mask=n_iter > 0, other=0)
        for it in range(0, n_iter):
            if PREFETCH:  # the next block id is loaded one step ahead, as FlexAttention does
                start_n = blk * LAYOUT_BLOCK_K + (it % SUBS) * BLOCK_N
                blk = tl.load(idx_row + ((it + 1) // SUBS) * stride_ik, mask=it + 1 < n_iter, other=0)
            else:
                start_n = tl.load(idx_row + (it // SUBS) * stride_ik) * LAYOUT_BLOCK_K + (it % SUBS) * BLOCK_N
            acc, l_i, m_i, skipped = _attend_tile(
                acc,
                l_i,
                m_i,
                q,
                k_src,
                v_src,
                start_n,
                q_pos,
                row_ok,
                seq_lo,
                seq_hi,
                guard_from,
                stride_ks,
                stride_kd,
                stride_vs,
                stride_vd,
                S_K,
                causal_offset,
                qk_scale,
                skip_thr,
                False,
                CAUSAL,
                HAS_SEQ_LENS,
                HEAD_DIM,
                BLOCK_D,
                BLOCK_N,
                OFFS_64,
                SKIP,
                USE_TMA,
                LAZY_RESCALE,
            )
            if STATS:
                n_skip += skipped
                n_tiles += 1
        for it in range(n_iter, n_blocks * SUBS):
            start_n = tl.load(idx_row + (it // SUBS) * stride_ik) * LAYOUT_BLOCK_K + (it % SUBS) * BLOCK_N
            acc, l_i, m_i, skipped = _attend_tile(
                acc,
                l_i,
                m_i,
                q,
                K_head,
                V_head,
                start_n,
                q_pos,
                row_ok,
                seq_lo,
                seq_hi,
                guard_from,
                stride_ks,
                stride_kd,
                stride_vs,
                stride_vd,
                S_K,
                causal_offset,
                qk_scale,
                skip_thr,
                True,
                CAUSAL,
                HAS_SEQ_LENS,
                HEAD_DIM,
                BLOCK_D,
                BLOCK_N,
                OFFS_64,
                SKIP,
            )
            if STATS:
                n_skip += skipped
                n_tiles += 1
        if HAS_COLS:  # the query block's token columns, BLOCK_N gathered keys at a time, after its blocks
            n_cols = tl.load(COL_NUM + b64 * stride_cnb + layout_h * stride_cnh + q_block * stride_cnm)
            col_row = COL_IDX + b64 * stride_cib + layout_h * stride_cih + q_block.to(tl.int64) * stride_cim
            for start_c in range(0, n_cols, BLOCK_N):
                acc, l_i, m_i = _attend_gathered(
                    acc,
                    l_i,
                    m_i,
                    q,
                    K_head,
                    V_head,
                    col_row,
                    start_c,
                    n_cols,
                    stride_cik,
                    q_pos,
                    row_ok,
                    seq_lo,
                    seq_hi,
                    guard_from,
                    stride_ks,
                    stride_kd,
                    stride_vs,
                    stride_vd,
                    S_K,
                    causal_offset,
                    qk_scale,
                    CAUSAL,
                    HAS_SEQ_LENS,
                    HEAD_DIM,
                    BLOCK_D,
                    BLOCK_N,
                    OFFS_64,
                )
    else:
        lo = 0
        hi = any_see
        full_hi = (all_see // BLOCK_N) * BLOCK_N
        if HAS_SEQ_LENS:
            lo = (seq_lo // BLOCK_N) * BLOCK_N
            hi = tl.minimum(hi, seq_hi)
            full_hi = lo
        for start_n in range(lo, full_hi, BLOCK_N):
            acc, l_i, m_i, skipped = _attend_tile(
                acc,
                l_i,
                m_i,
                q,
                k_src,
                v_src,
                start_n,
                q_pos,
                row_ok,
                seq_lo,
                seq_hi,
                guard_from,
                stride_ks,
                stride_kd,
                stride_vs,
                stride_vd,
                S_K,
                causal_offset,
                qk_scale,
                skip_thr,
                False,
                CAUSAL,
                HAS_SEQ_LENS,
                HEAD_DIM,
                BLOCK_D,
                BLOCK_N,
                OFFS_64,
                SKIP,
                USE_TMA,
                LAZY_RESCALE,
            )
            if STATS:
                n_skip += skipped
                n_tiles += 1
        for start_n in range(full_hi, hi, BLOCK_N):
            acc, l_i, m_i, skipped = _attend_tile(
                acc,
                l_i,
                m_i,
                q,
                K_head,
                V_head,
                start_n,
                q_pos,
                row_ok,
                seq_lo,
                seq_hi,
                guard_from,
                stride_ks,
                stride_kd,
                stride_vs,
                stride_vd,
                S_K,
                causal_offset,
                qk_scale,
                skip_thr,
                True,
                CAUSAL,
                HAS_SEQ_LENS,
                HEAD_DIM,
                BLOCK_D,
                BLOCK_N,
                OFFS_64,
                SKIP,
            )
            if STATS:
                n_skip += skipped
                n_tiles += 1

    # every real (query, head) row is written, padded ones too (0 and -inf)
    store_ok = (offs_m < QPT * PACK) & (q_pos < S_Q)
    empty = l_i == 0.0  # nothing attended; a NaN l_i (NaN input) stays NaN in out and lse
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_ptrs = (
        O + b64 * stride_ob + head_row[:, None] * stride_oh + q_row[:, None] * stride_os + offs_d[None, :] * stride_od
    )
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=store_ok[:, None] & d_ok[None, :])
    if STATS:  # one atomic per program
        offs_s = tl.arange(0, 1)
        tl.atomic_add(SKIP_STATS + offs_s, n_skip)
        tl.atomic_add(SKIP_STATS + 1 + offs_s, n_tiles)
    if RETURN_LSE:
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
        lse_ptrs = LSE + (b64 * HQ + head_row) * S_Q + q_row
        tl.store(lse_ptrs, lse, mask=store_ok)
