"""``flash_attention``: exact attention for prefill (FlashAttention-2 algorithm in Triton)."""

from __future__ import annotations

import torch

from sparseflash._validate import GPU_DTYPES, check_backend, check_qkv, check_scale, check_seq_lens
from sparseflash.ops.reference import attention_torch


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    return_lse: bool = False,
    seq_lens: torch.Tensor | None = None,
    padding_side: str = "right",
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention, ``softmax(q k^T * scale) v``, without materialising the score matrix.

    Args:
        q: (batch, num_heads, seq_len_q, head_dim), fp16/bf16 (fp32 on the CPU path); any strides.
        k, v: (batch, num_kv_heads, seq_len_k, head_dim), same dtype and device; ``num_heads`` a multiple of
            ``num_kv_heads`` (GQA/MQA read K/V without copies).
        causal: mask aligned bottom-right: query ``i`` sees keys ``j <= i + seq_len_k - seq_len_q``.
        scale: softmax scale, default ``1 / sqrt(head_dim)``.
        return_lse: also return the natural-log log-sum-exp of each row.
        seq_lens: optional int32 (batch,) valid lengths of a padded batch (needs seq_len_q == seq_len_k);
            padded tokens neither attend nor are attended and their rows come out 0. Its values are checked
            on the host (one sync).
        padding_side: 'right' (valid tokens first) or 'left' (as transformers pads for generation).
        backend: 'auto' (Triton on CUDA, PyTorch on CPU), 'triton' or 'torch'.

    Returns:
        out (batch, num_heads, seq_len_q, head_dim) in q's dtype (from Triton, a view of
        (batch, seq_len_q, num_heads, head_dim) memory), and with ``return_lse`` the lse
        (batch, num_heads, seq_len_q) float32. A row with no key to attend gives 0 and lse -inf.

    Raises:
        TypeError: non-tensor inputs, non-float or mismatched dtypes, fp32 on the Triton path.
        ValueError: wrong ranks or shapes, num_heads not a multiple of num_kv_heads, head_dim not a multiple
            of 8 in [16, 256], mismatched devices, bad seq_lens / padding_side / backend / scale.
    """
    dims = check_qkv(q, k, v)
    scale = check_scale(scale, dims.head_dim)
    check_seq_lens(seq_lens, dims, q.device, padding_side)
    backend = check_backend(backend, q.device)
    if backend == "torch":
        out, lse = attention_torch(q, k, v, causal=causal, scale=scale, seq_lens=seq_lens,
                                   padding_side=padding_side)
    else:
        if q.dtype not in GPU_DTYPES:
            raise TypeError(f"q: expected float16 or bfloat16 for the Triton kernel, got {q.dtype}")
        from sparseflash.ops.prefill import prefill_forward

        out, lse = prefill_forward(q, k, v, causal=causal, scale=scale, seq_lens=seq_lens,
                                   padding_side=padding_side, return_lse=return_lse)
    return (out, lse) if return_lse else out
