"""Oracle: exact block importance from dense attention, the ceiling every selection method is measured against.

The block mass ``E[I, J] = sum_{i in I, j in J} P[i, j]`` of the dense (bottom-right causal) softmax ``P`` is
computed blockwise (:func:`~sparseflash.ops.scores.block_scores.block_scores` with ``mode="mass"``: the dense row
lse, then one ``Q K^T`` pass summing ``exp(s - lse)`` per block; never an ``Sq x Sk`` tensor). Every query row
that sees a key has mass 1, so for any block set of one (batch, head) layout the mean row recall (what
:func:`sparseflash.metrics.attention_recall` averages) is exactly the sum of the kept ``E`` over ``R = sum E``,
the number of such rows; the mean recall of query block ``I`` is ``sum_{kept J} E[I, J] / sum_J E[I, J]``.

**The upper bound: ``scope="global"``** (the default of the ``density`` rule). Per (batch, head) the oracle keeps
the forced blocks (the diagonal block(s) of every query-block row, as
:func:`~sparseflash.patterns.selection.forced_mask` gives them), then the largest-``E`` allowed blocks over the
whole ``Qb x Kb`` causal block grid, ``n = max(F, floor(density * A + 0.5))`` blocks in all (``A`` allowed
blocks, ``F`` forced ones: ``density * A`` rounded half up, never fewer than the forced blocks; ties broken by
position, row-major). The mean recall being the kept ``E`` over a constant, no layout of ``n`` blocks that keeps
the diagonal blocks has a higher mean attention recall: this is the **upper bound on recall at matched density**
(the same kept-block count per head, ``density = kept / A``) for every selector that keeps the diagonal blocks
(every :class:`BlockLayout` pattern here does; a ``PermutedLayout``'s blocks are over permuted keys, not covered).
With ``target_recall`` and ``scope="global"`` it keeps the fewest blocks (forced blocks counted first, then by
decreasing ``E`` over the grid) whose mass reaches ``target_recall * sum E``: a mean row recall
``>= target_recall`` at the least density any diagonal-keeping selector needs for it.

**Per row: ``scope="row"``** (the default of the ``target_recall`` rule; the only rule before ``scope``). Each
query-block row has its own budget: ``density`` keeps the ``max(F_I, ceil(density * A_I))`` largest blocks of
row ``I`` (diagonal included in the budget: the realised density is above the requested one, 0.16 for 0.1 on a
real model), ``target_recall`` the fewest blocks reaching that fraction of each row's mass, diagonal counted
first (so every query block's recall is ``>= target_recall``). A per-row budget is a constraint, not a ceiling:
at the same kept-block count it never has a higher mean recall than the global rule.

**One budget per layer: ``scope="layer"``.** The heads' grids stacked as one: the forced blocks of every head plus
the largest-``E`` allowed blocks over all heads, ``max(H F, floor(density * H A + 0.5))`` blocks in all (or the
fewest reaching ``target_recall`` of the layer's mass). Heads then get unequal budgets, as adaptive selectors give
them (XAttention's threshold keeps more blocks in a diffuse head than in a local one); the mean recall over heads
and rows is the kept ``E`` over ``H R``, so this is the upper bound at matched *mean* density, the one to compare a
method's recall with when its density is reported as a mean over heads (``benchmarks/bench_patterns.py`` does).

Layout per query head; ``heads="kv"`` takes the union over each GQA group *after* the selection, so the density
rises above the requested one (and the recall with it). Not a fast method: it costs more than dense attention.
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
SCOPE_CHOICES = ("global", "layer", "row")


@register("oracle", kind="dynamic", heads="q")
def oracle(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: tuple[int, int] = (128, 128),
    causal: bool = True,
    density: float | None = None,
    target_recall: float | None = None,
    scope: str | None = None,
    heads: str = "q",
    scale: float | None = None,
    backend: str = "auto",
) -> BlockLayout:
    """Exact top-mass blocks at a target ``density`` (default 0.1) or ``target_recall`` (give at most one).

    Args:
        q: ``(B, Hq, Sq, D)``. k: ``(B, Hkv, Sk, D)``; ``Sq < Sk`` is chunked prefill (bottom-right).
        block_size: ``(block_q, block_k)``.
        causal: bottom-right causal (True) or full attention.
        density: fraction in (0, 1] of the allowed blocks to keep: per head ``max(F, floor(density * A + 0.5))``
            blocks over the whole grid (``scope="global"``), or ``max(F_I, ceil(density * A_I))`` per
            query-block row ``I`` (``scope="row"``); ``A``/``F``: allowed/forced (diagonal) blocks.
        target_recall: fraction in (0, 1] of the dense softmax mass to keep: of each head's total mass, i.e. the
            mean row recall (``scope="global"``), or of each query-block row's mass (``scope="row"``).
        scope: ``"global"`` (the largest-mass blocks over each head's whole block grid: the upper bound on mean
            recall at matched density among diagonal-keeping layouts), ``"layer"`` (one budget over all heads
            of the layer: the bound at matched mean density), ``"row"`` (a budget per query-block row,
            the rule before ``scope`` existed), or None: ``"global"`` for the ``density`` rule (and the default
            density), ``"row"`` for ``target_recall`` (so existing ``target_recall`` configurations keep their
            per-row guarantee; pass ``scope="global"`` for the global rule).
        heads: ``"q"`` (per query head) or ``"kv"`` (per KV head: the union of the group's query-head
            selections, so the density rises above the requested one).
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
    opt.check_choice("oracle: scope", scope, (None, *SCOPE_CHOICES))
    if density is not None and target_recall is not None:
        raise ValueError(f"oracle: expected density or target_recall, not both; got {density!r} and {target_recall!r}")
    if target_recall is not None:
        recall = opt.check_fraction("oracle: target_recall", target_recall)
        scope = "row" if scope is None else scope
    else:
        frac = DEFAULT_DENSITY if density is None else opt.check_fraction("oracle: density", density)
        scope = "global" if scope is None else scope
    mass = block_scores(q, k, block_size=bs, mode="mass", causal=causal, scale=scale, backend=backend)
    allowed = geo.causal_block_mask(seq_len_q, seq_len_k, bs, causal=causal, device=q.device)
    forced = sel.forced_mask(seq_len_q, seq_len_k, bs, causal=causal, device=q.device)
    if scope == "layer":  # one budget over all heads of the layer: the grids of the heads stacked as one
        batch, heads_m, num_q_blocks, num_k_blocks = mass.shape
        stacked = mass.reshape(batch, 1, heads_m * num_q_blocks, num_k_blocks)
        allowed_l, forced_l = allowed.repeat(heads_m, 1), forced.repeat(heads_m, 1)
        if target_recall is not None:
            keep = sel.select_by_cumulative_mass_global(stacked, recall, allowed_l, forced=forced_l)
        else:
            budget = _global_budget(allowed_l, forced_l, frac)
            keep = sel.select_topk_global(stacked, budget, allowed_l, forced=forced_l)
        keep = keep.view(batch, heads_m, num_q_blocks, num_k_blocks)
    elif target_recall is not None:
        if scope == "global":
            keep = sel.select_by_cumulative_mass_global(mass, recall, allowed, forced=forced)
        else:
            keep = sel.select_by_cumulative_mass(mass, recall, allowed, forced=forced)
    elif scope == "global":
        keep = sel.select_topk_global(mass, _global_budget(allowed, forced, frac), allowed, forced=forced)
    else:
        budget = torch.ceil(allowed.sum(-1) * frac - 1e-9).long()  # (Qb,) blocks per row
        extra = (budget - forced.sum(-1)).clamp_min(0)
        keep = sel.select_topk(mass, extra, allowed, forced=forced)
    if heads == "kv":
        keep = sel.group_heads(keep, num_kv_heads)
    return sel.to_layout(keep, seq_len_q, seq_len_k, bs)


def _global_budget(allowed: torch.Tensor, forced: torch.Tensor, density: float) -> torch.Tensor:
    """Non-forced blocks the global rule keeps: ``max(F, floor(density * A + 0.5)) - F`` as a 0-dim int64 tensor.

    ``A = allowed.sum()``, ``F = forced.sum()`` (bool ``(Qb, Kb)`` masks, forced inside allowed); the product is
    taken in float64 (as Python would: a test can recompute the count), on the masks' device with no host sync.
    """
    total = torch.floor(allowed.sum().double() * density + 0.5).long()
    return (total - forced.sum()).clamp_min(0)
