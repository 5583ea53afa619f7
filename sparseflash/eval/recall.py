"""Per-layer attention recall and density of a method's layout on captured q/k.

Uses :func:`sparseflash.metrics.attention_recall` and :func:`sparseflash.metrics.density` when that module is
present; otherwise the exact PyTorch computation below (dense causal softmax in row chunks, float32), which is
what those functions compute: the softmax mass each query row keeps inside the layout's blocks, averaged over
rows and heads, and kept causal blocks over causal blocks.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import torch

from sparseflash.eval.methods import DENSE


def _metrics() -> Any | None:
    try:
        return importlib.import_module("sparseflash.metrics")
    except ImportError:
        return None


def attention_recall_torch(q: torch.Tensor, k: torch.Tensor, layout: Any, *, scale: float | None = None,
                           chunk: int = 512) -> float:
    """Mean over heads and query rows of the causal softmax mass inside ``layout``'s kept blocks.

    Args:
        q: (1, Hq, S, D). k: (1, Hkv, S, D) with Hq a multiple of Hkv.
        layout: a :class:`sparseflash.BlockLayout` for (S, S) with 1, Hkv or Hq heads.
    """
    _, hq, s, d = q.shape
    hkv = k.shape[1]
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    blocks = layout.to_dense()[0]  # (H, Qb, Kb) bool
    if blocks.shape[0] == 1:
        blocks = blocks.expand(hq, -1, -1)
    elif blocks.shape[0] == hkv and hkv != hq:
        blocks = blocks.repeat_interleave(hq // hkv, dim=0)
    bq, bk = layout.block_size
    kf = k[0].float().repeat_interleave(hq // hkv, dim=0)  # (Hq, S, D)
    cols = torch.arange(s, device=q.device)
    kept_total = 0.0
    for r0 in range(0, s, chunk):
        r1 = min(s, r0 + chunk)
        rows = torch.arange(r0, r1, device=q.device)
        scores = torch.einsum("hrd,hsd->hrs", q[0, :, r0:r1].float(), kf) * scale
        scores.masked_fill_(cols[None, None, :] > rows[None, :, None], float("-inf"))
        probs = scores.softmax(-1)
        token_mask = blocks[:, rows // bq][:, :, cols // bk]  # (Hq, r, S)
        kept_total += float((probs * token_mask).sum())
    return kept_total / (hq * s)


def layer_recall(method: str, options: dict[str, Any], q: torch.Tensor, k: torch.Tensor) -> tuple[float, float]:
    """(recall, density) of ``method``'s layout on one layer's q (1, Hq, S, D) and k (1, Hkv, S, D)."""
    if method == DENSE:
        return 1.0, 1.0
    from sparseflash.eval.methods import _PATCH_OPTIONS, pattern_names
    from sparseflash.patterns.registry import select

    pattern_names()  # registers the patterns
    layout = select(method, q, k, **{key: v for key, v in options.items() if key not in _PATCH_OPTIONS})
    m = _metrics()
    if m is not None and hasattr(m, "attention_recall"):
        rec = m.attention_recall(q, k, layout)
        dens = m.density(layout) if hasattr(m, "density") else layout.density()
    else:
        rec, dens = attention_recall_torch(q, k, layout), layout.density()
    return float(rec), float(dens)
