"""Triton pieces both attention kernels use (prefill and decode): base-2 softmax constants and the NaN-safe P @ V."""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


@triton.jit
def guarded_pv(acc, p, v):
    """``acc + p @ v`` where non-finite values of ``v`` are zeroed first, and the rows of ``p`` that give such a
    key weight (``p > 0``) come out NaN: 0 * NaN from a key a row skips never enters its result.

    acc: [M, D] fp32; p: [M, N] fp32 probabilities; v: [N, D] in the kernel's dtype.
    """
    v32 = v.to(tl.float32)
    v_bad = (v32 != v32) | (tl.abs(v32) == float("inf"))
    key_bad = tl.max(v_bad.to(tl.int32), 1) > 0  # [N]
    hit = tl.max(((p > 0.0) & key_bad[None, :]).to(tl.int32), 1) > 0  # [M]
    v = tl.where(v_bad, 0.0, v32).to(v.dtype)
    acc = tl.dot(p.to(v.dtype), v, acc)
    return tl.where(hit[:, None], float("nan"), acc)
