"""Capturing every layer's q and k where a transformers model calls its attention function (after RoPE and q/k
norms), through ``AttentionInterface``; the layer then runs as with ``sdpa``. Used by the eval's recall task,
calibration and benchmarks/diagnose_recall.py."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

_CAPTURE_NAME = "sf_eval_capture"  # no "flash" in the name: transformers treats such names as flash-attn
_capture_callback: list[Callable[[int, torch.Tensor, torch.Tensor], None]] = []


def _capture_attention(
    module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any, **kwargs: Any
) -> Any:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if _capture_callback and query.shape[2] == key.shape[2] and query.shape[2] > 1:
        _capture_callback[-1](int(getattr(module, "layer_idx", -1)), query, key)
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)


@contextlib.contextmanager
def capture_attention(model: Any, on_layer: Callable[[int, torch.Tensor, torch.Tensor], None]) -> Iterator[None]:
    """Within the block, ``model``'s attention layers pass their q/k to ``on_layer`` and then run sdpa."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(_CAPTURE_NAME, _capture_attention)
    AttentionMaskInterface.register(_CAPTURE_NAME, sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(_CAPTURE_NAME)
    _capture_callback.append(on_layer)
    try:
        yield
    finally:
        _capture_callback.pop()
        model.set_attn_implementation(previous)
