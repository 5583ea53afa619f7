"""Running a model under a sparse method, and knowing what density the method picked.

``dense`` is the model as loaded (transformers' own SDPA attention): the baseline every method is compared with.
Any other name is a pattern of :mod:`sparseflash.patterns`; the model is patched with
:func:`sparseflash.integrations.hf.patched` when that module is present, otherwise with the small adapter below
(prefill through the pattern + :func:`sparseflash.block_sparse_attention`, decode steps dense).

Either way, :func:`use_method` records the layouts the prefill used, so each case reports the density it ran at
(kept causal blocks over causal blocks, averaged over layers and heads).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

DENSE = "dense"
_ADAPTER_NAME = "sf_eval_sparse"  # no "flash" in the name: transformers treats such names as flash-attn


def _hf() -> Any | None:
    try:
        return importlib.import_module("sparseflash.integrations.hf")
    except ImportError:
        return None


def pattern_names() -> list[str]:
    """The registered pattern names (importing :mod:`sparseflash.patterns` registers them)."""
    with contextlib.suppress(ImportError):
        importlib.import_module("sparseflash.patterns")
    from sparseflash.patterns.registry import available

    return available()


def available_methods() -> list[str]:
    """``dense`` plus every registered pattern."""
    return [DENSE] + [m for m in pattern_names() if m != DENSE]


def check_method(name: str, options: dict[str, Any] | None = None) -> None:
    """``ValueError`` for an unknown method (listing the known ones) or an option the method does not take."""
    if name == DENSE:
        if options:
            raise ValueError(f"dense: takes no options, got {sorted(options)}")
        return
    names = pattern_names()
    if name not in names:
        raise ValueError(f"method: expected one of {[DENSE, *names]}, got {name!r}")
    from sparseflash.patterns.registry import check_options

    check_options(name, {k: v for k, v in (options or {}).items() if k not in _PATCH_OPTIONS})


# options that belong to the patching, not to the pattern
_PATCH_OPTIONS = ("dense_layers", "min_sparse_len", "decode", "layer_options", "backend")


@dataclass
class MethodRun:
    """What a method did during the forwards inside :func:`use_method`: the layouts of every sparse prefill."""

    method: str
    layouts: list[Any] = field(default_factory=list)

    def reset(self) -> None:
        self.layouts.clear()

    def density(self) -> float | None:
        """Mean block density over the recorded layouts (1.0 for dense, None if nothing was recorded)."""
        if self.method == DENSE:
            return 1.0
        if not self.layouts:
            return None
        return sum(lay.density() for lay in self.layouts) / len(self.layouts)


# ------------------------------------------------------------------ recording the layouts a pattern returns
_recorders: list[MethodRun] = []


@contextlib.contextmanager
def _record_layouts(run: MethodRun) -> Iterator[None]:
    """Wrap the registry's pattern functions so every layout they return is appended to ``run``."""
    from sparseflash.patterns import registry

    originals = dict(registry._REGISTRY)

    def wrap(info: Any) -> Any:
        fn = info.fn

        def recorded(*args: Any, **kwargs: Any) -> Any:
            layout = fn(*args, **kwargs)
            if _recorders:
                _recorders[-1].layouts.append(layout)
            return layout

        recorded.__wrapped__ = fn  # keeps inspect.signature (options_of) working
        return type(info)(info.name, recorded, info.kind, info.heads)

    for name, info in originals.items():
        registry._REGISTRY[name] = wrap(info)
    _recorders.append(run)
    try:
        yield
    finally:
        _recorders.pop()
        registry._REGISTRY.clear()
        registry._REGISTRY.update(originals)


# ------------------------------------------------------------------ the fallback adapter
@dataclass
class _AdapterState:
    method: str
    options: dict[str, Any]
    dense_layers: tuple[int, ...] = ()
    min_sparse_len: int = 0


_adapter: list[_AdapterState] = []


def _adapter_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: Any, scaling: float | None = None, dropout: float = 0.0,
                       **kwargs: Any) -> tuple[torch.Tensor, None]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    state = _adapter[-1]
    seq_q, seq_k = query.shape[2], key.shape[2]
    layer = int(getattr(module, "layer_idx", -1))
    sparse = (seq_q == seq_k and seq_q > 1 and seq_q >= state.min_sparse_len and attention_mask is None
              and kwargs.get("sliding_window") is None and layer not in state.dense_layers)
    if not sparse:  # decode steps, padded or sliding-window prefill, dense layers: the model's own sdpa
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, scaling=scaling,
                                               dropout=dropout, **kwargs)
    from sparseflash import block_sparse_attention
    from sparseflash.patterns.registry import select

    layout = select(state.method, query, key, **state.options)
    out = block_sparse_attention(query, key, value, layout, causal=True, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def _adapter_patched(model: Any, method: str, options: dict[str, Any]) -> Iterator[None]:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(_ADAPTER_NAME, _adapter_attention)
    AttentionMaskInterface.register(_ADAPTER_NAME, sdpa_mask)
    pattern_opts = {k: v for k, v in options.items() if k not in _PATCH_OPTIONS}
    _adapter.append(_AdapterState(method, pattern_opts, tuple(options.get("dense_layers", ())),
                                  int(options.get("min_sparse_len", 0))))
    previous = model.config._attn_implementation
    model.set_attn_implementation(_ADAPTER_NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
        _adapter.pop()


@contextlib.contextmanager
def use_method(model: Any, method: str, options: dict[str, Any] | None = None) -> Iterator[MethodRun]:
    """Within the block, ``model`` runs with ``method``; the yielded :class:`MethodRun` collects its layouts.

    Args:
        model: a transformers causal LM.
        method: ``dense`` (the model unchanged) or a pattern name.
        options: the pattern's options, plus ``dense_layers`` / ``min_sparse_len`` / ``decode`` for patching.
            The harness passes ``min_sparse_len=0`` unless asked otherwise, so every prompt goes sparse.

    Raises:
        ValueError: unknown method or option.
    """
    options = dict(options or {})
    check_method(method, options)
    run = MethodRun(method)
    if method == DENSE:
        yield run
        return
    hf = _hf()
    with _record_layouts(run):
        if hf is not None and hasattr(hf, "patched"):
            options.setdefault("min_sparse_len", 0)
            with hf.patched(model, method, **options):
                yield run
        else:
            with _adapter_patched(model, method, options):
                yield run
