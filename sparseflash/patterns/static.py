"""Static patterns (methods.md §2.7): ``dense``, ``streaming`` (A-shape), ``sliding_window``, ``strided``.

They read only the shapes of q and k, never their values, and return **one layout shared by every batch
element and head** (``B = H = 1`` in the layout; the kernels broadcast it). Token-level rules are mapped to
blocks by keeping every block that holds at least one (query, key) pair the rule allows, so boundary blocks are
computed whole (the layout is a superset of the token rule; the kernel masks only causality).

Positions are bottom-right aligned: query ``i`` of a chunk sits at absolute position ``p = Sk - Sq + i``.
"""

from __future__ import annotations

import math

import torch

from sparseflash import _options as opt
from sparseflash._validate import check_qk
from sparseflash.layouts import BlockLayout
from sparseflash.layouts import geometry as geo
from sparseflash.patterns import selection as sel
from sparseflash.patterns.registry import register


def _shared_layout(
    mask: torch.Tensor, seq_len_q: int, seq_len_k: int, block_size: tuple[int, int], capacity: int | None = None
) -> BlockLayout:
    num_k_blocks = mask.shape[-1]
    cap = None if capacity is None else max(1, min(capacity, num_k_blocks))
    return sel.to_layout(mask[None, None], seq_len_q, seq_len_k, block_size, capacity=cap)


def _token_band_blocks(
    seq_len_q: int, seq_len_k: int, block_size: tuple[int, int], window: int, sink: int, device: torch.device
) -> torch.Tensor:
    """Bool ``(Qb, Kb)``: blocks holding a pair with ``0 <= p - j < window`` or ``j < sink, j <= p``."""
    first_pos, last_pos = geo.row_positions(seq_len_q, seq_len_k, block_size, device=device)
    k_first, k_last = geo.key_block_ranges(seq_len_k, block_size, device=device)
    a, b = first_pos.clamp_min(0)[:, None], last_pos[:, None]  # queries before key 0 see nothing
    js, je = k_first[None, :], k_last[None, :]
    # p - j over the block's pairs spans [a - je, b - js]; it must meet [0, window - 1]
    band = (a - je <= window - 1) & (b - js >= 0) & (b >= a)
    sinks = (js < sink) & (js <= b) & (b >= a)
    return band | sinks


@register("dense", kind="static", heads="shared")
def dense(
    q: torch.Tensor, k: torch.Tensor, *, block_size: tuple[int, int] = (128, 128), causal: bool = True
) -> BlockLayout:
    """Every block with at least one allowed pair (all blocks when not causal). Shared by all heads.

    Args:
        q: ``(B, Hq, Sq, D)``; only its shape and device are read.
        k: ``(B, Hkv, Sk, D)``.
        block_size: ``(block_q, block_k)``.
        causal: bottom-right causal (default) or full attention.

    Returns:
        A :class:`BlockLayout` with ``B = H = 1``.
    """
    _, _, _, seq_len_q, seq_len_k, _ = check_qk("dense", q, k)
    bs = opt.check_block_size("dense", block_size)
    opt.check_causal("dense", causal)
    mask = geo.causal_block_mask(seq_len_q, seq_len_k, bs, causal=causal, device=q.device)
    return _shared_layout(mask, seq_len_q, seq_len_k, bs)


@register("streaming", kind="static", heads="shared")
def streaming(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: tuple[int, int] = (128, 128),
    causal: bool = True,
    sink_tokens: int = 128,
    local_tokens: int = 3968,
) -> BlockLayout:
    """StreamingLLM / MInference A-shape: each query ``p`` sees keys ``[0, sink_tokens)`` and ``(p - local_tokens, p]``.

    Defaults are MInference's A-shape (128 sink + 3968 local = 4K keys per query). Row ``I`` keeps the blocks
    ``0 .. ceil(sink_tokens / block_k) - 1`` and the band of blocks ending at its diagonal that the local window
    touches. Shared by all heads (layout ``B = H = 1``).

    Args:
        q: ``(B, Hq, Sq, D)``; only its shape and device are read.
        k: ``(B, Hkv, Sk, D)``.
        block_size: ``(block_q, block_k)``.
        causal: must be True (the pattern is defined causally).
        sink_tokens: leading keys every query sees (``>= 0``).
        local_tokens: window of the most recent keys, the query's own position included (``>= 1``).
    """
    _, _, _, seq_len_q, seq_len_k, _ = check_qk("streaming", q, k)
    bs = opt.check_block_size("streaming", block_size)
    opt.check_causal("streaming", causal, causal_only=True)
    sink = opt.check_nonnegative_int("streaming: sink_tokens", sink_tokens)
    local = opt.check_positive_int("streaming: local_tokens", local_tokens)
    mask = _token_band_blocks(seq_len_q, seq_len_k, bs, local, sink, q.device)
    cap = math.ceil(sink / bs[1]) + math.ceil((local + bs[0]) / bs[1]) + 2
    return _shared_layout(mask, seq_len_q, seq_len_k, bs, cap)


@register("sliding_window", kind="static", heads="shared")
def sliding_window(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: tuple[int, int] = (128, 128),
    causal: bool = True,
    window: int = 4096,
) -> BlockLayout:
    """Sliding window (Mistral style): query ``p`` sees keys ``(p - window, p]``; the diagonal band of blocks.

    Shared by all heads (layout ``B = H = 1``). ``window = 4096`` is Mistral's default.

    Args:
        q: ``(B, Hq, Sq, D)``; only its shape and device are read.
        k: ``(B, Hkv, Sk, D)``.
        block_size: ``(block_q, block_k)``.
        causal: must be True.
        window: keys per query, its own position included (``>= 1``).
    """
    _, _, _, seq_len_q, seq_len_k, _ = check_qk("sliding_window", q, k)
    bs = opt.check_block_size("sliding_window", block_size)
    opt.check_causal("sliding_window", causal, causal_only=True)
    window = opt.check_positive_int("sliding_window: window", window)
    mask = _token_band_blocks(seq_len_q, seq_len_k, bs, window, 0, q.device)
    cap = math.ceil((window + bs[0]) / bs[1]) + 2
    return _shared_layout(mask, seq_len_q, seq_len_k, bs, cap)


@register("strided", kind="static", heads="shared")
def strided(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: tuple[int, int] = (128, 128),
    causal: bool = True,
    stride: int | None = None,
    local_blocks: int | None = None,
    sink_blocks: int = 0,
) -> BlockLayout:
    """Sparse Transformer's strided pattern at block level (a block-dilated layout), shared by all heads.

    Row ``I`` with diagonal block(s) ending at ``D`` (the key block of its last query) keeps:
    the diagonal block(s); the ``local_blocks`` blocks just before them (Sparse Transformer's head type 1,
    window ``l``); the blocks ``D - m * stride`` for ``m >= 1`` (head type 2, every ``l``-th key with ``l`` a
    multiple of the block, so whole block columns); and blocks ``0 .. sink_blocks - 1``.
    Sparse Transformer takes ``l ~ sqrt(N)``: here ``stride`` defaults to ``ceil(sqrt(Kb))`` blocks and
    ``local_blocks`` to ``stride``, so a row holds about ``2 sqrt(Kb)`` blocks (``O(N sqrt N)`` work).
    ``sink_blocks`` (default 0, not in the paper) adds attention sinks.

    Args:
        q: ``(B, Hq, Sq, D)``; only its shape and device are read.
        k: ``(B, Hkv, Sk, D)``.
        block_size: ``(block_q, block_k)``.
        causal: must be True.
        stride: dilation in key blocks (``>= 1``; 1 keeps every causal block).
        local_blocks: dense blocks before the diagonal (``>= 0``).
        sink_blocks: leading key blocks always kept (``>= 0``).
    """
    _, _, _, seq_len_q, seq_len_k, _ = check_qk("strided", q, k)
    bs = opt.check_block_size("strided", block_size)
    opt.check_causal("strided", causal, causal_only=True)
    num_k_blocks = -(-seq_len_k // bs[1])
    stride = math.ceil(math.sqrt(num_k_blocks)) if stride is None else opt.check_stride("strided: stride", stride)
    local = stride if local_blocks is None else opt.check_nonnegative_int("strided: local_blocks", local_blocks)
    sink = opt.check_nonnegative_int("strided: sink_blocks", sink_blocks)
    last_diag = _last_diagonal_block(seq_len_q, seq_len_k, bs, q.device)
    cols = torch.arange(num_k_blocks, device=q.device)
    dist = last_diag[:, None] - cols[None, :]
    dilated = (dist >= 0) & (dist % stride == 0)
    forced = sel.forced_mask(seq_len_q, seq_len_k, bs, sink_blocks=sink, local_blocks=local, device=q.device)
    mask = (dilated | forced) & geo.causal_block_mask(seq_len_q, seq_len_k, bs, device=q.device)
    cap = sink + local + 2 + math.ceil(bs[0] / bs[1]) + num_k_blocks // stride + 1
    return _shared_layout(mask, seq_len_q, seq_len_k, bs, cap)


def _last_diagonal_block(
    seq_len_q: int, seq_len_k: int, block_size: tuple[int, int], device: torch.device
) -> torch.Tensor:
    """Int64 ``(Qb,)``: key block of each row's last query position (negative for a row before key 0)."""
    _, last_pos = geo.row_positions(seq_len_q, seq_len_k, block_size, device=device)
    return torch.where(last_pos >= 0, last_pos // block_size[1], -1)
