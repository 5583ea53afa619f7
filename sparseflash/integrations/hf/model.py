"""Which transformers models :func:`~.hf.patch` can take, and where their attention modules are.

Model checks only (no patching), so that :mod:`sparseflash.calibration` can walk a model's layers without
importing the patch itself.
"""

from __future__ import annotations

from typing import Any

import torch

SUPPORTED_MODEL_TYPES = ("gemma3_text", "llama", "mistral", "qwen2", "qwen3")


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("sparseflash.patch needs transformers: pip install 'transformers>=5.17' accelerate") from err
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
        raise TypeError(f"model: expected a transformers causal LM (*ForCausalLM), got {type(model).__name__}")
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
