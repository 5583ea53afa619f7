"""The attention masks of a patched model: what :mod:`.forward` reads from transformers' 4-D masks.

* :func:`_mask_with_padding`: transformers' SDPA mask builder (registered under :data:`~.plan.ATTN_NAME` with
  ``AttentionMaskInterface``); a plain causal + padding mask it builds also carries the model's 2-D padding mask,
  bool (batch, seq_len_k), as the attribute :data:`_PAD_ATTR`.
* :func:`_padding_of`: a plain causal + padding mask parsed into per-sequence valid lengths and the padding side
  (left or right); parsed once per mask (one host sync) and cached on it as :data:`_LENS_ATTR` for the other layers.
* :func:`_window_mask`: the bool causal sliding-window mask of a layer longer than its window (``sdpa`` route).

No transformers import at module level: the mask builder imports it when called.
"""

from __future__ import annotations

from typing import Any

import torch

_PAD_ATTR = "_sparseflash_padding"  # on a 4-D mask built from causal + 2-D padding: the (B, Sk) bool mask
_LENS_ATTR = "_sparseflash_lens"  # on the same mask: the parsed padding (cached for the other layers)


def _mask_with_padding(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """transformers' SDPA mask builder; a plain causal + padding mask also carries its 2-D padding mask."""
    from transformers.masking_utils import causal_mask_function, prepare_padding_mask, sdpa_mask

    mask = sdpa_mask(*args, **kwargs)
    pad = kwargs.get("attention_mask")
    q_len, kv_len = kwargs.get("q_length"), kwargs.get("kv_length")
    plain = (
        kwargs.get("mask_function") is causal_mask_function
        and kwargs.get("local_size") is None
        and _is_zero(kwargs.get("q_offset", 0))
        and _is_zero(kwargs.get("kv_offset", 0))
    )
    if isinstance(mask, torch.Tensor) and plain and isinstance(pad, torch.Tensor) and pad.ndim == 2 and q_len == kv_len:
        pad = prepare_padding_mask(pad, kv_len, 0)
        if pad is not None and tuple(pad.shape) == (mask.shape[0], kv_len):
            setattr(mask, _PAD_ATTR, pad.to(torch.bool))
    return mask


def _is_zero(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value == 0


def _padding_of(mask: torch.Tensor, seq_len: int) -> tuple[list[int], torch.Tensor, str] | None:
    """``(lengths, lengths int32 (B,), "left" | "right")`` of a plain causal + padding mask, else None.

    Parsed once per mask (one host sync) and cached on the mask for the other layers.
    """
    cached = getattr(mask, _LENS_ATTR, None)
    if cached is not None:
        return cached or None
    pad = getattr(mask, _PAD_ATTR, None)
    result: tuple = ()
    if pad is not None and pad.shape[-1] == seq_len:
        lens = pad.sum(-1).to(torch.int32)
        pos = torch.arange(seq_len, device=pad.device)[None, :]
        left = torch.equal(pad, pos >= seq_len - lens[:, None])
        right = torch.equal(pad, pos < lens[:, None])
        if left or right:
            result = (lens.tolist(), lens, "left" if left else "right")
    setattr(mask, _LENS_ATTR, result)
    return result or None


def _window_mask(seq_len_q: int, seq_len_k: int, window: int, device: torch.device) -> torch.Tensor:
    """Bool (1, 1, Sq, Sk), causal window: query at p sees key j iff p - window < j <= p."""
    p = torch.arange(seq_len_q, device=device)[:, None] + (seq_len_k - seq_len_q)
    j = torch.arange(seq_len_k, device=device)[None, :]
    return ((j <= p) & (j > p - window))[None, None]
