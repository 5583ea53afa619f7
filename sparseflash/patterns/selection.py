"""Selection helpers shared by the patterns: forced blocks, mass / top-k selection, GQA heads, the layout.

Every function here runs on the device of its inputs without host synchronisation (no ``.item()``,
``.cpu()``, ``.tolist()`` or Python branching on tensor values).

Shapes: ``mask`` is a bool block mask ``(..., Qb, Kb)`` (usually ``(B, H, Qb, Kb)``), ``Qb = ceil(Sq / block_q)``,
``Kb = ceil(Sk / block_k)``; the block geometry (causal blocks, diagonals) is :mod:`sparseflash.layouts.geometry`.
"""

from __future__ import annotations

import functools

import torch

from sparseflash._options import check_choice
from sparseflash.layouts.block import BlockLayout
from sparseflash.layouts.geometry import causal_block_mask, diagonal_mask


def forced_mask(
    seq_len_q: int,
    seq_len_k: int,
    block_size: tuple[int, int],
    *,
    diagonal: bool = True,
    sink_blocks: int = 0,
    local_blocks: int = 0,
    causal: bool = True,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Bool ``(Qb, Kb)``: the blocks a method always keeps, restricted to the causal-allowed ones.

    Args:
        diagonal: keep each row's diagonal block(s) (see :func:`diagonal_mask`).
        sink_blocks: keep key blocks ``0 .. sink_blocks-1`` (the attention sinks).
        local_blocks: keep the ``local_blocks`` key blocks just before each row's first diagonal block.
    """
    allowed = causal_block_mask(seq_len_q, seq_len_k, block_size, causal=causal, device=device)
    num_k_blocks = allowed.shape[1]
    cols = torch.arange(num_k_blocks, device=device)
    forced = (cols < sink_blocks)[None, :].expand_as(allowed).clone()
    diag = diagonal_mask(seq_len_q, seq_len_k, block_size, device=device)
    if diagonal:
        forced |= diag
    if local_blocks > 0:
        # first diagonal block of each row (Kb when the row has none: then nothing local is added)
        first_diag = torch.where(diag, cols[None, :], num_k_blocks).amin(-1)
        dist = first_diag[:, None] - cols[None, :]
        forced |= (dist >= 1) & (dist <= local_blocks)
    return forced & allowed


def selection_geometry(
    seq_len_q: int,
    seq_len_k: int,
    block_size: tuple[int, int],
    *,
    sink_blocks: int = 0,
    local_blocks: int = 0,
    causal: bool = True,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(allowed, forced)``: :func:`~sparseflash.layouts.geometry.causal_block_mask` and :func:`forced_mask` (with
    the diagonal), made once per shape, options and device and then shared: **read-only** bool ``(Qb, Kb)``.

    Built at every layer call they were about 70 small device ops, most of the selection's launches after the
    scoring kernel (Qwen2.5-Coder-1.5B at 16K on an H200: the selection was bound by the host there).
    """
    key = (int(seq_len_q), int(seq_len_k), tuple(block_size), int(sink_blocks), int(local_blocks), bool(causal))
    return _selection_geometry(*key, str(torch.device(device)))


@functools.lru_cache(maxsize=64)
def _selection_geometry(
    seq_len_q: int, seq_len_k: int, block_size: tuple[int, int], sink_blocks: int, local_blocks: int, causal: bool,
    device: str,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    allowed = causal_block_mask(seq_len_q, seq_len_k, block_size, causal=causal, device=device)
    forced = forced_mask(
        seq_len_q, seq_len_k, block_size, sink_blocks=sink_blocks, local_blocks=local_blocks, causal=causal,
        device=device,
    )  # fmt: skip
    return allowed, forced


def force_blocks(
    mask: torch.Tensor,
    *,
    seq_len_q: int,
    seq_len_k: int,
    block_size: tuple[int, int],
    diagonal: bool = True,
    sink_blocks: int = 0,
    local_blocks: int = 0,
    causal: bool = True,
) -> torch.Tensor:
    """``mask (..., Qb, Kb)`` with the forced blocks set and everything outside the causal blocks cleared."""
    allowed = causal_block_mask(seq_len_q, seq_len_k, block_size, causal=causal, device=mask.device)
    forced = forced_mask(
        seq_len_q,
        seq_len_k,
        block_size,
        diagonal=diagonal,
        sink_blocks=sink_blocks,
        local_blocks=local_blocks,
        causal=causal,
        device=mask.device,
    )
    return (mask | forced) & allowed


# ---------------------------------------------------------------------------------------------- selection


def _as_row_values(value: float | torch.Tensor, scores: torch.Tensor) -> float | torch.Tensor:
    """A scalar, or a tensor broadcast against ``scores.shape[:-1]`` with a trailing 1 added."""
    if isinstance(value, torch.Tensor):
        return value.to(device=scores.device, dtype=torch.float32).unsqueeze(-1)
    return float(value)


def select_by_cumulative_mass(
    scores: torch.Tensor,
    threshold: float | torch.Tensor,
    allowed: torch.Tensor | None = None,
    *,
    forced: torch.Tensor | None = None,
    extra: int = 0,
) -> torch.Tensor:
    """Per row, the smallest set of largest entries whose mass reaches ``threshold`` of the row's mass.

    Sort descending and keep entry ``m`` iff the mass before it is below ``threshold * total`` (the entry
    crossing the threshold is kept); zero-mass entries are never kept. With ``forced``, the forced entries'
    mass counts first (XAttention's rule: sink and diagonal are in, the rest fill up to the threshold) and the
    forced entries are in the result.

    Args:
        scores: ``(..., Kb)`` nonnegative scores (block masses or estimates), any float dtype.
        threshold: a float in ``[0, 1]`` or a tensor broadcastable to ``scores.shape[:-1]`` (e.g. per head
            ``(H, 1)`` for ``(B, H, Qb, Kb)`` scores).
        allowed: bool, broadcastable to ``scores``; entries outside are scored 0 (never kept, no mass).
        forced: bool, broadcastable to ``scores``; entries always kept, their mass counted first.
        extra: also keep this many next-largest entries of positive score after the threshold is reached
            (XAttention's official code keeps one more block per row in its first chunk, ``methods.md`` §7).

    Returns:
        Bool keep mask, the shape of ``scores``.
    """
    s = scores.float().clamp_min(0)
    if allowed is not None:
        s = torch.where(allowed, s, 0.0)
    total = s.sum(-1, keepdim=True)
    thr = _as_row_values(threshold, s)
    if forced is not None:
        forced = forced.expand_as(s)
        if allowed is not None:
            forced = forced & allowed
        acc = torch.where(forced, s, 0.0).sum(-1, keepdim=True)
        rest = torch.where(forced, 0.0, s)
    else:
        acc = torch.zeros_like(total)
        rest = s
    sorted_s, order = torch.sort(rest, dim=-1, descending=True)
    before = acc + torch.cumsum(sorted_s, dim=-1) - sorted_s
    keep_sorted = (before < thr * total) & (sorted_s > 0)
    if extra > 0:  # keep_sorted is a prefix of the sorted row: lengthen it by ``extra``
        rank = torch.arange(s.shape[-1], device=s.device)
        keep_sorted = (rank < keep_sorted.sum(-1, keepdim=True) + extra) & (sorted_s > 0)
    keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    if forced is not None:
        keep |= forced
    return keep


def select_topk(
    scores: torch.Tensor,
    k: int | torch.Tensor,
    allowed: torch.Tensor | None = None,
    *,
    forced: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per row, the ``k`` largest allowed entries (plus ``forced``, which do not count against ``k``).

    Args:
        scores: ``(..., Kb)`` float scores (any sign).
        k: an int ``>= 0`` or an integer tensor broadcastable to ``scores.shape[:-1]`` (per-row budgets).
        allowed: bool, broadcastable to ``scores``; entries outside are never kept (unless forced).
        forced: bool, broadcastable to ``scores``; entries always kept.

    Returns:
        Bool keep mask, the shape of ``scores``. Ties are broken by position (lower index first).
    """
    s = scores.float()
    eligible = torch.ones_like(s, dtype=torch.bool)
    if allowed is not None:
        eligible = eligible & allowed
    if forced is not None:
        eligible = eligible & ~forced
    s = torch.where(eligible, s, float("-inf"))
    num = s.shape[-1]
    if isinstance(k, int):
        kk = min(max(k, 0), num)
        keep = torch.zeros_like(eligible)
        if kk > 0:
            idx = torch.topk(s, kk, dim=-1, sorted=False).indices
            keep.scatter_(-1, idx, True)
        keep &= eligible
    else:
        order = torch.sort(s, dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(num, device=s.device).expand_as(order))
        keep = (rank < k.to(s.device).unsqueeze(-1)) & eligible
    if forced is not None:
        keep = keep | (forced if allowed is None else forced & allowed)
    return keep


# --------------------------------------------------------------------------- selection over the whole grid


def _flat_grid(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """A bool mask broadcastable to ``(..., Qb, Kb)`` as ``(..., Qb * Kb)`` (its leading dims kept)."""
    if mask.dim() < 2:
        mask = mask.reshape((1,) * (2 - mask.dim()) + tuple(mask.shape))
    return mask.expand(*mask.shape[:-2], *grid).flatten(-2)


def _grid_masks(
    scores: torch.Tensor, allowed: torch.Tensor | None, forced: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``scores (..., Qb, Kb)`` -> float32 ``(..., Qb*Kb)``; allowed/forced flattened the same way (forced &
    allowed)."""
    grid = (scores.shape[-2], scores.shape[-1])
    flat = scores.float().flatten(-2)
    allowed_f = None if allowed is None else _flat_grid(allowed.to(device=flat.device, dtype=torch.bool), grid)
    forced_f = None if forced is None else _flat_grid(forced.to(device=flat.device, dtype=torch.bool), grid)
    if forced_f is not None and allowed_f is not None:
        forced_f = forced_f & allowed_f
    return flat, allowed_f, forced_f


def select_topk_global(
    scores: torch.Tensor,
    k: int | torch.Tensor,
    allowed: torch.Tensor | None = None,
    *,
    forced: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per grid (the last two dims), the ``k`` largest allowed entries over the whole grid, plus ``forced``.

    The grid-wide counterpart of :func:`select_topk`: the budget is not split into rows, the ``k`` largest
    allowed, non-forced entries of the flattened ``Qb x Kb`` grid are kept (forced entries do not count against
    ``k``). One stable descending sort of each flattened grid: ``O(numel)`` memory, no host synchronisation.

    Args:
        scores: ``(..., Qb, Kb)`` float scores (any sign, any float dtype; compared in float32), usually
            ``(B, H, Qb, Kb)``.
        k: an int ``>= 0`` or an integer tensor broadcastable to ``scores.shape[:-2]`` (e.g. a 0-dim tensor,
            or one budget per head ``(H,)`` for ``(B, H, Qb, Kb)`` scores). A budget above the number of
            eligible entries keeps them all.
        allowed: bool, broadcastable to ``scores``; entries outside are never kept (unless forced).
        forced: bool, broadcastable to ``scores``; entries always kept (those inside ``allowed`` when given).

    Returns:
        Bool keep mask, the shape of ``scores``. Ties are broken by flat position (row-major: the lower query
        block first, then the lower key block).
    """
    s, allowed_f, forced_f = _grid_masks(scores, allowed, forced)
    eligible = torch.ones_like(s, dtype=torch.bool)
    if allowed_f is not None:
        eligible = eligible & allowed_f
    if forced_f is not None:
        eligible = eligible & ~forced_f
    s = torch.where(eligible, s, float("-inf"))
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    rank = torch.arange(s.shape[-1], device=s.device).expand_as(order)
    budget = k if isinstance(k, int) else k.to(device=s.device, dtype=torch.long).unsqueeze(-1)
    keep = torch.zeros_like(eligible).scatter_(-1, order, rank < budget) & eligible
    if forced_f is not None:
        keep = keep | forced_f
    return keep.view(scores.shape)


def select_by_cumulative_mass_global(
    scores: torch.Tensor,
    threshold: float | torch.Tensor,
    allowed: torch.Tensor | None = None,
    *,
    forced: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per grid (the last two dims), the fewest largest entries whose mass reaches ``threshold`` of the grid's.

    The grid-wide counterpart of :func:`select_by_cumulative_mass`: the forced entries' mass counts first,
    then entries are taken by decreasing score over the whole flattened ``Qb x Kb`` grid; entry ``m`` is kept
    iff the mass before it is below ``threshold * total`` (the entry crossing the threshold is kept) and its
    score is positive. With block masses of a dense softmax (every row has mass 1) the kept share of the
    total is the layout's mean row recall, so this is the smallest block set containing ``forced`` with a
    mean recall ``>= threshold``. Sums are accumulated in float64 (``O(numel)`` memory, no host sync).

    Args:
        scores: ``(..., Qb, Kb)`` nonnegative scores (negative ones count as 0), any float dtype.
        threshold: a float in ``[0, 1]`` or a tensor broadcastable to ``scores.shape[:-2]`` (e.g. per head
            ``(H,)`` for ``(B, H, Qb, Kb)`` scores).
        allowed: bool, broadcastable to ``scores``; entries outside are scored 0 (never kept, no mass).
        forced: bool, broadcastable to ``scores``; entries always kept, their mass counted first.

    Returns:
        Bool keep mask, the shape of ``scores``. Ties are broken by flat position (row-major).
    """
    s, allowed_f, forced_f = _grid_masks(scores, allowed, forced)
    s = s.clamp_min(0)
    if allowed_f is not None:
        s = torch.where(allowed_f, s, 0.0)
    total = s.sum(-1, keepdim=True, dtype=torch.float64)
    if isinstance(threshold, torch.Tensor):
        thr = threshold.to(device=s.device, dtype=torch.float64).unsqueeze(-1)
    else:
        thr = float(threshold)
    if forced_f is not None:
        acc = torch.where(forced_f, s, 0.0).sum(-1, keepdim=True, dtype=torch.float64)
        rest = torch.where(forced_f, 0.0, s)
    else:
        acc = torch.zeros_like(total)
        rest = s
    sorted_s, order = torch.sort(rest, dim=-1, descending=True, stable=True)
    before = acc + (torch.cumsum(sorted_s, dim=-1, dtype=torch.float64) - sorted_s.double())
    keep_sorted = (before < thr * total) & (sorted_s > 0)
    keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    if forced_f is not None:
        keep = keep | forced_f
    return keep.view(scores.shape)


# ------------------------------------------------------------------------------------- heads and layouts


def group_heads(mask: torch.Tensor, num_kv_heads: int, *, reduce: str = "union") -> torch.Tensor:
    """Per-query-head mask ``(B, Hq, Qb, Kb)`` onto KV heads ``(B, Hkv, Qb, Kb)``.

    Query head ``h`` belongs to KV head ``h // G`` (``G = Hq / Hkv``). ``reduce="union"`` keeps a block any
    head of the group keeps (density rises, recall never drops); ``"vote"`` keeps a block at least half the
    group keeps (re-force the diagonal afterwards).
    """
    batch, num_heads = mask.shape[:2]
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads: expected a divisor of {num_heads} (query heads), got {num_kv_heads}")
    check_choice("reduce", reduce, ("union", "vote"))
    grouped = mask.view(batch, num_kv_heads, num_heads // num_kv_heads, *mask.shape[2:])
    if reduce == "union":
        return grouped.any(2)
    return grouped.sum(2, dtype=torch.int32) * 2 >= grouped.shape[2]


def to_layout(
    mask: torch.Tensor,
    seq_len_q: int,
    seq_len_k: int,
    block_size: tuple[int, int],
    *,
    capacity: int | None = None,
) -> BlockLayout:
    """Compress a bool block mask ``(B, H, Qb, Kb)`` into a :class:`BlockLayout` (no host sync)."""
    return BlockLayout.from_dense(
        mask.contiguous(), seq_len_q=seq_len_q, seq_len_k=seq_len_k, block_size=block_size, capacity=capacity
    )
