"""Per-layer thresholds by output sensitivity: the sparsest layers that keep the next-token distribution.

Recall calibration (:mod:`sparseflash.calibration`) gives every layer the same attention recall, but layers differ
in how much a lost fraction of mass moves the model's output: on Qwen2.5-Coder-0.5B two groups of middle layers
carry most of the KL to dense (``benchmarks/results/kl_by_layer_group_cpu.txt``; on the 1.5B the layers are about
equally sensitive, README "Accuracy"). This module measures that directly and spends a KL budget where it buys the
most density:

1. :func:`measure_sensitivity`: for each layer alone sparse (every other layer on sparseflash's exact kernel) and
   each candidate value of the method's threshold, the mean KL(exact || patched) of the next-token distributions
   over the last ``window`` positions of a calibration text, and that layer's density.
2. :func:`allocate`: per layer, a candidate value or dense, minimising the mean density subject to the sum of
   the layers' *excess* KLs <= ``target_kl`` (exact dynamic programme over KL rounded up to ``target_kl / 2000``).
   A layer's excess is its KL minus its KL at the largest candidate value (:meth:`Sensitivity.excess`): in bf16
   on a GPU any change of one layer's rounding moves the output by a floor of its own (Qwen2.5-Coder-1.5B at 16K:
   0.0002-0.0009 per layer at threshold 0.98, against 0.0007 for all layers on another exact kernel), and these
   floors do not add up (28 layers at 0.98 sum to 0.0175, all of them sparse at 0.95 give 0.0046), while the
   excesses do, roughly: 0.5B in float32, 0.0258 summed over six layer groups against 0.0256 all together
   (``benchmarks/results/kl_by_layer_group_cpu.txt``); 1.5B in bf16, allocations of equal summed excess gave equal
   measured KL (0.0022: 0.0046 uniform, 0.0047 per layer; 0.0066: 0.0093 and 0.0096, 16K). With 1.0 among the
   values the floor is the layer's KL at full density, i.e. pure rounding.
3. :func:`calibrate_kl`: both, as a :class:`~sparseflash.calibration_file.Calibration` with ``objective.kind ==
   "kl"``; :func:`reallocate` re-runs step 2 on a file's stored table for another budget without the model.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sparseflash.calibration_file import CALIBRATED, Calibration, LayerCalibration, model_info

DEFAULT_VALUES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 1.0)
DEFAULT_WINDOW = 1024
_STEPS = 2000  # KL resolution of the allocation: target_kl / _STEPS


@dataclass
class Sensitivity:
    """What :func:`measure_sensitivity` measured: ``kl[i][j]`` and ``density[i][j]`` for row ``i`` alone sparse
    at ``values[j]``. A row is layer ``layers[i]``, or with ``heads`` (per-head tables) query head ``heads[i]`` of
    that layer, the layer's other heads at the largest value. ``dense_kl``: KL(exact || exact) of the reference
    run against itself (0 unless the kernels are not deterministic)."""

    layers: list[int]
    values: list[float]
    kl: list[list[float]]
    density: list[list[float]]
    window: int
    dense_kl: float = 0.0
    heads: list[int] | None = None

    def excess(self) -> list[list[float]]:
        """``kl`` minus each layer's KL at the largest value (its rounding floor), clamped at 0."""
        top = self.values.index(max(self.values)) if self.values else 0
        return [[max(0.0, k - row[top]) for k in row] for row in self.kl]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Sensitivity:
        """``ValueError`` naming the field on a malformed table (as stored in a calibration file)."""
        try:
            table = cls(
                [int(i) for i in data["layers"]],
                [float(v) for v in data["values"]],
                [[float(x) for x in row] for row in data["kl"]],
                [[float(x) for x in row] for row in data["density"]],
                int(data["window"]),
                float(data.get("dense_kl", 0.0)),
                None if data.get("heads") is None else [int(h) for h in data["heads"]],
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"calibration: objective: expected a sensitivity table, got a bad field ({err})") from None
        shape = (len(table.layers), len(table.values))
        if table.heads is not None and len(table.heads) != shape[0]:
            raise ValueError(f"calibration: objective.heads: expected {shape[0]} head indices")
        for name, rows in (("kl", table.kl), ("density", table.density)):
            if len(rows) != shape[0] or any(len(r) != shape[1] for r in rows):
                raise ValueError(f"calibration: objective.{name}: expected {shape[0]} rows of {shape[1]} values")
        return table


def _check_target_kl(target_kl: object) -> None:
    if isinstance(target_kl, bool) or not isinstance(target_kl, int | float) or not 0 < target_kl < math.inf:
        raise ValueError(f"target_kl: expected a positive number, got {target_kl!r}")


def default_options(method: str) -> dict[str, Any]:
    """``patch``'s safe options of ``method`` without the option the calibration sets (what it measures with)."""
    from sparseflash.integrations.hf.plan import SAFE_OPTIONS

    return {k: v for k, v in SAFE_OPTIONS.get(method, {}).items() if k != CALIBRATED[method][0]}


def allocate(table: Sensitivity, target_kl: float) -> list[float | None]:
    """Per row of ``table``: the value to use, or None for dense (per-layer tables only); the mean density is
    minimal among choices whose summed excess KL (:meth:`Sensitivity.excess`) stays <= ``target_kl`` (rounded up
    to ``target_kl / 2000``, so the bound holds exactly on the table).

    Raises:
        ValueError: ``target_kl`` is not a positive finite number.
    """
    _check_target_kl(target_kl)
    unit = target_kl / _STEPS
    dense = [] if table.heads is not None else [(0, 1.0, None)]
    options = [
        dense + [(math.ceil(k / unit - 1e-9), d, v) for k, d, v in zip(kls, dens, table.values, strict=True)]
        for kls, dens in zip(table.excess(), table.density, strict=True)
    ]
    # best[s]: least summed density of the rows so far within s units; back[r, s]: row r's option there
    best = torch.zeros(_STEPS + 1, dtype=torch.float64)
    back = torch.zeros(len(options), _STEPS + 1, dtype=torch.int64)
    for r, opts in enumerate(options):
        new = torch.full((_STEPS + 1,), math.inf, dtype=torch.float64)
        for o, (cost, dens, _) in enumerate(opts):
            if cost > _STEPS:
                continue
            cand = torch.full((_STEPS + 1,), math.inf, dtype=torch.float64)
            cand[cost:] = best[: _STEPS + 1 - cost] + dens
            better = cand < new
            new[better], back[r, better] = cand[better], o
        best = new
    choice: list[float | None] = [None] * len(options)
    budget = _STEPS
    for r in reversed(range(len(options))):
        cost, _, value = options[r][int(back[r, budget])]
        choice[r], budget = value, budget - cost
    return choice


def _log_probs(model: Any, ids: torch.Tensor, window: int) -> torch.Tensor:
    with torch.inference_mode():
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=window).logits[0]
    return torch.log_softmax(logits.float(), -1)


def measure_sensitivity(
    model: Any,
    ids: torch.Tensor,
    method: str,
    values: Sequence[float] = DEFAULT_VALUES,
    *,
    options: Mapping[str, Any] | None = None,
    layers: Sequence[int] | None = None,
    window: int = DEFAULT_WINDOW,
    per_head: bool = False,
    on_row: Callable[[str, list[float], list[float]], None] | None = None,
) -> Sensitivity:
    """Step 1 of the module docstring on one text.

    Args:
        model: a transformers causal LM :func:`sparseflash.patch` supports (not patched).
        ids: (1, S) int64 token ids on the model's device.
        method: a key of :data:`~sparseflash.calibration_file.CALIBRATED`; ``values`` are its option's candidates.
        options: other patch and pattern options of every run (default: none).
        layers: the layers to measure (default all; the others stay dense in the result).
        window: KL over the next-token distributions of the last ``window`` positions.
        per_head: one row per query head (methods calibrated per head): the head at each value, the layer's other
            heads at the largest; a head's density is its layout's (the exact last rows not counted), from one
            pass that captures every layer's q/k. Costs ``1 + heads x (values - 1)`` forwards per layer.
        on_row: called with (row label: ``"layer"`` or ``"layer.head"``, kl per value, density per value).
    """
    from sparseflash.eval.engine import kl_per_row
    from sparseflash.integrations.hf.patching import patch, patch_state, unpatch

    num_layers = model.config.num_hidden_layers
    option = CALIBRATED[method][0]
    layers = list(range(num_layers)) if layers is None else [int(i) for i in layers]
    common = {**dict(options or {}), "min_sparse_len": 0}
    patch(model, "dense")
    try:
        ref = _log_probs(model, ids, window)
        dense_kl = float(kl_per_row(ref, _log_probs(model, ids, window)).mean())
    finally:
        unpatch(model)

    def run(layer: int, value: Any) -> tuple[float, float]:
        """(KL, work density) with only ``layer`` sparse at ``value``."""
        seen: list[float] = []
        patch(model, method, dense_layers=[i for i in range(num_layers) if i != layer], **common, **{option: value})
        patch_state(model).on_prefill = lambda idx, d: seen.append(d) if idx == layer else None
        try:
            kl = float(kl_per_row(ref, _log_probs(model, ids, window)).mean())
        finally:
            unpatch(model)
        return kl, sum(float(d) for d in seen) / len(seen) if seen else 1.0

    values = [float(v) for v in values]
    table = Sensitivity(layers if not per_head else [], values, [], [], int(window), dense_kl, [] if per_head else None)
    if not per_head:
        for layer in layers:
            kls, dens = zip(*(run(layer, v) for v in values), strict=True)
            table.kl.append(list(kls))
            table.density.append(list(dens))
            if on_row is not None:
                on_row(str(layer), list(kls), list(dens))
        return table
    head_density = _head_densities(model, ids, method, values, common, layers)
    heads, top = model.config.num_attention_heads, max(values)
    for layer in layers:
        floor = run(layer, [top] * heads)[0]
        for h in range(heads):
            kls = [floor if v == top else run(layer, [v if g == h else top for g in range(heads)])[0] for v in values]
            dens = [head_density[layer][j][h] for j in range(len(values))]
            table.layers.append(layer)
            table.heads.append(h)
            table.kl.append(kls)
            table.density.append(dens)
            if on_row is not None:
                on_row(f"{layer}.{h}", kls, dens)
    return table


def _head_densities(
    model: Any, ids: torch.Tensor, method: str, values: Sequence[float], options: Mapping[str, Any], layers: list[int]
) -> dict[int, list[list[float]]]:
    """``{layer: [value][query head] density}`` of the method's layouts on the q/k of one captured pass."""
    from sparseflash.eval.capture import capture_attention
    from sparseflash.integrations.hf.model import _attention_modules
    from sparseflash.integrations.hf.plan import PATCH_KEYS
    from sparseflash.metrics import density
    from sparseflash.patterns import select

    option = CALIBRATED[method][0]
    modules = _attention_modules(model)
    pattern = {k: v for k, v in options.items() if k not in PATCH_KEYS}
    found: dict[int, list[list[float]]] = {}

    def on_qk(idx: int, q: torch.Tensor, k: torch.Tensor) -> None:
        if idx in layers:
            scale = getattr(modules[idx], "scaling", None)
            found[idx] = [
                density(select(method, q, k, scale=scale, **pattern, **{option: v}), per_head=True).tolist()
                for v in values
            ]

    with torch.inference_mode(), capture_attention(model, on_qk):
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    return found


def _from_allocation(base: Calibration, table: Sensitivity, target_kl: float, skipped: Sequence[int]) -> Calibration:
    """``base`` (model, text, options) with the layers and objective of ``allocate(table, target_kl)``; a layer's
    ``kl`` is the excess KL its choice spends."""
    choice, excess = allocate(table, target_kl), table.excess()
    heads = base.model["num_heads"]
    picked: dict[int, list[tuple[int | None, float, float, float]]] = {}  # layer -> [(head, value, density, kl)]
    dense = set(skipped)
    for i, layer in enumerate(table.layers):
        if choice[i] is None:
            dense.add(layer)
            continue
        j = table.values.index(choice[i])
        head = None if table.heads is None else table.heads[i]
        picked.setdefault(layer, []).append((head, choice[i], table.density[i][j], excess[i][j]))
    layers = []
    for layer, rows in sorted(picked.items()):
        if rows[0][0] is None:  # a per-layer table: one value for all heads
            (_, value, dens, kl), many = rows[0], base.per_head
            layers.append(
                LayerCalibration(
                    layer,
                    [value] * heads if many else value,
                    None,
                    [dens] * heads if many else dens,
                    [True] * heads if many else True,
                    kl=kl,
                )
            )
            continue
        rows = sorted(rows, key=lambda r: r[0])
        if [r[0] for r in rows] != list(range(heads)):
            raise ValueError(f"calibration: objective.heads: expected heads 0..{heads - 1} for layer {layer}")
        layers.append(
            LayerCalibration(
                layer, [r[1] for r in rows], None, [r[2] for r in rows], [True] * heads, kl=sum(r[3] for r in rows)
            )
        )
    objective = {**base.objective, "kind": "kl", "target_kl": float(target_kl), **table.to_dict()}
    return dataclasses.replace(base, target_recall=None, layers=layers, dense_layers=sorted(dense), objective=objective)


def reallocate(calibration: Calibration, target_kl: float) -> Calibration:
    """The same KL calibration for another ``target_kl``, from the sensitivity table stored in the file."""
    if calibration.objective.get("kind") != "kl":
        raise ValueError("calibration: expected a file of the KL objective (sparseflash calibrate --target-kl)")
    table = Sensitivity.from_dict(calibration.objective)
    measured = set(table.layers)
    skipped = [i for i in calibration.dense_layers if i not in measured]
    return _from_allocation(calibration, table, target_kl, skipped)


def calibrate_kl(
    model: Any,
    ids: torch.Tensor,
    method: str = "xattention",
    *,
    target_kl: float,
    values: Sequence[float] = DEFAULT_VALUES,
    options: Mapping[str, Any] | None = None,
    dense_layers: Sequence[int] = (),
    window: int = DEFAULT_WINDOW,
    per_head: bool = False,
    text: Mapping[str, Any] | None = None,
    name: str | None = None,
    on_row: Callable[[str, list[float], list[float]], None] | None = None,
) -> Calibration:
    """Measure the sensitivity table and allocate ``target_kl`` (module docstring).

    Args:
        ids: (1, S) int64 ids of the calibration text. options: pattern options of every run (default: patch's
            safe options for ``method``), stored in the file and applied by ``patch`` with it; patch options
            among them (e.g. ``dense_last_queries``) are used while measuring and recorded in ``objective``.
        values: candidate values of the method's option, each in (0, 1]. dense_layers: layers left dense
            (sliding-window layers always are). text: what ``ids`` are (stored in the file).
        per_head: one value per query head (``xattention``) from a per-head table (:func:`measure_sensitivity`);
            no layer is then made dense by the allocation.
        on_row: progress, as :func:`measure_sensitivity`'s.
    """
    from sparseflash.integrations.hf.model import _attention_modules, _check_model
    from sparseflash.integrations.hf.plan import PATCH_KEYS

    _check_model(model)
    if method not in CALIBRATED:
        raise ValueError(f"method: expected one of {sorted(CALIBRATED)}, got {method!r}")
    _check_target_kl(target_kl)
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v <= 1]
    if not values or bad or len(set(values)) != len(values):
        raise ValueError(f"values: expected distinct numbers in (0, 1], got {list(values)!r}")
    if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= ids.shape[-1]:
        raise ValueError(f"window: expected an int in [1, {ids.shape[-1]}], got {window!r}")
    option, head_values = CALIBRATED[method]
    if per_head and not head_values:
        raise ValueError(f"per_head: expected False for method {method!r} (one {option} per layer), got True")
    opts = dict(default_options(method) if options is None else options)
    clash = sorted({option, "target_recall", "calibration", "dense_layers", "layer_options"} & set(opts))
    if clash:
        raise ValueError(f"options: expected none of {clash} (the calibration sets them), got {opts}")
    patch_options = {k: opts.pop(k) for k in list(opts) if k in PATCH_KEYS}
    block = opts.get("block_size", 128)
    block = (block, block) if isinstance(block, int) else tuple(block)
    modules = _attention_modules(model)
    skipped = {int(i) % len(modules) for i in dense_layers}
    skipped |= {i for i, m in modules.items() if getattr(m, "sliding_window", None) is not None}
    measured = [i for i in sorted(modules) if i not in skipped]
    table = measure_sensitivity(
        model,
        ids.reshape(1, -1),
        method,
        values,
        options={**opts, **patch_options},
        layers=measured,
        window=window,
        per_head=per_head,
        on_row=on_row,
    )
    import sparseflash

    info = model_info(model)
    info["name"] = name or info["name"]
    base = Calibration(
        method,
        option,
        head_values,
        None,
        info,
        dict(text or {"source": "ids", "tokens": int(ids.shape[-1]), "seed": None}),
        block,
        [],
        opts,
        datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        sparseflash.__version__,
    )
    calibration = _from_allocation(base, table, target_kl, sorted(skipped))
    calibration.objective["patch_options"] = patch_options
    return calibration
