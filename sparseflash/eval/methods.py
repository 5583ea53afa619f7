"""Running a model under a sparse method, and knowing what density the method picked.

``sdpa`` (:data:`BASELINE`) is the model as loaded (transformers' own SDPA attention): the baseline every method
is compared with. ``dense`` is sparseflash's exact kernels everywhere (``sparseflash.patch(model, "dense")``): the
noise floor of our kernels against the baseline. Any other name is a pattern of :mod:`sparseflash.patterns`; the
model is patched with :func:`sparseflash.integrations.hf.patched`.

:func:`use_method` records the density of every layer prefill through the patch's public ``on_prefill`` hook, so
each case reports the density it ran at (dense layers count 1.0; the exact last query rows are counted too).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from sparseflash.integrations import hf
from sparseflash.integrations.hf.plan import PATCH_KEYS
from sparseflash.patterns.registry import available, check_options

DENSE = "dense"  # sparseflash's exact kernels: patch(model, "dense")
SDPA = "sdpa"  # the model as loaded (transformers' SDPA attention)
BASELINE = SDPA  # what every method is compared with in the eval harness


def pattern_names() -> list[str]:
    """The registered pattern names."""
    return available()


def available_methods() -> list[str]:
    """``sdpa`` (the baseline), ``dense`` and every other registered pattern."""
    return [SDPA, DENSE] + [m for m in pattern_names() if m not in (SDPA, DENSE)]


def check_method(name: str, options: dict[str, Any] | None = None) -> None:
    """``ValueError`` for an unknown method (listing the known ones) or an option the method does not take."""
    if name == SDPA:
        if options:
            raise ValueError(f"sdpa: takes no options (it is the model as loaded), got {sorted(options)}")
        return
    if name == DENSE:
        pattern_opts = sorted(k for k in options or {} if k not in _PATCH_OPTIONS)
        if pattern_opts:
            raise ValueError(
                f"dense: takes no pattern options, only patch options {list(_PATCH_OPTIONS)}; got {pattern_opts}"
            )
        return
    names = pattern_names()
    if name not in names:
        raise ValueError(f"method: expected one of {available_methods()}, got {name!r}")
    check_options(name, {k: v for k, v in (options or {}).items() if k not in _PATCH_OPTIONS})


# options that belong to the patching, not to the pattern: the patch's own list
_PATCH_OPTIONS = PATCH_KEYS


@dataclass
class MethodRun:
    """What a method did during the forwards inside :func:`use_method`: the density of every layer prefill.

    ``densities`` gets one value per attention-layer prefill (sparseflash's ``PatchState.on_prefill`` hook): 1.0 for
    a dense layer or a prompt below ``min_sparse_len``, else the layout's causal block density plus the cost of the
    exactly computed last query rows, in the same block units.
    """

    method: str
    densities: list[float | torch.Tensor] = field(default_factory=list)

    def reset(self) -> None:
        self.densities.clear()

    def record(self, layer: int, density: float | torch.Tensor) -> None:
        self.densities.append(density)  # a 0-dim device tensor for sparse layers: read after the forward

    def density(self) -> float | None:
        """Mean over the recorded layer prefills (1.0 for sdpa and dense, None if nothing was recorded)."""
        if self.method in (SDPA, DENSE):
            return 1.0
        if not self.densities:
            return None
        return sum(float(d) for d in self.densities) / len(self.densities)


@contextlib.contextmanager
def use_method(model: Any, method: str, options: dict[str, Any] | None = None) -> Iterator[MethodRun]:
    """Within the block, ``model`` runs with ``method``; the yielded :class:`MethodRun` collects its layouts.

    Args:
        model: a transformers causal LM.
        method: ``sdpa`` (the model unchanged), ``dense`` (``hf.patched(model, "dense", **options)``: our exact
            kernels; patch options such as ``backend`` only) or a pattern name.
        options: the pattern's options, plus ``dense_layers`` / ``min_sparse_len`` / ``decode`` for patching.
            The harness passes ``min_sparse_len=0`` to patterns unless asked otherwise, so every prompt goes sparse.

    Raises:
        ValueError: unknown method or option.
    """
    options = dict(options or {})
    check_method(method, options)
    run = MethodRun(method)
    if method == SDPA:
        yield run
        return
    if method == DENSE:
        with hf.patched(model, DENSE, **options):
            yield run
        return
    options.setdefault("min_sparse_len", 0)
    with hf.patched(model, method, **options):
        hf.patch_state(model).on_prefill = run.record
        yield run
