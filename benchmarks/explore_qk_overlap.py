"""Does issuing the next tile's Q K^T before this tile's softmax speed up a Triton attention loop on Hopper?

FlashAttention-3's intra-warpgroup overlap: the tensor cores work on ``S_{j+1} = Q K_{j+1}^T`` while the softmax of
``S_j`` runs on the other units. Triton's wgmma is asynchronous, so writing the loop with ``S_{j+1}`` issued first
may let the compiler overlap them. A minimal causal/non-causal forward (B=1, bf16, no GQA packing, square shapes)
with and without the reordering, against SDPA cuDNN and sparseflash's kernel, in one GPU call (issue 13).

    PYTHONUNBUFFERED=1 python benchmarks/explore_qk_overlap.py [--out DIR]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import bench_ms, gpu_tag, sdpa_repeated_kv  # noqa: E402

import sparseflash as sf  # noqa: E402


@triton.jit
def _softmax_pv(acc, l_i, m_i, qk, v, qk_scale):
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, l_i, m_new


@triton.jit
def _fwd(
    Q, K, V, O, qk_scale, stride_h, stride_s, N, G,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    OVERLAP: tl.constexpr,
):  # fmt: skip
    n_tiles = tl.cdiv(N, BLOCK_M)
    tile = n_tiles - 1 - tl.program_id(0)  # longest (causal) first
    h = tl.program_id(1)
    kv = h // G
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + h.to(tl.int64) * stride_h + offs_m[:, None] * stride_s + offs_d[None, :])
    k_base = K + kv.to(tl.int64) * stride_h + offs_d[:, None] + offs_n[None, :] * stride_s  # [D, BLOCK_N]
    v_base = V + kv.to(tl.int64) * stride_h + offs_n[:, None] * stride_s + offs_d[None, :]  # [BLOCK_N, D]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    full_hi = tile * BLOCK_M if CAUSAL else N
    if OVERLAP:
        if full_hi > 0:
            qk = tl.dot(q, tl.load(k_base))
            for start_n in range(BLOCK_N, full_hi, BLOCK_N):
                qk_next = tl.dot(q, tl.load(k_base + start_n * stride_s))
                v = tl.load(v_base + (start_n - BLOCK_N) * stride_s)
                acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, qk, v, qk_scale)
                qk = qk_next
            v = tl.load(v_base + (full_hi - BLOCK_N) * stride_s)
            acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, qk, v, qk_scale)
    else:
        for start_n in range(0, full_hi, BLOCK_N):
            qk = tl.dot(q, tl.load(k_base + start_n * stride_s))
            v = tl.load(v_base + start_n * stride_s)
            acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, qk, v, qk_scale)
    if CAUSAL:  # the diagonal tile(s), masked
        for start_n in range(full_hi, full_hi + BLOCK_M, BLOCK_N):
            qk = tl.dot(q, tl.load(k_base + start_n * stride_s))
            qk = tl.where((start_n + offs_n)[None, :] <= offs_m[:, None], qk, float("-inf"))
            v = tl.load(v_base + start_n * stride_s)
            acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, qk, v, qk_scale)
    out = acc / l_i[:, None]
    tl.store(O + h.to(tl.int64) * stride_h + offs_m[:, None] * stride_s + offs_d[None, :], out.to(O.dtype.element_ty))


def run(q, k, v, causal, bm, bn, warps, stages, overlap):
    """q (Hq, N, D), k/v (Hkv, N, D) contiguous."""
    hq, n, d = q.shape
    o = torch.empty_like(q)
    grid = (n // bm, hq)
    _fwd[grid](
        q, k, v, o, d**-0.5 * 1.4426950408889634, q.stride(0), q.stride(1), n, hq // k.shape[0],
        HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal, OVERLAP=overlap, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return o


CONFIGS = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (128, 64, 4, 3)]


def one_shape(d: int, hq: int, hkv: int, n: int, causal: bool) -> list[dict]:
    """cuDNN, sparseflash and every (config, overlap) variant at one shape."""
    q = torch.randn(hq, n, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(hkv, n, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(hkv, n, d, device="cuda", dtype=torch.bfloat16)
    flops = 4 * hq * n * n * d * (0.5 if causal else 1.0)
    qb, kb, vb = q[None], k[None], v[None]
    run_cudnn = sdpa_repeated_kv(qb, kb, vb, causal)
    ref = run_cudnn()[0]
    cudnn = bench_ms(run_cudnn)["ms"]
    ours = bench_ms(lambda: sf.flash_attention(qb, kb, vb, causal=causal))["ms"]
    base = dict(d=d, n=n, causal=causal)
    rows = [{**base, "variant": "cudnn", "ms": cudnn}, {**base, "variant": "sparseflash", "ms": ours}]
    print(f"d{d} n{n} causal={causal} cudnn {cudnn:.3f} ms, sparseflash {ours:.3f} ms (x{cudnn / ours:.3f})")
    for bm, bn, w, s in CONFIGS:
        if d == 64 and bn == 128:
            continue
        for overlap in (False, True):
            name = f"{bm}x{bn}w{w}s{s}{'+overlap' if overlap else ''}"
            try:
                o = run(q, k, v, causal, bm, bn, w, s, overlap)
                err = (o.float() - ref.float()).abs().max().item()
                ms = bench_ms(lambda: run(q, k, v, causal, bm, bn, w, s, overlap))["ms"]  # noqa: B023
                row = {**base, "variant": name, "ms": ms, "vs_cudnn": cudnn / ms, "max_err": err}
                print(f"  {name:24s} {ms:8.3f} ms {flops / ms / 1e9:6.0f} TF/s x{cudnn / ms:.3f} err {err:.3g}")
            except Exception as exc:  # noqa: BLE001 - one variant failing must not stop the run
                row = {**base, "variant": name, "error": str(exc)[:200]}
                print(f"  {name:24s} {row['error']}")
            rows.append(row)
    return rows


def main() -> int:
    out_dir = Path(sys.argv[sys.argv.index("--out") + 1]) if "--out" in sys.argv else Path(".")
    torch.manual_seed(0)
    rows = []
    for d, hq, hkv in ((128, 32, 8), (64, 32, 8)):
        for n in (16384, 65536):
            for causal in (True, False):
                rows += one_shape(d, hq, hkv, n, causal)
    out = {"gpu": gpu_tag(), "torch": torch.__version__, "triton": triton.__version__, "rows": rows}
    (out_dir / f"explore_qk_overlap_{gpu_tag()}.json").write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
