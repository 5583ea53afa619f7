"""Block-Sparse FlashAttention (BSFA, methods.md §2.5): exact block-max logits against calibrated thresholds.

BSFA decides inside its kernel: for each off-diagonal (query block ``I``, key block ``J``) tile it computes
``S = Q K^T``, takes the tile's maximum scaled logit and skips ``P V`` when it is below ``thr[layer, h, I]``,
a threshold calibrated offline for a target ``k`` (off-diagonal key tiles kept per row, on average).
sparseflash's kernels consume layouts, so here the block maxima are computed first (exact ``Q K^T`` of every
causal tile: :func:`~sparseflash.ops.scores.block_scores.block_scores`, Triton + PyTorch reference) and turned
into a layout: block ``(I, J)`` is kept iff its max logit ``>= thr[h, min(I, len - 1)]``; the diagonal
block(s) are always kept (BSFA always computes its masking tiles). The cost is the ``Q K^T`` half of dense
attention, so this method is judged by total time, not by selection overhead. Layout per query head.

Calibration (:func:`calibrate_block_max`, BSFA's ``thresholds/calibrate.py``): on a few (q, k) samples of one
layer, for every query head ``h`` and query block ``I``, sort the block maxima of the *valid* key blocks
(causal, not a diagonal block) descending ``v1 >= v2 >= ...``; the row's threshold is ``(v_k + v_{k+1}) / 2``,
or ``-inf`` (keep all) when the row has ``<= k`` valid blocks; the table is the mean over samples (rows past a
shorter sample's end take the mean of the samples that reach them). What it fits: one logit threshold per
(query head, query-block position) for this layer and this ``top_k``; the thresholds are logits, so they hold
for one model, one RoPE scaling and one context range (positions past the calibrated length reuse the last).

In-kernel path (:func:`block_max_attention`): BSFA's own design, with no separate ``Q K^T`` pass and no layout
built first: the prefill kernel's ``skip_threshold`` decides tile by tile after ``Q K^T``, against the row's
running maximum rather than an absolute calibrated logit (see its docstring for the differences).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sparseflash import _options as opt
from sparseflash._validate import check_qk
from sparseflash.layouts import BlockLayout
from sparseflash.layouts import geometry as geo
from sparseflash.ops.prefill.block_sparse import block_sparse_attention
from sparseflash.ops.prefill.dense import flash_attention
from sparseflash.ops.scores.block_scores import block_scores
from sparseflash.patterns import selection as sel
from sparseflash.patterns.registry import register

DEFAULT_BLOCK_SIZE = (128, 64)  # BSFA's tiles: 128 queries x 64 keys
DEFAULT_TOP_K = 64  # BSFA recommends k = 64-96 for general tasks, 32 for retrieval


@dataclass(frozen=True)
class BlockMaxCalibration:
    """Thresholds learned by :func:`calibrate_block_max` for one layer.

    Attributes:
        thresholds: float32 ``(Hq, Qb_max)`` logit thresholds (``-inf``: keep every block of that row).
        top_k: the target number of off-diagonal key blocks per row they were fitted for.
        block_size: ``(block_q, block_k)`` they were fitted with (must match the layout's).
        num_samples: how many (batch element) samples were averaged.
    """

    thresholds: torch.Tensor
    top_k: int
    block_size: tuple[int, int]
    num_samples: int

    def to(self, device: torch.device | str) -> BlockMaxCalibration:
        return BlockMaxCalibration(self.thresholds.to(device), self.top_k, self.block_size, self.num_samples)


def _valid_blocks(seq_len_q: int, seq_len_k: int, bs: tuple[int, int], device: torch.device) -> torch.Tensor:
    """Bool ``(Qb, Kb)``: causal blocks that are not diagonal blocks (BSFA's candidates)."""
    allowed = geo.causal_block_mask(seq_len_q, seq_len_k, bs, device=device)
    return allowed & ~geo.diagonal_mask(seq_len_q, seq_len_k, bs, device=device)


def row_thresholds(block_maxima: torch.Tensor, valid: torch.Tensor, top_k: int) -> torch.Tensor:
    """Per row, ``(v_k + v_{k+1}) / 2`` of the valid block maxima sorted descending (``-inf`` if ``<= k`` valid).

    Args:
        block_maxima: float ``(..., Qb, Kb)``.
        valid: bool broadcastable to ``block_maxima``.
        top_k: ``k >= 1``.

    Returns:
        float32 ``(..., Qb)``.
    """
    vals = torch.where(valid, block_maxima.float(), float("-inf"))
    num_k_blocks = vals.shape[-1]
    if top_k >= num_k_blocks:
        return torch.full(vals.shape[:-1], float("-inf"), device=vals.device)
    top = torch.topk(vals, top_k + 1, dim=-1).values
    count = valid.expand_as(vals).sum(-1)
    mid = (top[..., top_k - 1] + top[..., top_k]) / 2
    return torch.where(count > top_k, mid, float("-inf"))


def calibrate_block_max(
    samples: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    top_k: int = DEFAULT_TOP_K,
    block_size: tuple[int, int] = DEFAULT_BLOCK_SIZE,
    scale: float | None = None,
    backend: str = "auto",
) -> BlockMaxCalibration:
    """Learn BSFA thresholds for one layer from a small sample (module docstring).

    Args:
        samples: ``(q, k)`` pairs of this layer, q ``(B, Hq, S, D)``, k ``(B, Hkv, S, D)``; lengths may differ,
            heads must agree. Every batch element counts as one sample (BSFA uses 16).
        top_k: off-diagonal key blocks to keep per row on average (``>= 1``).
        block_size: ``(block_q, block_k)`` of the layouts the thresholds will build.
        scale: softmax scale, default ``1 / sqrt(D)``.
        backend: block-max backend, see :func:`~sparseflash.ops.scores.block_scores.block_scores`.

    Returns:
        A :class:`BlockMaxCalibration` on the samples' device.
    """
    top_k = opt.check_positive_int("calibrate_block_max: top_k", top_k)
    bs = opt.check_block_size("calibrate_block_max", block_size)
    if not isinstance(samples, Sequence) or len(samples) == 0:
        raise ValueError(f"samples: expected a non-empty list of (q, k) pairs, got {samples!r:.80}")
    per_sample: list[torch.Tensor] = []
    num_heads = None
    for idx, pair in enumerate(samples):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"samples[{idx}]: expected a (q, k) pair, got {type(pair).__name__}")
        q, k = pair
        _, hq, _, seq_len_q, seq_len_k, _ = check_qk("calibrate_block_max", q, k)
        if num_heads is not None and hq != num_heads:
            raise ValueError(f"samples[{idx}]: expected {num_heads} query heads (from samples[0]), got {hq}")
        num_heads = hq
        maxima = block_scores(q, k, block_size=bs, mode="max", scale=scale, backend=backend)
        valid = _valid_blocks(seq_len_q, seq_len_k, bs, q.device)
        per_sample.extend(row_thresholds(maxima, valid, top_k).unbind(0))  # each (Hq, Qb)
    longest = max(t.shape[-1] for t in per_sample)
    device = per_sample[0].device
    stacked = torch.full((len(per_sample), num_heads, longest), float("nan"), device=device)
    for i, t in enumerate(per_sample):
        stacked[i, :, : t.shape[-1]] = t.to(device)
    return BlockMaxCalibration(torch.nanmean(stacked, 0), top_k, bs, len(per_sample))


@register("block_max", kind="dynamic", heads="q")
def block_max(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: tuple[int, int] = DEFAULT_BLOCK_SIZE,
    causal: bool = True,
    calibration: BlockMaxCalibration | None = None,
    threshold: float | torch.Tensor | None = None,
    top_k: int | None = None,
    heads: str = "q",
    scale: float | None = None,
    backend: str = "auto",
) -> BlockLayout:
    """BSFA layout: keep block ``(I, J)`` iff its max logit reaches the row's threshold; diagonal always kept.

    Per query head by default (``heads="kv"``: union over each GQA group). Thresholds, first given wins:
    ``calibration`` (from :func:`calibrate_block_max`, per head and query-block position); ``threshold``
    (a logit: a float, or a tensor ``(Hq,)`` or ``(Hq, Qb_max)``); else ``top_k`` applied to this input
    itself (the calibration rule on the current sample: exactly the ``k`` best off-diagonal blocks per row,
    default 64).

    Args:
        q: ``(B, Hq, Sq, D)``. k: ``(B, Hkv, Sk, D)``.
        block_size: ``(block_q, block_k)``, BSFA's ``(128, 64)`` by default; must match the calibration's.
        causal: must be True (BSFA is causal prefill).
        calibration: thresholds learned on a sample.
        threshold: logit threshold(s) (natural units, scaled by ``scale``).
        top_k: off-diagonal blocks per row when neither of the above is given.
        heads: ``"q"`` or ``"kv"``.
        scale: softmax scale, default ``1 / sqrt(D)``.
        backend: block-max backend.
    """
    batch, num_heads, num_kv_heads, seq_len_q, seq_len_k, _ = check_qk("block_max", q, k)
    bs = opt.check_block_size("block_max", block_size)
    opt.check_causal("block_max", causal, causal_only=True)
    scale = opt.check_scale("block_max", scale)
    opt.check_backend_option("block_max", backend)
    opt.layout_heads("block_max", heads, num_heads, num_kv_heads)
    given = [n for n, v in (("calibration", calibration), ("threshold", threshold), ("top_k", top_k)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"block_max: expected one of calibration, threshold, top_k; got {given}")
    if calibration is not None:
        if not isinstance(calibration, BlockMaxCalibration):
            raise ValueError(
                f"block_max: calibration: expected a BlockMaxCalibration, got {type(calibration).__name__}"
            )
        if tuple(calibration.block_size) != bs:
            raise ValueError(
                f"block_max: block_size: expected {tuple(calibration.block_size)} (from the calibration), got {bs}"
            )
        table = calibration.thresholds
        if table.shape[0] != num_heads:
            raise ValueError(f"block_max: calibration: expected {num_heads} query heads (from q), got {table.shape[0]}")
    elif threshold is not None:
        table = _threshold_table(threshold, num_heads)
    maxima = block_scores(q, k, block_size=bs, mode="max", scale=scale, backend=backend)
    valid = _valid_blocks(seq_len_q, seq_len_k, bs, q.device)
    if calibration is None and threshold is None:
        k_rows = DEFAULT_TOP_K if top_k is None else opt.check_positive_int("block_max: top_k", top_k)
        thr = row_thresholds(maxima, valid, k_rows)  # (B, Hq, Qb)
    else:
        table = table.to(device=q.device, dtype=torch.float32)
        rows = torch.arange(maxima.shape[2], device=q.device).clamp(max=table.shape[1] - 1)
        thr = table[:, rows]  # (Hq, Qb), broadcast over batch
    keep = (maxima >= thr[..., None]) & valid
    keep = sel.force_blocks(keep, seq_len_q=seq_len_q, seq_len_k=seq_len_k, block_size=bs)
    if heads == "kv":
        keep = sel.group_heads(keep, num_kv_heads)
    return sel.to_layout(keep, seq_len_q, seq_len_k, bs)


def _threshold_table(threshold: object, num_heads: int) -> torch.Tensor:
    """A ``(Hq, Qb_max)`` table from a float, a ``(Hq,)`` or a ``(Hq, Qb_max)`` tensor."""
    if isinstance(threshold, (int, float)) and not isinstance(threshold, bool):
        return torch.full((num_heads, 1), float(threshold))
    if isinstance(threshold, torch.Tensor) and threshold.is_floating_point():
        if threshold.dim() == 1 and threshold.shape[0] == num_heads:
            return threshold[:, None]
        if threshold.dim() == 2 and threshold.shape[0] == num_heads and threshold.shape[1] >= 1:
            return threshold
    got = tuple(threshold.shape) if isinstance(threshold, torch.Tensor) else repr(threshold)
    raise ValueError(
        f"block_max: threshold: expected a float logit or a float tensor ({num_heads},) or "
        f"({num_heads}, Qb_max), got {got}"
    )


def block_max_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    skip_threshold: float | None,
    causal: bool = True,
    scale: float | None = None,
    layout: BlockLayout | None = None,
    backend: str = "auto",
    return_lse: bool = False,
    skip_stats: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """BSFA's in-kernel block skipping: attention that drops key tiles whose logits are far below the row's max.

    No separate ``Q K^T`` pass and no layout built first: the prefill kernel computes ``Q K^T`` of each key tile
    and, when every query row of its program has its tile maximum more than ``skip_threshold`` below its
    running maximum, skips the tile's V load, ``P V`` and softmax update. This is
    :func:`sparseflash.flash_attention` (or, with ``layout``, :func:`sparseflash.block_sparse_attention`, skipping
    on top of the layout's blocks) with ``skip_threshold``; their docstrings give the exact rule, the tiles that
    are never skipped (those needing a mask: the diagonal, the sequence end) and the visiting order.

    Relation to BSFA (methods.md §2.5), honestly stated:

    * BSFA's threshold is an *absolute* logit, calibrated offline per (layer, head, query-block position) for a
      target number of kept tiles (:func:`calibrate_block_max` fits those tables; :func:`block_max` applies them
      as a layout, with a separate exact block-max pass). Ours is *relative*: a tile is dropped when its max
      logit is below the running maximum minus ``skip_threshold``, i.e. when each of its probabilities is below
      ``exp(-skip_threshold)`` times the row's current top one. It needs no calibration and holds across
      models and positions, but does not target a number of kept tiles, and the number skipped depends on the
      input (a flat attention row skips nothing).
    * BSFA decides per 128-query x 64-key tile and walks key tiles from the diagonal backwards; the decision
      here is per kernel program (``block_m`` rows, which with GQA packing span the heads of a group) and key
      tiles are visited in ascending order (with a layout, in its order), so the running maximum at a tile
      depends on what came before it: the result depends on the visiting order and the tile geometry.
    * Both always compute the masked (diagonal) tiles and leave skipped tiles out of numerator and denominator.
    * Only the ``P V`` half of the work and the V traffic of skipped tiles are saved; ``Q K^T`` is always done.

    Args:
        q: (B, Hq, Sq, D); k, v: (B, Hkv, Sk, D); fp16/bf16 on the Triton path (float32 allowed on the PyTorch
            one, which replays the kernel's tile walk).
        skip_threshold: finite float >= 0, natural-log units of the scaled logits (None: exact attention, a
            baseline).
        causal, scale, backend, return_lse: as :func:`sparseflash.flash_attention`.
        layout: optional :class:`~sparseflash.BlockLayout` to skip within.
        skip_stats: optional int32 ``(2,)`` tensor on q's device receiving the key tiles skipped and visited.

    Returns:
        out (B, Hq, Sq, D) in q's dtype, and with ``return_lse`` the lse (B, Hq, Sq) float32.
    """
    kwargs = dict(causal=causal, scale=scale, backend=backend, return_lse=return_lse)
    kwargs.update(skip_threshold=skip_threshold, skip_stats=skip_stats)
    if layout is None:
        return flash_attention(q, k, v, **kwargs)
    return block_sparse_attention(q, k, v, layout, **kwargs)
