"""Merge two partial attention results over disjoint key sets into the attention over their union."""

from __future__ import annotations

import torch

from sparseflash._validate import check_tensor


def merge_attention_states(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax merge of two (output, log-sum-exp) pairs computed over disjoint key sets.

    With ``lse = logaddexp(lse_a, lse_b)``: ``out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b``.
    A row empty in one part takes the other part unchanged; a row empty in both gives 0 and ``-inf``.

    Args:
        out_a, out_b: (batch, num_heads, seq_len, head_dim), same dtype.
        lse_a, lse_b: (batch, num_heads, seq_len) float32, natural log; ``-inf`` marks an empty row.

    Returns:
        out (batch, num_heads, seq_len, head_dim) in the inputs' dtype (combined in float32, float64 for
        float64 inputs) and lse float32.

    Raises:
        TypeError: a non-tensor argument or differing output dtypes.
        ValueError: shapes that do not match.
    """
    for name, t in (("out_a", out_a), ("out_b", out_b)):
        check_tensor(name, t, ndim=4)
    for name, t in (("lse_a", lse_a), ("lse_b", lse_b)):
        check_tensor(name, t, ndim=3)
    if out_b.shape != out_a.shape:
        raise ValueError(f"out_b: expected shape {tuple(out_a.shape)} (from out_a), got {tuple(out_b.shape)}")
    if out_b.dtype != out_a.dtype:
        raise TypeError(f"out_b: expected dtype {out_a.dtype} (from out_a), got {out_b.dtype}")
    for name, t in (("lse_a", lse_a), ("lse_b", lse_b)):
        if t.shape != out_a.shape[:3]:
            raise ValueError(f"{name}: expected shape {tuple(out_a.shape[:3])} (from out_a), got {tuple(t.shape)}")
    # float32 math, or float64 when the inputs are float64
    compute = torch.promote_types(torch.promote_types(out_a.dtype, lse_a.dtype), torch.float32)
    lse_a, lse_b = lse_a.to(compute), lse_b.to(compute)
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(lse == float("-inf"), 0.0, lse)
    w_a = torch.exp(lse_a - safe).unsqueeze(-1)  # exp(-inf) = 0 for an empty part
    w_b = torch.exp(lse_b - safe).unsqueeze(-1)
    out = w_a * out_a.to(compute) + w_b * out_b.to(compute)
    return out.to(out_a.dtype), lse.float()
