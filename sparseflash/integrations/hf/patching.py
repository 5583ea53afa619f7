"""One call turns a transformers causal LM into a sparse-prefill model: :func:`patch`, :func:`unpatch`.

The model keeps its own projections, rotary embeddings, q/k norms and KV cache: :func:`patch` registers one
attention function with transformers' ``AttentionInterface`` (and the SDPA mask builder with
``AttentionMaskInterface``) under :data:`ATTN_NAME` and points the model at it with
``model.set_attn_implementation``; :func:`patched` is the context-manager form. Every attention call then goes
through :func:`~.forward.attention_forward`, which picks one route per call
(:mod:`.forward` lists the routes; :mod:`.masks` reads the padding of its masks). The options and per-layer
plans live in :mod:`.plan`.

Supported model types: :data:`SUPPORTED_MODEL_TYPES` (Llama family incl. SmolLM2, Mistral, Qwen2/2.5, Qwen3,
Gemma 3 text). Gemma 3's sliding-window layers (and Mistral/Qwen2 layers with a sliding window) keep their
window: they never go sparse and are exact.

On CPU, ``backend="auto"`` runs the PyTorch paths of the same functions, so the patched model runs anywhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from sparseflash.integrations.hf.forward import (  # noqa: F401  (re-exported: tests and tools reach them here)
    _decode_block_lists,
    _select,
    attention_forward,
)
from sparseflash.integrations.hf.masks import _mask_with_padding
from sparseflash.integrations.hf.model import SUPPORTED_MODEL_TYPES, _attention_modules, _check_model  # noqa: F401
from sparseflash.integrations.hf.plan import (  # noqa: F401  (the public names of a patch live on hf too)
    _CONFIG_ATTR,
    _LAYER_ATTR,
    _STATE_ATTR,
    ATTN_NAME,
    BACKENDS,
    DECODE_CHOICES,
    DEFAULT_APPROXIMATE_DROPPED,
    DEFAULT_DENSE_LAST_QUERIES,
    DEFAULT_METHOD,
    DEFAULT_MIN_SPARSE_LEN,
    DENSE,
    SAFE_OPTIONS,
    LayerPlan,
    PatchState,
    _check_pattern_options,
    _layer_overrides,
    _patch_settings,
    check_approximate_dropped,
    check_patch_options,
    probe_qk,
    with_safe_options,
)


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
              :data:`DEFAULT_MIN_SPARSE_LEN` (16384, the shortest length where the time to first token was measured
              ahead of SDPA's, 1.06x on Qwen2.5-Coder-1.5B, H200, and where the accuracy grid starts). On CUDA
              these dense prefills run transformers' SDPA (route ``dense_sdpa``), as unpatched.
            * ``dense_last_queries``: the last this many query rows of every sparse prefill, rounded up to whole
              query blocks of the layout, attend all keys exactly (the question and the answer prefix; cost
              O(n * N), not O(N^2); computed by the sparse kernel as fully kept rows). Default
              :data:`DEFAULT_DENSE_LAST_QUERIES`; 0 turns it off.
            * ``approximate_dropped``: each block a row's layout drops enters its softmax as one pooled token
              (mean key, mean value, log of its size added to the logit), so the row's normaliser and output
              account for the dropped mass (:mod:`sparseflash.ops.prefill.dropped_blocks`; cost ~1/(block/2) of dense
              attention). An int ``n`` (a power of two dividing the layout's ``block_k``) pools every ``n`` keys
              of a dropped block instead: a closer estimate for ``block_k / n`` times that cost. Not for
              ``permuted`` (its blocks index permuted keys). Default :data:`DEFAULT_APPROXIMATE_DROPPED`.
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


# ----------------------------------------------------------------------------------------- building the state
def _build_state(
    model: Any, modules: Mapping[int, torch.nn.Module], method: str, options: dict[str, Any], num_layers: int
) -> PatchState:
    from sparseflash.patterns import get as get_pattern
    from sparseflash.patterns import options_of

    settings = _patch_settings(method, options)
    dense_layers, layer_options = settings["dense_layers"], settings["layer_options"]
    from sparseflash.calibration_file import apply_calibration, pop_calibration

    calibration = pop_calibration(method, options)
    if calibration is not None:  # its per-layer values become layer_options, its other options the defaults
        options = {**calibration.options, **options}
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
            select=get_pattern(layer_method).fn if layer_method != DENSE else None,
        )
    approximate_dropped = settings["approximate_dropped"]
    check_approximate_dropped(
        approximate_dropped, [(p.method, p.options, f"layer {i}'s {p.method}") for i, p in plans.items()]
    )
    if approximate_dropped and any(p.method == "permuted" for p in plans.values()):
        raise ValueError(
            "approximate_dropped: expected False with method 'permuted' (its layouts index permuted keys), "
            f"got {approximate_dropped!r}"
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
        q, k = probe_qk(heads, kv_heads, head_dim, plan.options.get("block_size", (128, 128)))
        cases = [("prefill", q)] + ([("decode='sparse'", q[:, :, -1:])] if state.decode == "sparse" else [])
        # on CPU tensors: the patterns' PyTorch path, whatever backend the layer will use
        probe = dataclasses.replace(
            plan,
            options={n: v for n, v in plan.options.items() if n != "backend"},
            pass_backend=plan.pass_backend or "backend" in plan.options,
        )
        for what, qq in cases:
            try:
                _select(probe, qq, k, getattr(module, "scaling", None), "torch")
            except (ValueError, TypeError, NotImplementedError) as err:
                raise ValueError(
                    f"method {plan.method!r} (layer {idx}, {what}) rejected its options {dict(plan.options)}: {err}"
                ) from None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, _mask_with_padding)
