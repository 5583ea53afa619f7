"""Building blocks shared by the selection methods: checks, forced blocks, mass/top-k selection, heads.

Every function here runs on the device of its inputs without host synchronisation (no ``.item()``,
``.cpu()``, ``.tolist()`` or Python branching on tensor values); the option checks run on Python values only.

Shapes: ``mask`` is a bool block mask ``(..., Qb, Kb)`` (usually ``(B, H, Qb, Kb)``), ``Qb = ceil(Sq / block_q)``,
``Kb = ceil(Sk / block_k)``. Causality is bottom-right aligned: query ``i`` sits at absolute position
``o + i`` with ``o = Sk - Sq`` and sees keys ``j <= o + i``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sparseflash._validate import check_tensor
from sparseflash.layouts.block import SUPPORTED_BLOCK_SIZES, BlockLayout, _cdiv, _check_block_size, causal_block_mask

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HEADS_CHOICES = ("q", "kv")

# ----------------------------------------------------------------------------------------- option checks


def check_qk(name: str, q: object, k: object) -> tuple[int, int, int, int, int, int]:
    """Validate q ``(B, Hq, Sq, D)`` and k ``(B, Hkv, Sk, D)`` for pattern ``name``.

    Returns:
        ``(batch, num_heads, num_kv_heads, seq_len_q, seq_len_k, head_dim)``.

    Raises:
        TypeError: a non-tensor or a non-floating dtype.
        ValueError: wrong rank, mismatched batch/head_dim/device, Hq not a multiple of Hkv, empty dims.
    """
    for arg, t in (("q", q), ("k", k)):
        check_tensor(arg, t, ndim=4)
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}: {arg}: expected a floating dtype (float16, bfloat16, float32), got {t.dtype}")
    batch, num_heads, seq_len_q, head_dim = q.shape
    num_kv_heads, seq_len_k = k.shape[1], k.shape[2]
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(
            f"{name}: k: expected shape ({batch}, num_kv_heads, seq_len_k, {head_dim}) (batch and head_dim "
            f"from q), got {tuple(k.shape)}"
        )
    if k.device != q.device:
        raise ValueError(f"{name}: k: expected device {q.device} (from q), got {k.device}")
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(
            f"{name}: q: expected num_heads a multiple of k's num_kv_heads={num_kv_heads}, got {num_heads}"
        )
    if min(batch, num_heads, seq_len_q, seq_len_k, head_dim) == 0:
        raise ValueError(f"{name}: q, k: expected non-empty dims, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    return batch, num_heads, num_kv_heads, seq_len_q, seq_len_k, head_dim


def check_causal(name: str, causal: object, *, causal_only: bool = False) -> bool:
    """``causal`` must be a bool; with ``causal_only`` only ``True`` (``NotImplementedError`` for False)."""
    if not isinstance(causal, bool):
        raise ValueError(f"{name}: causal: expected True or False, got {causal!r}")
    if causal_only and not causal:
        raise NotImplementedError(f"{name}: only causal prefill is supported (causal=True), got causal=False")
    return causal


def check_block_size(
    name: str,
    block_size: object,
    *,
    square: bool = False,
    multiple_of: int | None = None,
    allowed: Sequence[int] = SUPPORTED_BLOCK_SIZES,
) -> tuple[int, int]:
    """Validate ``block_size`` (int or ``(block_q, block_k)``) for pattern ``name``; return the pair.

    Args:
        square: require ``block_q == block_k`` (methods whose estimator works on square blocks).
        multiple_of: require both sizes to be multiples of this (e.g. XAttention's stride).
        allowed: sizes the method accepts (default: every size the kernels support).
    """
    pair = _check_block_size(block_size)
    if any(b not in allowed for b in pair):
        raise ValueError(f"{name}: block_size: expected sizes in {tuple(allowed)}, got {pair}")
    if square and pair[0] != pair[1]:
        raise ValueError(f"{name}: block_size: expected block_q == block_k (square blocks), got {pair}")
    if multiple_of is not None and any(b % multiple_of for b in pair):
        raise ValueError(f"{name}: block_size: expected multiples of {multiple_of} (the stride), got {pair}")
    return pair


def check_layout_block_size(name: str, layout: BlockLayout, block_size: object) -> None:
    """Raise unless ``layout`` was built with ``block_size`` (the 'block size not matching' error)."""
    pair = _check_block_size(block_size)
    if tuple(layout.block_size) != pair:
        raise ValueError(f"{name}: block_size: expected {tuple(layout.block_size)} (from the layout), got {pair}")


def check_fraction(name: str, value: object) -> float:
    """A float in ``(0, 1]`` (thresholds, densities, recalls); ``ValueError`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{name}: expected a float in (0, 1], got {value!r}")
    return float(value)


def check_fractions(
    name: str, value: object, num_heads: int, device: torch.device | str
) -> float | torch.Tensor:
    """A scalar in ``(0, 1]``, or one value per head (list, tuple or CPU tensor of ``num_heads`` values).

    Per-head values may also be ``0`` (XAttention's tables use 0 for "sink + diagonal only").

    Returns:
        The float, or a float32 tensor ``(num_heads,)`` on ``device``.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return check_fraction(name, value)
    if isinstance(value, torch.Tensor):
        if value.device.type != "cpu":
            raise ValueError(f"{name}: expected per-head values as a list or a CPU tensor, got a tensor on "
                             f"{value.device} (checking it would synchronise)")
        values = value.flatten().tolist()
        if value.dim() != 1:
            raise ValueError(f"{name}: expected {num_heads} per-head values (1-D), got shape {tuple(value.shape)}")
    elif isinstance(value, (list, tuple)):
        values = list(value)
    else:
        raise ValueError(f"{name}: expected a float in (0, 1] or {num_heads} per-head floats, got {value!r}")
    if len(values) != num_heads:
        raise ValueError(f"{name}: expected {num_heads} per-head values (one per layout head), got {len(values)}")
    if any(isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 <= x <= 1 for x in values):
        raise ValueError(f"{name}: expected per-head values in [0, 1], got {values}")
    return torch.tensor(values, dtype=torch.float32).to(device)


def check_positive_int(name: str, value: object) -> int:
    """An int ``>= 1`` (strides, block counts, top-k); ``ValueError`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    return value


def check_nonnegative_int(name: str, value: object) -> int:
    """An int ``>= 0`` (sink/local counts); ``ValueError`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}: expected an int >= 0, got {value!r}")
    return value


def check_stride(name: str, value: object, allowed: Sequence[int] | None = None) -> int:
    """A stride ``>= 1``, optionally one of ``allowed``."""
    stride = check_positive_int(name, value)
    if allowed is not None and stride not in allowed:
        raise ValueError(f"{name}: expected one of {tuple(allowed)}, got {value!r}")
    return stride


def check_choice(name: str, value: object, choices: Sequence[object]) -> object:
    """``value`` must be one of ``choices``."""
    if value not in choices or isinstance(value, bool) != any(isinstance(c, bool) for c in choices):
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")
    return value


BACKEND_CHOICES = ("auto", "triton", "torch")


def check_scale(name: str, scale: object) -> float | None:
    """A pattern's ``scale`` option: None (``1 / sqrt(head_dim)``) or a finite float > 0.

    Raises:
        TypeError: not a real number (or a bool).
        ValueError: NaN, infinite, zero or negative.
    """
    import math
    import numbers

    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{name}: scale: expected a finite float > 0 or None, got {type(scale).__name__} {scale!r}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{name}: scale: expected a finite float > 0 or None, got {scale!r}")
    return float(scale)


def check_backend_option(name: str, backend: object) -> str:
    """A pattern's ``backend`` option: one of :data:`BACKEND_CHOICES`."""
    if not isinstance(backend, str) or backend not in BACKEND_CHOICES:
        raise ValueError(f"{name}: backend: expected one of {BACKEND_CHOICES}, got {backend!r}")
    return backend


def resolve_threshold(
    name: str, threshold: object, target_recall: object, default: float
) -> float:
    """The cumulative-mass threshold from ``threshold`` or ``target_recall`` (at most one given).

    ``target_recall`` is the fraction of (estimated) attention mass each row must keep: for a cumulative-mass
    selector it is the threshold itself, so both map to the same number; a method whose threshold means
    something else converts it itself. Neither given: ``default``.
    """
    if threshold is not None and target_recall is not None:
        raise ValueError(f"{name}: expected threshold or target_recall, not both; got {threshold!r} and "
                         f"{target_recall!r}")
    if target_recall is not None:
        return check_fraction(f"{name}: target_recall", target_recall)
    if threshold is not None:
        return check_fraction(f"{name}: threshold", threshold)
    return default


# ------------------------------------------------------------------------------------------ block masks


def causal_allowed(
    seq_len_q: int,
    seq_len_k: int,
    block_size: tuple[int, int],
    *,
    causal: bool = True,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Bool ``(Qb, Kb)``: blocks holding at least one allowed (query, key) pair (all blocks if not causal)."""
    return causal_block_mask(seq_len_q, seq_len_k, block_size, causal=causal, device=device)


def row_positions(
    seq_len_q: int, seq_len_k: int, block_size: tuple[int, int], *, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absolute positions of each query-block row's first and last query: int64 ``(Qb,)`` each.

    Query ``i`` sits at ``Sk - Sq + i`` (bottom-right); positions may be negative when ``Sq > Sk``.
    """
    block_q = block_size[0]
    offset = seq_len_k - seq_len_q
    first = torch.arange(_cdiv(seq_len_q, block_q), device=device) * block_q
    last = torch.clamp(first + block_q, max=seq_len_q) - 1
    return first + offset, last + offset


def key_block_ranges(
    seq_len_k: int, block_size: tuple[int, int], *, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last key position of each key block (the last one clipped to ``Sk - 1``): int64 ``(Kb,)``."""
    block_k = block_size[1]
    first = torch.arange(_cdiv(seq_len_k, block_k), device=device) * block_k
    return first, torch.clamp(first + block_k, max=seq_len_k) - 1


def diagonal_mask(
    seq_len_q: int, seq_len_k: int, block_size: tuple[int, int], *, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Bool ``(Qb, Kb)``: the diagonal block(s) of each query-block row.

    Row ``I`` covers absolute positions ``o + I*block_q .. o + min((I+1)*block_q, Sq) - 1`` (``o = Sk - Sq``);
    its diagonal blocks are the key blocks holding any of those positions (one block when aligned, two
    otherwise). Positions before key 0 are clipped; a row wholly before key 0 (``Sq > Sk``) has none.
    """
    first_pos, last_pos = row_positions(seq_len_q, seq_len_k, block_size, device=device)
    k_first, k_last = key_block_ranges(seq_len_k, block_size, device=device)
    return (k_first[None, :] <= last_pos[:, None]) & (k_last[None, :] >= first_pos[:, None])


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
    allowed = causal_allowed(seq_len_q, seq_len_k, block_size, causal=causal, device=device)
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
    allowed = causal_allowed(seq_len_q, seq_len_k, block_size, causal=causal, device=mask.device)
    forced = forced_mask(seq_len_q, seq_len_k, block_size, diagonal=diagonal, sink_blocks=sink_blocks,
                         local_blocks=local_blocks, causal=causal, device=mask.device)
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


def group_scores(scores: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Per-query-head scores ``(B, Hq, ...)`` summed onto KV heads ``(B, Hkv, ...)`` (group of ``h // G``)."""
    batch, num_heads = scores.shape[:2]
    return scores.view(batch, num_kv_heads, num_heads // num_kv_heads, *scores.shape[2:]).sum(2)


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


def layout_heads(name: str, heads: object, num_heads: int, num_kv_heads: int) -> int:
    """Number of layout heads for a ``heads`` option (``"q"``: query heads, ``"kv"``: KV heads)."""
    check_choice(f"{name}: heads", heads, HEADS_CHOICES)
    return num_heads if heads == "q" else num_kv_heads
