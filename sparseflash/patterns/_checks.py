"""Temporary helpers for minference/flexprefill/pbs until ``_common`` lands (then replaced by it)."""

from __future__ import annotations

import torch

from sparseflash._validate import check_tensor
from sparseflash.layout import _check_block_size, causal_block_mask, full_block_mask


def pattern_inputs(name: str, q: torch.Tensor, k: torch.Tensor, block_size: object, causal: object) -> tuple[int, int]:
    check_tensor("q", q, ndim=4)
    check_tensor("k", k, ndim=4)
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3] or k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(
            f"k: expected shape ({q.shape[0]}, num_kv_heads dividing {q.shape[1]}, seq_len_k, {q.shape[3]}) "
            f"(from q), got {tuple(k.shape)}"
        )
    if min(q.shape[2], k.shape[2]) == 0:
        raise ValueError(f"q, k: expected non-empty sequences, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if causal is not True:
        if causal is False:
            raise NotImplementedError(f"{name}: only causal prefill is supported (causal=True), got causal=False")
        raise ValueError(f"causal: expected True, got {causal!r}")
    return _check_block_size(block_size)


def positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def nonnegative_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}: expected a non-negative int, got {value!r}")
    return value


def fraction(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{name}: expected a float in (0, 1], got {value!r}")
    return float(value)


def diagonal_blocks(seq_len_q: int, seq_len_k: int, block_size: tuple[int, int], device) -> torch.Tensor:
    allowed = causal_block_mask(seq_len_q, seq_len_k, block_size, device=device)
    return allowed & ~full_block_mask(seq_len_q, seq_len_k, block_size, device=device)
