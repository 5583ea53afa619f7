"""Per-layer attention recall and density of a method's layout on captured q/k (:mod:`sparseflash.metrics`)."""

from __future__ import annotations

from typing import Any

import torch

from sparseflash.eval.methods import DENSE


def layer_recall(method: str, options: dict[str, Any], q: torch.Tensor, k: torch.Tensor) -> tuple[float, float]:
    """(recall, density) of ``method``'s layout on one layer's q (1, Hq, S, D) and k (1, Hkv, S, D).

    Recall is :func:`sparseflash.metrics.attention_recall` (the causal softmax mass each query row keeps inside
    the layout, averaged over rows and heads), density :func:`sparseflash.metrics.density`.
    """
    if method == DENSE:
        return 1.0, 1.0
    from sparseflash.eval.methods import _PATCH_OPTIONS
    from sparseflash.metrics import attention_recall, density
    from sparseflash.patterns import select

    layout = select(method, q, k, **{key: v for key, v in options.items() if key not in _PATCH_OPTIONS})
    return float(attention_recall(q, k, layout)), float(density(layout))
