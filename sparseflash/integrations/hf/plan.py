"""What a patch runs: its settings, the plan of each attention layer, and every check of ``patch``'s options.

No transformers import and no model needed: :func:`check_patch_options` runs all of :func:`~.hf.patch`'s option
checks (plus each pattern's own, on a small random CPU input) so the CLI can refuse bad options before it loads a
model. :class:`PatchState` and :class:`LayerPlan` are what :mod:`.hf` stores on a patched model and what
:mod:`.forward` reads at every attention call.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

ATTN_NAME = "sf_sparse_prefill"  # no "flash" in the name: transformers treats such names as flash-attn
# prompts shorter than this stay dense (SDPA on CUDA): the shortest length measured where patch(model) beats SDPA on
# Qwen2.5-Coder-1.5B, H200 (time to first token 1.06x at 16K, 1.20x at 32K; .../accuracy_h200/.../e2e_q15_v3); its
# accuracy is measured from 16K (the n = 50 retrieval grid), none below
DEFAULT_MIN_SPARSE_LEN = 16384
DEFAULT_DENSE_LAST_QUERIES = 256  # final query rows of a sparse prefill computed exactly (question + answer prefix)
DEFAULT_METHOD = "xattention"
# patch()'s defaults per method, over the pattern's own (the papers'): measured on Qwen2.5-Coder at 16K-32K
# (benchmarks/results/accuracy_h200/): threshold 0.95 halves XAttention's KL to dense against 0.9, one forced
# local block gives every query at least one block of preceding keys (the rows at the start of a block otherwise
# lose their local context when the previous block is not selected), and stride 8 was the sparsest variant within
# 10x dense's KL on the 1.5B model at 32K (density 0.341, KL 0.0059 against 0.0063 with stride 16).
SAFE_OPTIONS: dict[str, dict[str, Any]] = {"xattention": {"threshold": 0.95, "local_blocks": 1, "stride": 8}}
DEFAULT_APPROXIMATE_DROPPED = False  # dropped blocks enter the softmax as pooled tokens (ops/dropped_blocks.py)
DECODE_CHOICES = ("dense", "sparse")
BACKENDS = ("auto", "triton", "torch")
DENSE = "dense"

_STATE_ATTR = "_sparseflash_patch"  # on the model: its PatchState
_LAYER_ATTR = "_sparseflash_layer"  # on each attention module: (PatchState, LayerPlan)
_CONFIG_ATTR = "_sparseflash_configs"  # on the model: [(module, its original config)] swapped for private copies
PATCH_KEYS = (
    "dense_layers",
    "min_sparse_len",
    "dense_last_queries",
    "approximate_dropped",
    "decode",
    "layer_options",
    "backend",
    "calibration",
)


@dataclass(frozen=True)
class LayerPlan:
    """What one attention layer runs: ``method`` (``"dense"`` or a pattern name) and its options."""

    layer_idx: int
    method: str
    options: Mapping[str, Any]
    pass_scale: bool = False  # the pattern takes ``scale``, not set by the user: the layer's scaling goes in
    pass_backend: bool = False  # the pattern takes ``backend``, not set by the user: the patch's goes in
    select: Callable[..., Any] | None = None  # the pattern function, resolved once when the plan is made


@dataclass
class PatchState:
    """The patch of one model: settings, per-layer plans, the attention implementation to restore, counters.

    ``calls`` counts the routes taken (``"sparse"``, ``"dense"``, ``"decode"``, ``"sdpa"``, ...; see
    :mod:`.forward`), one per attention-layer call; reset it freely.

    ``on_prefill``: an optional hook ``(layer_idx, density)`` called after every prefill of a layer through the
    ``sparse`` or ``dense`` routes: 1.0 for a dense prefill, else the layout's causal block density plus the exact
    last query rows in the same units (the work done, relative to dense), as a 0-dim float64 tensor on the
    model's device computed without a host sync: read it (``float(d)``) after the forward, so the hook does not
    stall the prefill it observes. The evaluation harness uses it to report densities.
    """

    method: str
    options: dict[str, Any]
    min_sparse_len: int
    dense_last_queries: int
    approximate_dropped: bool | int  # an int: keys per pooled token (True: one pooled token per block)
    decode: str
    backend: str
    plans: dict[int, LayerPlan]
    previous_attn_implementation: str | None
    calls: Counter = field(default_factory=Counter)
    on_prefill: Callable[[int, float | torch.Tensor], None] | None = None


def with_safe_options(method: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` over :data:`SAFE_OPTIONS` of ``method`` (unchanged with a ``calibration``: it sets thresholds)."""
    if "calibration" in options or not isinstance(method, str):
        return dict(options)
    return {**SAFE_OPTIONS.get(method, {}), **options}


def _check_method(method: object) -> list[str]:
    from sparseflash.patterns import available

    names = available()
    if not isinstance(method, str) or (method != DENSE and method not in names):
        raise ValueError(f"method: expected one of {sorted({DENSE, *names})}, got {method!r}")
    return names


def _check_pattern_options(method: str, options: Mapping[str, Any], where: str) -> dict[str, Any]:
    from sparseflash.patterns import check_options

    if not isinstance(options, Mapping):
        raise TypeError(f"{where}: expected a dict of options, got {type(options).__name__}")
    bad = [k for k in options if not isinstance(k, str)]
    if bad:
        raise TypeError(f"{where}: expected option names as strings, got {bad}")
    if method == DENSE:
        if options:
            raise ValueError(f"{where}: method 'dense' takes no options, got {sorted(options)}")
        return {}
    if "causal" in options:
        raise ValueError(f"{where}: option 'causal' is fixed to True for a causal LM, got causal={options['causal']!r}")
    try:
        check_options(method, dict(options))
    except ValueError as err:
        said = str(err)  # the pattern's own message names it; say ``where`` once
        prefix = "" if said.startswith(f"{where}: ") else f"{where}: "
        raise ValueError(f"{prefix}{said} (patch options: {list(PATCH_KEYS)})") from None
    return dict(options)


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value


def _layer_index(name: str, value: object, num_layers: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected layer indices as ints, got {type(value).__name__} {value!r}")
    if not -num_layers <= value < num_layers:
        raise ValueError(f"{name}: expected layer indices in [{-num_layers}, {num_layers}), got {value}")
    return value % num_layers


def check_patch_options(method: str, options: Mapping[str, Any] | None = None, num_layers: int | None = None) -> None:
    """Check ``patch(model, method, **options)``'s method and options without a model: the checks :func:`patch`
    runs, plus each pattern's own option checks on a small random CPU input.

    Args:
        method: ``"dense"`` or a pattern name.
        options: pattern and patch options, as for :func:`patch`.
        num_layers: the model's layer count, if known: layer indices (``dense_layers``, ``layer_options``) are
            checked against it; without it only their types are (range checks need the model).

    Raises:
        TypeError, ValueError: as :func:`patch` (the message names the option, what was expected and what was
            given). Checks that need the model (layer index range without ``num_layers``, a calibration file
            against the model's shape, per-head values against its head count) are left to :func:`patch`.
    """
    if options is not None and not isinstance(options, Mapping):
        raise TypeError(f"options: expected a dict of options, got {type(options).__name__}")
    opts = with_safe_options(method, options or {})
    settings = _patch_settings(method, opts)
    from sparseflash.calibration_file import pop_calibration

    given = opts.get("calibration")
    try:
        pop_calibration(method, opts)  # loads and checks the file; its per-layer values are applied by patch
    except OSError as err:
        raise ValueError(
            f"calibration: expected a readable file written by `sparseflash calibrate`, got "
            f"{str(given)!r} ({err.strerror or err})"
        ) from None
    global_options = _check_pattern_options(method, opts, method)
    overrides = _layer_overrides(
        method, global_options, settings["dense_layers"], settings["layer_options"], num_layers
    )
    plans = [(method, global_options, method)] + [(m, o, f"layer_options[{i}]") for i, (m, o) in overrides.items()]
    if settings["approximate_dropped"] and any(m == "permuted" for m, _, _ in plans):
        raise ValueError(
            "approximate_dropped: expected False with method 'permuted' (its layouts index permuted keys), "
            f"got {settings['approximate_dropped']!r}"
        )
    check_approximate_dropped(settings["approximate_dropped"], plans)
    seen: set[str] = set()
    for layer_method, layer_opts, where in plans:
        key = repr((layer_method, sorted(layer_opts.items())))
        if layer_method != DENSE and key not in seen:
            seen.add(key)
            _probe_pattern(layer_method, layer_opts, where)


def probe_qk(heads: int, kv_heads: int, head_dim: int, block_size: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random CPU ``q (1, heads, S, D)`` and ``k (1, kv_heads, S, D)`` for a dry run of a pattern: ``S`` is
    two blocks of ``block_size`` (an int or pair; ignored when malformed, the pattern then rejects it), >= 256."""
    sizes = [b for b in (block_size if isinstance(block_size, tuple | list) else [block_size]) if isinstance(b, int)]
    length = max([256] + [2 * b for b in sizes if 0 < b <= 1024])
    gen = torch.Generator().manual_seed(0)
    return (
        torch.randn(1, heads, length, head_dim, generator=gen),
        torch.randn(1, kv_heads, length, head_dim, generator=gen),
    )


def _probe_pattern(method: str, options: Mapping[str, Any], where: str) -> None:
    """Run pattern ``method`` with ``options`` once on a small random CPU input (MHA, head_dim 64; as many heads
    as a per-head list option has values): bad option values raise here, naming the option."""
    from sparseflash.patterns import get, options_of

    counts = set()
    for name, value in options.items():
        if name == "block_size":
            continue
        if isinstance(value, list | tuple):
            counts.add(len(value))
        elif isinstance(value, torch.Tensor) and value.dim() == 1:
            counts.add(value.shape[0])
        elif value is not None and not isinstance(value, bool | int | float | str):
            return  # an object option (e.g. a calibration object): checked by patch on the model's shapes
    if len(counts) > 1 or 0 in counts:
        return  # per-head values of different lengths: only the model's head counts can tell
    heads = counts.pop() if counts else 2
    block = options.get("block_size", options_of(method).get("block_size", (128, 128)))
    q, k = probe_qk(heads, heads, 64, block)
    call = dict(options)
    if "backend" in options_of(method):
        call["backend"] = "torch"  # the patch option backend= picks the kernels; the probe runs on CPU
    try:
        get(method).fn(q, k, **call)
    except (ValueError, TypeError, NotImplementedError) as err:
        cls = TypeError if isinstance(err, TypeError) else ValueError
        raise cls(str(err) if where == method else f"{where}: {err}") from None


def check_approximate_dropped(pool: bool | int, plans: Iterable[tuple[str, Mapping[str, Any], str]]) -> None:
    """``approximate_dropped`` against every sparse plan ``(method, options, where)``: no token columns (a dropped
    block may hold attended columns: its pooled token would count them twice), and an int (keys per pooled token)
    must divide the plan's block_k; raises ValueError naming the plan."""
    if pool is False:
        return
    from sparseflash.patterns import options_of

    for layer_method, layer_opts, where in plans:
        if layer_method == DENSE:
            continue
        columns = layer_opts.get("columns", False)
        if columns is True or (not isinstance(columns, bool) and isinstance(columns, int) and columns > 0):
            raise ValueError(
                f"approximate_dropped: expected False with token columns ({where}: columns={columns!r}), got {pool!r}"
            )
        if isinstance(pool, bool):
            continue
        block = layer_opts.get("block_size", options_of(layer_method).get("block_size", 128))
        block_k = block[-1] if isinstance(block, list | tuple) else block
        if isinstance(block_k, int) and block_k % pool:
            raise ValueError(
                f"approximate_dropped: expected keys per pooled token dividing {where}'s block_k = {block_k}, "
                f"got {pool}"
            )


def _patch_settings(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """Take the patch options out of ``options`` (in place; the pattern's options stay) and check them."""
    _check_method(method)
    dense_layers = options.pop("dense_layers", ())
    if isinstance(dense_layers, int | str) or not isinstance(dense_layers, Iterable):
        raise TypeError(f"dense_layers: expected an iterable of layer indices, got {dense_layers!r}")
    dense_layers = tuple(dense_layers)
    min_sparse_len = _check_int("min_sparse_len", options.pop("min_sparse_len", DEFAULT_MIN_SPARSE_LEN), 0)
    decode = options.pop("decode", "dense")
    if decode not in DECODE_CHOICES:
        raise ValueError(f"decode: expected one of {list(DECODE_CHOICES)}, got {decode!r}")
    dense_last_queries = _check_int(
        "dense_last_queries", options.pop("dense_last_queries", DEFAULT_DENSE_LAST_QUERIES), 0
    )
    approximate_dropped = options.pop("approximate_dropped", DEFAULT_APPROXIMATE_DROPPED)
    if not isinstance(approximate_dropped, bool | int):
        raise TypeError(
            "approximate_dropped: expected a bool or an int (keys per pooled token), got "
            f"{type(approximate_dropped).__name__} {approximate_dropped!r}"
        )
    if not isinstance(approximate_dropped, bool) and (
        approximate_dropped < 1 or approximate_dropped & (approximate_dropped - 1)
    ):
        raise ValueError(
            f"approximate_dropped: expected True, False or a power of two >= 1 (keys per pooled token), "
            f"got {approximate_dropped}"
        )
    backend = options.pop("backend", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {backend!r}")
    layer_options = options.pop("layer_options", None) or {}
    if not isinstance(layer_options, Mapping):
        raise TypeError(f"layer_options: expected a dict {{layer: method or options}}, got {layer_options!r}")
    return {
        "dense_layers": dense_layers,
        "min_sparse_len": min_sparse_len,
        "decode": decode,
        "dense_last_queries": dense_last_queries,
        "approximate_dropped": approximate_dropped,
        "backend": backend,
        "layer_options": layer_options,
    }


def _layer_overrides(
    method: str,
    global_options: dict[str, Any],
    dense_layers: Iterable[object],
    layer_options: Mapping[object, Any],
    num_layers: int | None,
) -> dict[int, tuple[str, dict[str, Any]]]:
    """``{layer: (method, options)}`` from ``dense_layers`` and ``layer_options``, checked. Without
    ``num_layers`` the layer indices are checked for type only and kept as given."""

    def index(name: str, value: object) -> int:
        if num_layers is not None:
            return _layer_index(name, value, num_layers)
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name}: expected layer indices as ints, got {type(value).__name__} {value!r}")
        return value

    overrides: dict[int, tuple[str, dict[str, Any]]] = {}
    for idx in dense_layers:
        overrides[index("dense_layers", idx)] = (DENSE, {})
    if not isinstance(layer_options, Mapping):
        raise TypeError(f"layer_options: expected a dict {{layer: method or options}}, got {layer_options!r}")
    for raw_idx, spec in layer_options.items():
        idx = index("layer_options", raw_idx)
        where = f"layer_options[{raw_idx}]"
        if isinstance(spec, str):
            layer_method, layer_opts = spec, {}
        elif isinstance(spec, Mapping):
            layer_opts = dict(spec)
            layer_method = layer_opts.pop("method", method)
        else:
            raise TypeError(f"{where}: expected a method name or a dict of options, got {spec!r}")
        _check_method(layer_method)
        if layer_method == method and method != DENSE:
            layer_opts = {**global_options, **layer_opts}
        overrides[idx] = (layer_method, _check_pattern_options(layer_method, layer_opts, where))
    return overrides
