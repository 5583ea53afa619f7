"""``decode_combine_kernel``: merges the NS partial outputs of :mod:`.kernel`'s split kernel by log-sum-exp.

One program per (batch, KV head, row). The partials are ``O_PART (B, HKV, NS, ROWS, D)``, each normalised by its
own sum, and ``LSE_PART (B, HKV, NS, ROWS)`` in log2; the output is written in q's layout and the lse in natural
log. A row whose every partial is empty (lse -inf) writes 0 and lse -inf.
"""

from __future__ import annotations

import triton
import triton.language as tl

from sparseflash.ops.triton_common import LN2


@triton.jit
def decode_combine_kernel(
    O_PART,
    LSE_PART,
    O,
    LSE,
    stride_ob,
    stride_oh,
    stride_os,
    stride_od,
    NUM_KV_HEADS,
    G,
    S_Q,
    ROWS,
    NUM_SPLITS,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLITS_POW2: tl.constexpr,
    SPLIT_CHUNK: tl.constexpr,
    RETURN_LSE: tl.constexpr,
):
    """Merge the NUM_SPLITS partials of one (batch, KV head, row) by log-sum-exp into O and LSE.

    O_PART (B, HKV, NUM_SPLITS, ROWS, D) and LSE_PART (B, HKV, NUM_SPLITS, ROWS) fp32 (log2 domain) from
    :func:`decode_split_kernel`; O (B, HQ, S_Q, D) in the query dtype; LSE (B, HQ, S_Q) fp32 natural log.
    """
    pid = tl.program_id(0)
    row = pid % ROWS
    bh = pid // ROWS
    b = bh // NUM_KV_HEADS
    h = bh % NUM_KV_HEADS
    t = row // G
    head = (h * G + row % G).to(tl.int64)
    b64 = b.to(tl.int64)
    base = bh.to(tl.int64) * NUM_SPLITS * ROWS + row  # partial row of split 0; split s is s * ROWS further

    offs_s = tl.arange(0, SPLITS_POW2)
    lse_all = tl.load(LSE_PART + base + offs_s * ROWS, mask=offs_s < NUM_SPLITS, other=float("-inf"))
    m = tl.max(lse_all, 0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    total = tl.sum(tl.math.exp2(lse_all - m_use), 0)
    empty = total == 0.0  # every split empty; a NaN partial keeps total (so out and lse) NaN
    lse_tot = tl.where(empty, 0.0, m_use + tl.math.log2(tl.where(empty, 1.0, total)))

    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_c = tl.arange(0, SPLIT_CHUNK)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for first in range(0, NUM_SPLITS, SPLIT_CHUNK):
        s_ok = first + offs_c < NUM_SPLITS
        part = base + (first + offs_c).to(tl.int64) * ROWS  # [SPLIT_CHUNK]
        lse_c = tl.load(LSE_PART + part, mask=s_ok, other=float("-inf"))
        w = tl.math.exp2(lse_c - lse_tot)  # 0 for empty splits
        o_c = tl.load(
            O_PART + part[:, None] * HEAD_DIM + offs_d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0
        )  # [SPLIT_CHUNK, BLOCK_D]
        acc += tl.sum(w[:, None] * o_c, 0)
    acc = tl.where(empty, 0.0, acc)
    tl.store(
        O + b64 * stride_ob + head * stride_oh + t * stride_os + offs_d * stride_od,
        acc.to(O.dtype.element_ty),
        mask=d_ok,
    )
    if RETURN_LSE:
        lse = tl.where(empty, float("-inf"), lse_tot * LN2)
        tl.store(LSE + (b64 * NUM_KV_HEADS * G + head) * S_Q + t, lse)
