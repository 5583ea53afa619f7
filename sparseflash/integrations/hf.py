"""One call turns a transformers causal LM into a sparse-prefill model: :func:`patch`, :func:`unpatch`.

The model keeps its own projections, rotary embeddings, q/k norms and KV cache: :func:`patch` registers one
attention function with transformers' ``AttentionInterface`` (and the SDPA mask builder with
``AttentionMaskInterface``) under :data:`ATTN_NAME` and points the model at it with
``model.set_attn_implementation``; :func:`patched` is the context-manager form. Every attention call then goes
through :func:`attention_forward`, which picks one route per call (``PatchState.calls`` counts them):

* ``sparse``: prefill of a full-attention layer whose method is a pattern, prompt >= ``min_sparse_len``:
  ``patterns.get(method).fn(q, k, **options)`` then :func:`sparseflash.block_sparse_attention`.
* ``dense``: the other prefills (``method="dense"``, dense layers, short prompts, sliding-window layers whose
  whole context fits in their window): :func:`sparseflash.flash_attention`.
* ``decode``: one new token over the KV cache: :func:`sparseflash.ops.decode.decode_attention` (split-KV), or
  :func:`sparseflash.flash_attention` (exact under bottom-right causality) in builds without it.
* ``decode_sparse``: the same with ``decode="sparse"`` on a sparse layer: the pattern picks key blocks for the
  new token and the decode kernel reads only those (per KV head, the union of its query heads' blocks).
* ``dense_padded`` / ``sparse_padded``: prefill of a left- or right-padded batch (below).
* ``sdpa``: everything else, computed exactly as transformers' own SDPA does it (PyTorch, with the 4-D mask):
  decode steps of a padded batch, sliding-window layers longer than their window, chunked prefill over a
  cache, custom 4-D or packed-sequence masks, training (dropout or gradients: the kernels have no backward).

Padded batches (batch > 1): the per-sequence valid lengths come from the 2-D ``attention_mask`` the model
received (captured when transformers builds its causal mask; one host sync per forward). A left- or
right-padded prefill of a full-attention layer goes through :func:`sparseflash.flash_attention` with
``seq_lens`` (dense layers) or prefills **each sequence on its own valid tokens** (sparse layers: one
pattern + kernel call per sequence, so each result equals that prompt run alone). Padded positions come out 0
(transformers leaves them unspecified). Masks the adapter cannot read as plain causal + padding go the
``sdpa`` route.

Supported model types: :data:`SUPPORTED_MODEL_TYPES` (Llama family incl. SmolLM2, Mistral, Qwen2/2.5, Qwen3,
Gemma 3 text). Gemma 3's sliding-window layers (and Mistral/Qwen2 layers with a sliding window) keep their
window: they never go sparse and are exact.

On CPU, ``backend="auto"`` runs the PyTorch paths of the same functions, so the patched model runs anywhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

ATTN_NAME = "sf_sparse_prefill"  # no "flash" in the name: transformers treats such names as flash-attn
DEFAULT_MIN_SPARSE_LEN = 8192  # prompts shorter than this stay dense; the GPU break-even is not measured yet
DEFAULT_DENSE_LAST_QUERIES = 256  # final query rows of a sparse prefill computed exactly (question + answer prefix)
DEFAULT_METHOD = "xattention"
# patch()'s defaults per method, over the pattern's own (the papers'): measured on Qwen2.5-Coder at 16K-32K
# (benchmarks/results/accuracy_h200/): threshold 0.95 halves XAttention's KL to dense against 0.9, and one
# forced local block gives every query at least one block of preceding keys (the rows at the start of a block
# otherwise lose their local context when the previous block is not selected).
SAFE_OPTIONS: dict[str, dict[str, Any]] = {"xattention": {"threshold": 0.95, "local_blocks": 1}}
DEFAULT_APPROXIMATE_DROPPED = False  # dropped blocks enter the softmax as pooled tokens (ops/dropped_blocks.py)
SUPPORTED_MODEL_TYPES = ("gemma3_text", "llama", "mistral", "qwen2", "qwen3")
DECODE_CHOICES = ("dense", "sparse")
BACKENDS = ("auto", "triton", "torch")
DENSE = "dense"

_STATE_ATTR = "_sparseflash_patch"  # on the model: its PatchState
_LAYER_ATTR = "_sparseflash_layer"  # on each attention module: (PatchState, LayerPlan)
_CONFIG_ATTR = "_sparseflash_configs"  # on the model: [(module, its original config)] swapped for private copies
_PAD_ATTR = "_sparseflash_padding"  # on a 4-D mask built from causal + 2-D padding: the (B, Sk) bool mask
_LENS_ATTR = "_sparseflash_lens"  # on the same mask: the parsed padding (cached for the other layers)
_PATCH_KEYS = (
    "dense_layers", "min_sparse_len", "dense_last_queries", "approximate_dropped", "decode", "layer_options",
    "backend", "calibration",
)


@dataclass(frozen=True)
class LayerPlan:
    """What one attention layer runs: ``method`` (``"dense"`` or a pattern name) and its options."""

    layer_idx: int
    method: str
    options: Mapping[str, Any]
    pass_scale: bool = False  # the pattern takes ``scale``, not set by the user: the layer's scaling goes in
    pass_backend: bool = False  # the pattern takes ``backend``, not set by the user: the patch's goes in


@dataclass
class PatchState:
    """The patch of one model: settings, per-layer plans, the attention implementation to restore, counters.

    ``calls`` counts the routes taken (``"sparse"``, ``"dense"``, ``"decode"``, ``"sdpa"``, ...; see the
    module docstring), one per attention-layer call; reset it freely.

    ``on_prefill``: an optional hook ``(layer_idx, density)`` called after every prefill of a layer through the
    ``sparse`` or ``dense`` routes: 1.0 for a dense prefill, else the layout's causal block density plus the exact
    last query rows in the same units (the work done, relative to dense). Setting it costs one host sync per
    sparse layer call; the evaluation harness uses it to report densities.
    """

    method: str
    options: dict[str, Any]
    min_sparse_len: int
    dense_last_queries: int
    approximate_dropped: bool
    decode: str
    backend: str
    plans: dict[int, LayerPlan]
    previous_attn_implementation: str | None
    calls: Counter = field(default_factory=Counter)
    on_prefill: Callable[[int, float], None] | None = None


# ----------------------------------------------------------------------------------------- public API
def patch(model: Any, method: str = DEFAULT_METHOD, **options: Any) -> Any:
    """Make every attention layer of ``model`` run through sparseflash; returns ``model`` (patched in place).

    Args:
        model: a transformers causal LM (``*ForCausalLM``) of a type in :data:`SUPPORTED_MODEL_TYPES`.
        method: ``"dense"`` (sparseflash's exact kernels everywhere) or a pattern name from
            ``sparseflash.patterns.available()``. Default :data:`DEFAULT_METHOD`.
        **options: the pattern's own options (checked against its signature and by a dry run on a tiny input),
            plus these patch options. For the methods in :data:`SAFE_OPTIONS`, options not given take the
            values there (the settings measured on real models, README "Accuracy"), not the pattern's own
            defaults (the papers'); with a ``calibration`` file they are not applied.

            * ``dense_layers``: iterable of layer indices (negative ones count from the end) kept dense,
              e.g. the first layers as MInference does. Default none.
            * ``min_sparse_len``: prompts (per sequence) shorter than this stay dense. Default
              :data:`DEFAULT_MIN_SPARSE_LEN` (8192), to be replaced by the measured break-even length.
            * ``dense_last_queries``: the last this many query rows of every sparse prefill attend all keys
              exactly (the question and the answer prefix; cost O(n * N), not O(N^2)). Default
              :data:`DEFAULT_DENSE_LAST_QUERIES`; 0 turns it off.
            * ``approximate_dropped``: each block a row's layout drops enters its softmax as one pooled token
              (mean key, mean value, log of its size added to the logit), so the row's normaliser and output
              account for the dropped mass (:mod:`sparseflash.ops.dropped_blocks`; cost ~1/(block/2) of dense
              attention). Not for ``permuted`` (its blocks index permuted keys). Default
              :data:`DEFAULT_APPROXIMATE_DROPPED`.
            * ``layer_options``: per-layer overrides ``{layer: "dense" | method | {"method": m, **opts}}``;
              a dict without ``"method"`` (or with the patch's own method) updates the global options, another
              method starts from its defaults.
            * ``decode``: ``"dense"`` (default; decode steps attend the whole cache exactly) or ``"sparse"``
              (decode steps of sparse layers use the pattern too, once the cache holds ``min_sparse_len``
              tokens).
            * ``backend``: ``"auto"`` (Triton on CUDA, PyTorch on CPU), ``"triton"`` or ``"torch"``; passed
              to the kernels and to patterns that take it.
            * ``calibration``: a file written by ``sparseflash calibrate`` (path) or a
              :class:`sparseflash.calibration.Calibration`: its per-layer (xattention: per-head) thresholds
              become ``layer_options``; refused (ValueError) if made for another method or model shape, or if
              ``layer_options`` sets the same option for a calibrated layer.

    Returns:
        ``model`` itself, patched; :func:`unpatch` restores it.

    Raises:
        ImportError: transformers is not installed.
        TypeError: ``model`` is not a transformers causal LM; an option of the wrong type; a float32 model on
            CUDA with the Triton backend (the kernels take fp16/bf16).
        NotImplementedError: a model type outside :data:`SUPPORTED_MODEL_TYPES` (the message names both).
        ValueError: an unknown method or option, a bad option value, a layer index out of range, or a model
            that is already patched.
    """
    _check_model(model)
    if getattr(model, _STATE_ATTR, None) is not None:
        raise ValueError(
            f"model: already patched with method {getattr(model, _STATE_ATTR).method!r}; "
            "call sparseflash.unpatch(model) first"
        )
    modules = _attention_modules(model)
    num_layers = len(modules)
    state = _build_state(model, modules, method, with_safe_options(method, options), num_layers)
    _check_device_dtype(model, state.backend)
    _dry_run(modules, state)
    _register()
    # the switch writes to the config, which transformers shares between models built from one config object:
    # the patched model switches a private copy, so the others keep their attention (restored by unpatch)
    swapped = _own_config(model)
    try:
        model.set_attn_implementation(ATTN_NAME)
    except BaseException:
        _restore_config(swapped)
        raise
    if model.config._attn_implementation != ATTN_NAME:
        _restore_config(swapped)
        raise NotImplementedError(
            f"model: {type(model).__name__} does not let transformers switch its attention implementation "
            f"(it does not follow the AttentionInterface), so it cannot be patched"
        )
    for idx, module in modules.items():
        setattr(module, _LAYER_ATTR, (state, state.plans[idx]))
    setattr(model, _CONFIG_ATTR, swapped)
    setattr(model, _STATE_ATTR, state)
    return model


def with_safe_options(method: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` over :data:`SAFE_OPTIONS` of ``method`` (unchanged with a ``calibration``: it sets thresholds)."""
    if "calibration" in options or not isinstance(method, str):
        return dict(options)
    return {**SAFE_OPTIONS.get(method, {}), **options}


def unpatch(model: Any) -> Any:
    """Undo :func:`patch`: the model's previous attention implementation comes back; returns ``model``.

    The model gets its original config object back (:func:`patch` switched a private copy, so that other models
    built from the same config object were never affected); changes made to ``model.config`` while patched stay
    with that copy.

    Raises:
        ValueError: ``model`` is not patched.
    """
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        raise ValueError(
            f"model: expected a model patched by sparseflash.patch, got an unpatched {type(model).__name__}"
        )
    swapped = getattr(model, _CONFIG_ATTR, None)
    if swapped is not None:
        _restore_config(swapped)
        delattr(model, _CONFIG_ATTR)
    else:  # patched by a version that switched the shared config itself
        model.set_attn_implementation(state.previous_attn_implementation or "sdpa")
    for module in model.modules():
        if hasattr(module, _LAYER_ATTR):
            delattr(module, _LAYER_ATTR)
    delattr(model, _STATE_ATTR)
    return model


def _own_config(model: Any) -> list[tuple[torch.nn.Module, Any]]:
    """Give ``model`` private copies of its config and sub-configs (every module holding one gets the copy).

    Returns:
        ``[(module, original config)]`` for :func:`_restore_config`.
    """
    import copy

    from transformers import PretrainedConfig

    memo: dict[int, Any] = {}
    copy.deepcopy(model.config, memo)  # memo: id(original) -> copy, for the config and everything inside it
    swapped = []
    for module in model.modules():
        original = module.__dict__.get("config")
        if isinstance(original, PretrainedConfig) and id(original) in memo:
            swapped.append((module, original))
            module.config = memo[id(original)]
    return swapped


def _restore_config(swapped: list[tuple[torch.nn.Module, Any]]) -> None:
    for module, original in swapped:
        module.config = original


@contextlib.contextmanager
def patched(model: Any, method: str = "xattention", **options: Any) -> Iterator[Any]:
    """Context manager form of :func:`patch`: the model is patched inside the block and unpatched after it.

    Example::

        with sparseflash.patched(model, "vertical_slash", min_sparse_len=4096):
            out = model.generate(**inputs, max_new_tokens=32)
    """
    patch(model, method, **options)
    state = getattr(model, _STATE_ATTR)
    try:
        yield model
    finally:
        if getattr(model, _STATE_ATTR, None) is state:
            unpatch(model)


def is_patched(model: Any) -> bool:
    """Whether ``model`` is currently patched by :func:`patch`."""
    return getattr(model, _STATE_ATTR, None) is not None


def patch_state(model: Any) -> PatchState | None:
    """The :class:`PatchState` of a patched model (settings, per-layer plans, route counters), else None."""
    return getattr(model, _STATE_ATTR, None)


# ----------------------------------------------------------------------------------------- checks
def _transformers() -> Any:
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "sparseflash.patch needs transformers: pip install 'transformers>=5.17' accelerate"
        ) from err
    return transformers


def _check_model(model: Any) -> None:
    transformers = _transformers()
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(
            f"model: expected a transformers causal LM (a PreTrainedModel such as LlamaForCausalLM), "
            f"got {type(model).__name__}"
        )
    causal_names = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if not any(cls.__name__ in causal_names for cls in type(model).__mro__):
        raise TypeError(
            f"model: expected a transformers causal LM (*ForCausalLM), got {type(model).__name__}"
        )
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise NotImplementedError(
            f"model: model type {model_type!r} ({type(model).__name__}) is not supported by "
            f"sparseflash.patch; supported model types: {list(SUPPORTED_MODEL_TYPES)} (Llama/SmolLM2, "
            f"Mistral, Qwen2/2.5, Qwen3, Gemma 3 text)"
        )
    if getattr(model.config, "attn_logit_softcapping", None) is not None:
        raise NotImplementedError(
            f"model: attention logit softcapping "
            f"({model.config.attn_logit_softcapping}) is not supported by the kernels"
        )


def _attention_modules(model: Any) -> dict[int, torch.nn.Module]:
    """The attention modules by layer index (class ``*Attention`` with ``layer_idx`` and ``q_proj``)."""
    found: dict[int, torch.nn.Module] = {}
    for module in model.modules():
        if (
            type(module).__name__.endswith("Attention")
            and hasattr(module, "q_proj")
            and isinstance(getattr(module, "layer_idx", None), int)
        ):
            found[module.layer_idx] = module
    expected = getattr(model.config, "num_hidden_layers", len(found))
    if sorted(found) != list(range(expected)):
        raise NotImplementedError(
            f"model: found attention modules for layers {sorted(found)}, expected "
            f"0..{expected - 1}; {type(model).__name__} is laid out in an unsupported way"
        )
    return found


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
        raise ValueError(
            f"{where}: option 'causal' is fixed to True for a causal LM, got causal={options['causal']!r}"
        )
    try:
        check_options(method, dict(options))
    except ValueError as err:
        raise ValueError(f"{where}: {err} (patch options: {list(_PATCH_KEYS)})") from None
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


def check_patch_options(
    method: str, options: Mapping[str, Any] | None = None, num_layers: int | None = None
) -> None:
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
    from sparseflash.calibration import pop_calibration

    given = opts.get("calibration")
    try:
        pop_calibration(method, opts)  # loads and checks the file; its per-layer values are applied by patch
    except OSError as err:
        raise ValueError(f"calibration: expected a readable file written by `sparseflash calibrate`, got "
                         f"{str(given)!r} ({err.strerror or err})") from None
    global_options = _check_pattern_options(method, opts, method)
    overrides = _layer_overrides(
        method, global_options, settings["dense_layers"], settings["layer_options"], num_layers
    )
    plans = [(method, global_options, method)] + [(m, o, f"layer_options[{i}]") for i, (m, o) in overrides.items()]
    if settings["approximate_dropped"] and any(m == "permuted" for m, _, _ in plans):
        raise ValueError(
            "approximate_dropped: expected False with method 'permuted' (its layouts index permuted keys), got True"
        )
    seen: set[str] = set()
    for layer_method, layer_opts, where in plans:
        key = repr((layer_method, sorted(layer_opts.items())))
        if layer_method != DENSE and key not in seen:
            seen.add(key)
            _probe_pattern(layer_method, layer_opts, where)


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
    sizes = [b for b in (block if isinstance(block, tuple | list) else [block]) if isinstance(b, int)]
    length = max([256] + [2 * b for b in sizes if 0 < b <= 1024])
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, length, 64, generator=gen)
    k = torch.randn(1, heads, length, 64, generator=gen)
    call = dict(options)
    if "backend" in options_of(method):
        call["backend"] = "torch"  # the patch option backend= picks the kernels; the probe runs on CPU
    try:
        inspect.unwrap(get(method).fn)(q, k, **call)
    except (ValueError, TypeError, NotImplementedError) as err:
        cls = TypeError if isinstance(err, TypeError) else ValueError
        raise cls(str(err) if where == method else f"{where}: {err}") from None


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
    if not isinstance(approximate_dropped, bool):
        raise TypeError(f"approximate_dropped: expected a bool, got {type(approximate_dropped).__name__} "
                        f"{approximate_dropped!r}")
    backend = options.pop("backend", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {backend!r}")
    layer_options = options.pop("layer_options", None) or {}
    if not isinstance(layer_options, Mapping):
        raise TypeError(f"layer_options: expected a dict {{layer: method or options}}, got {layer_options!r}")
    return {"dense_layers": dense_layers, "min_sparse_len": min_sparse_len, "decode": decode,
            "dense_last_queries": dense_last_queries, "approximate_dropped": approximate_dropped,
            "backend": backend, "layer_options": layer_options}


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


def _build_state(
    model: Any, modules: Mapping[int, torch.nn.Module], method: str, options: dict[str, Any], num_layers: int
) -> PatchState:
    from sparseflash.patterns import options_of

    settings = _patch_settings(method, options)
    dense_layers, layer_options = settings["dense_layers"], settings["layer_options"]
    from sparseflash.calibration import apply_calibration, pop_calibration

    calibration = pop_calibration(method, options)
    if calibration is not None:  # its per-layer values become layer_options
        layer_options, dense_layers = apply_calibration(
            calibration, model, method, layer_options, options, dense_layers, num_layers
        )
    global_options = _check_pattern_options(method, options, method)
    overrides = _layer_overrides(method, global_options, dense_layers, layer_options, num_layers)

    plans: dict[int, LayerPlan] = {}
    for idx in range(num_layers):
        layer_method, layer_opts = overrides.get(idx, (method, global_options))
        takes = options_of(layer_method) if layer_method != DENSE else {}
        plans[idx] = LayerPlan(
            idx,
            layer_method,
            dict(layer_opts),
            pass_scale="scale" in takes and "scale" not in layer_opts,
            pass_backend="backend" in takes and "backend" not in layer_opts,
        )
    approximate_dropped = settings["approximate_dropped"]
    if approximate_dropped and any(p.method == "permuted" for p in plans.values()):
        raise ValueError(
            "approximate_dropped: expected False with method 'permuted' (its layouts index permuted keys), got True"
        )
    return PatchState(
        method=method,
        options=global_options,
        min_sparse_len=settings["min_sparse_len"],
        dense_last_queries=settings["dense_last_queries"],
        approximate_dropped=approximate_dropped,
        decode=settings["decode"],
        backend=settings["backend"],
        plans=plans,
        previous_attn_implementation=model.config._attn_implementation,
    )


def _check_device_dtype(model: Any, backend: str) -> None:
    param = next(model.parameters(), None)
    if param is None:
        return
    triton = backend == "triton" or (backend == "auto" and param.device.type == "cuda")
    if triton and param.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(
            f"model: expected float16 or bfloat16 weights for the Triton kernels on {param.device}, got "
            f"{param.dtype}; cast with model.to(torch.bfloat16) or pass backend='torch'"
        )


def _dry_run(modules: Mapping[int, torch.nn.Module], state: PatchState) -> None:
    """Run each distinct (method, options) once on a tiny CPU input: bad option values fail at patch time."""
    seen: set[tuple[str, str]] = set()
    for idx, plan in state.plans.items():
        if plan.method == DENSE:
            continue
        key = (plan.method, repr(sorted(plan.options.items())))
        if key in seen:
            continue
        seen.add(key)
        module = modules[idx]
        cfg = module.config
        heads, kv_heads = (
            cfg.num_attention_heads,
            getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        )
        head_dim = int(getattr(module, "head_dim", 0) or cfg.hidden_size // heads)
        block = plan.options.get("block_size", (128, 128))
        length = 2 * max(block) if isinstance(block, tuple | list) and block else 256
        gen = torch.Generator().manual_seed(0)
        q = torch.randn(1, heads, length, head_dim, generator=gen)
        k = torch.randn(1, kv_heads, length, head_dim, generator=gen)
        cases = [("prefill", q)] + ([("decode='sparse'", q[:, :, -1:])] if state.decode == "sparse" else [])
        # on CPU tensors: the patterns' PyTorch path, whatever backend the layer will use
        probe = dataclasses.replace(
            plan,
            options={n: v for n, v in plan.options.items() if n != "backend"},
            pass_backend=plan.pass_backend or "backend" in plan.options,
        )
        for what, qq in cases:
            try:
                _select(probe, qq, k, getattr(module, "scaling", None), "torch", unwrap=True)
            except (ValueError, TypeError, NotImplementedError) as err:
                raise ValueError(
                    f"method {plan.method!r} (layer {idx}, {what}) rejected its options "
                    f"{dict(plan.options)}: {err}"
                ) from None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, _mask_with_padding)


# ----------------------------------------------------------------------------------------- masks
def _mask_with_padding(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """transformers' SDPA mask builder; a plain causal + padding mask also carries its 2-D padding mask."""
    from transformers.masking_utils import causal_mask_function, prepare_padding_mask, sdpa_mask

    mask = sdpa_mask(*args, **kwargs)
    pad = kwargs.get("attention_mask")
    q_len, kv_len = kwargs.get("q_length"), kwargs.get("kv_length")
    plain = (
        kwargs.get("mask_function") is causal_mask_function
        and kwargs.get("local_size") is None
        and _is_zero(kwargs.get("q_offset", 0))
        and _is_zero(kwargs.get("kv_offset", 0))
    )
    if (
        isinstance(mask, torch.Tensor)
        and plain
        and isinstance(pad, torch.Tensor)
        and pad.ndim == 2
        and q_len == kv_len
    ):
        pad = prepare_padding_mask(pad, kv_len, 0)
        if pad is not None and tuple(pad.shape) == (mask.shape[0], kv_len):
            setattr(mask, _PAD_ATTR, pad.to(torch.bool))
    return mask


def _is_zero(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value == 0


def _padding_of(mask: torch.Tensor, seq_len: int) -> tuple[list[int], torch.Tensor, str] | None:
    """``(lengths, lengths int32 (B,), "left" | "right")`` of a plain causal + padding mask, else None.

    Parsed once per mask (one host sync) and cached on the mask for the other layers.
    """
    cached = getattr(mask, _LENS_ATTR, None)
    if cached is not None:
        return cached or None
    pad = getattr(mask, _PAD_ATTR, None)
    result: tuple = ()
    if pad is not None and pad.shape[-1] == seq_len:
        lens = pad.sum(-1).to(torch.int32)
        pos = torch.arange(seq_len, device=pad.device)[None, :]
        left = torch.equal(pad, pos >= seq_len - lens[:, None])
        right = torch.equal(pad, pos < lens[:, None])
        if left or right:
            result = (lens.tolist(), lens, "left" if left else "right")
    setattr(mask, _LENS_ATTR, result)
    return result or None


def _window_mask(seq_len_q: int, seq_len_k: int, window: int, device: torch.device) -> torch.Tensor:
    """Bool (1, 1, Sq, Sk), causal window: query at p sees key j iff p - window < j <= p."""
    p = torch.arange(seq_len_q, device=device)[:, None] + (seq_len_k - seq_len_q)
    j = torch.arange(seq_len_k, device=device)[None, :]
    return ((j <= p) & (j > p - window))[None, None]


# ------------------------------------------------------------------------------------ the attention function
@functools.lru_cache(maxsize=1)
def _decode_kernel() -> Any | None:
    try:
        from sparseflash.ops.decode import decode_attention
    except ImportError:
        return None
    return decode_attention


def _select(
    plan: LayerPlan,
    q: torch.Tensor,
    k: torch.Tensor,
    scaling: float | None,
    backend: str,
    *,
    unwrap: bool = False,
) -> Any:
    """The layer's layout for (q, k). The pattern is looked up per call, so wrappers of the registry (the eval
    harness records layouts that way) see every call; ``unwrap`` bypasses them (the patch-time dry run)."""
    from sparseflash.patterns import get

    options = dict(plan.options)
    if plan.pass_scale and scaling is not None:
        options["scale"] = scaling
    if plan.pass_backend:
        options["backend"] = backend
    fn = get(plan.method).fn
    return (inspect.unwrap(fn) if unwrap else fn)(q, k, **options)


def _sdpa(
    module: Any,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float | None,
    dropout: float,
    kwargs: dict[str, Any],
) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, q, k, v, mask, dropout=dropout, scaling=scaling, **kwargs)


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The function registered as :data:`ATTN_NAME` in transformers' ``AttentionInterface``.

    Args:
        module: the model's attention module (carries its :class:`LayerPlan` once patched).
        query: (batch, num_heads, seq_len_q, head_dim), after RoPE.
        key, value: (batch, num_kv_heads, seq_len_k, head_dim), the whole cache so far (GQA not repeated).
        attention_mask: None (plain causal) or transformers' bool (batch, 1, seq_len_q, seq_len_k) mask.
        scaling: softmax scale; dropout: attention dropout (training only; forces the ``sdpa`` route).
        **kwargs: ``sliding_window`` (the layer's window or None) and whatever else the model passes.

    Returns:
        ``(out, None)`` with out (batch, seq_len_q, num_heads, head_dim) contiguous, in query's dtype.
    """
    layer = getattr(module, _LAYER_ATTR, None)
    if layer is None:
        raise RuntimeError(
            f"attn_implementation {ATTN_NAME!r} is set, but {type(module).__name__} (layer "
            f"{getattr(module, 'layer_idx', '?')}) belongs to no model patched by sparseflash.patch"
        )
    state, plan = layer
    window = kwargs.get("sliding_window")
    seq_q, seq_k = query.shape[2], key.shape[2]
    grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    if (
        (dropout and module.training)
        or grad
        or kwargs.get("softcap") is not None
        or kwargs.get("is_causal", True) is False
        or not getattr(module, "is_causal", True)
    ):
        state.calls["sdpa"] += 1
        return _sdpa(module, query, key, value, attention_mask, scaling, dropout, kwargs)
    if attention_mask is None:
        if 1 < seq_q < seq_k:
            # prefill into an empty static cache: transformers' SDPA attends keys [0, seq_q) causally
            key, value, seq_k = key[:, :, :seq_q], value[:, :, :seq_q], seq_q
        if window is not None and seq_k > window:
            state.calls["sdpa"] += 1
            mask = _window_mask(seq_q, seq_k, window, query.device)
            return _sdpa(module, query, key, value, mask, scaling, dropout, kwargs)
        if seq_q == seq_k:
            out = _prefill(state, plan, query, key, value, scaling, window)
        elif seq_q == 1:
            out = _decode(state, plan, query, key, value, scaling, window)
        else:
            state.calls["sdpa"] += 1
            return _sdpa(module, query, key, value, attention_mask, scaling, dropout, kwargs)
        return out.transpose(1, 2).contiguous(), None
    padding = _padding_of(attention_mask, seq_k) if seq_q == seq_k and window is None else None
    if padding is None:
        state.calls["sdpa"] += 1
        return _sdpa(module, query, key, value, attention_mask, scaling, dropout, kwargs)
    out = _prefill_padded(state, plan, query, key, value, scaling, padding)
    return out.transpose(1, 2).contiguous(), None


def _prefill(
    state: PatchState,
    plan: LayerPlan,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scaling: float | None,
    window: int | None,
) -> torch.Tensor:
    from sparseflash.ops.block_sparse import block_sparse_attention
    from sparseflash.ops.dense import flash_attention

    if plan.method == DENSE or window is not None or q.shape[2] < state.min_sparse_len:
        state.calls["dense"] += 1
        if state.on_prefill is not None:
            state.on_prefill(plan.layer_idx, 1.0)
        return flash_attention(q, k, v, causal=True, scale=scaling, backend=state.backend)
    state.calls["sparse"] += 1
    layout = _select(plan, q, k, scaling, state.backend)
    if state.approximate_dropped:
        from sparseflash.ops.dropped_blocks import dropped_block_attention
        from sparseflash.ops.merge import merge_attention_states

        out, lse = block_sparse_attention(
            q, k, v, layout, causal=True, scale=scaling, check_indices=False, return_lse=True,
            backend=state.backend,
        )
        out, _ = merge_attention_states(out, lse, *dropped_block_attention(q, k, v, layout, scale=scaling))
    else:
        out = block_sparse_attention(
            q, k, v, layout, causal=True, scale=scaling, check_indices=False, backend=state.backend
        )
    tail = min(state.dense_last_queries, q.shape[2])
    if tail > 0:
        # the last rows (the question and the answer prefix, whose hidden states give the first answer token)
        # attend every key exactly: O(tail * N) work, bottom-right causal over the whole prompt
        out[:, :, -tail:] = flash_attention(
            q[:, :, -tail:], k, v, causal=True, scale=scaling, backend=state.backend
        )
    if state.on_prefill is not None:
        state.on_prefill(plan.layer_idx, _work_density(layout, tail))
    return out


def _work_density(layout: Any, tail: int) -> float:
    """The layout's causal block density plus ``tail`` exact rows over all keys, in causal-block units (<= 1)."""
    from sparseflash.layout import causal_block_mask

    bq, bk = layout.block_size
    allowed = int(causal_block_mask(layout.seq_len_q, layout.seq_len_k, (bq, bk)).sum())
    extra = tail * layout.seq_len_k / (bq * bk * max(allowed, 1))
    return min(1.0, layout.density() + extra)


def _decode(
    state: PatchState,
    plan: LayerPlan,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scaling: float | None,
    window: int | None,
) -> torch.Tensor:
    """One new token per sequence over the whole cache (batch rows all of length seq_len_k)."""
    from sparseflash.ops.dense import flash_attention

    kernel = _decode_kernel()
    sparse = (
        state.decode == "sparse"
        and plan.method != DENSE
        and window is None
        and k.shape[2] >= state.min_sparse_len
    )
    if kernel is None:  # no decode kernel in this build: the prefill kernels (bottom-right causal is exact)
        from sparseflash.ops.block_sparse import block_sparse_attention

        if sparse:
            state.calls["decode_sparse"] += 1
            layout = _select(plan, q, k, scaling, state.backend)
            return block_sparse_attention(
                q, k, v, layout, causal=True, scale=scaling, check_indices=False, backend=state.backend
            )
        state.calls["decode"] += 1
        return flash_attention(q, k, v, causal=True, scale=scaling, backend=state.backend)
    lens = torch.full((q.shape[0],), k.shape[2], dtype=torch.int32, device=q.device)
    if sparse:
        state.calls["decode_sparse"] += 1
        indices, counts, block = _decode_block_lists(
            _select(plan, q, k, scaling, state.backend), q.shape[0], q.shape[1], k.shape[1]
        )
        return kernel(
            q,
            k,
            v,
            lens,
            scale=scaling,
            kv_block_indices=indices,
            kv_block_counts=counts,
            block_size=block,
            check_values=False,
            backend=state.backend,
        )
    state.calls["decode"] += 1
    return kernel(q, k, v, lens, scale=scaling, check_values=False, backend=state.backend)


def _decode_block_lists(
    layout: Any, batch: int, num_heads: int, num_kv_heads: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A one-query-block layout as the decode kernel's per-KV-head block lists.

    Returns ``(indices (B, Hkv, Kb) int32, counts (B, Hkv) int32, block_k)``; a per-query-head layout gives
    each KV head the union of its query heads' blocks. No host sync.
    """
    keep = layout.to_dense()[:, :, 0]  # (B or 1, H, Kb) with H in (1, Hkv, Hq)
    if keep.shape[1] == num_heads and num_heads != num_kv_heads:
        keep = keep.reshape(keep.shape[0], num_kv_heads, num_heads // num_kv_heads, -1).any(2)
    keep = keep.expand(batch, num_kv_heads, keep.shape[-1])
    counts = keep.sum(-1, dtype=torch.int32)
    order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices  # kept block ids first, ascending
    return order.to(torch.int32).contiguous(), counts.contiguous(), layout.block_size[1]


def _prefill_padded(
    state: PatchState,
    plan: LayerPlan,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scaling: float | None,
    padding: tuple[list[int], torch.Tensor, str],
) -> torch.Tensor:
    """Prefill of a left/right-padded batch: dense with ``seq_lens``, sparse one sequence at a time."""
    from sparseflash.ops.dense import flash_attention

    lengths, lens, side = padding
    seq_len = q.shape[2]
    if all(n == seq_len for n in lengths):
        return _prefill(state, plan, q, k, v, scaling, None)
    if plan.method == DENSE or max(lengths) < state.min_sparse_len:
        state.calls["dense_padded"] += 1
        return flash_attention(
            q, k, v, causal=True, scale=scaling, seq_lens=lens, padding_side=side, backend=state.backend
        )
    state.calls["sparse_padded"] += 1
    out = torch.zeros_like(q)
    for b, n in enumerate(lengths):
        if n == 0:
            continue
        lo = seq_len - n if side == "left" else 0
        rows = slice(lo, lo + n)
        out[b : b + 1, :, rows] = _prefill(
            state, plan, q[b : b + 1, :, rows], k[b : b + 1, :, rows], v[b : b + 1, :, rows], scaling, None
        )
    return out
