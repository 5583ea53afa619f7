"""Per-layer / per-head threshold calibration: compute it on a text, save it as JSON, load and check it.

:func:`calibrate` runs the model once over a calibration text (a seeded window of the long corpus of
:mod:`sparseflash.eval.text`), captures every layer's post-RoPE q/k and, one layer at a time, bisects the
method's threshold (:data:`CALIBRATED`) down to the smallest value whose layout keeps ``target_recall`` of the
exact attention mass (:func:`sparseflash.metrics.attention_recall`, mean over rows): per query head for
``xattention`` (whose ``threshold`` takes one value per head), per layer (mean over heads) otherwise.

``patch(model, method, calibration=PATH)`` (and ``sparseflash eval -O xattention.calibration=PATH``) turns the
file into per-layer options; a file made for another method or model shape is refused (:meth:`Calibration.check_model`).
"""

from __future__ import annotations

import datetime
import random
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from sparseflash.calibration_file import (  # noqa: F401  (re-exported: the file side of calibration)
    _SYNONYM,
    CALIBRATED,
    FORMAT,
    VERSION,
    Calibration,
    LayerCalibration,
    apply_calibration,
    as_calibration,
    load_calibration,
    model_info,
    pop_calibration,
)

DEFAULT_LENGTH = {"cuda": 16384, "cpu": 1024}
MIN_LENGTH = 256
DEFAULT_ITERATIONS = 8


class _RecallProbe:
    """Per-head recall of layouts for one (q, k): :func:`sparseflash.metrics.attention_recall` with the dense
    lse computed once (the bisection scores ~9 layouts per layer)."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, scale: float | None) -> None:
        from sparseflash.ops.prefill.dense import flash_attention

        self.q, self.k, self.scale = q, k, scale
        _, lse = flash_attention(q, k, k, causal=True, scale=scale, return_lse=True)
        self.valid = torch.isfinite(lse)
        self.lse = torch.where(self.valid, lse.float(), 0.0)

    def __call__(self, layout: Any) -> torch.Tensor:
        """float64 (Hq,) on the CPU: mean row recall per query head."""
        from sparseflash.ops.prefill.block_sparse import block_sparse_attention

        _, lse = block_sparse_attention(self.q, self.k, self.k, layout, causal=True, scale=self.scale, return_lse=True)
        recall = torch.where(self.valid, torch.exp(lse.float() - self.lse).clamp(0.0, 1.0), 1.0)
        num = torch.where(self.valid, recall.double(), 0.0)
        return (num.sum((0, 2)) / self.valid.sum((0, 2)).clamp_min(1)).cpu()


def calibrate_layer(
    q: torch.Tensor,
    k: torch.Tensor,
    method: str,
    *,
    target_recall: float,
    layer: int = 0,
    scale: float | None = None,
    block_size: tuple[int, int] = (128, 128),
    options: Mapping[str, Any] | None = None,
    iterations: int = DEFAULT_ITERATIONS,
) -> LayerCalibration:
    """Bisect one layer's threshold in ``[0, 1]``: the upper end after ``iterations`` halvings.

    Args:
        q: (1, Hq, S, D). k: (1, Hkv, S, D), post-RoPE. scale: the layer's softmax scale.
        method: a key of :data:`CALIBRATED`. options: other pattern options (not the calibrated one).
    """
    from sparseflash.metrics import density
    from sparseflash.patterns import select

    option, per_head = CALIBRATED[method]
    opts = {**(options or {}), "block_size": tuple(block_size), "scale": scale}
    num = q.shape[1] if per_head else 1
    probe = _RecallProbe(q, k, scale)

    def evaluate(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        value = values.tolist() if per_head else float(values[0])
        layout = select(method, q, k, **opts, **{option: value})
        recall, dens = probe(layout), density(layout, per_head=True).cpu()
        if not per_head:
            recall, dens = recall.mean()[None], dens.mean()[None]
        return recall, dens, recall >= target_recall

    hi = torch.ones(num, dtype=torch.float64)
    recall, dens, reached = evaluate(hi)
    lo = torch.where(reached, 0.0, 1.0).double()  # heads that miss at 1.0 stay there
    for _ in range(iterations):
        mid = (lo + hi) / 2
        r, d, ok = evaluate(mid)
        ok &= reached
        hi, lo = torch.where(ok, mid, hi), torch.where(ok, lo, mid)
        recall, dens = torch.where(ok, r, recall), torch.where(ok, d, dens)
    out = [hi.tolist(), recall.tolist(), dens.tolist(), reached.tolist()]
    return LayerCalibration(layer, *(x if per_head else x[0] for x in out))


def calibration_ids(tokenizer: Any, length: int, seed: int, source: str = "auto") -> tuple[torch.Tensor, str]:
    """(1, length) int64 ids of the corpus from a seeded sentence on, and the corpus name."""
    from sparseflash.eval.text import load_corpus

    corpus = load_corpus(source)
    start = random.Random(seed).randrange(len(corpus.sentences))
    chars = 5 * length
    while True:
        ids = tokenizer(corpus.text(start, chars), return_tensors="pt")["input_ids"]
        if ids.shape[1] >= length:
            return ids[:, :length], corpus.name
        chars *= 2


def calibrate(
    model: Any,
    tokenizer_or_ids: Any,
    method: str = "xattention",
    *,
    target_recall: float = 0.95,
    length: int | None = None,
    seed: int = 0,
    text_source: str = "auto",
    block_size: int = 128,
    options: Mapping[str, Any] | None = None,
    dense_layers: Iterable[int] = (),
    iterations: int = DEFAULT_ITERATIONS,
    name: str | None = None,
    on_layer: Callable[[LayerCalibration], None] | None = None,
) -> Calibration:
    """Calibrate ``method``'s threshold per layer (per head for xattention) to reach ``target_recall``.

    Args:
        model: a transformers causal LM that :func:`sparseflash.patch` supports (not patched).
        tokenizer_or_ids: its tokenizer (the text is a seeded window of the corpus) or int ids (1, S) / (S,).
        length: tokens of calibration text (ids are cut to it); default 16384 on CUDA, 1024 on the CPU.
        block_size: square block of the layouts. options: other pattern options used while calibrating.
        dense_layers: layers left out (as ``patch``'s option); sliding-window layers are always left out.
        name: the model's name in the file (default: its config's ``name_or_path``).
        on_layer: called with each layer's result as it is done (progress).
    """
    from sparseflash.eval.capture import capture_attention
    from sparseflash.integrations.hf.model import _attention_modules, _check_model

    _check_model(model)
    if method not in CALIBRATED:
        raise ValueError(f"method: expected one of {sorted(CALIBRATED)}, got {method!r}")
    if isinstance(target_recall, bool) or not isinstance(target_recall, int | float) or not 0 < target_recall < 1:
        raise ValueError(f"target_recall: expected a float in (0, 1), got {target_recall!r}")
    option, per_head = CALIBRATED[method]
    clash = sorted({option, _SYNONYM, "block_size", "scale"} & set(options or {}))
    if clash or (options or {}).get("heads", "q") != "q":
        raise ValueError(f"options: expected none of {clash} and heads='q', got {dict(options or {})}")
    device = next(model.parameters()).device
    length = DEFAULT_LENGTH["cuda" if device.type == "cuda" else "cpu"] if length is None else length
    if isinstance(length, bool) or not isinstance(length, int) or length < MIN_LENGTH:
        raise ValueError(f"length: expected an int >= {MIN_LENGTH}, got {length!r}")
    if isinstance(tokenizer_or_ids, torch.Tensor):
        ids = tokenizer_or_ids.reshape(1, -1)[:, :length]
        text = {"source": "ids", "tokens": ids.shape[1], "seed": None}
    else:
        ids, source = calibration_ids(tokenizer_or_ids, length, seed, text_source)
        text = {"source": source, "tokens": ids.shape[1], "seed": seed}
    modules = _attention_modules(model)
    num_layers = len(modules)
    skip = {int(i) % num_layers for i in dense_layers}
    skip |= {i for i, m in modules.items() if getattr(m, "sliding_window", None) is not None}
    layers: list[LayerCalibration] = []

    def on_qk(idx: int, q: torch.Tensor, k: torch.Tensor) -> None:
        if idx in skip:
            return
        entry = calibrate_layer(
            q,
            k,
            method,
            target_recall=float(target_recall),
            layer=idx,
            scale=getattr(modules[idx], "scaling", None),
            block_size=(block_size, block_size),
            options=options,
            iterations=iterations,
        )
        layers.append(entry)
        if on_layer is not None:
            on_layer(entry)

    with torch.inference_mode(), capture_attention(model, on_qk):
        model(input_ids=ids.to(device), use_cache=False, logits_to_keep=1)
    info = model_info(model)
    info["name"] = name or info["name"]
    import sparseflash

    return Calibration(
        method,
        option,
        per_head,
        float(target_recall),
        info,
        text,
        (block_size, block_size),
        sorted(layers, key=lambda e: e.layer),
        dict(options or {}),
        datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        sparseflash.__version__,
    )
