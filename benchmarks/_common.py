"""Shared pieces of the benchmark scripts: timing, ceilings, result files (shape of results.md), tables."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def out_dir(arg: str | None) -> Path:
    """``--out`` if given, else ``$OUT`` (the device tool's folder), else ``benchmarks/results``."""
    path = Path(arg or os.environ.get("OUT") or RESULTS_DIR)
    path.mkdir(parents=True, exist_ok=True)
    return path


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", help="folder for the JSON and PNG (default: $OUT, else benchmarks/results)")
    parser.add_argument("--quick", action="store_true", help="a few small points only (smoke run)")
    return parser


def gpu_tag() -> str:
    """Short GPU name for file names: 'h100', 'h200', ... ('cpu' without a GPU)."""
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name().lower()
    for tag in ("h100", "h200", "h20", "a100", "l40s", "b200", "gb200"):
        if tag in name:
            return tag
    return name.split()[-1].replace(" ", "_")


def git_sha() -> str:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                cwd=Path(__file__).parent,
                check=False,
            ).stdout.strip()
            or "unknown"
        )
    except OSError:
        return "unknown"


def header(benchmark: str, ceilings: dict | None = None) -> dict:
    import triton

    return {
        "benchmark": benchmark,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": _dt.date.today().isoformat(),
        "git_sha": git_sha(),
        "command": " ".join(["python", *sys.argv]),
        "ceilings": ceilings or {},
    }


def write_result(path: Path, benchmark: str, rows: list[dict], ceilings: dict | None = None) -> Path:
    doc = header(benchmark, ceilings)
    doc["rows"] = rows
    path.write_text(json.dumps(doc, indent=1))
    return path


def bench_ms(fn: Callable[[], object], *, min_reps: int = 5) -> dict[str, float]:
    """Median, p20 and p80 milliseconds of ``fn`` with ``triton.testing.do_bench`` (CUDA events, warm)."""
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end), 1e-3)
    rep = max(100.0, min_reps * estimate)  # at least min_reps timed calls, even at 128K
    p20, p50, p80 = do_bench(fn, warmup=max(25.0, estimate), rep=rep, quantiles=[0.2, 0.5, 0.8])
    return {"ms": p50, "ms_p20": p20, "ms_p80": p80}


def measure_ceilings() -> dict[str, float]:
    """Device copy bandwidth (bytes read + written) and bf16 matmul rate, measured now."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm = bench_ms(lambda: a @ b)["ms"]
    x = torch.randn(2**29, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    cp = bench_ms(lambda: y.copy_(x))["ms"]
    return {"copy_tb_s": round(2 * 2**29 * 2 / cp / 1e9, 3), "matmul_tflops": round(2 * 8192**3 / mm / 1e9, 1)}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if torch.isnan(out).any():
        return float("inf")
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def print_table(rows: list[dict], columns: list[str]) -> None:
    """A plain fixed-width table (the device tool returns the end of stdout)."""

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    widths = [max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    for r in rows:
        print("  ".join(fmt(r.get(c, "")).rjust(w) for c, w in zip(columns, widths, strict=True)))


def sdpa_repeated_kv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, backend: object = None
) -> Callable[[], torch.Tensor]:
    """SDPA over K/V repeated to q's heads, as transformers runs cuDNN with GQA (the repeat made here, once, not
    timed): a closure for :func:`bench_ms`. ``backend``: an ``SDPBackend`` (default: cuDNN)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    group = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    chosen = SDPBackend.CUDNN_ATTENTION if backend is None else backend

    def run() -> torch.Tensor:
        with sdpa_kernel(chosen):
            return torch.nn.functional.scaled_dot_product_attention(q, kk, vv, is_causal=causal)

    return run
