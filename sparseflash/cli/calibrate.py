"""``sparseflash calibrate``: per-layer thresholds for a recall target or an output KL budget (checks first,
then the model)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sparseflash.cli.args import (
    UsageError,
    _check_device,
    _check_model,
    _check_out_file,
    _device_kind,
    _parse_length,
    _value,
    check_as_patch,
)
from sparseflash.cli.commands import _console, _sanitize


def cmd_calibrate(args: argparse.Namespace) -> int:
    from sparseflash.calibration import CALIBRATED, DEFAULT_LENGTH

    if args.method not in CALIBRATED:
        raise UsageError(f"--method: expected one of {sorted(CALIBRATED)}, got {args.method!r}")
    if not 0 < args.target_recall < 1:
        raise UsageError(f"--target-recall: expected a float in (0, 1), got {args.target_recall}")
    if args.target_kl is not None:
        return _calibrate_kl(args)
    if args.reallocate is not None:
        raise UsageError("--reallocate: expected --target-kl with it")
    if args.option:
        raise UsageError(f"--option: expected --target-kl with it (the recall objective takes none), got {args.option}")
    _check_device(args.device)
    kind = _device_kind(args.device)
    length = _parse_length(args.length) if args.length is not None else DEFAULT_LENGTH[kind]
    if args.iterations < 1:
        raise UsageError(f"--iterations: expected >= 1, got {args.iterations}")
    model_tag = _sanitize(Path(args.model).name.removesuffix(".gguf"))
    out = Path(args.out or f"results/calibration_{model_tag}_{args.method}_r{args.target_recall:g}.json")
    _check_out_file(out)
    _check_model(args.model)

    from sparseflash.calibration import calibrate
    from sparseflash.eval.model import load_model

    console = _console()
    with console.status(f"loading {args.model} ..."):
        loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    if loaded.max_positions and length > loaded.max_positions:
        raise UsageError(f"--length: expected <= the model's context {loaded.max_positions}, got {length}")
    console.print(
        f"[bold]sparseflash calibrate[/]: {loaded.name}, method {args.method}, target recall "
        f"{args.target_recall}, {length} tokens, block {args.block_size}"
    )

    def show(e: Any) -> None:
        vals = e.value if isinstance(e.value, list) else [e.value]
        recs = e.recall if isinstance(e.recall, list) else [e.recall]
        dens = e.density if isinstance(e.density, list) else [e.density]
        missed = "" if all(e.reached if isinstance(e.reached, list) else [e.reached]) else "  (1.0 misses the target)"
        console.print(
            f"layer {e.layer:3d}: value {min(vals):.4f}..{max(vals):.4f}  recall {min(recs):.4f}  "
            f"density {sum(dens) / len(dens):.3f}{missed}"
        )

    cal = calibrate(
        loaded.model,
        loaded.tokenizer,
        args.method,
        target_recall=args.target_recall,
        length=length,
        seed=args.seed,
        text_source=args.text_source,
        block_size=args.block_size,
        iterations=args.iterations,
        name=loaded.name,
        on_layer=show,
    )
    path = cal.save(out)
    console.print(
        f"calibration: {path}  (use: sparseflash eval -O {args.method}.calibration={path}, "
        f"or sparseflash.patch(model, {args.method!r}, calibration=...))"
    )
    return 0


def _calibrate_kl(args: argparse.Namespace) -> int:
    """``sparseflash calibrate --target-kl``: measure (or re-allocate) a KL calibration."""
    from sparseflash.calibration import DEFAULT_LENGTH, calibration_ids

    if not 0 < args.target_kl < float("inf"):
        raise UsageError(f"--target-kl: expected a positive number, got {args.target_kl}")
    try:
        values = [float(v) for v in args.kl_values.split(",")]
    except ValueError:
        raise UsageError(f"--kl-values: expected comma-separated numbers, got {args.kl_values!r}") from None
    if not values or any(not 0 < v <= 1 for v in values) or len(set(values)) != len(values):
        raise UsageError(f"--kl-values: expected distinct numbers in (0, 1], got {args.kl_values!r}")
    model_tag = _sanitize(Path(args.model).name.removesuffix(".gguf"))
    out = Path(args.out or f"results/calibration_{model_tag}_{args.method}_kl{args.target_kl:g}.json")
    _check_out_file(out)
    console = _console()
    if args.kl_per_head and args.method != "xattention":
        raise UsageError(f"--kl-per-head: expected --method xattention (per-head thresholds), got {args.method!r}")
    if args.reallocate is not None and args.option:
        raise UsageError(f"--option: expected none with --reallocate (its table was measured), got {args.option}")
    options = _kl_options(args.method, args.block_size, args.option) if args.reallocate is None else {}
    if args.reallocate is not None:
        from sparseflash.calibration_file import load_calibration
        from sparseflash.calibration_kl import reallocate

        try:
            cal = reallocate(load_calibration(args.reallocate), args.target_kl)
        except (OSError, ValueError) as err:
            raise UsageError(f"--reallocate: {err}") from None
        return _report_kl(console, cal, out)
    _check_device(args.device)
    length = _parse_length(args.length) if args.length is not None else DEFAULT_LENGTH[_device_kind(args.device)]
    if not 1 <= args.kl_window <= length:
        raise UsageError(f"--kl-window: expected an int in [1, --length {length}], got {args.kl_window}")
    _check_model(args.model)

    from sparseflash.calibration_kl import calibrate_kl
    from sparseflash.eval.model import load_model

    with console.status(f"loading {args.model} ..."):
        loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    if loaded.max_positions and length > loaded.max_positions:
        raise UsageError(f"--length: expected <= the model's context {loaded.max_positions}, got {length}")
    ids, source = calibration_ids(loaded.tokenizer, length, args.seed, args.text_source)
    console.print(
        f"[bold]sparseflash calibrate[/]: {loaded.name}, method {args.method}, target KL {args.target_kl}, "
        f"values {values}, {length} tokens, KL over the last {args.kl_window}"
    )

    def show(row: str, kls: list[float], dens: list[float]) -> None:
        cells = "  ".join(f"{v:g}: KL {k:.5f} d {d:.3f}" for v, k, d in zip(values, kls, dens, strict=True))
        console.print(f"layer {row:>3}: {cells}")

    cal = calibrate_kl(
        loaded.model,
        ids.to(loaded.device),
        args.method,
        target_kl=args.target_kl,
        values=values,
        options=options,
        window=args.kl_window,
        per_head=args.kl_per_head,
        text={"source": source, "tokens": int(ids.shape[1]), "seed": args.seed},
        name=loaded.name,
        on_row=show,
    )
    return _report_kl(console, cal, out)


def _kl_options(method: str, block_size: int, items: list[str]) -> dict[str, Any]:
    """The options of every measured run: patch's safe options of ``method``, ``--block-size``, then ``-O``
    items (checked as ``patch`` checks them, before any load)."""
    from sparseflash.calibration_file import CALIBRATED
    from sparseflash.calibration_kl import default_options

    given: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--option: expected KEY=VALUE, got {item!r}")
        given[key.strip()] = _value(value)
    set_elsewhere = {
        CALIBRATED[method][0]: "the calibration sets it",
        "target_recall": "the calibration sets the threshold",
        "calibration": "this command writes one",
        "dense_layers": "the KL allocation chooses them",
        "layer_options": "the calibration sets per-layer values",
        "block_size": "use --block-size",
    }
    for key in given:
        if key in set_elsewhere:
            raise UsageError(f"--option: {key}: not allowed here ({set_elsewhere[key]}), got {given[key]!r}")
    options = {**default_options(method), "block_size": block_size, **given}
    check_as_patch(method, options, "--option")
    return options


def _report_kl(console: Any, cal: Any, out: Path) -> int:
    def show(value: float | list[float]) -> str:
        if not isinstance(value, list) or len(set(value)) == 1:
            return f"{value[0] if isinstance(value, list) else value:g}"
        return f"{min(value):g}..{max(value):g}"

    chosen = {e.layer: show(e.value) for e in cal.layers}
    dens = [sum(e.density) / len(e.density) if isinstance(e.density, list) else e.density for e in cal.layers]
    n = len(cal.layers) + len(cal.dense_layers)
    mean = (sum(dens) + len(cal.dense_layers)) / max(n, 1)
    summed = sum(e.kl or 0.0 for e in cal.layers)
    console.print(
        f"per-layer values {chosen}; dense layers {cal.dense_layers}; summed excess KL {summed:.5f} "
        f"(target {cal.objective['target_kl']}), mean density {mean:.3f}"
    )
    path = cal.save(out)
    console.print(f"calibration: {path}  (use: sparseflash.patch(model, {cal.method!r}, calibration=...))")
    return 0
