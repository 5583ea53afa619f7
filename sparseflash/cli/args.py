"""Parsing and checking the ``sparseflash`` command line, before anything loads.

Every check raises :class:`UsageError` with one line naming the flag, what was expected and what was given; the
parser in :mod:`sparseflash.cli` prints it with the usage line and exits with code 2.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

PREFERRED_METHODS = ("xattention", "flexprefill", "vertical_slash")
ALL_TASKS = (
    "passkey,niah_single,niah_multikey,niah_multivalue,niah_multiquery,variable_tracking,perplexity,agreement,recall"
)
FITS_ANY_TASK = 4096  # every task's own text (instructions, needles, question) fits far below this many tokens


class UsageError(Exception):
    """Bad command-line input: reported by the parser with exit code 2."""


# ---------------------------------------------------------------------------- parsing helpers
def parse_lengths(text: str) -> list[int]:
    """``"1024,4k,32K"`` -> ``[1024, 4096, 32768]``."""
    out = [_tokens(part, "--lengths") for part in text.split(",") if part.strip()]
    if not out or any(n < 64 for n in out):
        raise UsageError(f"--lengths: expected one or more lengths >= 64 tokens, got {text!r}")
    return sorted(set(out))


def _tokens(text: str, flag: str, expected: str = "integers like 1024 or 4k") -> int:
    """``"4k"`` -> 4096, ``"1024"`` -> 1024; ``UsageError`` naming ``flag`` otherwise."""
    part = text.strip().lower()
    try:
        return int(part[:-1]) * 1024 if part.endswith("k") else int(part)
    except ValueError:
        raise UsageError(f"{flag}: expected {expected}, got {text.strip()!r}") from None


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest existing parent (what a new file or folder at ``path`` would be created in)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def parse_depths(text: str) -> list[float]:
    """``"0,50,100"`` -> ``[0.0, 50.0, 100.0]`` (percent)."""
    try:
        out = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise UsageError(f"--depths: expected percentages like 0,50,100, got {text!r}") from None
    if not out or any(not 0 <= d <= 100 for d in out):
        raise UsageError(f"--depths: expected percentages in [0, 100], got {text!r}")
    return sorted(set(out))


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_method_options(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["xattention.threshold=0.9"]`` -> ``{"xattention": {"threshold": 0.9}}`` (values parsed as JSON)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        name, sep, value = item.partition("=")
        method, dot, key = name.partition(".")
        if not sep or not dot or not method or not key:
            raise UsageError(f"--method-option: expected METHOD.KEY=VALUE, got {item!r}")
        out.setdefault(method, {})[key] = _value(value)
    return out


def parse_task_options(items: list[str]) -> dict[str, Any]:
    """``["value_type=uuids"]`` -> ``{"value_type": "uuids"}``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--task-option: expected KEY=VALUE, got {item!r}")
        out[key] = _value(value)
    return out


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _device_kind(device: str) -> str:
    return "cuda" if device.startswith("cuda") or (device == "auto" and _has_cuda()) else "cpu"


def _check_device(text: str) -> str:
    """``--device``: 'auto', 'cpu' or 'cuda[:i]' that this torch can use; ``UsageError`` otherwise."""
    import torch

    if text == "auto":
        return text
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device: expected 'auto', 'cpu' or 'cuda[:i]', got {text!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                f"--device: expected 'auto' or 'cpu' (this torch {torch.__version__} sees no CUDA device), got {text!r}"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise UsageError(f"--device: expected cuda:0..cuda:{count - 1} ({count} CUDA devices), got {text!r}")
    return text


def _check_out_dir(out: Path, flag: str = "--out") -> None:
    """``UsageError`` unless ``out`` is (or can be created as) a writable folder."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"{flag}: expected a folder (new or existing), got the existing file {str(out)!r}")
    parent = _nearest_existing(out)
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(
            f"{flag}: expected a writable folder, cannot create or write {str(out)!r} "
            f"({str(parent)!r} is {'not writable' if parent.is_dir() else 'not a folder'})"
        )


def default_methods() -> list[str]:
    """Up to three dynamic methods, preferring xattention, flexprefill and vertical_slash."""
    from sparseflash.eval.methods import DENSE, pattern_names

    names = [n for n in pattern_names() if n != DENSE]
    picked = [m for m in PREFERRED_METHODS if m in names]
    return picked or names[:3]


def _check_tasks(text: str) -> list[str]:
    from sparseflash.eval.tasks import available_tasks

    names = [t.strip() for t in (ALL_TASKS if text == "all" else text).split(",") if t.strip()]
    for t in names:
        if t not in available_tasks():
            raise UsageError(f"--tasks: unknown task {t!r}; expected some of {available_tasks()} or 'all'")
    if not names:
        raise UsageError("--tasks: expected at least one task")
    return names


def _method_names(text: str | None) -> list[str]:
    """``--methods`` split on commas; ``UsageError`` if it names none (``--methods ,``)."""
    if text is None:
        return default_methods()
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise UsageError(f"--methods: expected one or more comma-separated method names, got {text!r}")
    return names


def check_as_patch(
    method: str, options: dict[str, Any], flag: str, num_layers: int | None = None, after: str = ""
) -> None:
    """``options`` of ``method`` checked as ``sparseflash.patch`` checks them; a bad one is a ``UsageError`` naming
    ``flag`` (``--method-option``, ``--option``) and the method, with ``after`` appended. Without transformers
    nothing can be patched: the run reports it, so nothing is checked here."""
    try:
        from sparseflash.integrations.hf import check_patch_options
    except ImportError:
        return
    try:
        check_patch_options(method, options, num_layers=num_layers)
    except (ValueError, TypeError, NotImplementedError) as err:
        msg = str(err) if str(err).startswith(f"{method}: ") else f"{method}: {err}"
        raise UsageError(f"{flag}: {msg}{after}") from None


def _check_option_values(
    method: str, options: dict[str, Any], num_layers: int | None = None, model_name: str = ""
) -> None:
    """The option values of ``method`` as ``sparseflash.patch`` checks them (no model needed; layer index ranges
    only once ``num_layers`` is known), plus the pattern's own checks on a small random input."""
    from sparseflash.eval.methods import BASELINE

    if method == BASELINE:
        return
    after = "" if num_layers is None else f" (checked after loading the model: {model_name} has {num_layers} layers)"
    check_as_patch(method, options, "--method-option", num_layers, after)


def _check_methods(text: str | None, options: dict[str, dict[str, Any]], first: str | None = None) -> list[str]:
    """``--methods`` and ``-O`` checked before any load; ``first`` (the baseline) leads the returned list.

    ``bench`` leads with ``dense`` (its rows time our exact kernels against SDPA); ``eval`` with ``sdpa``.
    """
    from sparseflash.eval.methods import DENSE, available_methods, check_method

    first = DENSE if first is None else first
    names = _method_names(text)
    for m in names:
        if m not in available_methods():
            raise UsageError(f"--methods: unknown method {m!r}; expected some of {available_methods()}")
    for m, opts in options.items():
        if m not in names and m != first:
            raise UsageError(f"--method-option: method {m!r} is not in --methods {names}")
        try:
            check_method(m, opts)
        except ValueError as err:
            raise UsageError(f"--method-option: {err}") from None
        _check_option_values(m, opts)
    return [first] + [m for m in names if m != first]


def _check_model(spec: str) -> None:
    from sparseflash.eval.model import ModelSpecError, check_model_spec

    try:
        check_model_spec(spec)
    except ModelSpecError as err:
        raise UsageError(f"--model: {err}") from None


def _check_eval_methods(text: str | None, options: dict[str, dict[str, Any]]) -> list[str]:
    """The eval's methods: the baseline ``sdpa`` first, then ``--methods`` (``dense`` = our exact kernels)."""
    from sparseflash.eval.methods import BASELINE

    return _check_methods(text, options, BASELINE)


def _check_lengths_fit(
    tasks: list[str],
    lengths: list[int],
    depths: list[float],
    samples: int,
    seed: int,
    task_options: dict[str, Any],
    tokenizer: Any = None,
    fmt: Any = None,
) -> None:
    """``UsageError`` unless every task's prompts of the shortest length leave room for a haystack.

    Before the model loads (``tokenizer`` None) the prompts are built with a one-token-per-byte tokenizer, the
    most tokens any byte-level tokenizer needs (exact for ``tiny-random``); once loaded, with the model's
    tokenizer and prompt format (``--chat``). Lengths of :data:`FITS_ANY_TASK` tokens or more always fit.
    """
    from sparseflash.eval.grid import case_seed
    from sparseflash.eval.tasks import get_task, plain_format

    shortest = min(lengths)
    if shortest >= FITS_ANY_TASK:
        return
    after_load = tokenizer is not None
    if tokenizer is None:
        from sparseflash.eval.tiny import byte_tokenizer

        tokenizer = byte_tokenizer()
    fmt = fmt or plain_format
    needs: dict[str, int] = {}
    for name in tasks:
        task = get_task(name)
        opts = {k: v for k, v in task_options.items() if k in task.options}
        points = [(d, i) for d in (depths if task.uses_depth else [None]) for i in range(samples)]

        def fits(n: int, task: Any = task, opts: dict[str, Any] = opts, points: list[Any] = points) -> str | None:
            try:
                for d, i in points:
                    task.build(tokenizer, n, d, case_seed(seed, task.name, shortest, d, i), fmt, **opts)
            except ValueError as exc:
                return str(exc)
            return None

        err = fits(shortest)
        if err is None:
            continue
        if fits(FITS_ANY_TASK) is not None:  # not a matter of length: a bad task option
            raise UsageError(f"--task-option: task {name}: {err}")
        lo, hi = shortest, FITS_ANY_TASK  # fits(lo) fails, fits(hi) works
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if fits(mid) is None else (mid, hi)
        needs[name] = hi
    if needs:
        name = max(needs, key=needs.__getitem__)
        how = (
            "with this model's tokenizer and prompt format; checked after loading the model"
            if after_load
            else "counted one token per byte, the most a byte-level tokenizer needs"
        )
        raise UsageError(
            f"--lengths: expected lengths >= {needs[name]} tokens (task {name}'s instructions, needles "
            f"and answer budget need that many, {how}), got {shortest}"
        )


def _parse_length(text: str) -> int:
    from sparseflash.calibration import MIN_LENGTH

    n = _tokens(text, "--length", "an integer like 16384 or 16k")
    if n < MIN_LENGTH:
        raise UsageError(f"--length: expected >= {MIN_LENGTH} tokens, got {n}")
    return n


def _check_out_file(out: Path) -> None:
    """``UsageError`` unless a file can be written at ``out`` (not a folder; nearest existing parent writable)."""
    if out.is_dir():
        raise UsageError(f"--out: expected a JSON file path, got the folder {str(out)!r}")
    parent = _nearest_existing(out.parent)
    if not parent.is_dir() or not os.access(parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise UsageError(f"--out: expected a writable path, cannot write {str(out)!r}")
