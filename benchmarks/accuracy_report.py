"""Tables and a Pareto plot from the real-model accuracy study's committed result folders.

* ``--sweep DIR`` (a folder written by ``accuracy_sweep.py``: ``cases.jsonl`` and ``variants.json``): one row per
  variant and length: density, mean KL and top-1 agreement with SDPA, perplexity ratio, prefill speedup, the bar
  verdict; per method, its **safe setting** (the sparsest variant that meets the bar on what the sweep measured)
  and a plot of KL against density (prefill speedup written next to each point, the bar as a line).
* ``--final DIR`` (a folder written by ``sparseflash eval`` with ``sdpa``, ``dense`` and one method): per task and
  length, the method's accuracy against SDPA's on the same prompts, n, paired losses and wins, the bar verdict.

    python benchmarks/accuracy_report.py --sweep benchmarks/results/accuracy_h200/qwen2.5-coder-1.5b/sweep \\
        --final benchmarks/results/accuracy_h200/qwen2.5-coder-1.5b/final --out benchmarks/results/...

Writes ``report.md`` (and ``pareto.png`` with ``--sweep``) into ``--out`` and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy_sweep import FLOOR, load_variants, score_variants  # noqa: E402

from sparseflash.eval.plots import method_colours  # noqa: E402
from sparseflash.eval.results import read_cases  # noqa: E402


def _f(x: Any, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def sweep_rows(folder: Path, kl_factor: float) -> list[dict[str, Any]]:
    """``score_variants`` rows of a sweep folder (its ``variants.json`` names the variants)."""
    return score_variants(read_cases(folder), load_variants(str(folder / "variants.json")), kl_factor)


def safe_settings(rows: list[dict[str, Any]], length: int) -> dict[str, dict[str, Any]]:
    """Per method, the passing variant with the lowest mean density at ``length``."""
    best: dict[str, dict[str, Any]] = {}
    for r in rows:
        d = r["lengths"].get(str(length), {})
        if r["label"] == FLOOR or not r["meets_bar"] or "density" not in d or "kl" not in d:
            continue  # a variant without an agreement measurement is not known to be safe
        if r["method"] not in best or d["density"] < best[r["method"]]["lengths"][str(length)]["density"]:
            best[r["method"]] = r
    return best


def sweep_markdown(rows: list[dict[str, Any]], kl_factor: float) -> str:
    lengths = sorted({int(n) for r in rows for n in r["lengths"]})
    out = [
        f"| variant | options | length | density | KL to SDPA | top-1 | ppl ratio | prefill speedup | "
        f"retrieval (losses/wins) | bar (KL <= {kl_factor:g}x dense, ppl +1 %) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for n in lengths:
            d = r["lengths"].get(str(n))
            if not d:
                continue
            tasks = (
                ", ".join(
                    f"{k.split('@')[0]} -{t['losses']}/+{t['wins']} (n {t['n']})"
                    for k, t in sorted(r["tasks"].items())
                    if k.endswith(f"@{n}")
                )
                or "-"
            )
            fails = [f for f in r["fails"] if f" {n}" in f or f"@{n}" in f]
            verdict = "floor" if r["label"] == FLOOR else ("fail" if fails else "pass" if "kl" in d else "no KL")
            out.append(
                f"| {r['label']} | `{json.dumps(r['options'], sort_keys=True)}` | {n} | "
                f"{_f(d.get('density'), '.3f')} | {_f(d.get('kl'), '.4f')} | {_f(d.get('top1'), '.3f')} | "
                f"{_f(d.get('ppl_ratio'), '.4f')} | {_f(d.get('speedup'), '.2f')} | {tasks} | {verdict} |"
            )
    longest = max(lengths)
    safe = safe_settings(rows, longest)
    out.append("")
    out.append(f"Safe setting per method (sparsest variant meeting the bar at {longest}):")
    for method in sorted({r["method"] for r in rows if r["label"] != FLOOR and str(longest) in r["lengths"]}):
        r = safe.get(method)
        out.append(
            f"- {method}: "
            + (
                f"{r['label']} `{json.dumps(r['options'], sort_keys=True)}`, density "
                f"{r['lengths'][str(longest)]['density']:.3f}"
                if r
                else "none of the variants tried meets the bar"
            )
        )
    return "\n".join(out)


def pareto_plot(rows: list[dict[str, Any]], length: int, kl_factor: float, path: Path, title: str) -> Path | None:
    """KL to SDPA (log) against density at ``length``, one colour per method, speedup labels, the bar line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [
        (r, r["lengths"][str(length)])
        for r in rows
        if str(length) in r["lengths"] and r["lengths"][str(length)].get("kl") is not None
    ]
    if not pts:
        return None
    colours = method_colours(sorted({r["method"] for r, _ in pts}))
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    floor = next((d["kl"] for r, d in pts if r["label"] == FLOOR), None)
    for method in sorted(colours):
        mine = sorted(
            [(d["density"], max(d["kl"], 1e-6), d.get("speedup"), r) for r, d in pts if r["method"] == method],
            key=lambda x: x[0],
        )
        ax.plot([m[0] for m in mine], [m[1] for m in mine], "o", color=colours[method], label=method)
        for dens, kl, speed, r in mine:
            mark = "*" if r["meets_bar"] and r["label"] != FLOOR else ""
            ax.annotate(f"{_f(speed, '.1f')}x{mark}", (dens, kl), textcoords="offset points", xytext=(4, 3), fontsize=7)
    if floor:
        ax.axhline(kl_factor * floor, color="grey", ls="--", lw=1, label=f"bar: {kl_factor:g}x dense")
    ax.set_yscale("log")
    ax.set_xlabel(f"density at {length // 1024}K (fraction of causal blocks computed)")
    ax.set_ylabel("mean KL(SDPA || method), nats")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def final_markdown(folder: Path, kl_factor: float) -> str:
    cases = read_cases(folder)
    methods = sorted({c["method"] for c in cases} - {"sdpa", FLOOR})
    options = {m: next(c.get("options") or {} for c in cases if c["method"] == m) for m in methods}
    variants = [{"label": m, "method": m, "options": options[m]} for m in methods]
    rows = score_variants(cases, variants, kl_factor)
    out = [
        "| method | length | task | n | accuracy (method / SDPA) | losses | wins | bar |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for key, t in sorted(r["tasks"].items(), key=lambda kv: (int(kv[0].split("@")[1]), kv[0])):
            task, n = key.split("@")
            ok = t["losses"] - t["wins"] <= max(1, 0.02 * t["n"])
            out.append(
                f"| {r['label']} | {n} | {task} | {t['n']} | {t['score']:.3f} / {t['base']:.3f} | "
                f"{t['losses']} | {t['wins']} | {'pass' if ok else 'FAIL'} |"
            )
    out.append("")
    out.append("| method | length | density | KL to SDPA | top-1 | ppl ratio | prefill speedup | verdict |")
    out.append("|---|---|---|---|---|---|---|---|")
    for r in rows:
        for n, d in sorted(r["lengths"].items(), key=lambda kv: int(kv[0])):
            fails = [f for f in r["fails"] if f" {n}" in f or f"@{n}" in f]
            verdict = "floor" if r["label"] == FLOOR else ("pass" if not fails else "fail: " + "; ".join(fails))
            out.append(
                f"| {r['label']} | {n} | {_f(d.get('density'), '.3f')} | {_f(d.get('kl'), '.4f')} | "
                f"{_f(d.get('top1'), '.3f')} | {_f(d.get('ppl_ratio'), '.4f')} | "
                f"{_f(d.get('speedup'), '.2f')} | {verdict} |"
            )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sweep", type=Path, default=None)
    p.add_argument("--final", type=Path, default=None)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--title", default="")
    p.add_argument("--kl-factor", type=float, default=10.0)
    args = p.parse_args(argv)
    if args.sweep is None and args.final is None:
        p.error("give --sweep and/or --final")
    args.out.mkdir(parents=True, exist_ok=True)
    parts = []
    if args.sweep is not None:
        rows = sweep_rows(args.sweep, args.kl_factor)
        parts.append("## Sweep\n\n" + sweep_markdown(rows, args.kl_factor))
        longest = max(int(n) for r in rows for n in r["lengths"])
        plot = pareto_plot(rows, longest, args.kl_factor, args.out / "pareto.png", args.title)
        if plot:
            parts.append(f"![KL against density]({plot.name})")
    if args.final is not None:
        parts.append("## Final grid\n\n" + final_markdown(args.final, args.kl_factor))
    text = (f"# {args.title}\n\n" if args.title else "") + "\n\n".join(parts) + "\n"
    (args.out / "report.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
