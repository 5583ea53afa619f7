"""Plain-PyTorch reference of :mod:`sparseflash.ops.scores.last_queries` (materialises ``P``; the CPU path and the
test oracle), and the argument check both share."""

from __future__ import annotations

import torch

from sparseflash._validate import check_tensor


def check_last_query_args(q: torch.Tensor, k: torch.Tensor, num_queries: int, num_keys: int | None) -> tuple[int, int]:
    """Checks q/k and the counts of :func:`last_query_scores_reference` (and its Triton twin); returns
    ``(rows scored, num_keys)``: ``num_queries`` clipped to ``Sq``, ``num_keys`` defaulting to ``Sk``."""
    check_tensor("q", q, ndim=4)
    check_tensor("k", k, ndim=4)
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3] or q.shape[1] % k.shape[1]:
        raise ValueError(
            f"k: expected shape ({q.shape[0]}, num_kv_heads dividing {q.shape[1]}, seq_len_k, {q.shape[3]}) "
            f"(from q), got {tuple(k.shape)}"
        )
    if isinstance(num_queries, bool) or not isinstance(num_queries, int) or num_queries < 1:
        raise ValueError(f"num_queries: expected a positive int, got {num_queries!r}")
    seq_len_k = k.shape[2]
    num_keys = seq_len_k if num_keys is None else num_keys
    if isinstance(num_keys, bool) or not isinstance(num_keys, int) or not 0 <= num_keys <= seq_len_k:
        raise ValueError(f"num_keys: expected an int in [0, {seq_len_k}], got {num_keys!r}")
    return min(num_queries, q.shape[2]), num_keys


def last_query_scores_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    num_queries: int,
    num_keys: int | None = None,
    causal: bool = True,
    scale: float | None = None,
    slash: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Plain-PyTorch vertical and slash sums of the last ``num_queries`` softmax rows (module docstring).

    Args:
        q: (batch, num_heads, seq_len_q, head_dim). k: (batch, num_kv_heads, seq_len_k, head_dim).
        num_queries: rows scored (clipped to ``seq_len_q``).
        num_keys: keys inside the softmax, ``[0, num_keys)`` (default all).
        causal: mask keys after each query (bottom-right aligned).
        scale: softmax scale, default ``1 / sqrt(head_dim)``.
        slash: also return the diagonal sums.

    Returns:
        ``vert`` float32 (batch, num_heads, seq_len_k) and ``slash`` float32 (batch, num_heads, seq_len_k) or None.
    """
    rows, num_keys = check_last_query_args(q, k, num_queries, num_keys)
    batch, num_heads, seq_len_q, head_dim = q.shape
    num_kv_heads, seq_len_k = k.shape[1], k.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    group = num_heads // num_kv_heads
    vert = torch.zeros(batch, num_heads, seq_len_k, dtype=torch.float32, device=q.device)
    slash_out = torch.zeros_like(vert) if slash else None
    if num_keys == 0:
        return vert, slash_out
    q_last = q[:, :, seq_len_q - rows :].float().reshape(batch, num_kv_heads, group, rows, head_dim)
    k_used = k[:, :, :num_keys].float().unsqueeze(2)
    scores = torch.matmul(q_last, k_used.transpose(-1, -2)) * scale  # (B, Hkv, G, L, nk)
    i = torch.arange(rows, device=q.device)
    j = torch.arange(num_keys, device=q.device)
    if causal:
        scores = scores.masked_fill(j[None, :] > (seq_len_k - rows + i)[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with no key: all zero
    probs = probs.reshape(batch, num_heads, rows, num_keys)
    vert[..., :num_keys] = probs.sum(-2)
    if slash:
        # slash[c] = sum_i P[i, c - (L - 1 - i)]
        c = torch.arange(seq_len_k, device=q.device)
        src = c[None, :] - (rows - 1 - i)[:, None]  # (L, Sk)
        hit = (src >= 0) & (src < num_keys)
        gathered = probs.gather(-1, src.clamp(0, num_keys - 1).expand(batch, num_heads, rows, seq_len_k))
        slash_out = torch.where(hit, gathered, 0.0).sum(-2)
    return vert, slash_out
