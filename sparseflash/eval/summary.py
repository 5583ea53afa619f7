"""From cases to the table a person reads and the ``summary.json`` the README and plots read.

One row per (model, task, length, method, options), the baseline (``sdpa``) first, then ``dense``, then the rest:

* every row: ``n`` cases, mean ``density``, mean and median ``prefill_ms`` (per case: a batch's prefill divided
  by its size) and, for methods, ``n_paired`` (prompts the baseline also ran) and ``speedup_vs_baseline`` (mean
  baseline prefill over mean method prefill, on those paired prompts);
* generation tasks: ``accuracy`` (mean score in [0, 1]) with a 95 % Wilson interval ``ci95`` (scores of
  multi-needle tasks are fractions; the interval treats the mean as a proportion over n, exact for 0/1 scores and
  a fair approximation otherwise) and paired ``wins`` / ``losses`` / ``ties`` against the baseline on the same
  prompts: a win is the method right (full score) where the baseline was wrong, a loss the reverse;
* ``perplexity``: mean ``ppl`` and ``ppl_last`` and, for methods, ``ppl_ratio`` / ``ppl_last_ratio``: the mean
  over paired prompts of method ppl / baseline ppl (1.0 = no change), with a 95 % t interval;
* ``agreement``: mean ``kl`` (KL(baseline || method), nats) and ``top1`` (argmax agreement) with 95 % t
  intervals over the samples (``kl_ci95``, ``top1_ci95``; None for a single sample), mean ``ppl_window`` and its
  paired ``ppl_window_ratio``;
* ``recall``: mean ``recall``.

``summary.json`` has the outer shape of ``shared/reference/results.md``: benchmark, gpu, torch, triton, date,
command, baseline, rows with ``model, task, seqlen, method, accuracy, density, n, prefill_ms`` (``accuracy``
only on generation rows).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from sparseflash.eval.methods import BASELINE, DENSE

SUMMARY = "summary.json"

# two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom, then a few anchors (interpolated in 1/df)
_T95 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)
_T95_TAIL = ((30, 2.042), (40, 2.021), (60, 2.000), (120, 1.980), (math.inf, 1.960))


def wilson_interval(mean: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion ``mean`` observed over ``n`` trials; (0, 1) when n == 0."""
    if n <= 0:
        return 0.0, 1.0
    denom = 1 + z * z / n
    centre = (mean + z * z / (2 * n)) / denom
    half = z * math.sqrt(mean * (1 - mean) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def t_quantile95(df: int) -> float:
    """Two-sided 95 % quantile of Student's t with ``df`` >= 1 degrees of freedom (table, 3 decimals)."""
    if df < 1:
        raise ValueError(f"df: expected >= 1, got {df}")
    if df <= len(_T95):
        return _T95[df - 1]
    for (d0, t0), (d1, t1) in zip(_T95_TAIL, _T95_TAIL[1:], strict=False):
        if df <= d1:
            w = (1 / d0 - 1 / df) / (1 / d0 - (0 if d1 == math.inf else 1 / d1))
            return t0 + w * (t1 - t0)
    return 1.960


def t_interval(values: list[float]) -> list[float] | None:
    """95 % t interval ``[lo, hi]`` of the mean of ``values`` (samples); None with fewer than 2 finite values."""
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    if len(xs) < 2:
        return None
    mean = sum(xs) / len(xs)
    half = t_quantile95(len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))
    return [mean - half, mean + half]


def _prompt_key(case: dict[str, Any]) -> tuple[Any, ...]:
    return (
        case["model"],
        case["task"],
        json.dumps(case.get("task_options"), sort_keys=True),
        case["length"],
        case.get("depth"),
        case["seed"],
    )


def _median(values: list[Any]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _mean(values: list[Any]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _ratios(paired: list[tuple[dict[str, Any], dict[str, Any]]], key: str) -> list[float]:
    return [c[key] / b[key] for c, b in paired if c.get(key) is not None and b.get(key)]


def _generation_fields(
    group: list[dict[str, Any]], paired: list[tuple[dict[str, Any], dict[str, Any]]], is_baseline: bool
) -> dict[str, Any]:
    acc = _mean([c.get("score") for c in group]) or 0.0
    row: dict[str, Any] = {"accuracy": acc, "ci95": list(wilson_interval(acc, len(group)))}
    if not is_baseline and paired:
        right = [
            (c["score"] >= 1.0, b["score"] >= 1.0)
            for c, b in paired
            if c.get("score") is not None and b.get("score") is not None
        ]
        row["wins"] = sum(m and not b for m, b in right)
        row["losses"] = sum(b and not m for m, b in right)
        row["ties"] = len(right) - row["wins"] - row["losses"]
    return row


def _perplexity_fields(
    group: list[dict[str, Any]], paired: list[tuple[dict[str, Any], dict[str, Any]]], is_baseline: bool
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "ppl": _mean([c.get("ppl") for c in group]),
        "ppl_last": _mean([c.get("ppl_last") for c in group]),
    }
    if not is_baseline and paired:
        for key in ("ppl", "ppl_last"):
            ratios = _ratios(paired, key)
            row[f"{key}_ratio"] = _mean(ratios)
            row[f"{key}_ratio_ci95"] = t_interval(ratios)
    return row


def _agreement_fields(
    group: list[dict[str, Any]], paired: list[tuple[dict[str, Any], dict[str, Any]]], is_baseline: bool
) -> dict[str, Any]:
    kl = [c.get("kl") for c in group]
    top1 = [c.get("top1") for c in group]
    kl_end = [c.get("kl_end") for c in group if c.get("kl_end") is not None]
    row: dict[str, Any] = {
        "kl": _mean(kl),
        "kl_ci95": t_interval(kl),
        "top1": _mean(top1),
        "top1_ci95": t_interval(top1),
        "kl_end": _mean(kl_end) if kl_end else None,
        "top1_end": _mean([c.get("top1_end") for c in group]) if kl_end else None,
        "ppl_window": _mean([c.get("ppl_window") for c in group]),
        "positions": _mean([c.get("positions") for c in group]),
    }
    if not is_baseline and paired:
        row["ppl_window_ratio"] = _mean(_ratios(paired, "ppl_window"))
    return row


def _kind(group: list[dict[str, Any]]) -> str:
    if any("kl" in c for c in group):
        return "agreement"
    if any("ppl" in c for c in group):
        return "perplexity"
    if any("recall" in c for c in group):
        return "recall"
    return "generate"


def summarize(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, task, length, method, options): the baseline first within each (task, length), then
    ``dense``, then the other methods by name (see the module docstring for the fields)."""
    base = {_prompt_key(c): c for c in cases if c["method"] == BASELINE}
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for c in cases:
        groups[
            (c["model"], c["task"], c["length"], c["method"], json.dumps(c.get("options") or {}, sort_keys=True))
        ].append(c)
    rows = []
    for (model, task, length, method, options), group in groups.items():
        is_baseline = method == BASELINE
        paired = [(c, base[_prompt_key(c)]) for c in group if _prompt_key(c) in base]
        row: dict[str, Any] = {
            "model": model,
            "task": task,
            "seqlen": length,
            "method": method,
            "options": json.loads(options),
            "n": len(group),
            "density": _mean([c.get("density") for c in group]),
            "prefill_ms": _mean([c.get("prefill_ms") for c in group]),
            "prefill_ms_median": _median([c.get("prefill_ms") for c in group]),
        }
        kind = _kind(group)
        if kind == "generate":
            row.update(_generation_fields(group, paired, is_baseline))
        elif kind == "perplexity":
            row.update(_perplexity_fields(group, paired, is_baseline))
        elif kind == "agreement":
            row.update(_agreement_fields(group, paired, is_baseline))
        else:
            row["recall"] = _mean([c.get("recall") for c in group])
        if not is_baseline and paired:
            mine = _mean([c.get("prefill_ms") for c, _ in paired])
            theirs = _mean([b.get("prefill_ms") for _, b in paired])
            row["n_paired"] = len(paired)
            row["speedup_vs_baseline"] = theirs / mine if mine and theirs else None
        rows.append(row)
    order = {BASELINE: 0, DENSE: 1}
    rows.sort(key=lambda r: (r["model"], r["task"], r["seqlen"], order.get(r["method"], 2), r["method"]))
    return rows


def environment() -> dict[str, Any]:
    """gpu, torch, triton, transformers versions and today's date, for the summary's header."""
    import torch

    env: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
    }
    for mod in ("triton", "transformers"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            env[mod] = None
    env["date"] = _dt.date.today().isoformat()
    return env


def write_summary(
    folder: str | Path, cases: list[dict[str, Any]], command: str, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write ``folder/summary.json`` from ``cases`` and return it."""
    summary = {
        "benchmark": "eval",
        **environment(),
        "command": command,
        "baseline": BASELINE,
        **(extra or {}),
        "rows": summarize(cases),
    }
    path = Path(folder) / SUMMARY
    path.write_text(json.dumps(summary, indent=1, sort_keys=False, default=str) + "\n")
    return summary


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _ratio(x: float | None) -> str:
    return "" if x is None else f" x{x:.3f}"


def _result_cell(r: dict[str, Any]) -> str:
    """The table's result column: accuracy [CI], ppl (ratio), KL [CI] + top-1, or recall."""
    if "kl" in r:
        ci = r.get("kl_ci95")
        ci_text = "" if ci is None else f" [{ci[0]:.2g}, {ci[1]:.2g}]"
        top1 = r.get("top1")
        return f"KL {_fmt(r['kl'], '.3g')}{ci_text}, top1 {'-' if top1 is None else f'{100 * top1:.1f}%'}"
    if "ppl" in r:
        return (
            f"ppl {_fmt(r['ppl'], '.3f')}{_ratio(r.get('ppl_ratio'))} (last {_fmt(r.get('ppl_last'), '.3f')}"
            f"{_ratio(r.get('ppl_last_ratio'))})"
        )
    if "recall" in r:
        return f"recall {_fmt(r['recall'], '.3f')}"
    lo, hi = r["ci95"]
    return f"{100 * r['accuracy']:.1f} [{100 * lo:.0f}, {100 * hi:.0f}]"


def render_table(rows: list[dict[str, Any]], title: str = "sparseflash eval") -> Any:
    """A ``rich.table.Table`` of the summary rows."""
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for col, just in (
        ("task", "left"),
        ("length", "right"),
        ("method", "left"),
        ("n", "right"),
        ("result [95% CI]", "right"),
        (f"W/L vs {BASELINE}", "right"),
        ("density", "right"),
        ("prefill ms", "right"),
        ("speedup", "right"),
    ):
        table.add_column(col, justify=just)
    last = None
    for r in rows:
        if last is not None and (r["task"], r["seqlen"]) != last:
            table.add_section()
        last = (r["task"], r["seqlen"])
        wl = f"{r['wins']}/{r['losses']}" if "wins" in r else "-"
        sp = r.get("speedup_vs_baseline")
        table.add_row(
            r["task"],
            str(r["seqlen"]),
            r["method"],
            str(r["n"]),
            _result_cell(r),
            wl,
            _fmt(r.get("density"), ".3f"),
            _fmt(r.get("prefill_ms"), ".1f"),
            "-" if sp is None else f"{sp:.2f}x",
        )
    return table
