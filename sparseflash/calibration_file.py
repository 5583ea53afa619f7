"""The calibration file: per-layer (xattention: per-head) thresholds as versioned JSON, checked against a model.

:class:`Calibration` (``save``, ``check_model``), :func:`load_calibration` (every field checked, a clear error
naming it), and the two steps ``patch`` takes: :func:`pop_calibration` (the ``calibration=`` option out of the
pattern options) and :func:`apply_calibration` (the file as per-layer options). Measuring one is
:func:`sparseflash.calibration.calibrate`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "sparseflash-calibration"
VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 2 added the KL objective (``objective``, ``dense_layers``, a layer's ``kl``)
CALIBRATED = {"xattention": ("threshold", True), "flexprefill": ("gamma", False), "permuted": ("threshold", False)}
"""method -> (the option calibrated, whether it is calibrated per query head)"""
_SYNONYM = "target_recall"  # every calibrated option has this synonym in its pattern
_MODEL_KEYS = ("num_layers", "num_heads", "num_kv_heads", "head_dim")


@dataclass
class LayerCalibration:
    """One layer: ``value`` (float, or one float per query head), the ``recall`` and ``density`` it gave
    (same shape as ``value``), and ``reached``: False where even 1.0 missed the target (``value`` is then 1.0).
    Files of the KL objective give ``kl`` (the excess next-token KL this layer's values spend of the budget,
    :mod:`sparseflash.calibration_kl`) and no ``recall``."""

    layer: int
    value: float | list[float]
    recall: float | list[float] | None
    density: float | list[float]
    reached: bool | list[bool]
    kl: float | None = None


@dataclass
class Calibration:
    """A calibration file's content (module docstring); :meth:`save` / :func:`load_calibration` round-trip it."""

    method: str
    option: str
    per_head: bool
    target_recall: float | None
    model: dict[str, Any]
    calibration_text: dict[str, Any]
    block_size: tuple[int, int]
    layers: list[LayerCalibration]
    options: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    sparseflash_version: str = ""
    dense_layers: list[int] = field(default_factory=list)
    objective: dict[str, Any] = field(default_factory=dict)
    """``{}`` for the recall objective; for the KL objective (:mod:`sparseflash.calibration_kl`) ``kind: "kl"``,
    the ``target_kl`` and the measured per-layer sensitivity table it was allocated from."""

    def to_dict(self) -> dict[str, Any]:
        """The JSON object (``format`` and ``version`` first)."""
        body = asdict(self)
        body["block_size"] = list(self.block_size)
        return {"format": FORMAT, "version": VERSION, **body}

    @classmethod
    def from_dict(cls, data: object) -> Calibration:
        """Validate a parsed JSON object; ``ValueError`` naming the first bad field."""
        return _parse(data)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the JSON to ``path`` (parent folders created); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        return path

    def check_model(self, model: Any, method: str) -> None:
        """``ValueError`` unless this calibration was made for ``method`` and a model of ``model``'s shape."""
        if method != self.method:
            raise ValueError(f"calibration: made for method {self.method!r}, got method {method!r}")
        have = model_info(model)
        if any(have[k] != self.model[k] for k in _MODEL_KEYS):

            def shape(m: Mapping[str, Any]) -> str:
                return (
                    f"{m['num_layers']} layers / {m['num_heads']} heads / {m['num_kv_heads']} KV heads / "
                    f"head_dim {m['head_dim']}"
                )

            raise ValueError(
                f"calibration: made for {shape(self.model)} / method {self.method!r}, model has {shape(have)}"
            )


# ------------------------------------------------------------------------------------------ validation
def _fail(name: str, expected: str, got: object) -> ValueError:
    return ValueError(f"calibration: {name}: expected {expected}, got {got!r:.80}")


def _number(name: str, value: object, lo: float = 0.0, hi: float = 1.0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise _fail(name, f"a number in [{lo}, {hi}]", value)
    return float(value)


def _per_value(name: str, value: object, per_head: bool, heads: int, check: Callable[[str, object], Any]) -> Any:
    """``check`` applied to one value, or to each of ``heads`` values (per-head files)."""
    if not per_head:
        return check(name, value)
    if not isinstance(value, list) or len(value) != heads:
        raise _fail(name, f"a list of {heads} values (one per query head)", value)
    return [check(f"{name}[{h}]", v) for h, v in enumerate(value)]


def _bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise _fail(name, "true or false", value)
    return value


def _parse_layer(
    where: str, entry: object, per_head: bool, model: Mapping[str, int], seen: set[int], kl_objective: bool
) -> LayerCalibration:
    if not isinstance(entry, dict):
        raise _fail(where, "an object", entry)
    idx, num_layers, heads = entry.get("layer"), model["num_layers"], model["num_heads"]
    if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < num_layers or idx in seen:
        raise _fail(f"{where}.layer", f"a new layer index in [0, {num_layers})", idx)
    seen.add(idx)
    value_lo = 0.0 if per_head else 2.0**-30  # per-head thresholds may be 0 (sink + diagonal only)
    fields = [
        None
        if key == "recall" and kl_objective and entry.get(key) is None
        else _per_value(f"{where}.{key}", entry.get(key), per_head, heads, check)
        for key, check in (
            ("value", lambda n, v: _number(n, v, value_lo)),
            ("recall", _number),
            ("density", _number),
            ("reached", _bool),
        )
    ]
    kl = entry.get("kl")
    if kl_objective:
        kl = _number(f"{where}.kl", kl, 0.0, float("inf"))
    elif kl is not None:
        raise _fail(f"{where}.kl", "null (only files of the KL objective give it)", kl)
    return LayerCalibration(idx, *fields, kl=kl)


def _parse(data: object) -> Calibration:
    if not isinstance(data, dict):
        raise _fail("file", "a JSON object", type(data).__name__)
    if data.get("format") != FORMAT:
        raise _fail("format", repr(FORMAT), data.get("format"))
    if data.get("version") not in READABLE_VERSIONS:
        raise _fail("version", f"one of {list(READABLE_VERSIONS)}", data.get("version"))
    method = data.get("method")
    if method not in CALIBRATED:
        raise _fail("method", f"one of {sorted(CALIBRATED)}", method)
    option, per_head = CALIBRATED[method]
    if data.get("option") != option or data.get("per_head") is not per_head:
        raise _fail(
            "option/per_head",
            f"{option!r}/{per_head} for method {method!r}",
            (data.get("option"), data.get("per_head")),
        )
    objective = data.get("objective", {})
    if not isinstance(objective, dict) or objective.get("kind", "kl") != "kl":
        raise _fail("objective", "{} (recall) or an object with kind 'kl'", objective)
    kl_objective = bool(objective)
    if kl_objective:
        _number("objective.target_kl", objective.get("target_kl"), 0.0, float("inf"))
        if data.get("target_recall") is not None:
            raise _fail("target_recall", "null in a file of the KL objective", data.get("target_recall"))
        target = None
    else:
        target = _number("target_recall", data.get("target_recall"))
    model = data.get("model")
    if not isinstance(model, dict):
        raise _fail("model", "an object", model)
    for key in _MODEL_KEYS:
        if isinstance(model.get(key), bool) or not isinstance(model.get(key), int) or model[key] < 1:
            raise _fail(f"model.{key}", "a positive int", model.get(key))
    block = data.get("block_size")
    if not isinstance(block, list) or len(block) != 2 or not all(isinstance(b, int) for b in block):
        raise _fail("block_size", "[block_q, block_k]", block)
    for key, kind in (("layers", list), ("calibration_text", dict), ("options", dict)):
        if not isinstance(data.get(key, kind()), kind):
            raise _fail(key, f"a JSON {'array' if kind is list else 'object'}", data.get(key))
    seen: set[int] = set()
    layers = [
        _parse_layer(f"layers[{i}]", e, per_head, model, seen, kl_objective)
        for i, e in enumerate(data.get("layers", []))
    ]
    dense = data.get("dense_layers", [])
    if not isinstance(dense, list) or any(
        isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < model["num_layers"] or i in seen for i in dense
    ):
        raise _fail("dense_layers", f"a list of uncalibrated layer indices in [0, {model['num_layers']})", dense)
    return Calibration(
        method,
        option,
        per_head,
        target,
        dict(model),
        dict(data.get("calibration_text", {})),
        (block[0], block[1]),
        layers,
        dict(data.get("options", {})),
        str(data.get("created", "")),
        str(data.get("sparseflash_version", "")),
        sorted(set(dense)),
        dict(objective),
    )


def load_calibration(path: str | os.PathLike) -> Calibration:
    """Read and validate a calibration file. Raises ``ValueError`` (naming the field) on a malformed file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"calibration: {path}: not valid JSON ({err})") from None
    return _parse(data)


# ------------------------------------------------------------------------------------------ patching
def model_info(model: Any) -> dict[str, Any]:
    """Name, type and attention shape of a transformers model, from its config."""
    cfg = model.config
    heads = int(cfg.num_attention_heads)
    return {
        "name": str(getattr(cfg, "name_or_path", "") or ""),
        "model_type": getattr(cfg, "model_type", None),
        "num_layers": int(cfg.num_hidden_layers),
        "num_heads": heads,
        "num_kv_heads": int(getattr(cfg, "num_key_value_heads", None) or heads),
        "head_dim": int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads),
    }


def as_calibration(value: object) -> Calibration:
    """A :class:`Calibration` from itself or a path; ``TypeError`` naming ``calibration`` otherwise."""
    if isinstance(value, Calibration):
        return value
    if isinstance(value, str | os.PathLike):
        return load_calibration(value)
    raise TypeError(
        f"calibration: expected a path or a sparseflash.calibration.Calibration, got {type(value).__name__}"
    )


def pop_calibration(method: str, options: dict[str, Any]) -> Calibration | None:
    """Take the patch option ``calibration`` out of ``options`` (a pattern with its own ``calibration``
    option, such as ``block_max``, keeps values that are not a path or a :class:`Calibration`)."""
    from sparseflash.patterns import available, options_of

    value = options.get("calibration")
    if value is None:
        options.pop("calibration", None)
        return None
    own = method in available() and "calibration" in options_of(method)
    if own and not isinstance(value, Calibration | str | os.PathLike):
        return None
    return as_calibration(options.pop("calibration"))


def apply_calibration(
    calibration: Calibration,
    model: Any,
    method: str,
    layer_options: Any,
    global_options: Mapping[str, Any],
    dense_layers: Any,
    num_layers: int,
) -> tuple[Any, Any]:
    """``(layer_options with {option: value} added for every calibrated layer, dense_layers)`` (``patch``'s
    helper; ``dense_layers`` comes back as a tuple when it was an iterator, which this reads).

    Layers in ``dense_layers`` or given another method in ``layer_options`` stay as the user set them; the
    file's own ``dense_layers`` (a KL calibration's choice) become ``"dense"`` in ``layer_options`` unless the
    user set that layer there.

    Raises:
        ValueError: the calibration does not match (method, model shape), or the user sets the calibrated
            option (or ``target_recall``) for a calibrated layer, or ``target_recall`` globally.
    """
    calibration.check_model(model, method)
    option = calibration.option
    if _SYNONYM in global_options:
        raise ValueError(f"{_SYNONYM}: conflicts with calibration (which sets {option!r} per layer); give one")
    if isinstance(dense_layers, Iterable) and not isinstance(dense_layers, str | Collection):
        dense_layers = tuple(dense_layers)
    if not isinstance(layer_options, Mapping):
        return layer_options, dense_layers  # patch reports the type error

    def index(i: object) -> int | None:
        ok = isinstance(i, int) and not isinstance(i, bool) and -num_layers <= i < num_layers
        return i % num_layers if ok else None

    dense = {index(i) for i in dense_layers} if isinstance(dense_layers, Iterable) else set()
    raw_of = {index(raw): raw for raw in layer_options if index(raw) is not None}
    merged = dict(layer_options)
    for entry in calibration.layers:
        if entry.layer in dense:
            continue
        raw = raw_of.get(entry.layer, entry.layer)
        spec = layer_options.get(raw, method)
        if spec == method:
            merged[raw] = {option: entry.value}
        elif isinstance(spec, Mapping) and spec.get("method", method) == method:
            clash = sorted({option, _SYNONYM} & set(spec))
            if clash:
                raise ValueError(
                    f"layer_options[{raw}]: sets {clash}, which the calibration also sets for layer "
                    f"{entry.layer}; give one or the other"
                )
            merged[raw] = {**spec, option: entry.value}
    for layer in calibration.dense_layers:
        if layer not in dense and layer not in raw_of:
            merged[layer] = "dense"
    return merged, dense_layers


# ------------------------------------------------------------------------------------------ computing
