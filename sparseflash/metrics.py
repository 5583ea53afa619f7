"""Quality metrics of a block layout: attention recall (methods.md §1.3) and density.

``attention_recall`` is exact and never builds an ``Sq x Sk`` tensor: the row recall
``recall_i = sum_{j kept} P[i, j]`` of the dense softmax ``P`` equals ``exp(lse_sparse_i - lse_dense_i)``, with
``lse_dense`` from :func:`sparseflash.flash_attention` and ``lse_sparse`` from
:func:`sparseflash.block_sparse_attention` over the layout (both with ``return_lse=True``; k stands in for v,
whose values do not affect the lse).
"""

from __future__ import annotations

import torch

from sparseflash.layouts import BlockLayout, PermutedLayout, causal_block_mask
from sparseflash.ops.prefill.block_sparse import block_sparse_attention
from sparseflash.ops.prefill.dense import flash_attention


def row_recall(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: BlockLayout | PermutedLayout,
    *,
    causal: bool = True,
    scale: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row recall and validity.

    Args:
        q: ``(B, Hq, Sq, D)``. k: ``(B, Hkv, Sk, D)`` (dtypes and head dims the attention kernels accept).
        layout: the layout to score (any of its head counts: 1, Hkv or Hq).
        causal: bottom-right causal.
        scale: softmax scale, default ``1 / sqrt(D)``.
        backend: attention backend ('auto', 'triton', 'torch').

    Returns:
        ``(recall, valid)``: float32 ``(B, Hq, Sq)`` in [0, 1] and bool ``(B, Hq, Sq)``, False on rows that see
        no key at all (``Sq > Sk`` with causal), whose recall is reported as 1.

    Raises:
        ValueError: a NaN log-sum-exp (NaN/inf in q or k), checked with one host sync, and the attention
            entry points' errors (a ``scale`` that is not finite and positive, say).
    """
    if not isinstance(layout, BlockLayout | PermutedLayout):
        raise TypeError(f"layout: expected a BlockLayout, got {type(layout).__name__}")
    _, lse_dense = flash_attention(q, k, k, causal=causal, scale=scale, return_lse=True, backend=backend)
    _, lse_sparse = block_sparse_attention(
        q, k, k, layout, causal=causal, scale=scale, return_lse=True, backend=backend
    )
    if bool(torch.isnan(lse_dense).any() | torch.isnan(lse_sparse).any()):  # one host sync
        raise ValueError(
            "q, k: expected finite attention logits q.k * scale, got NaN in the log-sum-exp (check q and k for "
            "NaN/inf); a NaN row would otherwise count as seeing no key (recall 1)"
        )
    valid = torch.isfinite(lse_dense)
    diff = lse_sparse.float() - torch.where(valid, lse_dense.float(), 0.0)
    recall = torch.where(valid, torch.exp(diff).clamp(0.0, 1.0), 1.0)
    return recall, valid


def attention_recall(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: BlockLayout | PermutedLayout,
    *,
    causal: bool = True,
    scale: float | None = None,
    per_head: bool = False,
    backend: str = "auto",
) -> float | torch.Tensor:
    """Fraction of the dense softmax mass each query row keeps under ``layout``, averaged over rows.

    Rows that see no key (``Sq > Sk``) are left out. ``recall = 1`` for a dense layout.

    Args:
        q, k, layout, causal, scale, backend: see :func:`row_recall`.
        per_head: return a float64 tensor ``(Hq,)`` (mean over batch and rows per query head) instead of a float.

    Returns:
        The mean recall (a Python float: one host sync) or the per-head tensor on q's device.

    Raises:
        ValueError: see :func:`row_recall` (never a recall made up from NaN rows).
    """
    recall, valid = row_recall(q, k, layout, causal=causal, scale=scale, backend=backend)
    num = torch.where(valid, recall.double(), 0.0)
    if per_head:
        return num.sum((0, 2)) / valid.sum((0, 2)).clamp_min(1)
    return float(num.sum() / valid.sum().clamp_min(1))


def density(
    layout: BlockLayout | PermutedLayout, *, causal: bool = True, per_head: bool = False
) -> float | torch.Tensor:
    """Kept blocks over causal-allowed blocks (methods.md §1.3), averaged over batch and heads.

    Blocks kept above the causal diagonal do not count. ``per_head=True`` gives a float64 tensor
    ``(layout heads,)`` averaged over the batch. A :class:`PermutedLayout` counts the blocks it computes.
    """
    if isinstance(layout, PermutedLayout):
        layout = layout.blocks
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout: expected a BlockLayout, got {type(layout).__name__}")
    if not per_head:
        return layout.density(causal=causal)
    allowed = causal_block_mask(
        layout.seq_len_q, layout.seq_len_k, layout.block_size, causal=causal, device=layout.device
    )
    kept = (layout.to_dense() & allowed).sum((0, 2, 3), dtype=torch.float64)
    return kept / (allowed.sum() * layout.batch)
