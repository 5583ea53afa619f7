"""Dense prefill against SDPA cuDNN per tile config, in one GPU call (issue 13: dense at >= 0.95x cuDNN).

B=1, Hq=32, Hkv=8 (and the default model's 14/2 at d = 64), bf16, 16K and 64K, causal and not: cuDNN (K/V repeated
as transformers does; the repeat not timed) and ``sparseflash.flash_attention`` with the library's tile config and
the configs of ``--configs``, each checked against cuDNN first. Run it from two checkouts (``PYTHONPATH``) to
compare kernel versions in one call; ``--tag`` names the file.

    python benchmarks/bench_dense_configs.py [--configs 128,128,8,3;128,64,8,3] [--tag new] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import bench_ms, gpu_tag, sdpa_repeated_kv  # noqa: E402

import sparseflash as sf  # noqa: E402
from sparseflash.ops.tuning import TileConfig, tuned  # noqa: E402

SHAPES = ((128, 32, 8), (64, 32, 8), (64, 14, 2))


def one_point(d: int, hq: int, hkv: int, n: int, causal: bool, configs: list[TileConfig]) -> list[dict]:
    q = torch.randn(1, hq, n, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, hkv, n, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, hkv, n, d, device="cuda", dtype=torch.bfloat16)
    run_cudnn = sdpa_repeated_kv(q, k, v, causal)
    ref = run_cudnn()
    cudnn = bench_ms(run_cudnn)["ms"]
    flops = 4 * hq * n * n * d * (0.5 if causal else 1.0)
    base = dict(d=d, heads=f"{hq}/{hkv}", n=n, causal=causal)
    rows = [{**base, "variant": "cudnn", "ms": cudnn, "tflops": flops / cudnn / 1e9}]
    for config in [None, *configs]:
        name = (
            "default" if config is None else f"{config.block_m}x{config.block_n}w{config.num_warps}s{config.num_stages}"
        )
        try:
            with tuned(prefill=config):
                out = sf.flash_attention(q, k, v, causal=causal)
                err = (out.float() - ref.float()).abs().max().item()
                ms = bench_ms(lambda: sf.flash_attention(q, k, v, causal=causal))["ms"]
            rows.append({**base, "variant": name, "ms": ms, "tflops": flops / ms / 1e9, "vs_cudnn": cudnn / ms,
                         "max_err": err, "ok": err < 3e-2})  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - one config failing must not stop the run
            rows.append({**base, "variant": name, "error": str(exc)[:200]})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="128,128,8,3;128,64,8,3;128,64,4,3", help="';'-separated M,N,warps,stages")
    p.add_argument("--lengths", default="16384,65536")
    p.add_argument("--tag", default="")
    p.add_argument("--out", type=Path, default=Path("."))
    args = p.parse_args(argv)
    configs = [TileConfig(*map(int, c.split(","))) for c in args.configs.split(";") if c]
    rows: list[dict] = []
    for d, hq, hkv in SHAPES:
        for n in map(int, args.lengths.split(",")):
            for causal in (True, False):
                for r in one_point(d, hq, hkv, n, causal, configs):
                    rows.append(r)
                    tail = f"x{r['vs_cudnn']:.3f} err {r['max_err']:.2g}" if "vs_cudnn" in r else r.get("error", "")
                    ms = f"{r['ms']:8.3f} ms" if "ms" in r else ""
                    print(
                        f"{args.tag:4s} d{d} {r['heads']:5s} n{n} causal={causal!s:5s} {r['variant']:12s} {ms} {tail}"
                    )
    out = {"gpu": gpu_tag(), "torch": torch.__version__, "triton": triton.__version__, "tag": args.tag, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"dense_configs_{gpu_tag()}{'_' + args.tag if args.tag else ''}.json").write_text(
        json.dumps(out, indent=1)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
