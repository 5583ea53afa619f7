"""Where does a pattern's selection time go? torch.profiler over ``select(method, q, k)`` on captured real q/k.

Loads a ``capture_qk.py`` file, runs the selection warm, then profiles ``--reps`` calls and prints the CUDA and
CPU time per operator (the top ``--top`` rows), plus the median wall time per call with and without a
``torch.cuda.synchronize`` (host syncs show up as the gap between CPU and CUDA totals).

    python benchmarks/profile_selection.py --qk qk_L14.pt --method xattention \\
        --options '{"threshold": 0.95, "local_blocks": 1, "stride": 8}' [--seqlen 32768] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import out_dir  # noqa: E402

from sparseflash.patterns import select  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--qk", help="a capture_qk.py file")
    source.add_argument(
        "--random", metavar="HQ,HKV,D", help="random bf16 q/k of this shape instead (needs --seqlen; no model)"
    )
    p.add_argument("--method", default="xattention")
    p.add_argument("--options", default="{}", help="pattern options as JSON")
    p.add_argument("--seqlen", type=int, default=None, help="use the first SEQLEN tokens (default: all)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.qk:
        saved = torch.load(args.qk, map_location="cpu", weights_only=True)
        n = args.seqlen or saved["q"].shape[2]
        q = saved["q"][:, :, :n].cuda().to(torch.bfloat16)
        k = saved["k"][:, :, :n].cuda().to(torch.bfloat16)
        source = Path(args.qk).stem
    else:
        if not args.seqlen:
            p.error("--random needs --seqlen")
        hq, hkv, d = (int(x) for x in args.random.split(","))
        n = args.seqlen
        q = torch.randn(1, hq, n, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, hkv, n, d, device="cuda", dtype=torch.bfloat16)
        source = f"random_{hq}x{hkv}x{d}"
    options = json.loads(args.options)

    def call() -> object:
        return select(args.method, q, k, **options)

    for _ in range(3):
        call()
    torch.cuda.synchronize()
    walls = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        call()
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - t0) * 1e3)
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    ) as prof:
        for _ in range(args.reps):
            call()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top)
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}"
    head = f"{args.method} {json.dumps(options)} on {source}, {n} tokens, {shapes}"
    text = f"{head}\nwall per call (synchronized): median {statistics.median(walls):.3f} ms over {args.reps}\n{table}"
    print(text)
    dest = out_dir(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / f"select_profile_{args.method}_{source}_{n}.txt").write_text(text)


if __name__ == "__main__":
    main()
