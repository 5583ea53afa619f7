"""Paired accuracy of many method variants against SDPA on a real model, and the sparsest one that meets the bar.

Each variant is a (method, options) pair; every variant runs the same prompts as the ``sdpa`` baseline (the model
as loaded) and ``dense`` (sparseflash's exact kernels, the noise floor of the output-agreement KL), through the
evaluation harness (:class:`sparseflash.eval.runner.Runner`), into one results folder (resumable). Then, per
variant: paired losses and wins against the baseline per retrieval task, mean KL and top-1 agreement of the
next-token distributions on long real text, perplexity ratio, density and prefill time; and the accuracy bar of
the project's accuracy issue:

* every retrieval task: losses - wins <= max(1, 2 % of n);
* mean KL to the baseline <= ``--kl-factor`` (10) x that of ``dense``;
* perplexity (agreement window) within +1 % of the baseline.

``--choose FILE`` writes the passing variant with the lowest mean density at the longest length (ties: faster
prefill) as JSON ``{"label", "method", "options", ...}``.

    python benchmarks/accuracy_sweep.py --model ~/models/qwen2.5-coder-1.5b --variants variants.json \\
        --lengths 32768 --samples 10 --out results/sweep --choose chosen.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

RETRIEVAL = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "variable_tracking")
BASELINE = "sdpa"
FLOOR = "dense"


def _canon(options: dict[str, Any]) -> str:
    return json.dumps(options, sort_keys=True)


def load_variants(text_or_path: str) -> list[dict[str, Any]]:
    """``[{"label", "method", "options"}]`` from a JSON file or string (a dict ``{label: [method, options]}``)."""
    path = Path(text_or_path)
    raw = json.loads(path.read_text() if path.is_file() else text_or_path)
    if isinstance(raw, dict):
        raw = [{"label": k, "method": v[0], "options": v[1]} for k, v in raw.items()]
    for v in raw:
        if not {"label", "method", "options"} <= set(v):
            raise ValueError(f"variants: expected entries with label, method and options, got {v!r}")
    return raw


def run_variants(
    model: str,
    variants: list[dict[str, Any]],
    tasks: list[str],
    lengths: list[int],
    samples: int,
    seed: int,
    out: Path,
    batch_size: int,
    depths: list[float],
) -> list[dict[str, Any]]:
    """Run baseline, floor and every variant into ``out`` (resuming); returns all cases of the folder."""
    from sparseflash.eval.model import load_model
    from sparseflash.eval.results import ResultsStore
    from sparseflash.eval.runner import EvalConfig, Runner

    loaded = load_model(model)
    store = ResultsStore(out)
    runs = [{"label": FLOOR, "method": FLOOR, "options": {}}] + variants
    for v in runs:
        t0 = time.perf_counter()
        # the floor only matters for output agreement (its retrieval answers equal the baseline's)
        run_tasks = [t for t in tasks if t == "agreement"] if v["label"] == FLOOR else tasks
        if not run_tasks:
            continue
        config = EvalConfig(
            tasks=run_tasks,
            methods=[v["method"]],
            lengths=lengths,
            depths=depths,
            samples=samples,
            seed=seed,
            method_options={v["method"]: dict(v["options"])},
            batch_size=batch_size,
        )
        written = Runner(loaded, store, config).run()
        print(f"[{v['label']}] {len(written)} cases in {time.perf_counter() - t0:.1f} s", flush=True)
    return list(store)


def _paired(cases: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    base = {}
    for c in cases:
        if c["method"] == BASELINE:
            base[(c["task"], c["length"], c.get("depth"), c["seed"])] = c
    return base


def score_variants(
    cases: list[dict[str, Any]], variants: list[dict[str, Any]], kl_factor: float
) -> list[dict[str, Any]]:
    """One row per variant (and the floor): per-task paired results, KL, top-1, ppl ratio, density, bar verdict."""
    base = _paired(cases)
    rows = []
    floor_kl: dict[int, float] = {}
    for v in [{"label": FLOOR, "method": FLOOR, "options": {}}] + variants:
        mine = [
            c for c in cases if c["method"] == v["method"] and _canon(c.get("options") or {}) == _canon(v["options"])
        ]
        row: dict[str, Any] = {"label": v["label"], "method": v["method"], "options": v["options"], "tasks": {}}
        by_len: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for c in mine:
            b = base.get((c["task"], c["length"], c.get("depth"), c["seed"]))
            bucket = by_len[c["length"]]
            if c.get("density") is not None:
                bucket["density"].append(c["density"])
            if c.get("prefill_ms") is not None:
                bucket["prefill_ms"].append(c["prefill_ms"])
            if b is not None and b.get("prefill_ms"):
                bucket["speedup"].append(b["prefill_ms"] / max(c.get("prefill_ms") or math.inf, 1e-9))
            if c["task"] in RETRIEVAL and b is not None:
                t = row["tasks"].setdefault(
                    f"{c['task']}@{c['length']}", {"n": 0, "score": 0.0, "base": 0.0, "wins": 0, "losses": 0}
                )
                s, bs = float(c["score"]), float(b["score"])
                t["n"] += 1
                t["score"] += s
                t["base"] += bs
                t["wins"] += s > bs
                t["losses"] += s < bs
            if c.get("kl") is not None:
                bucket["kl"].append(c["kl"])
                bucket["top1"].append(c["top1"])
                if c.get("kl_end") is not None:
                    bucket["kl_end"].append(c["kl_end"])
                if b is not None and b.get("ppl_window") and c.get("ppl_window"):
                    bucket["ppl_ratio"].append(c["ppl_window"] / b["ppl_window"])
            if c["task"] == "perplexity" and b is not None and b.get("ppl") and c.get("ppl"):
                bucket["ppl_ratio"].append(c["ppl"] / b["ppl"])
        row["lengths"] = {str(n): {k: sum(x) / len(x) for k, x in d.items() if x} for n, d in by_len.items()}
        for t in row["tasks"].values():
            t["score"] /= max(t["n"], 1)
            t["base"] /= max(t["n"], 1)
        if v["label"] == FLOOR:
            floor_kl = {int(n): d.get("kl", 0.0) for n, d in row["lengths"].items()}
        fails = []
        for name, t in row["tasks"].items():
            if t["losses"] - t["wins"] > max(1, 0.02 * t["n"]):
                fails.append(f"{name} -{t['losses']}/+{t['wins']}")
        for n, d in row["lengths"].items():
            if "kl" in d and v["label"] != FLOOR and d["kl"] > kl_factor * max(floor_kl.get(int(n), 0.0), 1e-6):
                fails.append(f"KL {d['kl']:.4f} > {kl_factor:g}x{floor_kl.get(int(n), 0.0):.5f} at {n}")
            if d.get("ppl_ratio", 1.0) > 1.01:
                fails.append(f"ppl x{d['ppl_ratio']:.4f} at {n}")
        row["fails"] = fails
        row["meets_bar"] = not fails
        rows.append(row)
    return rows


def _net_losses(row: dict[str, Any]) -> int:
    return sum(max(0, t["losses"] - t["wins"]) for t in row["tasks"].values())


def choose(rows: list[dict[str, Any]], length: int, max_density: float = 0.25) -> dict[str, Any] | None:
    """The passing variant (not the floor) with the lowest mean density at ``length`` (ties: higher speedup).

    When none passes: among the variants at mean density <= ``max_density`` at ``length``, the one with the
    fewest net retrieval losses, then the lowest KL (``meets_bar`` stays False in its row).
    """
    cands = [r for r in rows if r["label"] != FLOOR and str(length) in r["lengths"]]
    ok = [r for r in cands if r["meets_bar"]]
    if ok:
        return min(
            ok,
            key=lambda r: (
                round(r["lengths"][str(length)].get("density", 1.0), 3),
                -r["lengths"][str(length)].get("speedup", 0.0),
            ),
        )
    sparse = [r for r in cands if r["lengths"][str(length)].get("density", 1.0) <= max_density]
    if not sparse:
        return None
    return min(sparse, key=lambda r: (_net_losses(r), r["lengths"][str(length)].get("kl", float("inf"))))


def print_table(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        for n, d in sorted(r["lengths"].items(), key=lambda x: int(x[0])):
            tasks = " ".join(
                f"{k.split('@')[0]}:{t['score']:.2f}/{t['base']:.2f}(-{t['losses']}+{t['wins']})"
                for k, t in sorted(r["tasks"].items())
                if k.endswith(f"@{n}")
            )
            print(
                f"{r['label']:<24}{n:>7} dens {d.get('density', float('nan')):.3f} kl {d.get('kl', float('nan')):.4f}"
                f" kl_end {d.get('kl_end', float('nan')):.4f}"
                f" top1 {d.get('top1', float('nan')):.3f} ppl x{d.get('ppl_ratio', float('nan')):.4f}"
                f" speedup {d.get('speedup', float('nan')):.2f} {'PASS' if r['meets_bar'] else 'fail'} | {tasks}"
            )
        if r["fails"]:
            print(f"{'':<24}fails: {'; '.join(r['fails'])}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument(
        "--variants",
        required=True,
        help="JSON file or string: [{label, method, options}] or {label: [method, options]}",
    )
    p.add_argument("--tasks", default="niah_single,niah_multikey,niah_multivalue,agreement")
    p.add_argument("--lengths", default="32768")
    p.add_argument("--depths", default="10,30,50,70,90")
    p.add_argument("--samples", type=int, default=2, help="prompts per (task, length, depth)")
    p.add_argument("--seed", type=int, default=1234, help="base seed (use a different one than the final grid)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--kl-factor", type=float, default=10.0)
    p.add_argument("--out", required=True)
    p.add_argument("--choose", default=None, help="write the chosen variant here (JSON)")
    p.add_argument("--choose-method", default=None, help="choose among this method's variants only (default: all)")
    args = p.parse_args(argv)
    variants = load_variants(args.variants)
    lengths = [int(x) for x in args.lengths.split(",")]
    out = Path(args.out)
    cases = run_variants(
        args.model,
        variants,
        args.tasks.split(","),
        lengths,
        args.samples,
        args.seed,
        out,
        args.batch_size,
        [float(x) for x in args.depths.split(",")],
    )
    rows = score_variants(cases, variants, args.kl_factor)
    print_table(rows)
    (out / "sweep.json").write_text(json.dumps(rows, indent=1))
    if args.choose:
        among = [r for r in rows if args.choose_method in (None, r["method"])]
        best = choose(among, max(lengths))
        if best is None:
            print("no variant meets the bar", file=sys.stderr)
            Path(args.choose).write_text(json.dumps(None))
            return 1
        Path(args.choose).write_text(json.dumps({k: best[k] for k in ("label", "method", "options", "meets_bar")}))
        print(f"chosen: {best['label']} {best['method']} {best['options']} (meets the bar: {best['meets_bar']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
