"""Block geometry of causal (bottom-right) attention: which blocks hold allowed pairs, full blocks, diagonals.

Shapes: ``Qb = ceil(Sq / block_q)`` query blocks, ``Kb = ceil(Sk / block_k)`` key blocks. Causality is
bottom-right aligned: query ``i`` sits at absolute position ``o + i`` with ``o = Sk - Sq`` and sees keys
``j <= o + i``. Every function runs on ``device`` without host synchronisation.
"""

from __future__ import annotations

import torch

SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128, 256)
DEFAULT_BLOCK_SIZE = (128, 128)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_block_size(block_size: object) -> tuple[int, int]:
    if isinstance(block_size, int):
        block_size = (block_size, block_size)
    if (
        not isinstance(block_size, (tuple, list))
        or len(block_size) != 2
        or any(not isinstance(b, int) or b not in SUPPORTED_BLOCK_SIZES for b in block_size)
    ):
        raise ValueError(
            f"block_size: expected (block_q, block_k) with each in {SUPPORTED_BLOCK_SIZES}, got {block_size!r}"
        )
    return int(block_size[0]), int(block_size[1])


def block_bounds(
    seq_len_q: int, seq_len_k: int, block_size: tuple[int, int], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query block, the keys every row sees and the keys some row sees (causal, bottom-right).

    Returns ``(all_see, any_see)``, each int64 ``(Qb,)``: keys ``[0, all_see)`` are visible to every query of
    the block, keys ``[0, any_see)`` to at least one (both clipped to ``[0, Sk]``).
    """
    first, last = row_positions(seq_len_q, seq_len_k, block_size, device=device)
    return (first + 1).clamp(0, seq_len_k), (last + 1).clamp(0, seq_len_k)


def causal_block_mask(
    seq_len_q: int,
    seq_len_k: int,
    block_size: tuple[int, int] = DEFAULT_BLOCK_SIZE,
    *,
    causal: bool = True,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Bool ``(Qb, Kb)``: blocks holding at least one allowed (query, key) pair."""
    block_k = block_size[1]
    num_k_blocks = _cdiv(seq_len_k, block_k)
    if not causal:
        return torch.ones(_cdiv(seq_len_q, block_size[0]), num_k_blocks, dtype=torch.bool, device=device)
    _, any_see = block_bounds(seq_len_q, seq_len_k, block_size, device)
    k_first = torch.arange(num_k_blocks, device=device) * block_k
    return k_first[None, :] < any_see[:, None]


def full_block_mask(
    seq_len_q: int,
    seq_len_k: int,
    block_size: tuple[int, int] = DEFAULT_BLOCK_SIZE,
    *,
    causal: bool = True,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Bool ``(Qb, Kb)``: blocks whose every (query, key) pair is allowed, so no element mask is needed."""
    block_q, block_k = block_size
    num_q_blocks, num_k_blocks = _cdiv(seq_len_q, block_q), _cdiv(seq_len_k, block_k)
    k_end = (torch.arange(num_k_blocks, device=device) + 1) * block_k
    if causal:
        all_see, _ = block_bounds(seq_len_q, seq_len_k, block_size, device)
    else:
        all_see = torch.full((num_q_blocks,), seq_len_k, device=device)
    return k_end[None, :] <= all_see[:, None]


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
