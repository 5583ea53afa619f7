"""Oracle: exact block importance from dense attention, the ceiling every selection method is measured against.

The block mass ``E[I, J] = sum_{i in I, j in J} P[i, j]`` of the dense causal softmax ``P`` is computed
blockwise (:func:`~sparseflash.ops.scores.block_scores.block_scores` with ``mode="mass"``: the dense row lse,
then one ``Q K^T`` pass summing ``exp(s - lse)`` per block; never an ``Sq x Sk`` tensor). Because every query
row has mass 1, the mean row recall of query block ``I`` is exactly ``sum_{kept J} E[I, J] / sum_J E[I, J]``,
so keeping blocks by decreasing ``E`` is the best any block selector with the same per-row budget can do.

Two rules: ``density`` (per row, the ``ceil(density * allowed_blocks)`` largest blocks, diagonal included in
the budget) or ``target_recall`` (per row, the fewest blocks reaching that fraction of the row's mass,
diagonal counted first: the layout's attention recall is then ``>= target_recall``). Layout per query head
(``heads="kv"``: union over each GQA group). Not a fast method: it costs more than dense attention.
"""

from __future__ import annotations

import torch

from sparseflash import _options as opt
from sparseflash._validate import check_qk
from sparseflash.layouts import BlockLayout
from sparseflash.layouts import geometry as geo
from sparseflash.ops.scores.block_scores import block_scores
from sparseflash.patterns import selection as sel
from sparseflash.patterns.registry import register

DEFAULT_DENSITY = 0.1


@register("oracle", kind="dynamic", heads="q")
def oracle(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: tuple[int, int] = (128, 128),
    causal: bool = True,
    density: float | None = None,
    target_recall: float | None = None,
    heads: str = "q",
    scale: float | None = None,
    backend: str = "auto",
) -> BlockLayout:
    """Exact top blocks per row at a target ``density`` (default 0.1) or ``target_recall`` (give at most one).

    Args:
        q: ``(B, Hq, Sq, D)``. k: ``(B, Hkv, Sk, D)``; ``Sq < Sk`` is chunked prefill (bottom-right).
        block_size: ``(block_q, block_k)``.
        causal: bottom-right causal (True) or full attention.
        density: fraction in (0, 1] of each row's allowed blocks to keep (at least the diagonal).
        target_recall: fraction in (0, 1] of each row's dense softmax mass to keep.
        heads: ``"q"`` (per query head) or ``"kv"`` (per KV head, union of the group).
        scale: softmax scale, default ``1 / sqrt(D)``.
        backend: block-mass backend ('auto', 'triton', 'torch').

    Returns:
        A :class:`BlockLayout` ``(B, Hq or Hkv, Qb, Kb)``.
    """
    _, num_heads, num_kv_heads, seq_len_q, seq_len_k, _ = check_qk("oracle", q, k)
    bs = opt.check_block_size("oracle", block_size)
    opt.check_causal("oracle", causal)
    scale = opt.check_scale("oracle", scale)
    opt.check_backend_option("oracle", backend)
    opt.layout_heads("oracle", heads, num_heads, num_kv_heads)
    if density is not None and target_recall is not None:
        raise ValueError(f"oracle: expected density or target_recall, not both; got {density!r} and {target_recall!r}")
    mass = block_scores(q, k, block_size=bs, mode="mass", causal=causal, scale=scale, backend=backend)
    allowed = geo.causal_block_mask(seq_len_q, seq_len_k, bs, causal=causal, device=q.device)
    forced = sel.forced_mask(seq_len_q, seq_len_k, bs, causal=causal, device=q.device)
    if target_recall is not None:
        recall = opt.check_fraction("oracle: target_recall", target_recall)
        keep = sel.select_by_cumulative_mass(mass, recall, allowed, forced=forced)
    else:
        frac = DEFAULT_DENSITY if density is None else opt.check_fraction("oracle: density", density)
        budget = torch.ceil(allowed.sum(-1) * frac - 1e-9).long()  # (Qb,) blocks per row
        extra = (budget - forced.sum(-1)).clamp_min(0)
        keep = sel.select_topk(mass, extra, allowed, forced=forced)
    if heads == "kv":
        keep = sel.group_heads(keep, num_kv_heads)
    return sel.to_layout(keep, seq_len_q, seq_len_k, bs)
