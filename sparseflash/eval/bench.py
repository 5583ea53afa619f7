"""Speed: attention kernels on random q/k/v, and end-to-end prefill of a real model, per method and length.

* kernel rows (``patterns`` shape of ``shared/reference/results.md``): for each length and method, the selection
  time, the block-sparse attention time, our dense kernel's time and the density picked; plus ``sdpa`` and our
  dense kernel as their own rows. Timing: ``triton.testing.do_bench`` medians on CUDA (warm), on CPU the median of
  a few ``perf_counter`` runs (CPU numbers are for plumbing, not for claims).
* end-to-end rows (``e2e_prefill`` shape): the prompt forward of the model with ``sdpa`` (transformers SDPA),
  ``dense`` (our kernels) and each method, median of ``repeats`` runs after one warm-up, and peak GPU memory.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from sparseflash.eval.methods import _PATCH_OPTIONS, DENSE, SDPA, use_method


def time_ms(fn: Callable[[], Any], device: torch.device, repeats: int = 5) -> float:
    """Median wall time of ``fn`` in ms: ``do_bench`` on CUDA, ``repeats`` timed runs after one warm-up on CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, return_mode="median"))
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def check_bench_args(
    *,
    heads_q: object = 1,
    heads_kv: object = 1,
    head_dim: object = 64,
    repeats: object = 1,
    names: dict[str, str] | None = None,
) -> None:
    """``ValueError`` naming the argument (``names`` maps it to e.g. a command-line flag), what was expected and
    what was given: ``repeats`` and the head counts ints >= 1, ``heads_q`` a multiple of ``heads_kv`` (GQA),
    ``head_dim`` one the kernels take (a multiple of 8 in [16, 256])."""
    from sparseflash._validate import MAX_HEAD_DIM, MIN_HEAD_DIM

    n = {key: key for key in ("heads_q", "heads_kv", "head_dim", "repeats")} | (names or {})
    for key, value in (("repeats", repeats), ("heads_q", heads_q), ("heads_kv", heads_kv), ("head_dim", head_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{n[key]}: expected an int >= 1, got {value!r}")
    if heads_q % heads_kv:  # type: ignore[operator]
        raise ValueError(
            f"{n['heads_q']}: expected a multiple of {n['heads_kv']}={heads_kv} (query heads per KV "
            f"head), got {heads_q}"
        )
    if head_dim % 8 or not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:  # type: ignore[operator]
        raise ValueError(
            f"{n['head_dim']}: expected a multiple of 8 in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {head_dim}"
        )


def kernel_rows(
    methods: list[str],
    lengths: list[int],
    *,
    heads_q: int,
    heads_kv: int,
    head_dim: int,
    device: torch.device,
    dtype: torch.dtype,
    method_options: dict[str, dict[str, Any]],
    repeats: int = 5,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Kernel timing rows on random q/k/v of shape (1, H, S, D), one set per length.

    Raises:
        ValueError: see :func:`check_bench_args`.
    """
    check_bench_args(heads_q=heads_q, heads_kv=heads_kv, head_dim=head_dim, repeats=repeats)
    import torch.nn.functional as F

    from sparseflash import block_sparse_attention, flash_attention
    from sparseflash.patterns.registry import select

    rows = []
    for s in lengths:
        g = torch.Generator(device="cpu").manual_seed(seed + s)
        q, k, v = (torch.randn(1, h, s, head_dim, generator=g).to(device, dtype) for h in (heads_q, heads_kv, heads_kv))
        base = {
            "seqlen": s,
            "head_dim": head_dim,
            "heads_q": heads_q,
            "heads_kv": heads_kv,
            "batch": 1,
            "dtype": str(dtype).removeprefix("torch."),
            "source": "random",
        }
        sdpa_ms = time_ms(
            partial(F.scaled_dot_product_attention, q, k, v, is_causal=True, enable_gqa=True), device, repeats
        )
        dense_ms = time_ms(partial(flash_attention, q, k, v, causal=True), device, repeats)
        rows.append({**base, "method": DENSE, "impl": "sdpa", "ms": sdpa_ms})
        rows.append({**base, "method": DENSE, "impl": "sparseflash", "ms": dense_ms})
        for m in methods:
            if m == DENSE:
                continue
            opts = {key: val for key, val in method_options.get(m, {}).items() if key not in _PATCH_OPTIONS}
            layout = select(m, q, k, **opts)
            select_ms = time_ms(partial(select, m, q, k, **opts), device, repeats)
            attn_ms = time_ms(
                partial(block_sparse_attention, q, k, v, layout, causal=True, check_indices=False), device, repeats
            )
            rows.append(
                {
                    **base,
                    "method": m,
                    "impl": "sparseflash",
                    "select_ms": select_ms,
                    "attn_ms": attn_ms,
                    "dense_ms": dense_ms,
                    "sdpa_ms": sdpa_ms,
                    "ms": select_ms + attn_ms,
                    "density": layout.density(),
                    "speedup_vs_dense": dense_ms / (select_ms + attn_ms),
                }
            )
    return rows


def e2e_rows(
    loaded: Any, methods: list[str], lengths: list[int], *, method_options: dict[str, dict[str, Any]], repeats: int = 3
) -> list[dict[str, Any]]:
    """End-to-end prefill rows: the model's prompt forward per method and length (KJV prompt, batch 1)."""
    check_bench_args(repeats=repeats)
    from sparseflash.eval.engine import Engine
    from sparseflash.eval.text import load_corpus

    engine = Engine(loaded)
    corpus = load_corpus()
    rows = []
    for s in lengths:
        ids = engine.encode(corpus.text(0, s * 8), max_tokens=s)
        base_ms = None
        for m in [SDPA, DENSE] + [x for x in methods if x not in (SDPA, DENSE)]:
            if loaded.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(loaded.device)
            with use_method(loaded.model, m, method_options.get(m, {})) as run:
                engine.prefill_ms(ids)  # warm-up (compilation, autotuning)
                run.reset()
                times = [engine.prefill_ms(ids) for _ in range(repeats)]
                density = run.density()
            ms = statistics.median(times)
            base_ms = ms if m == SDPA else base_ms
            peak = torch.cuda.max_memory_allocated(loaded.device) / 2**30 if loaded.device.type == "cuda" else None
            rows.append(
                {
                    "model": loaded.name,
                    "seqlen": int(ids.shape[1]),
                    "method": m,
                    "impl": "transformers_sdpa" if m == SDPA else "sparseflash",
                    "ms": ms,
                    "density": density,
                    "peak_mem_gib": peak,
                    "speedup_vs_sdpa": base_ms / ms if base_ms else None,
                }
            )
    return rows


def write_bench(
    path: Path, benchmark: str, env: dict[str, Any], command: str, rows: list[dict[str, Any]], png: Path, title: str
) -> list[Path]:
    """Write ``rows`` as ``{"benchmark", **env, "command", "rows"}`` JSON to ``path`` and their plot to ``png``."""
    path.write_text(json.dumps({"benchmark": benchmark, **env, "command": command, "rows": rows}, indent=1))
    plot_bench(rows, png, title)
    return [path, png]


def plot_bench(rows: list[dict[str, Any]], path: Any, title: str) -> None:
    """ms against length per (method, impl), log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        series.setdefault(f"{r['method']} ({r['impl']})", []).append((r["seqlen"], r["ms"]))
    for name, pts in series.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("time, median (ms)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
