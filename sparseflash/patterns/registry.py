"""The pattern registry: every selection method registers itself here by name.

A pattern is a function ``fn(q, k, *, block_size=(128, 128), causal=True, **options) -> BlockLayout`` with
q ``(B, Hq, Sq, D)`` and k ``(B, Hkv, Sk, D)``. It runs on q's device with no host synchronisation.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sparseflash.layouts import BlockLayout

PatternFn = Callable[..., BlockLayout]


@dataclass(frozen=True)
class PatternInfo:
    """A registered pattern: its function, whether it reads q/k ('dynamic') and its layout heads."""

    name: str
    fn: PatternFn
    kind: str  # "static" or "dynamic"
    heads: str  # "q" (per query head), "kv" (per KV head) or "shared" (one layout for all heads)


_REGISTRY: dict[str, PatternInfo] = {}


def register(name: str, *, kind: str, heads: str) -> Callable[[PatternFn], PatternFn]:
    """Decorator adding ``fn`` to the registry under ``name``."""
    if kind not in ("static", "dynamic") or heads not in ("q", "kv", "shared"):
        raise ValueError(f"register: bad kind {kind!r} or heads {heads!r}")

    def wrap(fn: PatternFn) -> PatternFn:
        if name in _REGISTRY:
            raise ValueError(f"pattern {name!r} is registered twice")
        _REGISTRY[name] = PatternInfo(name, fn, kind, heads)
        return fn

    return wrap


def available() -> list[str]:
    """Names of the registered patterns, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> PatternInfo:
    """The registered pattern ``name``; ``ValueError`` listing the known names otherwise."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"method: expected one of {available()}, got {name!r}")
    return _REGISTRY[name]


def options_of(name: str) -> dict[str, object]:
    """The keyword options of pattern ``name`` with their defaults."""
    sig = inspect.signature(get(name).fn)
    return {p.name: p.default for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def check_options(name: str, options: dict[str, object]) -> None:
    """``ValueError`` naming any option that pattern ``name`` does not take, and the ones it does."""
    known = options_of(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"{name}: unknown option(s) {unknown}; expected some of {sorted(known)}")


def select(name: str, q: torch.Tensor, k: torch.Tensor, **options: object) -> BlockLayout:
    """Run pattern ``name`` on q and k with ``options`` (validated) and return its layout."""
    info = get(name)
    check_options(name, options)
    return info.fn(q, k, **options)
