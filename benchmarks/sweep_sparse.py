"""Which sparse-loop variant and tile config is fastest? 64K, d=128, 10 % and 100 % density, one GPU call.

Prints one line per variant and, last, ``BEST <prefetch> <BM,BN,W,S>`` for the caller to export.
    PYTHONUNBUFFERED=1 python benchmarks/sweep_sparse.py [--out DIR]
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import base_parser, bench_ms, out_dir
from bench_sparse_vs_flex import HKV, HQ, random_layout

import sparseflash as sf  # noqa: E402
from sparseflash.ops.tuning import TileConfig, Tuning, get_tuning, set_tuning  # noqa: E402

CONFIGS = ["128,64,8,3", "128,128,8,3", "128,128,8,2", "128,64,8,4", "64,64,4,3"]


def main() -> None:
    dest = out_dir(base_parser(__doc__).parse_args().out)
    seq, d = 65536, 128
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, HQ, seq, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, HKV, seq, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(1, HKV, seq, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    layouts = {rho: random_layout(seq, HQ, rho, gen) for rho in (0.1, 1.0)}
    rows = []
    for config in CONFIGS:
        set_tuning(Tuning(prefill=TileConfig(*(int(x) for x in config.split(",")))))
        dense = bench_ms(functools.partial(sf.flash_attention, q, k, v))["ms"]
        for prefetch in ("0", "1"):
            set_tuning(Tuning(prefill=get_tuning().prefill, sparse_prefetch=prefetch == "1"))
            row = {"config": config, "prefetch": prefetch, "dense_ms": dense}
            for rho, layout in layouts.items():
                fn = functools.partial(sf.block_sparse_attention, q, k, v, layout, check_indices=False)
                row[f"ms_{rho}"] = bench_ms(fn)["ms"]
            rows.append(row)
            print(row, flush=True)
    (dest / "sweep_sparse.json").write_text(json.dumps(rows, indent=1))
    best = min(rows, key=lambda r: r["ms_0.1"] + r["ms_1.0"] / 10)
    print("BEST", best["prefetch"], best["config"])


if __name__ == "__main__":
    main()
