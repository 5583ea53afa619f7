"""In-kernel block skipping (``flash_attention(skip_threshold=...)``): its overhead and its ceiling, one GPU call.

Causal bf16 prefill (12 query heads, 2 KV heads, d = 128 by default) at each length, on two inputs:

* ``random``: q, k ~ N(0, 1): no tile lies far below the running max, so nothing is skipped at a threshold of
  8 and the time against ``skip_threshold=None`` is the cost of the per-tile decision;
* ``sink``: the first 128 keys carry a large component along every query (logits about +30 above the rest), so
  every later unmasked tile is skipped at threshold 8: the ceiling of what skipping saves (no V load, no P V).

Each row: milliseconds, the fraction of tiles skipped (``skip_stats``), and the output's max abs difference from
the exact kernel (``skip_threshold=None``).

    python benchmarks/bench_skip.py [--lengths 16384,32768,65536] [--out DIR]
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import base_parser, bench_ms, gpu_tag, out_dir, print_table, write_result  # noqa: E402

import sparseflash as sf  # noqa: E402


def inputs(kind: str, n: int, hq: int, hkv: int, d: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device="cuda").manual_seed(n)
    q = torch.randn(1, hq, n, d, device="cuda", generator=gen)
    k = torch.randn(1, hkv, n, d, device="cuda", generator=gen)
    v = torch.randn(1, hkv, n, d, device="cuda", generator=gen)
    if kind == "sink":
        direction = torch.nn.functional.normalize(torch.randn(d, device="cuda", generator=gen), dim=0)
        q = q + 4.0 * direction  # every query leans along one direction ...
        k[:, :, :128] += 30.0 * direction * d**0.5 / 4.0  # ... which the first block's keys carry strongly
    return tuple(x.to(torch.bfloat16) for x in (q, k, v))


def main() -> None:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="16384,32768,65536")
    p.add_argument("--heads", default="12,2,128", help="Hq,Hkv,d")
    p.add_argument("--thresholds", default="8,16")
    args = p.parse_args()
    hq, hkv, d = (int(x) for x in args.heads.split(","))
    rows = []
    for n in (int(x) for x in args.lengths.split(",")):
        for kind in ("random", "sink"):
            q, k, v = inputs(kind, n, hq, hkv, d)
            exact = sf.flash_attention(q, k, v, causal=True)
            base = bench_ms(lambda q=q, k=k, v=v: sf.flash_attention(q, k, v, causal=True))["ms"]
            rows.append({"seqlen": n, "input": kind, "threshold": None, "ms": base, "vs_exact": 1.0})
            for thr in (float(t) for t in args.thresholds.split(",")):
                stats = torch.zeros(2, dtype=torch.int32, device="cuda")
                out = sf.flash_attention(q, k, v, causal=True, skip_threshold=thr, skip_stats=stats)
                skipped = float(stats[0]) / max(float(stats[1]), 1.0)
                skipping = functools.partial(sf.flash_attention, q, k, v, causal=True, skip_threshold=thr)
                ms = bench_ms(skipping)["ms"]
                diff = float((out.float() - exact.float()).abs().max())
                row = {"seqlen": n, "input": kind, "threshold": thr, "ms": ms, "vs_exact": base / ms}
                rows.append({**row, "skipped_frac": skipped, "max_abs_diff": diff, "nan": bool(out.isnan().any())})
    print_table(rows, ["seqlen", "input", "threshold", "ms", "vs_exact", "skipped_frac", "max_abs_diff", "nan"])
    dest = out_dir(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    print("wrote", write_result(dest / f"skip_{gpu_tag()}.json", "prefill_skip", rows))


if __name__ == "__main__":
    main()
