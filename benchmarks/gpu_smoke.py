"""Compile and check every Triton kernel on the GPU once, small shapes, one line per case (first GPU call).

PYTHONUNBUFFERED=1 python benchmarks/gpu_smoke.py
"""

from __future__ import annotations

import time
import traceback

import torch

import sparseflash as sf

results = []


def case(name):
    def wrap(fn):
        t0 = time.time()
        try:
            msg = fn()
            results.append((name, "ok", f"{time.time() - t0:.1f}s", msg or ""))
        except Exception as e:  # keep going: one broken kernel must not hide the others
            traceback.print_exc()
            results.append((name, "FAIL", f"{time.time() - t0:.1f}s", f"{type(e).__name__}: {str(e)[:200]}"))
        print(results[-1], flush=True)
        return fn

    return wrap


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def qkv(b, hq, hkv, sq, sk, d, dtype=torch.bfloat16):
    return (
        torch.randn(b, hq, sq, d, device="cuda", dtype=dtype),
        torch.randn(b, hkv, sk, d, device="cuda", dtype=dtype),
        torch.randn(b, hkv, sk, d, device="cuda", dtype=dtype),
    )


for d in (64, 128, 256, 96):
    for causal in (True, False):
        for dtype in (torch.bfloat16, torch.float16):

            @case(f"dense d{d} causal={causal} {dtype}")
            def _(d=d, causal=causal, dtype=dtype):
                q, k, v = qkv(2, 8, 2, 1000, 1300, d, dtype)
                o, l = sf.flash_attention(q, k, v, causal=causal, return_lse=True)
                ro, rl = sf.attention_reference(q, k, v, causal=causal, dtype=torch.float32)
                fin = torch.isfinite(rl)
                err = rel(o, ro)
                lerr = float((l[fin] - rl[fin]).abs().max())
                assert err < 1.5e-2 and lerr < 1e-3 and torch.equal(torch.isfinite(l), fin), (err, lerr)
                return f"err {err:.2e} lse {lerr:.1e}"


@case("dense short prompt packed GQA")
def _():
    q, k, v = qkv(1, 32, 8, 7, 3000, 128)
    o = sf.flash_attention(q, k, v)
    ro, _ = sf.attention_reference(q, k, v, dtype=torch.float32)
    assert rel(o, ro) < 1.5e-2
    return f"err {rel(o, ro):.2e}"


@case("dense padded left")
def _():
    q, k, v = qkv(3, 8, 2, 700, 700, 128)
    sl = torch.tensor([700, 300, 1], dtype=torch.int32, device="cuda")
    o = sf.flash_attention(q, k, v, seq_lens=sl, padding_side="left")
    ro, _ = sf.attention_reference(q, k, v, seq_lens=sl, padding_side="left", dtype=torch.float32)
    assert rel(o, ro) < 1.5e-2
    return f"err {rel(o, ro):.2e}"


for lh in (1, 2, 8):
    for block in (128, 64):

        @case(f"block_sparse layout_heads={lh} block={block}")
        def _(lh=lh, block=block):
            q, k, v = qkv(2, 8, 2, 1500, 1500, 128)
            nb = -(-1500 // block)
            keep = torch.rand(2, lh, nb, nb, device="cuda") < 0.3
            keep &= sf.causal_block_mask(1500, 1500, (block, block), device="cuda")
            layout = sf.BlockLayout.from_dense(keep, seq_len_q=1500, seq_len_k=1500, block_size=block)
            o, l = sf.block_sparse_attention(q, k, v, layout, return_lse=True)
            ro, rl = sf.attention_reference(q, k, v, layout=layout, dtype=torch.float32)
            fin = torch.isfinite(rl)
            assert torch.equal(torch.isfinite(l), fin)
            assert rel(o, ro) < 1.5e-2, rel(o, ro)
            return f"err {rel(o, ro):.2e}"


@case("decode dense + paged + sparse")
def _():
    from sparseflash.ops.decode.api import decode_attention
    from sparseflash.ops.decode.reference import decode_reference

    b, hq, hkv, s, d = 4, 32, 8, 5000, 128
    q = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.bfloat16)
    kc = torch.randn(b, hkv, s, d, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    sl = torch.tensor([5000, 17, 4097, 1], dtype=torch.int32, device="cuda")
    o = decode_attention(q, kc, vc, sl)
    ro = decode_reference(q, kc, vc, sl)
    ro = ro[0] if isinstance(ro, tuple) else ro
    assert rel(o, ro) < 1.5e-2, rel(o, ro)
    return f"err {rel(o, ro):.2e}"


@case("patterns: every registered method at 4K")
def _():
    from sparseflash import patterns

    q, k, _ = qkv(1, 8, 2, 4096, 4096, 128)
    out = []
    for name in patterns.available():
        try:
            layout = patterns.select(name, q, k)
            out.append(f"{name}:{layout.density():.2f}")
        except Exception as e:
            out.append(f"{name}:FAIL({type(e).__name__}: {str(e)[:80]})")
    return " ".join(out)


print("\n".join(" | ".join(r) for r in results))
