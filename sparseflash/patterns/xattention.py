"""XAttention (methods.md §2.1): antidiagonal scoring with stride ``S``, cumulative-mass threshold per head.

The estimate ``E[I, J]`` of each (query block, key block) mass comes from
:func:`sparseflash.ops.scores.antidiagonal.xattention_scores` (Triton, with its PyTorch reference beside it).

Selection. Per query-block row, the sink column (key block 0) and the diagonal block(s) are kept and their
mass counted first; the other causal blocks are added by decreasing ``E`` until the kept mass reaches
``threshold`` of the row total (the crossing block included), exactly XAttention's ``find_blocks_chunked``.
With the Triton backend and one layout per query head this runs as one kernel that searches the cut value
instead of sorting (:mod:`sparseflash.patterns.mass_select_kernel`); elsewhere in PyTorch.
"""

from __future__ import annotations

import torch

from sparseflash import _options as opt
from sparseflash._validate import check_backend, check_qk
from sparseflash.layouts import BlockLayout, with_columns
from sparseflash.ops.scores.antidiagonal import (  # noqa: F401  (re-exported: the estimator lives in ops/scores)
    DEFAULT_STRIDE,
    STRIDES,
    xattention_scores,
    xattention_scores_reference,
    xattention_scores_triton,
)
from sparseflash.ops.scores.last_queries import last_query_scores
from sparseflash.patterns import selection as sel
from sparseflash.patterns.mass_select_kernel import (
    fused_selection_fits,
    mass_select_layout_reference,
    mass_select_layout_triton,
)
from sparseflash.patterns.minference import vertical_columns
from sparseflash.patterns.registry import register

DEFAULT_THRESHOLD = 0.9  # xattn_estimate's scalar default
LAST_QUERIES = 64  # queries whose attention picks the ``columns`` (MInference's last_q)


@register("xattention", kind="dynamic", heads="q")
def xattention(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: tuple[int, int] = (128, 128),
    causal: bool = True,
    stride: int = DEFAULT_STRIDE,
    threshold: float | list[float] | None = None,
    target_recall: float | None = None,
    heads: str = "q",
    local_blocks: int = 0,
    extra_blocks: int = 0,
    columns: int = 0,
    scale: float | None = None,
    backend: str = "auto",
) -> BlockLayout:
    """XAttention layout: per query head by default (``heads="kv"``: union over each GQA group).

    Args:
        q: ``(B, Hq, Sq, D)``. k: ``(B, Hkv, Sk, D)``; ``Sq < Sk`` is chunked prefill (bottom-right).
        block_size: square, a multiple of ``stride`` (XAttention uses 128).
        causal: bottom-right causal (True) or full attention.
        stride: antidiagonal stride ``S`` (4, 8 or 16 in the paper; 16 default).
        threshold: cumulative-mass threshold in (0, 1], or one value in [0, 1] per query head (a row of
            XAttention's calibrated tables; 0 = sink + diagonal only). Default 0.9.
        target_recall: alternative to ``threshold``: the fraction of estimated mass each row keeps (for this
            selector the same number; give one or the other).
        heads: ``"q"`` (one layout per query head) or ``"kv"`` (per KV head: the union of the group's
            per-query-head selections, so density rises and recall does not drop).
        local_blocks: also force the key blocks just before each row's diagonal block (a local window of at
            least ``local_blocks * block`` keys for every query; their mass counts first, like the sink's).
            0 (default) is XAttention's rule.
        extra_blocks: per row, also keep this many next-best blocks after the threshold is reached. 0 (default)
            is the paper's rule; 1 is what the official code does in its first chunk (``methods.md`` §7).
        columns: also keep this many key tokens per head as token columns of the layout (MInference's vertical
            lines: the keys the last ``min(64, Sq)`` queries attend most, by
            :func:`~sparseflash.ops.scores.last_queries.last_query_scores`), gathered by the kernel in every query
            block that sees them and whose kept blocks do not already hold them. 0 (default) adds none. Each
            column costs ``1 / block_k`` of a block per query block.
        scale: softmax scale for the estimate, default ``1 / sqrt(D)``.
        backend: estimator backend, see :func:`xattention_scores`.

    Returns:
        A :class:`BlockLayout` ``(B, Hq or Hkv, Qb, Kb)``; with ``columns``, its token columns too.
    """
    batch, num_heads, num_kv_heads, seq_len_q, seq_len_k, _ = check_qk("xattention", q, k)
    stride = opt.check_stride("xattention: stride", stride, STRIDES)
    bs = opt.check_block_size("xattention", block_size, square=True, multiple_of=stride)
    opt.check_causal("xattention", causal)
    scale = opt.check_scale("xattention", scale)
    opt.check_backend_option("xattention", backend)
    opt.layout_heads("xattention", heads, num_heads, num_kv_heads)
    if isinstance(threshold, (list, tuple, torch.Tensor)):
        if target_recall is not None:
            raise ValueError("xattention: expected threshold or target_recall, not both")
        tau = opt.check_fractions("xattention: threshold", threshold, num_heads, q.device)
        tau = tau.view(num_heads, 1)  # per query head, broadcast over batch and rows
    else:
        tau = opt.resolve_threshold("xattention", threshold, target_recall, DEFAULT_THRESHOLD)
    est = xattention_scores(q, k, stride=stride, block_size=bs, causal=causal, scale=scale, backend=backend)
    local_blocks = opt.check_nonnegative_int("xattention: local_blocks", local_blocks)
    allowed, forced = sel.selection_geometry(
        seq_len_q, seq_len_k, bs, sink_blocks=1, local_blocks=local_blocks, causal=causal, device=q.device
    )
    extra_blocks = opt.check_nonnegative_int("xattention: extra_blocks", extra_blocks)
    columns = opt.check_nonnegative_int("xattention: columns", columns)
    geometry = dict(extra=extra_blocks, seq_len_q=seq_len_q, seq_len_k=seq_len_k, block_size=bs)
    if heads == "q" and check_backend(backend, q.device) == "triton" and fused_selection_fits(est, tau):
        layout = mass_select_layout_triton(est, tau, allowed, forced, **geometry)  # no sort, no bool mask
    elif heads == "q":
        layout = mass_select_layout_reference(est, tau, allowed, forced, **geometry)
    else:
        keep = sel.select_by_cumulative_mass(est, tau, allowed, forced=forced, extra=extra_blocks)
        layout = sel.to_layout(sel.group_heads(keep, num_kv_heads), seq_len_q, seq_len_k, bs)
    if not columns:
        return layout
    vert, _ = last_query_scores(
        q, k, num_queries=min(LAST_QUERIES, seq_len_q), causal=causal, scale=scale, slash=False, backend=backend
    )
    verticals = vert.topk(min(columns, seq_len_k), dim=-1, sorted=False).indices  # (B, Hq, c)
    if heads == "kv":
        verticals = verticals.reshape(batch, num_kv_heads, -1)  # the group's columns, together
    return with_columns(layout, vertical_columns(verticals, seq_len_q, seq_len_k, bs[0]), check=False)
