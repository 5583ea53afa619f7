"""The eval figures: one colour per method everywhere, token tick labels, heat map labels, the baseline visible."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402

from sparseflash.eval import plots  # noqa: E402


def _cases():
    """Generation, recall, speed and agreement cases where the methods present differ between panels."""
    out = []
    for method, dens in (("sdpa", 1.0), ("dense", 1.0), ("zeta", 1.0), ("alpha", 0.3)):
        for n in (1024, 4096, 16384):
            for depth in (0.0, 50.0):
                out.append(
                    {
                        "model": "m",
                        "task": "passkey",
                        "method": method,
                        "length": n,
                        "seed": 1,
                        "depth": depth,
                        "score": 1.0 if method != "alpha" else 0.5,
                        "density": dens,
                        "prefill_ms": n / (1 if dens == 1.0 else 3),
                    }
                )
    # recall: 'alpha' only at 1024, 'zeta' only at 4096 (each panel holds a different subset)
    for method, n in (("sdpa", 1024), ("alpha", 1024), ("sdpa", 4096), ("zeta", 4096)):
        out.append(
            {
                "model": "m",
                "task": "recall",
                "method": method,
                "length": n,
                "seed": 2,
                "score": 1.0,
                "recall": 0.9,
                "recall_per_layer": [0.9, 0.8],
                "density_per_layer": [0.5, 0.5],
                "layers": [0, 1],
                "density": 0.5,
            }
        )
    # agreement: only 'zeta' besides the baseline
    for method in ("sdpa", "zeta"):
        for n in (1024, 32768):
            out.append(
                {
                    "model": "m",
                    "task": "agreement",
                    "method": method,
                    "length": n,
                    "seed": 3,
                    "kl": 0.0 if method == "sdpa" else 0.01,
                    "top1": 1.0 if method == "sdpa" else 0.97,
                }
            )
    return out


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    """``plot_all`` over :func:`_cases`: (written paths, every figure it closed, kept for inspection)."""
    kept = []
    real_close = plt.close

    def close(fig=None):
        if fig is not None and not isinstance(fig, str):
            kept.append(fig)
        real_close(fig)

    plt.close = close
    try:
        paths = plots.plot_all(_cases(), tmp_path_factory.mktemp("plots"))
    finally:
        plt.close = real_close
    return paths, kept


def test_method_colours_are_stable():
    a = plots.method_colours(["zeta", "sdpa", "alpha", "dense"])
    assert (
        a
        == plots.method_colours(["dense", "alpha", "sdpa", "zeta"])
        == plots.method_colours(iter(["alpha", "zeta", "dense", "sdpa", "alpha"]))
    )
    assert a["sdpa"] == "#000000" and a["dense"] == "#7f7f7f" and len(set(a.values())) == 4


def test_token_formatter():
    fmt = plots.token_formatter()
    assert [fmt(x, 0) for x in (512, 1024, 4096, 16384, 32768.0, 1536, 1 << 20)] == [
        "512",
        "1K",
        "4K",
        "16K",
        "32K",
        "1.5K",
        "1M",
    ]


def test_baseline_is_drawn_distinct_and_on_top():
    colours = plots.method_colours(["sdpa", "alpha"])
    base, other = plots.method_style("sdpa", colours), plots.method_style("alpha", colours)
    assert base["zorder"] > other["zorder"] and base["markerfacecolor"] == "none"
    assert base["markersize"] > other["markersize"] and base["marker"] != other["marker"]


def test_check_cases_names_the_missing_keys():
    with pytest.raises(ValueError, match=r"case 2: expected keys .*missing \['length', 'seed'\]"):
        plots.check_cases(
            [
                {"model": "m", "task": "t", "method": "x", "length": 1, "seed": 0},
                {"model": "m", "task": "t", "method": "x"},
            ]
        )
    with pytest.raises(ValueError, match=r"case 1: length: expected an int >= 1, got '1K'"):
        plots.check_cases([{"model": "m", "task": "t", "method": "x", "length": "1K", "seed": 0}])


def test_one_colour_per_method_in_every_panel_and_figure(drawn):
    paths, figures = drawn
    assert {p.name for p in paths} == {
        "heatmap_passkey.png",
        "accuracy_vs_density.png",
        "recall_per_layer.png",
        "speed_vs_length.png",
        "agreement.png",
    }
    expected = plots.method_colours(c["method"] for c in _cases())
    seen: dict[str, set[str]] = {}
    for fig in figures:
        for ax in fig.axes:
            for line in ax.get_lines():
                label = line.get_label().split(" (density")[0]
                if label in expected:
                    seen.setdefault(label, set()).add(to_hex(line.get_color()))
            # heat map panels are titled in their method's colour
            if ax.get_title() in expected:
                seen.setdefault(ax.get_title(), set()).add(to_hex(ax.title.get_color()))
    assert set(seen) == set(expected)
    assert all(cols == {expected[m]} for m, cols in seen.items()), seen


def test_length_axes_in_tokens_and_heatmap_labels_once(drawn):
    _, figures = drawn
    speed = next(f for f in figures if any("prefill time" in ax.get_ylabel() for ax in f.axes))
    speed.canvas.draw()
    labels = [t.get_text() for t in speed.axes[0].get_xticklabels()]
    assert labels == ["1K", "4K", "16K"]
    heat = next(f for f in figures if f.get_suptitle().startswith("passkey"))
    panels = [ax for ax in heat.axes if ax.get_title()]
    assert len(panels) == 4 and all(ax.get_xlabel() == "" and ax.get_ylabel() == "" for ax in panels)
    assert heat.get_supxlabel() == "context length (tokens)" and heat.get_supylabel() == "needle depth (%)"
    assert heat.get_layout_engine() is not None  # constrained layout: labels and colour bar do not overlap
    assert [t.get_text() for t in panels[0].get_xticklabels()] == ["1K", "4K", "16K"]
