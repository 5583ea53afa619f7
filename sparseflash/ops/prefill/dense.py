"""``flash_attention``: exact attention for prefill (FlashAttention-2 algorithm in Triton; SDPA on the CPU)."""

from __future__ import annotations

from typing import Literal, overload

import torch

from sparseflash._validate import (
    GPU_DTYPES,
    check_backend,
    check_grad,
    check_qkv,
    check_scale,
    check_seq_lens,
    check_skip,
)
from sparseflash.ops.prefill.reference import attention_torch, valid_range


@overload
def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = ...,
    scale: float | None = ...,
    return_lse: Literal[False] = ...,
    seq_lens: torch.Tensor | None = ...,
    padding_side: str = ...,
    backend: str = ...,
    skip_threshold: float | None = ...,
    skip_stats: torch.Tensor | None = ...,
) -> torch.Tensor: ...


@overload
def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = ...,
    scale: float | None = ...,
    return_lse: Literal[True],
    seq_lens: torch.Tensor | None = ...,
    padding_side: str = ...,
    backend: str = ...,
    skip_threshold: float | None = ...,
    skip_stats: torch.Tensor | None = ...,
) -> tuple[torch.Tensor, torch.Tensor]: ...


@overload
def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = ...,
    scale: float | None = ...,
    return_lse: bool = ...,
    seq_lens: torch.Tensor | None = ...,
    padding_side: str = ...,
    backend: str = ...,
    skip_threshold: float | None = ...,
    skip_stats: torch.Tensor | None = ...,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]: ...


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
    skip_threshold: float | None = None,
    skip_stats: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention, ``softmax(q k^T * scale) v``, without materialising the score matrix.

    Args:
        q: (batch, num_heads, seq_len_q, head_dim), fp16/bf16 (fp32 on the CPU path); any strides.
        k, v: (batch, num_kv_heads, seq_len_k, head_dim), same dtype and device; ``num_heads`` a multiple of
            ``num_kv_heads`` (GQA/MQA read K/V without copies).
        causal: mask aligned bottom-right: query ``i`` sees keys ``j <= i + seq_len_k - seq_len_q``.
        scale: softmax scale, default ``1 / sqrt(head_dim)``; finite, in ``(0, 1e18]``.
        return_lse: also return the natural-log log-sum-exp of each row.
        seq_lens: optional int32 (batch,) valid lengths of a padded batch (needs seq_len_q == seq_len_k);
            padded tokens neither attend nor are attended and their rows come out 0. Its values are checked
            on the host (one sync).
        padding_side: 'right' (valid tokens first) or 'left' (as transformers pads for generation).
        backend: 'auto' (Triton on CUDA, PyTorch on CPU), 'triton' or 'torch'. The PyTorch path runs
            ``torch.nn.functional.scaled_dot_product_attention`` when it computes the same function and no lse
            is wanted, else float32 chunks; it checks K/V for NaN on the host (one sync).
        skip_threshold: None (default: exact attention, the plain kernel) or a finite float >= 0 turning on
            in-kernel block skipping (Block-Sparse FlashAttention's design): after ``q k^T`` of a key tile that
            needs no mask, the tile is dropped (no V load, no ``P @ V``, left out of the softmax's numerator
            and denominator alike) when, for every query row of the program (its ``block_m`` rows, the rows
            past ``seq_len_q`` excepted), the largest scaled logit ``scale * q.k`` in the tile is below the
            row's running maximum over the tiles kept so far minus ``skip_threshold`` (natural-log units: each
            dropped probability is below ``exp(-skip_threshold)`` times the row's largest so far; a NaN maximum
            is never below). A program's key tiles are visited in ascending key order, so the first is never
            skipped; tiles needing the causal / sequence-end mask (around the diagonal, the last
            partial tile) are never skipped, nor is any tile with ``seq_lens`` (all of a padded batch's tiles
            are masked ones). The result is no longer exact attention and depends on the tile geometry
            (rows per program, keys per tile, packed GQA heads: ``launcher.tile_geometry``) and on the visiting
            order; the PyTorch path replays the same walk (:mod:`sparseflash.ops.prefill.reference_skip`).
            A skipped tile's values are never read (NaN there does not reach any row).
        skip_stats: optional int32 ``(2,)`` tensor on q's device (with ``skip_threshold`` only): the key tiles
            skipped and visited, summed over programs, are added to ``skip_stats[0]`` and ``skip_stats[1]``
            (int32: read and reset it every few calls at very long contexts).

    Autograd: only the 'torch' backend is differentiable. The Triton kernels have no backward, so a call that
    would build a graph on them (grad mode on and an input with ``requires_grad``) raises ``ValueError``: wrap
    inference in ``torch.no_grad()`` or pass ``backend='torch'``.

    Non-finite inputs: NaN/inf in keys or values a row does not attend (padding, keys past its causal horizon)
    never reach that row; a row attending one comes out non-finite.

    Returns:
        out (batch, num_heads, seq_len_q, head_dim) in q's dtype (from Triton, a view of
        (batch, seq_len_q, num_heads, head_dim) memory), and with ``return_lse`` the lse
        (batch, num_heads, seq_len_q) float32. A row with no key to attend gives 0 and lse -inf.

    Raises:
        TypeError: non-tensor inputs, non-float or mismatched dtypes, fp32 on the Triton path.
        ValueError: wrong ranks or shapes, num_heads not a multiple of num_kv_heads, head_dim not a multiple
            of 8 in [16, 256], mismatched devices, bad seq_lens / padding_side / backend / scale /
            skip_threshold / skip_stats, and inputs requiring grad on the Triton backend.
    """
    dims = check_qkv(q, k, v)
    skip_threshold = check_skip(skip_threshold, skip_stats, q.device)
    scale = check_scale(scale, dims.head_dim)
    check_seq_lens(seq_lens, dims, q.device, padding_side)
    backend = check_backend(backend, q.device)
    check_grad(backend, q=q, k=k, v=v)
    if backend == "torch" and skip_threshold is not None:  # the kernel's tile walk, replayed (float32)
        from sparseflash.ops.prefill.launcher import skip_attention_torch

        out, lse = skip_attention_torch(
            q,
            k,
            v,
            causal=causal,
            scale=scale,
            seq_lens=seq_lens,
            padding_side=padding_side,
            return_lse=return_lse,
            skip_threshold=skip_threshold,
            skip_stats=skip_stats,
        )
    elif backend == "torch":
        out = (
            None
            if return_lse
            else sdpa_attention(q, k, v, causal=causal, scale=scale, seq_lens=seq_lens, padding_side=padding_side)
        )
        if out is None:
            out, lse = attention_torch(
                q, k, v, causal=causal, scale=scale, seq_lens=seq_lens, padding_side=padding_side
            )
    else:
        if q.dtype not in GPU_DTYPES:
            raise TypeError(f"q: expected float16 or bfloat16 for the Triton kernel, got {q.dtype}")
        from sparseflash.ops.prefill.launcher import prefill_forward

        out, lse = prefill_forward(
            q,
            k,
            v,
            causal=causal,
            scale=scale,
            seq_lens=seq_lens,
            padding_side=padding_side,
            return_lse=return_lse,
            skip_threshold=skip_threshold,
            skip_stats=skip_stats,
        )
    return (out, lse) if return_lse else out


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    seq_lens: torch.Tensor | None = None,
    padding_side: str = "right",
) -> torch.Tensor | None:
    """:func:`flash_attention`'s output through ``scaled_dot_product_attention``, or None where it differs.

    SDPA's causal mask is top-left aligned, which equals ours for ``Sq == Sk``; ``Sq < Sk`` passes our
    bottom-right mask explicitly. None (use :func:`attention_torch`) for causal ``Sq > Sk`` (rows with no key,
    which SDPA does not define) and for a NaN/inf in the K/V it reads (SDPA would spread it to the rows before
    it through ``0 * NaN``). Padding is zeroed first and padded query rows attend everything, then come out 0,
    so no row is empty and gradients stay finite.
    """
    seq_len_q, seq_len_k = q.shape[2], k.shape[2]
    if causal and seq_len_q > seq_len_k:
        return None
    kwargs: dict = {"is_causal": causal and seq_len_q == seq_len_k}
    row_pad = None
    if seq_lens is not None:
        lo, hi = valid_range(seq_lens, seq_len_k, padding_side)
        pos = torch.arange(seq_len_k, device=q.device)
        valid = (pos >= lo[:, None]) & (pos < hi[:, None])  # (B, S)
        row_pad = ~valid[:, None, :, None]
        q, k, v = (t.masked_fill(row_pad, 0.0) for t in (q, k, v))  # padding is never read, whatever it holds
        mask = valid[:, None, None, :] | row_pad  # padded rows see every (zeroed) key: no empty row
        if causal:
            mask = mask & torch.ones(seq_len_q, seq_len_k, dtype=torch.bool, device=q.device).tril()
        kwargs = {"attn_mask": mask}
    elif causal and seq_len_q < seq_len_k:
        kwargs = {
            "attn_mask": torch.ones(seq_len_q, seq_len_k, dtype=torch.bool, device=q.device).tril(seq_len_k - seq_len_q)
        }
    if not bool(torch.isfinite(k).all() & torch.isfinite(v).all()):
        return None
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, scale=scale, enable_gqa=q.shape[1] != k.shape[1], **kwargs
    )
    return out if row_pad is None else out.masked_fill(row_pad, 0.0)
