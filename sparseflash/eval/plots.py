"""Figures from result files only (``cases.jsonl``), as PNG, with matplotlib's Agg backend.

* ``heatmap_<task>.png``: needle accuracy, depth (rows) x length (columns), one panel per method
  (red -> yellow -> green, MInference's colours), for every task with a depth axis;
* ``accuracy_vs_density.png``: accuracy against the density each method ran at, one point per (method, length);
* ``recall_per_layer.png``: attention recall per layer for each method (``recall`` task), one panel per length;
* ``speed_vs_length.png``: median prefill time per method against length, and the speedup vs the baseline
  (``sdpa``);
* ``agreement.png``: mean KL(baseline || method) and top-1 agreement per method against length, with 95 % t
  intervals over the samples (``agreement`` task).

Every method keeps one colour and marker in every panel and figure (:func:`method_colours`, computed once over
all the cases by :func:`plot_all`): the baseline ``sdpa`` black, drawn as a large hollow square above the other
points (so a method at the same place, e.g. density 1.0, stays visible inside it), ``dense`` grey, the other
methods by sorted name. Length axes are in tokens, labelled 1K, 4K, 16K, ... (:func:`token_formatter`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sparseflash.eval.methods import BASELINE, DENSE

_CMAP_COLOURS = ["#F0496E", "#EBB839", "#0CD79F"]
# tab10 without its grey (dense's) and black (the baseline's)
_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf"]
_MARKERS = ["o", "^", "v", "P", "X", "<", ">", "h", "p"]
_FIXED_COLOURS = {BASELINE: "#000000", DENSE: "#7f7f7f"}
REQUIRED_KEYS = ("model", "task", "method", "length", "seed")  # what every figure and the summary read


def check_cases(cases: list[dict[str, Any]]) -> None:
    """``ValueError`` naming the first case (1-based, in file order) that lacks a key the figures read.

    Every case needs :data:`REQUIRED_KEYS` (``length`` an int >= 1); a ``recall`` case (with
    ``recall_per_layer``) also ``layers`` and ``density``.
    """
    for i, c in enumerate(cases, 1):
        if not isinstance(c, dict):
            raise ValueError(f"results: case {i}: expected a JSON object, got {type(c).__name__} {c!r:.80}")
        need = REQUIRED_KEYS + (("layers", "density") if c.get("recall_per_layer") else ())
        missing = [k for k in need if k not in c]
        if missing:
            raise ValueError(f"results: case {i}: expected keys {list(need)}, missing {missing} (has {sorted(c)})")
        n = c["length"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"results: case {i}: length: expected an int >= 1, got {n!r}")


def method_colours(methods: Iterable[str]) -> dict[str, str]:
    """One colour per method: ``sdpa`` black, ``dense`` grey, the others from tab10 by sorted name.

    The mapping depends on the set of names only (not their order); :func:`plot_all` computes it once over all
    the cases so a method has the same colour in every panel and figure.
    """
    names = set(methods)
    others = sorted(names - set(_FIXED_COLOURS))
    out = {m: c for m, c in _FIXED_COLOURS.items() if m in names}
    out.update({m: _PALETTE[i % len(_PALETTE)] for i, m in enumerate(others)})
    return out


def method_style(method: str, colours: dict[str, str]) -> dict[str, Any]:
    """Matplotlib ``plot``/``errorbar`` keywords of ``method``: its colour and marker; the baseline a large hollow
    square on top (a method's point at the same place shows inside it), ``dense`` a hollow diamond."""
    colour = colours.get(method) or method_colours([method])[method]
    if method == BASELINE:
        return {
            "color": colour,
            "marker": "s",
            "markersize": 11,
            "markerfacecolor": "none",
            "markeredgewidth": 1.8,
            "zorder": 5,
        }
    if method == DENSE:
        return {
            "color": colour,
            "marker": "D",
            "markersize": 8,
            "markerfacecolor": "none",
            "markeredgewidth": 1.5,
            "zorder": 4,
        }
    others = sorted(m for m in colours if m not in _FIXED_COLOURS)
    i = others.index(method) if method in others else 0
    return {"color": colour, "marker": _MARKERS[i % len(_MARKERS)], "markersize": 5, "zorder": 3}


def token_label(n: float) -> str:
    """Tokens as a tick label: 1024 -> '1K', 16384 -> '16K', 1536 -> '1.5K', 512 -> '512', 2**20 -> '1M'."""
    r = round(n)
    if abs(n - r) > 1e-6:
        return f"{n:g}"
    if r >= 1 << 20 and r % (1 << 19) == 0:
        return f"{r / (1 << 20):g}M"
    if r >= 1024 and r % 512 == 0:
        return f"{r / 1024:g}K"
    return str(r)


def token_formatter() -> Any:
    """A matplotlib tick formatter writing token counts as :func:`token_label` does (16384 -> '16K')."""
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda x, pos=None: token_label(x))


def _length_axis(ax: Any, lengths: Iterable[int]) -> None:
    """A log2 x axis in tokens with one tick per length, labelled 1K, 4K, 16K, ..."""
    from matplotlib.ticker import FixedLocator, NullLocator

    ax.set_xscale("log", base=2)
    ticks = sorted(set(lengths))
    if ticks:
        ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(token_formatter())
    ax.set_xlabel("context length (tokens)")


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


def heatmaps(cases: list[dict[str, Any]], out: Path, colours: dict[str, str] | None = None) -> list[Path]:
    """One ``heatmap_<task>.png`` per task with depths (one panel per method, titled in its colour; the axis
    labels once for the figure); returns the written paths."""
    plt = _plt()
    from matplotlib.colors import LinearSegmentedColormap

    cmap = LinearSegmentedColormap.from_list("needle", _CMAP_COLOURS)
    colours = colours or method_colours(c["method"] for c in cases)
    written = []
    tasks = sorted({c["task"] for c in cases if c.get("depth") is not None and c.get("score") is not None})
    for task in tasks:
        tc = [c for c in cases if c["task"] == task and c.get("score") is not None]
        methods = _methods(tc)
        depths = sorted({c["depth"] for c in tc})
        lengths = sorted({c["length"] for c in tc})
        size = (2.2 + 1.1 * len(lengths) * len(methods), 0.5 * len(depths) + 2)
        fig, axes = plt.subplots(1, len(methods), figsize=size, squeeze=False, sharey=True, layout="constrained")
        for ax, method in zip(axes[0], methods, strict=True):
            cell: dict[tuple[float, int], list[float]] = defaultdict(list)
            for c in tc:
                if c["method"] == method:
                    cell[(c["depth"], c["length"])].append(c["score"])
            grid = [[_mean(cell[(d, n)]) if cell[(d, n)] else float("nan") for n in lengths] for d in depths]
            im = ax.imshow(grid, cmap=cmap, vmin=0, vmax=1, aspect="auto", origin="upper")
            ax.set_xticks(range(len(lengths)), [token_label(n) for n in lengths])
            ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
            ax.set_title(method, color=colours.get(method, "black"))
            for i, row in enumerate(grid):
                for j, v in enumerate(row):
                    if v == v:
                        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
        fig.supxlabel("context length (tokens)")
        fig.supylabel("needle depth (%)")
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
        fig.suptitle(f"{task}: accuracy by needle depth and context length")
        path = out / f"heatmap_{task}.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def accuracy_vs_density(cases: list[dict[str, Any]], out: Path, colours: dict[str, str] | None = None) -> Path | None:
    """Mean accuracy (generation tasks) against mean density, per (method, length); the baseline (density 1.0)
    is a large hollow square drawn above the methods, so one at density 1.0 shows inside it."""
    gen = [c for c in cases if c.get("score") is not None and c.get("density") is not None and "recall" not in c]
    if not gen:
        return None
    plt = _plt()
    colours = colours or method_colours(c["method"] for c in cases)
    fig, ax = plt.subplots(figsize=(6, 4.5), layout="constrained")
    for method in _methods(gen):
        pts = defaultdict(list)
        dens = defaultdict(list)
        for c in gen:
            if c["method"] == method:
                pts[c["length"]].append(c["score"])
                dens[c["length"]].append(c["density"])
        xs = [_mean(dens[n]) for n in sorted(pts)]
        ys = [_mean(pts[n]) for n in sorted(pts)]
        ax.plot(xs, ys, label=method, **method_style(method, colours))
        if method in _FIXED_COLOURS:  # sdpa and dense sit at density 1.0: their length labels would pile up
            continue
        for x, y, n in zip(xs, ys, sorted(pts), strict=True):
            ax.annotate(
                token_label(n),
                (x, y),
                fontsize=7,
                xytext=(4, 4),
                textcoords="offset points",
                color=colours.get(method, "black"),
            )
    ax.set_xlabel("density (kept causal blocks / causal blocks)")
    ax.set_ylabel("accuracy (all generation tasks)")
    ax.set_xlim(0, 1.08)
    ax.set_ylim(-0.05, 1.08)
    ax.grid(alpha=0.3)
    ax.legend()
    path = out / "accuracy_vs_density.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def recall_per_layer(cases: list[dict[str, Any]], out: Path, colours: dict[str, str] | None = None) -> Path | None:
    """Recall per layer per method, one panel per length (``recall`` task cases)."""
    rc = [c for c in cases if c.get("recall_per_layer")]
    if not rc:
        return None
    plt = _plt()
    colours = colours or method_colours(c["method"] for c in cases)
    lengths = sorted({c["length"] for c in rc})
    fig, axes = plt.subplots(
        1, len(lengths), figsize=(5 * len(lengths), 4), squeeze=False, sharey=True, layout="constrained"
    )
    for ax, length in zip(axes[0], lengths, strict=True):
        for method in _methods(rc):
            sel = [c for c in rc if c["method"] == method and c["length"] == length]
            if not sel:
                continue
            layers = sel[0]["layers"]
            mean = [_mean([c["recall_per_layer"][i] for c in sel]) for i in range(len(layers))]
            dens = _mean([c["density"] for c in sel])
            style = {**method_style(method, colours), "markersize": 4}
            ax.plot(layers, mean, label=f"{method} (density {dens:.2f})", **style)
        ax.set_title(f"{token_label(length)} tokens")
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("attention recall")
    path = out / "recall_per_layer.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def speed_vs_length(cases: list[dict[str, Any]], out: Path, colours: dict[str, str] | None = None) -> Path | None:
    """Median prefill ms per method against length, and the speedup vs the baseline."""
    import statistics

    timed = [c for c in cases if c.get("prefill_ms") is not None]
    if not timed:
        return None
    plt = _plt()
    colours = colours or method_colours(c["method"] for c in cases)
    med: dict[str, dict[int, float]] = defaultdict(dict)
    for method in _methods(timed):
        by = defaultdict(list)
        for c in timed:
            if c["method"] == method:
                by[c["length"]].append(c["prefill_ms"])
        med[method] = {n: statistics.median(v) for n, v in sorted(by.items())}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    for method, pts in med.items():
        style = method_style(method, colours)
        ax1.plot(list(pts), list(pts.values()), label=method, **style)
        if method != BASELINE and BASELINE in med:
            common = [n for n in pts if n in med[BASELINE]]
            ax2.plot(common, [med[BASELINE][n] / pts[n] for n in common], label=method, **style)
    for ax in (ax1, ax2):
        _length_axis(ax, {c["length"] for c in timed})
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


def agreement(cases: list[dict[str, Any]], out: Path, colours: dict[str, str] | None = None) -> Path | None:
    """Mean KL(baseline || method) (log scale; the baseline's 0 is left out) and top-1 agreement against length,
    one line per method, with 95 % t intervals over the samples as error bars."""
    from sparseflash.eval.summary import t_interval

    ag = [c for c in cases if c.get("kl") is not None and c.get("top1") is not None]
    if not ag:
        return None
    plt = _plt()
    colours = colours or method_colours(c["method"] for c in cases)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
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
            err = [
                [y - ci[0] if ci else 0.0 for y, ci in zip(ys, cis, strict=True)],
                [ci[1] - y if ci else 0.0 for y, ci in zip(ys, cis, strict=True)],
            ]
            if key == "kl":  # keep the bars inside the positive axis of a log plot
                err[0] = [min(e, 0.999 * y) for e, y in zip(err[0], ys, strict=True)]
            ax.errorbar(xs, ys, yerr=err, capsize=3, label=method, **method_style(method, colours))
    for ax in (ax1, ax2):
        _length_axis(ax, {c["length"] for c in ag})
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if ax1.lines:
        ax1.set_yscale("log")
    ax1.set_ylabel(f"KL({BASELINE} || method), nats, mean")
    ax2.set_ylabel(f"top-1 agreement with {BASELINE}")
    ax2.set_ylim(min(0.9, ax2.get_ylim()[0]), 1.005)
    fig.suptitle("next-token agreement with the baseline (last positions of a real-prose window)")
    path = out / "agreement.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_all(cases: list[dict[str, Any]], out: str | Path) -> list[Path]:
    """Every figure the cases allow, written under ``out``; returns the paths.

    Raises:
        ValueError: a case lacks a key the figures read (:func:`check_cases`).
    """
    check_cases(cases)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    colours = method_colours(c["method"] for c in cases)  # one colour per method in every figure
    paths = heatmaps(cases, out, colours)
    for fn in (accuracy_vs_density, recall_per_layer, speed_vs_length, agreement):
        p = fn(cases, out, colours)
        if p is not None:
            paths.append(p)
    return paths
