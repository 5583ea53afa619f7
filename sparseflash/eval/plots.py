"""Figures from result files only (``cases.jsonl``), as PNG, with matplotlib's Agg backend.

* ``heatmap_<task>.png``: needle accuracy, depth (rows) x length (columns), one panel per method
  (red -> yellow -> green, MInference's colours), for every task with a depth axis;
* ``accuracy_vs_density.png``: accuracy against the density each method ran at, one point per (method, length);
* ``recall_per_layer.png``: attention recall per layer for each method (``recall`` task), one panel per length;
* ``speed_vs_length.png``: median prefill time per method against length, and the speedup vs the baseline
  (``sdpa``);
* ``agreement.png``: mean KL(baseline || method) and top-1 agreement per method against length, with 95 % t
  intervals over the samples (``agreement`` task).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from sparseflash.eval.methods import BASELINE, DENSE

_CMAP_COLOURS = ["#F0496E", "#EBB839", "#0CD79F"]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _methods(cases: list[dict[str, Any]]) -> list[str]:
    names = sorted({c["method"] for c in cases})
    first = [m for m in (BASELINE, DENSE) if m in names]
    return first + [m for m in names if m not in first]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def heatmaps(cases: list[dict[str, Any]], out: Path) -> list[Path]:
    """One ``heatmap_<task>.png`` per task with depths; returns the written paths."""
    plt = _plt()
    from matplotlib.colors import LinearSegmentedColormap

    cmap = LinearSegmentedColormap.from_list("needle", _CMAP_COLOURS)
    written = []
    tasks = sorted({c["task"] for c in cases if c.get("depth") is not None and c.get("score") is not None})
    for task in tasks:
        tc = [c for c in cases if c["task"] == task and c.get("score") is not None]
        methods = _methods(tc)
        depths = sorted({c["depth"] for c in tc})
        lengths = sorted({c["length"] for c in tc})
        size = (2.2 + 1.1 * len(lengths) * len(methods), 0.5 * len(depths) + 2)
        fig, axes = plt.subplots(1, len(methods), figsize=size, squeeze=False, sharey=True)
        for ax, method in zip(axes[0], methods, strict=True):
            cell: dict[tuple[float, int], list[float]] = defaultdict(list)
            for c in tc:
                if c["method"] == method:
                    cell[(c["depth"], c["length"])].append(c["score"])
            grid = [[_mean(cell[(d, n)]) if cell[(d, n)] else float("nan") for n in lengths] for d in depths]
            im = ax.imshow(grid, cmap=cmap, vmin=0, vmax=1, aspect="auto", origin="upper")
            ax.set_xticks(range(len(lengths)), [_klabel(n) for n in lengths])
            ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
            ax.set_title(method)
            ax.set_xlabel("context length (tokens)")
            for i, row in enumerate(grid):
                for j, v in enumerate(row):
                    if v == v:
                        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
        axes[0][0].set_ylabel("needle depth (%)")
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
        fig.suptitle(f"{task}: accuracy by needle depth and context length", y=1.03)
        path = out / f"heatmap_{task}.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def _klabel(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 and n >= 1024 else str(n)


def accuracy_vs_density(cases: list[dict[str, Any]], out: Path) -> Path | None:
    """Mean accuracy (generation tasks) against mean density, per (method, length)."""
    gen = [c for c in cases if c.get("score") is not None and c.get("density") is not None and "recall" not in c]
    if not gen:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for method in _methods(gen):
        pts = defaultdict(list)
        dens = defaultdict(list)
        for c in gen:
            if c["method"] == method:
                pts[c["length"]].append(c["score"])
                dens[c["length"]].append(c["density"])
        xs = [_mean(dens[n]) for n in sorted(pts)]
        ys = [_mean(pts[n]) for n in sorted(pts)]
        ax.plot(xs, ys, marker="o", label=method)
        for x, y, n in zip(xs, ys, sorted(pts), strict=True):
            ax.annotate(_klabel(n), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("density (kept causal blocks / causal blocks)")
    ax.set_ylabel("accuracy (all generation tasks)")
    ax.set_xlim(0, 1.05)
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend()
    path = out / "accuracy_vs_density.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def recall_per_layer(cases: list[dict[str, Any]], out: Path) -> Path | None:
    """Recall per layer per method, one panel per length (``recall`` task cases)."""
    rc = [c for c in cases if c.get("recall_per_layer")]
    if not rc:
        return None
    plt = _plt()
    lengths = sorted({c["length"] for c in rc})
    fig, axes = plt.subplots(1, len(lengths), figsize=(5 * len(lengths), 4), squeeze=False, sharey=True)
    for ax, length in zip(axes[0], lengths, strict=True):
        for method in _methods(rc):
            sel = [c for c in rc if c["method"] == method and c["length"] == length]
            if not sel:
                continue
            layers = sel[0]["layers"]
            mean = [_mean([c["recall_per_layer"][i] for c in sel]) for i in range(len(layers))]
            dens = _mean([c["density"] for c in sel])
            ax.plot(layers, mean, marker=".", label=f"{method} (density {dens:.2f})")
        ax.set_title(f"{_klabel(length)} tokens")
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("attention recall")
    path = out / "recall_per_layer.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def speed_vs_length(cases: list[dict[str, Any]], out: Path) -> Path | None:
    """Median prefill ms per method against length, and the speedup vs the baseline."""
    import statistics

    timed = [c for c in cases if c.get("prefill_ms") is not None]
    if not timed:
        return None
    plt = _plt()
    med: dict[str, dict[int, float]] = defaultdict(dict)
    for method in _methods(timed):
        by = defaultdict(list)
        for c in timed:
            if c["method"] == method:
                by[c["length"]].append(c["prefill_ms"])
        med[method] = {n: statistics.median(v) for n, v in sorted(by.items())}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for method, pts in med.items():
        ax1.plot(list(pts), list(pts.values()), marker="o", label=method)
        if method != BASELINE and BASELINE in med:
            common = [n for n in pts if n in med[BASELINE]]
            ax2.plot(common, [med[BASELINE][n] / pts[n] for n in common], marker="o", label=method)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax1.set_yscale("log")
    ax1.set_ylabel("prefill time, median (ms)")
    ax2.axhline(1.0, color="grey", lw=1)
    ax2.set_ylabel(f"prefill speedup vs {BASELINE}")
    path = out / "speed_vs_length.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def agreement(cases: list[dict[str, Any]], out: Path) -> Path | None:
    """Mean KL(baseline || method) (log scale; the baseline's 0 is left out) and top-1 agreement against length,
    one line per method, with 95 % t intervals over the samples as error bars."""
    from sparseflash.eval.summary import t_interval

    ag = [c for c in cases if c.get("kl") is not None and c.get("top1") is not None]
    if not ag:
        return None
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for method in _methods(ag):
        for ax, key in ((ax1, "kl"), (ax2, "top1")):
            if key == "kl" and method == BASELINE:
                continue
            by = defaultdict(list)
            for c in ag:
                if c["method"] == method:
                    by[c["length"]].append(c[key])
            xs = sorted(by)
            ys = [_mean(by[n]) for n in xs]
            cis = [t_interval(by[n]) for n in xs]
            err = [[y - ci[0] if ci else 0.0 for y, ci in zip(ys, cis, strict=True)],
                   [ci[1] - y if ci else 0.0 for y, ci in zip(ys, cis, strict=True)]]
            if key == "kl":  # keep the bars inside the positive axis of a log plot
                err[0] = [min(e, 0.999 * y) for e, y in zip(err[0], ys, strict=True)]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=method)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if ax1.lines:
        ax1.set_yscale("log")
    ax1.set_ylabel(f"KL({BASELINE} || method), nats, mean")
    ax2.set_ylabel(f"top-1 agreement with {BASELINE}")
    ax2.set_ylim(min(0.9, ax2.get_ylim()[0]), 1.005)
    fig.suptitle("next-token agreement with the baseline (last positions of a real-prose window)", y=1.02)
    path = out / "agreement.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_all(cases: list[dict[str, Any]], out: str | Path) -> list[Path]:
    """Every figure the cases allow, written under ``out``; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = heatmaps(cases, out)
    for fn in (accuracy_vs_density, recall_per_layer, speed_vs_length, agreement):
        p = fn(cases, out)
        if p is not None:
            paths.append(p)
    return paths
