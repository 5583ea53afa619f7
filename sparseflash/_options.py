"""Checks of keyword options (patterns, scoring ops): plain Python values, no tensor is read.

Every check raises ``ValueError`` (``TypeError`` for a wrong type where said, ``NotImplementedError`` for a
supported-later combination) as ``<name>: <option>: expected <what>, got <what>``, where ``name`` is the pattern
or op, so a user sees which option of which method is wrong.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from sparseflash.layouts.geometry import SUPPORTED_BLOCK_SIZES, _check_block_size

HEADS_CHOICES = ("q", "kv")
BACKEND_CHOICES = ("auto", "triton", "torch")


def check_causal(name: str, causal: object, *, causal_only: bool = False) -> bool:
    """``causal`` must be a bool; with ``causal_only`` only ``True`` (``NotImplementedError`` for False)."""
    if not isinstance(causal, bool):
        raise ValueError(f"{name}: causal: expected True or False, got {causal!r}")
    if causal_only and not causal:
        raise NotImplementedError(f"{name}: only causal prefill is supported (causal=True), got causal=False")
    return causal


def check_block_size(
    name: str,
    block_size: object,
    *,
    square: bool = False,
    multiple_of: int | None = None,
    allowed: Sequence[int] = SUPPORTED_BLOCK_SIZES,
) -> tuple[int, int]:
    """Validate ``block_size`` (int or ``(block_q, block_k)``) for pattern ``name``; return the pair.

    Args:
        square: require ``block_q == block_k`` (methods whose estimator works on square blocks).
        multiple_of: require both sizes to be multiples of this (e.g. XAttention's stride).
        allowed: sizes the method accepts (default: every size the kernels support).
    """
    pair = _check_block_size(block_size)
    if any(b not in allowed for b in pair):
        raise ValueError(f"{name}: block_size: expected sizes in {tuple(allowed)}, got {pair}")
    if square and pair[0] != pair[1]:
        raise ValueError(f"{name}: block_size: expected block_q == block_k (square blocks), got {pair}")
    if multiple_of is not None and any(b % multiple_of for b in pair):
        raise ValueError(f"{name}: block_size: expected multiples of {multiple_of} (the stride), got {pair}")
    return pair


def check_fraction(name: str, value: object) -> float:
    """A float in ``(0, 1]`` (thresholds, densities, recalls); ``ValueError`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{name}: expected a float in (0, 1], got {value!r}")
    return float(value)


def check_fractions(name: str, value: object, num_heads: int, device: torch.device | str) -> float | torch.Tensor:
    """A scalar in ``(0, 1]``, or one value per head (list, tuple or CPU tensor of ``num_heads`` values).

    Per-head values may also be ``0`` (XAttention's tables use 0 for "sink + diagonal only").

    Returns:
        The float, or a float32 tensor ``(num_heads,)`` on ``device``.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return check_fraction(name, value)
    if isinstance(value, torch.Tensor):
        if value.device.type != "cpu":
            raise ValueError(
                f"{name}: expected per-head values as a list or a CPU tensor, got a tensor on "
                f"{value.device} (checking it would synchronise)"
            )
        values = value.flatten().tolist()
        if value.dim() != 1:
            raise ValueError(f"{name}: expected {num_heads} per-head values (1-D), got shape {tuple(value.shape)}")
    elif isinstance(value, (list, tuple)):
        values = list(value)
    else:
        raise ValueError(f"{name}: expected a float in (0, 1] or {num_heads} per-head floats, got {value!r}")
    if len(values) != num_heads:
        raise ValueError(f"{name}: expected {num_heads} per-head values (one per layout head), got {len(values)}")
    if any(isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 <= x <= 1 for x in values):
        raise ValueError(f"{name}: expected per-head values in [0, 1], got {values}")
    return _device_fractions(tuple(float(x) for x in values), str(torch.device(device)))


@functools.lru_cache(maxsize=1024)
def _device_fractions(values: tuple[float, ...], device: str) -> torch.Tensor:
    """One float32 tensor per distinct per-head list and device, made once: a copy to a GPU from pageable host
    memory waits for the stream, so making it at every layer call (calibrated per-head thresholds) stalled the
    host once per layer. Callers must not modify the returned tensor in place."""
    return torch.tensor(values, dtype=torch.float32).to(device)


def check_positive_int(name: str, value: object) -> int:
    """An int ``>= 1`` (strides, block counts, top-k); ``ValueError`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    return value


def check_nonnegative_int(name: str, value: object) -> int:
    """An int ``>= 0`` (sink/local counts); ``ValueError`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}: expected an int >= 0, got {value!r}")
    return value


def check_stride(name: str, value: object, allowed: Sequence[int] | None = None) -> int:
    """A stride ``>= 1``, optionally one of ``allowed``."""
    stride = check_positive_int(name, value)
    if allowed is not None and stride not in allowed:
        raise ValueError(f"{name}: expected one of {tuple(allowed)}, got {value!r}")
    return stride


def check_choice(name: str, value: object, choices: Sequence[object]) -> object:
    """``value`` must be one of ``choices``."""
    if value not in choices or isinstance(value, bool) != any(isinstance(c, bool) for c in choices):
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")
    return value


def check_scale(name: str, scale: object) -> float | None:
    """A pattern's ``scale`` option: None (``1 / sqrt(head_dim)``) or a finite float > 0.

    Raises:
        TypeError: not a real number (or a bool).
        ValueError: NaN, infinite, zero or negative.
    """
    import math
    import numbers

    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{name}: scale: expected a finite float > 0 or None, got {type(scale).__name__} {scale!r}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{name}: scale: expected a finite float > 0 or None, got {scale!r}")
    return float(scale)


def check_backend_option(name: str, backend: object) -> str:
    """A pattern's ``backend`` option: one of :data:`BACKEND_CHOICES`."""
    if not isinstance(backend, str) or backend not in BACKEND_CHOICES:
        raise ValueError(f"{name}: backend: expected one of {BACKEND_CHOICES}, got {backend!r}")
    return backend


def resolve_threshold(name: str, threshold: object, target_recall: object, default: float) -> float:
    """The cumulative-mass threshold from ``threshold`` or ``target_recall`` (at most one given).

    ``target_recall`` is the fraction of (estimated) attention mass each row must keep: for a cumulative-mass
    selector it is the threshold itself, so both map to the same number; a method whose threshold means
    something else converts it itself. Neither given: ``default``.
    """
    if threshold is not None and target_recall is not None:
        raise ValueError(
            f"{name}: expected threshold or target_recall, not both; got {threshold!r} and {target_recall!r}"
        )
    if target_recall is not None:
        return check_fraction(f"{name}: target_recall", target_recall)
    if threshold is not None:
        return check_fraction(f"{name}: threshold", threshold)
    return default


def layout_heads(name: str, heads: object, num_heads: int, num_kv_heads: int) -> int:
    """Number of layout heads for a ``heads`` option (``"q"``: query heads, ``"kv"``: KV heads)."""
    check_choice(f"{name}: heads", heads, HEADS_CHOICES)
    return num_heads if heads == "q" else num_kv_heads
