"""Selection cost of the dynamic patterns as a share of exact attention, one GPU call (issue 14's bar: <= 5 % at 64K).

For each length (bf16, ``B = 1``, Qwen2.5-Coder-1.5B's attention shape by default: 12 query heads, 2 KV heads,
d = 128, causal, block 128), times with ``do_bench`` (CUDA events, warm, medians; launch overhead included where the
GPU waits for the host): ``select(method, q, k, **options)`` for each ``--variants`` entry, SDPA's cuDNN and flash
backends (K/V repeated to the query heads for cuDNN, the repeat not timed; ``enable_gqa`` for flash) and our dense
kernel. Random q/k: the selections' work does not depend on the data (no data-dependent loop lengths), so random
inputs time them as a model's q/k do; density is reported but means nothing here.

    python benchmarks/bench_selection_cost.py [--lengths 16384,32768,65536,131072] [--out DIR]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import base_parser, bench_ms, gpu_tag, out_dir, print_table, write_result  # noqa: E402

import sparseflash as sf  # noqa: E402
from sparseflash.integrations.hf.plan import SAFE_OPTIONS  # noqa: E402
from sparseflash.patterns import select  # noqa: E402

VARIANTS = {
    "xattention_default": ("xattention", dict(SAFE_OPTIONS["xattention"])),
    "xattention_stride16": ("xattention", dict(SAFE_OPTIONS["xattention"], stride=16)),
    "flexprefill": ("flexprefill", {}),
    "flexprefill_g995": ("flexprefill", {"gamma": 0.995}),
    "permuted": ("permuted", {}),
    "permuted_t98": ("permuted", {"threshold": 0.98}),
}


def _cudnn_ms(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> float:
    """SDPA's cuDNN backend on K/V repeated to the query heads (as transformers runs it; the repeat not timed)."""
    group = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
        return bench_ms(lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=True))["ms"]


def one_length(n: int, hq: int, hkv: int, d: int, names: list[str]) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(n)
    q = torch.randn(1, hq, n, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, hkv, n, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(1, hkv, n, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    cudnn = _cudnn_ms(q, k, v)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        flash = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))["ms"]
    ours = bench_ms(lambda: sf.flash_attention(q, k, v, causal=True))["ms"]
    rows = []
    for name in names:
        method, options = VARIANTS[name]
        try:
            layout = select(method, q, k, **options)
            ms = bench_ms(lambda method=method, options=options: select(method, q, k, **options))["ms"]
        except Exception as err:  # reported, not fatal: the other variants still run
            rows.append({"seqlen": n, "variant": name, "error": f"{type(err).__name__}: {str(err)[:200]}"})
            continue
        rows.append(
            {
                "seqlen": n,
                "variant": name,
                "method": method,
                "options": options,
                "select_ms": ms,
                "frac_of_cudnn": ms / cudnn,
                "frac_of_ours": ms / ours,
                "density": float(layout.density()),
                "sdpa_cudnn_ms": cudnn,
                "sdpa_flash_ms": flash,
                "dense_ours_ms": ours,
            }
        )
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="16384,32768,65536,131072")
    p.add_argument("--heads", default="12,2,128", help="Hq,Hkv,d")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"some of {', '.join(VARIANTS)}")
    args = p.parse_args()
    names = args.variants.split(",")
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: expected some of {', '.join(VARIANTS)}, got unknown {unknown}")
    hq, hkv, d = (int(x) for x in args.heads.split(","))
    rows = []
    for n in (int(x) for x in args.lengths.split(",")):
        found = one_length(n, hq, hkv, d, names)
        columns = ["seqlen", "variant", "select_ms", "frac_of_cudnn", "frac_of_ours", "sdpa_cudnn_ms", "dense_ours_ms"]
        print_table([r for r in found if "select_ms" in r], columns)
        for r in found:
            if "error" in r:
                print(r["variant"], r["error"])
        rows += found
    dest = out_dir(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    path = write_result(dest / f"selection_cost_{gpu_tag()}.json", "selection_cost", rows)
    print("wrote", path, json.dumps({"heads": [hq, hkv, d]}))


if __name__ == "__main__":
    main()
