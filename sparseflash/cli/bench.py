"""``sparseflash bench``: kernel and end-to-end prefill timings, written as JSON rows and a plot per part."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sparseflash.cli.args import (
    UsageError,
    _check_device,
    _check_methods,
    _check_model,
    _check_option_values,
    _check_out_dir,
    _device_kind,
    parse_lengths,
    parse_method_options,
)
from sparseflash.cli.commands import _command, _console, _sanitize


def cmd_bench(args: argparse.Namespace) -> int:
    import torch
    from rich.table import Table

    from sparseflash.eval import bench
    from sparseflash.eval.summary import environment

    _check_device(args.device)
    method_options = parse_method_options(args.method_option)
    methods = _check_methods(args.methods, method_options)
    kind = _device_kind(args.device)
    lengths = parse_lengths(args.lengths or ("4096,16384,65536" if kind == "cuda" else "512,1024"))
    try:
        bench.check_bench_args(
            heads_q=args.heads_q,
            heads_kv=args.heads_kv,
            head_dim=args.head_dim,
            repeats=args.repeats,
            names=_BENCH_FLAGS,
        )
    except ValueError as err:
        raise UsageError(str(err)) from None
    _check_out_dir(Path(args.out) if args.out else Path("results"))
    if args.part in ("e2e", "both"):
        _check_model(args.model)
    env = environment()
    out = Path(args.out or f"results/bench_{_sanitize(env['gpu'])}")
    out.mkdir(parents=True, exist_ok=True)
    command = _command(args)
    device = torch.device("cuda" if kind == "cuda" else "cpu")
    console = _console()
    written = []
    if args.part in ("kernel", "both"):
        dtype = torch.bfloat16 if kind == "cuda" else torch.float32
        rows = bench.kernel_rows(
            methods,
            lengths,
            heads_q=args.heads_q,
            heads_kv=args.heads_kv,
            head_dim=args.head_dim,
            device=device,
            dtype=dtype,
            method_options=method_options,
            repeats=args.repeats,
        )
        written += bench.write_bench(
            out / f"patterns_{_sanitize(env['gpu'])}.json",
            "patterns",
            env,
            command,
            rows,
            out / "kernel_speed.png",
            "attention kernels, random q/k/v",
        )
        _print_rows(
            console,
            Table,
            "kernels (random q/k/v)",
            rows,
            ("seqlen", "method", "impl", "ms", "select_ms", "attn_ms", "density", "speedup_vs_dense"),
        )
    if args.part in ("e2e", "both"):
        from sparseflash.eval.model import load_model

        loaded = load_model(args.model, device=args.device, dtype=args.dtype)
        num_layers = getattr(loaded.model.config, "num_hidden_layers", None)
        if isinstance(num_layers, int):
            for m in methods:
                _check_option_values(m, method_options.get(m, {}), num_layers, loaded.name)
        rows = bench.e2e_rows(loaded, methods, lengths, method_options=method_options, repeats=args.repeats)
        path = out / f"e2e_prefill_{_sanitize(loaded.name)}_{_sanitize(env['gpu'])}.json"
        written += bench.write_bench(
            path, "e2e_prefill", env, command, rows, out / "e2e_prefill.png", f"prefill of {loaded.name}"
        )
        _print_rows(
            console,
            Table,
            f"end-to-end prefill ({loaded.name})",
            rows,
            ("seqlen", "method", "impl", "ms", "density", "peak_mem_gib", "speedup_vs_sdpa"),
        )
    for p in written:
        console.print(str(p))
    return 0


_BENCH_FLAGS = {"heads_q": "--heads-q", "heads_kv": "--heads-kv", "head_dim": "--head-dim", "repeats": "--repeats"}


def _print_rows(console: Any, table_cls: Any, title: str, rows: list[dict[str, Any]], cols: tuple[str, ...]) -> None:
    table = table_cls(title=title)
    for c in cols:
        table.add_column(c, justify="right" if c not in ("method", "impl") else "left")
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append("-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v))
        table.add_row(*cells)
    console.print(table)
