"""Selection methods: selection time vs our dense kernel, density, recall, and the oracle ceiling; one GPU call.

For every registered pattern (or ``--methods``) at 16K, 64K and 128K (B=1, Hq=32, Hkv=8, d=128, bf16, causal,
each method at its default options): the layout is checked (valid indices, causal blocks only, diagonal kept),
then timed with ``triton.testing.do_bench`` medians: ``select_ms`` (the pattern call), ``attn_ms``
(``block_sparse_attention`` over it), ``dense_ms`` (``flash_attention``), ``sdpa_flash_ms`` (SDPA's flash backend,
on CUDA); ``--options`` sets a method's options (default: its own); and scored: ``density``, ``recall``
(exact mean row recall, :func:`sparseflash.metrics.attention_recall`), ``out_rel_err`` vs dense, and
``oracle_recall`` (the oracle's recall at the same mean density, the ceiling: ``oracle(scope="layer")``, the
top-mass blocks over all heads' grids at once). The oracle is also swept over densities for the plot's ceiling
curve.

Inputs: random q/k/v (``source = "random"``; attention on random data is nearly uniform, so dynamic methods
pick high densities there) or ``--qk FILE``: a ``torch.save``d dict ``{"q": (B, Hq, S, D), "k": (B, Hkv, S, D),
"v" (optional), "source": "llama-3.1-8b-instruct layer 12"}`` captured from a model; lengths are then cut
from its prefix.

Writes ``patterns_<gpu>[_<tag>].json`` (rows as in results.md: ``method, seqlen, source, impl, select_ms,
attn_ms, dense_ms, density, recall``, plus derived fields) and a PNG (recall vs density per method, oracle
as ceiling); prints a table last. Without a GPU it runs with wall-clock timing on tiny shapes (``--cpu-smoke``)
to check the pipeline; those numbers are not benchmark results and are written only with ``--out``.

    PYTHONUNBUFFERED=1 python benchmarks/bench_patterns.py [--quick] [--methods xattention oracle] [--qk FILE]
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import base_parser, bench_ms, gpu_tag, out_dir, print_table, rel_err, write_result  # noqa: E402

import sparseflash as sf  # noqa: E402
from sparseflash import patterns  # noqa: E402
from sparseflash.layouts import geometry as geo  # noqa: E402
from sparseflash.metrics import attention_recall  # noqa: E402

ORACLE_SWEEP = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
COLUMNS = [
    "method",
    "seqlen",
    "select_ms",
    "attn_ms",
    "dense_ms",
    "select_frac",
    "total_vs_dense",
    "density",
    "recall",
    "oracle_recall",
    "out_rel_err",
]


def parse_args(argv: list[str] | None = None):
    parser = base_parser(__doc__)
    parser.add_argument("--seqlens", type=int, nargs="+", default=[16384, 65536, 131072])
    parser.add_argument("--methods", nargs="+", default=None, help="patterns to run (default: all registered)")
    parser.add_argument("--qk", type=Path, default=None, help="a torch.save'd {'q','k'[,'v','source']} file")
    parser.add_argument("--heads-q", type=int, default=32)
    parser.add_argument("--heads-kv", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--tag", default="", help="file-name suffix (e.g. the captured model)")
    parser.add_argument(
        "--options",
        type=json.loads,
        default={},
        help='JSON {method: {option: value}} passed to the selection, e.g. \'{"xattention": {"stride": 8}}\'',
    )
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="no GPU: tiny shapes, wall-clock timing, float32 (pipeline check only)"
    )
    args = parser.parse_args(argv)
    known = patterns.available()
    if args.methods is not None:
        bad = [m for m in args.methods if m not in known]
        if bad:
            parser.error(f"--methods: expected some of {known}, got unknown {bad}")
    if not isinstance(args.options, dict) or not all(isinstance(v, dict) for v in args.options.values()):
        parser.error(f"--options: expected a JSON object of objects, got {args.options!r}")
    if args.quick:
        args.seqlens = [16384]
    if args.cpu_smoke:
        args.seqlens = [s for s in args.seqlens if s <= 1024] or [512]
        args.heads_q, args.heads_kv, args.head_dim = 2, 1, 16
    return args


def timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Median ms: do_bench on CUDA, wall clock of 3 calls elsewhere (smoke runs only)."""
    if device.type == "cuda":
        return lambda fn: bench_ms(fn)["ms"]

    def wall(fn):
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return wall


def load_inputs(args, seq: int, device: torch.device, dtype: torch.dtype):
    """q, k, v of length ``seq`` and the source name."""
    if args.qk is None:
        gen = torch.Generator(device=device).manual_seed(seq)
        shape_q = (1, args.heads_q, seq, args.head_dim)
        shape_k = (1, args.heads_kv, seq, args.head_dim)
        q, k, v = (torch.randn(s, generator=gen, device=device, dtype=dtype) for s in (shape_q, shape_k, shape_k))
        return q, k, v, "random"
    saved = torch.load(args.qk, map_location="cpu", weights_only=True)
    q, k = saved["q"], saved["k"]
    if q.shape[2] < seq:
        raise ValueError(f"--qk: expected at least {seq} tokens, got {q.shape[2]}")
    v = saved.get("v", k)
    q, k, v = (t[:, :, :seq].to(device=device, dtype=dtype).contiguous() for t in (q, k, v))
    return q, k, v, str(saved.get("source", args.qk.stem))


def check_layout(name: str, layout: sf.BlockLayout, seq: int) -> None:
    """Valid indices, causal blocks only and diagonal kept (PBS's permuted layouts: indices only)."""
    layout.check_indices()
    if type(layout) is not sf.BlockLayout:
        return
    dense = layout.to_dense()
    bs = layout.block_size
    allowed = geo.causal_block_mask(seq, seq, bs, device=dense.device)
    diag = geo.diagonal_mask(seq, seq, bs, device=dense.device) & allowed
    if bool((dense & ~allowed).any()) or not bool(dense[..., diag].all()):
        raise AssertionError(f"{name}: layout breaks the causal/diagonal invariants at seqlen {seq}")


def run_method(name, q, k, v, dense_out, dense_ms, time_ms, seq, source, options=None):
    options = dict(options or {})
    layout = patterns.select(name, q, k, **options)
    check_layout(name, layout, seq)
    out = sf.block_sparse_attention(q, k, v, layout)
    select_ms = time_ms(lambda: patterns.select(name, q, k, **options))
    attn_ms = time_ms(lambda: sf.block_sparse_attention(q, k, v, layout, check_indices=False))
    density = layout.density()
    recall = attention_recall(q, k, layout)
    oracle_recall = None
    if name != "oracle" and type(layout) is sf.BlockLayout:
        # one budget over all heads: the bound at matched mean density (methods spread blocks unevenly over heads)
        oracle = patterns.select(
            "oracle", q, k, block_size=layout.block_size, density=max(density, 1e-6), scope="layer"
        )
        oracle_recall = attention_recall(q, k, oracle)
    return {
        "method": name,
        "options": options,
        "seqlen": seq,
        "source": source,
        "impl": "sparseflash",
        "kind": patterns.get(name).kind,
        "layout_heads": layout.num_heads,
        "block_size": list(layout.block_size),
        "select_ms": select_ms,
        "attn_ms": attn_ms,
        "dense_ms": dense_ms,
        "select_frac": select_ms / dense_ms,
        "total_vs_dense": (select_ms + attn_ms) / dense_ms,
        "density": density,
        "recall": recall,
        "oracle_recall": oracle_recall,
        "out_rel_err": rel_err(out, dense_out),
    }


def oracle_sweep(q, k, seq, source):
    rows = []
    for target in ORACLE_SWEEP:
        layout = patterns.select("oracle", q, k, density=target, scope="layer")
        rows.append(
            {
                "method": "oracle_sweep",
                "seqlen": seq,
                "source": source,
                "impl": "sparseflash",
                "target_density": target,
                "density": layout.density(),
                "recall": attention_recall(q, k, layout),
            }
        )
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seqlens = sorted({r["seqlen"] for r in rows})
    fig, axes = plt.subplots(1, len(seqlens), figsize=(5 * len(seqlens), 4.2), squeeze=False)
    for ax, seq in zip(axes[0], seqlens, strict=True):
        sweep = sorted(
            (r for r in rows if r["seqlen"] == seq and r["method"] == "oracle_sweep"), key=lambda r: r["density"]
        )
        if sweep:
            ax.plot([r["density"] for r in sweep], [r["recall"] for r in sweep], "k-", lw=2, label="oracle (ceiling)")
        for r in rows:
            if r["seqlen"] == seq and r["method"] not in ("oracle_sweep", "oracle"):
                ax.scatter(r["density"], r["recall"], s=30)
                ax.annotate(
                    r["method"], (r["density"], r["recall"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
                )
        ax.set(
            title=f"{seq // 1024}K tokens",
            xlabel="density (causal blocks kept)",
            ylabel="attention recall",
            xlim=(0, 1.02),
            ylim=(0, 1.02),
        )
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right", fontsize=8)
    source = rows[0]["source"] if rows else ""
    fig.suptitle(f"Selection methods: recall vs density ({source})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.cpu_smoke:
        device, dtype = torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_patterns: needs a CUDA GPU (or --cpu-smoke to check the pipeline)")
        device, dtype = torch.device("cuda"), torch.bfloat16
    if args.cpu_smoke and args.out is None:
        raise SystemExit("bench_patterns: --cpu-smoke numbers are not results; give --out DIR")
    dest = out_dir(args.out)
    methods = args.methods or patterns.available()
    time_ms = timer(device)
    rows: list[dict] = []
    for seq in args.seqlens:
        q, k, v, source = load_inputs(args, seq, device, dtype)
        dense_out = sf.flash_attention(q, k, v)
        dense_ms = time_ms(lambda q=q, k=k, v=v: sf.flash_attention(q, k, v))
        sdpa_ms = None
        if device.type == "cuda":  # the peer the patched model replaces: SDPA's flash backend, GQA in the call
            from torch.nn.attention import SDPBackend, sdpa_kernel

            def sdpa(q=q, k=k, v=v):
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

            sdpa_ms = time_ms(sdpa)
            print(f"dense @ {seq}: ours {dense_ms:.3f} ms, sdpa flash {sdpa_ms:.3f} ms", flush=True)
        for name in methods:
            try:
                rows.append(
                    run_method(name, q, k, v, dense_out, dense_ms, time_ms, seq, source, args.options.get(name))
                )
                rows[-1]["sdpa_flash_ms"] = sdpa_ms
            except (ValueError, NotImplementedError, torch.cuda.OutOfMemoryError) as err:
                print(f"{name} @ {seq}: skipped ({type(err).__name__}: {err})", flush=True)
                rows.append(
                    {
                        "method": name,
                        "seqlen": seq,
                        "source": source,
                        "impl": "sparseflash",
                        "error": f"{type(err).__name__}: {err}",
                    }
                )
            print(f"{name} @ {seq}: done", flush=True)
        if "oracle" in methods:
            rows.extend(oracle_sweep(q, k, seq, source))
        del q, k, v, dense_out
        if device.type == "cuda":
            torch.cuda.empty_cache()
    suffix = gpu_tag() if device.type == "cuda" else "cpu_smoke"
    if args.tag:
        suffix += f"_{args.tag}"
    path = write_result(dest / f"patterns_{suffix}.json", "patterns", rows)
    plot([r for r in rows if "recall" in r], dest / f"patterns_{suffix}.png")
    print(f"wrote {path}")
    table = [r for r in rows if r["method"] != "oracle_sweep" and "error" not in r]
    print_table([{c: r.get(c) if r.get(c) is not None else "" for c in COLUMNS} for r in table], COLUMNS)
    return rows


if __name__ == "__main__":
    main()
