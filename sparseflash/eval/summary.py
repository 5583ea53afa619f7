"""From cases to the table a person reads and the ``summary.json`` the README and plots read.

Per (task, length, method): ``n`` cases, accuracy (mean score in [0, 1]) with a 95 % Wilson interval (scores of
multi-needle tasks are fractions; the interval treats the mean as a proportion over n, which is exact for 0/1
scores and a fair approximation otherwise), paired wins / losses / ties against dense on the same prompts (a win:
the method scored higher on that prompt), mean density, median prefill time and the prefill speedup vs dense
(median dense prefill over median method prefill, both on the same prompts). Perplexity rows carry ``ppl`` and
``ppl_last`` (mean over windows) instead of accuracy; recall rows carry ``recall``.

``summary.json`` has the outer shape of ``shared/reference/results.md``: benchmark, gpu, torch, triton, date,
command, rows with ``model, task, seqlen, method, accuracy, density, n, prefill_ms``.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from sparseflash.eval.methods import DENSE

SUMMARY = "summary.json"


def wilson_interval(mean: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion ``mean`` observed over ``n`` trials; (0, 1) when n == 0."""
    if n <= 0:
        return 0.0, 1.0
    denom = 1 + z * z / n
    centre = (mean + z * z / (2 * n)) / denom
    half = z * math.sqrt(mean * (1 - mean) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _prompt_key(case: dict[str, Any]) -> tuple[Any, ...]:
    return (case["model"], case["task"], json.dumps(case.get("task_options"), sort_keys=True), case["length"],
            case.get("depth"), case["seed"])


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _mean(values: list[Any]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summarize(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, task, length, method), dense first within each (task, length)."""
    dense = {_prompt_key(c): c for c in cases if c["method"] == DENSE}
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for c in cases:
        groups[(c["model"], c["task"], c["length"], c["method"],
                json.dumps(c.get("options") or {}, sort_keys=True))].append(c)
    rows = []
    for (model, task, length, method, options), group in groups.items():
        row: dict[str, Any] = {"model": model, "task": task, "seqlen": length, "method": method,
                               "options": json.loads(options), "n": len(group),
                               "density": _mean([c.get("density") for c in group]),
                               "prefill_ms": _median([c.get("prefill_ms") for c in group])}
        if any("ppl" in c for c in group):
            row["ppl"] = _mean([c.get("ppl") for c in group])
            row["ppl_last"] = _mean([c.get("ppl_last") for c in group])
        elif any("recall" in c for c in group):
            row["recall"] = _mean([c.get("recall") for c in group])
        else:
            acc = _mean([c.get("score") for c in group]) or 0.0
            row["accuracy"] = acc
            row["ci95"] = list(wilson_interval(acc, len(group)))
        paired = [(c, dense[_prompt_key(c)]) for c in group if _prompt_key(c) in dense]
        if method != DENSE and paired:
            if "accuracy" in row:
                row["wins"] = sum(c["score"] > d["score"] for c, d in paired)
                row["losses"] = sum(c["score"] < d["score"] for c, d in paired)
                row["ties"] = len(paired) - row["wins"] - row["losses"]
            mine = _median([c.get("prefill_ms") for c, _ in paired])
            base = _median([d.get("prefill_ms") for _, d in paired])
            row["speedup_vs_dense"] = base / mine if mine and base else None
        rows.append(row)
    order = {DENSE: 0}
    rows.sort(key=lambda r: (r["model"], r["task"], r["seqlen"], order.get(r["method"], 1), r["method"]))
    return rows


def environment() -> dict[str, Any]:
    """gpu, torch, triton, transformers versions and today's date, for the summary's header."""
    import torch

    env: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                           "torch": torch.__version__}
    for mod in ("triton", "transformers"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            env[mod] = None
    env["date"] = _dt.date.today().isoformat()
    return env


def write_summary(folder: str | Path, cases: list[dict[str, Any]], command: str,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``folder/summary.json`` from ``cases`` and return it."""
    summary = {"benchmark": "eval", **environment(), "command": command, **(extra or {}),
               "rows": summarize(cases)}
    path = Path(folder) / SUMMARY
    path.write_text(json.dumps(summary, indent=1, sort_keys=False, default=str) + "\n")
    return summary


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def render_table(rows: list[dict[str, Any]], title: str = "sparseflash eval") -> Any:
    """A ``rich.table.Table`` of the summary rows."""
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for col, just in (("task", "left"), ("length", "right"), ("method", "left"), ("n", "right"),
                      ("accuracy [95% CI]", "right"), ("W/L vs dense", "right"), ("density", "right"),
                      ("prefill ms", "right"), ("speedup", "right")):
        table.add_column(col, justify=just)
    last = None
    for r in rows:
        if last is not None and (r["task"], r["seqlen"]) != last:
            table.add_section()
        last = (r["task"], r["seqlen"])
        if "ppl" in r:
            acc = f"ppl {_fmt(r['ppl'], '.3f')} (last {_fmt(r.get('ppl_last'), '.3f')})"
        elif "recall" in r:
            acc = f"recall {_fmt(r['recall'], '.3f')}"
        else:
            lo, hi = r["ci95"]
            acc = f"{100 * r['accuracy']:.1f} [{100 * lo:.0f}, {100 * hi:.0f}]"
        wl = f"{r['wins']}/{r['losses']}" if "wins" in r else "-"
        sp = r.get("speedup_vs_dense")
        table.add_row(r["task"], str(r["seqlen"]), r["method"], str(r["n"]), acc, wl, _fmt(r.get("density"), ".3f"),
                      _fmt(r.get("prefill_ms"), ".1f"), "-" if sp is None else f"{sp:.2f}x")
    return table
