"""The attention function a patched model calls: one route per call (``PatchState.calls`` counts them).

* ``sparse``: prefill of a full-attention layer whose method is a pattern, prompt >= ``min_sparse_len``:
  ``patterns.get(method).fn(q, k, **options)`` then :func:`sparseflash.block_sparse_attention`.
* ``dense``: the other prefills (``method="dense"``, dense layers, short prompts, sliding-window layers whose
  whole context fits in their window): :func:`sparseflash.flash_attention`.
* ``dense_sdpa``: those same dense prefills of a model patched with a pattern, on CUDA with ``backend="auto"``:
  transformers' SDPA, as the unpatched model (:func:`exact_by_sdpa`).
* ``decode``: one new token over the KV cache: :func:`sparseflash.ops.decode.decode_attention` (split-KV), or
  :func:`sparseflash.flash_attention` (exact under bottom-right causality) in builds without it.
* ``decode_sparse``: the same with ``decode="sparse"`` on a sparse layer: the pattern picks key blocks for the
  new token and the decode kernel reads only those (per KV head, the union of its query heads' blocks).
* ``dense_padded`` / ``sparse_padded``: prefill of a left- or right-padded batch (below).
* ``sdpa``: everything else, computed exactly as transformers' own SDPA does it (PyTorch, with the 4-D mask):
  decode steps of a padded batch, sliding-window layers longer than their window, chunked prefill over a
  cache, custom 4-D or packed-sequence masks, training (dropout or gradients: the kernels have no backward).

Padded batches (batch > 1): the per-sequence valid lengths come from the 2-D ``attention_mask`` the model
received (captured when transformers builds its causal mask, see :mod:`.masks`; one host sync per forward). A left- or
right-padded prefill of a full-attention layer goes through :func:`sparseflash.flash_attention` with
``seq_lens`` (dense layers) or prefills **each sequence on its own valid tokens** (sparse layers: one
pattern + kernel call per sequence, so each result equals that prompt run alone). Padded positions come out 0
(transformers leaves them unspecified). Masks the adapter cannot read as plain causal + padding go the
``sdpa`` route.

On CPU, ``backend="auto"`` runs the PyTorch paths of the same functions, so the patched model runs anywhere.
"""

from __future__ import annotations

from typing import Any

import torch

from sparseflash.integrations.hf.masks import _padding_of, _window_mask
from sparseflash.integrations.hf.plan import _LAYER_ATTR, ATTN_NAME, DENSE, LayerPlan, PatchState
from sparseflash.layouts.exact_rows import can_take_exact_rows, exact_row_count, with_exact_rows


# ------------------------------------------------------------------------------------ the attention function
def _select(
    plan: LayerPlan,
    q: torch.Tensor,
    k: torch.Tensor,
    scaling: float | None,
    backend: str,
) -> Any:
    """The layer's layout for (q, k), from the pattern function its plan resolved when the patch was made."""
    if plan.select is None:
        raise ValueError(f"layer {plan.layer_idx}: method {plan.method!r} has no selection (it runs dense)")
    options = dict(plan.options)
    if plan.pass_scale and scaling is not None:
        options["scale"] = scaling
    if plan.pass_backend:
        options["backend"] = backend
    return plan.select(q, k, **options)


def _sdpa(
    module: Any,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float | None,
    dropout: float,
    kwargs: dict[str, Any],
) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, q, k, v, mask, dropout=dropout, scaling=scaling, **kwargs)


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The function registered as :data:`ATTN_NAME` in transformers' ``AttentionInterface``.

    Args:
        module: the model's attention module (carries its :class:`LayerPlan` once patched).
        query: (batch, num_heads, seq_len_q, head_dim), after RoPE.
        key, value: (batch, num_kv_heads, seq_len_k, head_dim), the whole cache so far (GQA not repeated).
        attention_mask: None (plain causal) or transformers' bool (batch, 1, seq_len_q, seq_len_k) mask.
        scaling: softmax scale; dropout: attention dropout (training only; forces the ``sdpa`` route).
        **kwargs: ``sliding_window`` (the layer's window or None) and whatever else the model passes.

    Returns:
        ``(out, None)`` with out (batch, seq_len_q, num_heads, head_dim) contiguous, in query's dtype.
    """
    layer = getattr(module, _LAYER_ATTR, None)
    if layer is None:
        raise RuntimeError(
            f"attn_implementation {ATTN_NAME!r} is set, but {type(module).__name__} (layer "
            f"{getattr(module, 'layer_idx', '?')}) belongs to no model patched by sparseflash.patch"
        )
    state, plan = layer
    window = kwargs.get("sliding_window")
    seq_q, seq_k = query.shape[2], key.shape[2]
    grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    if (
        (dropout and module.training)
        or grad
        or kwargs.get("softcap") is not None
        or kwargs.get("is_causal", True) is False
        or not getattr(module, "is_causal", True)
    ):
        state.calls["sdpa"] += 1
        return _sdpa(module, query, key, value, attention_mask, scaling, dropout, kwargs)
    if attention_mask is None:
        if 1 < seq_q < seq_k:
            # prefill into an empty static cache: transformers' SDPA attends keys [0, seq_q) causally
            key, value, seq_k = key[:, :, :seq_q], value[:, :, :seq_q], seq_q
        if window is not None and seq_k > window:
            state.calls["sdpa"] += 1
            mask = _window_mask(seq_q, seq_k, window, query.device)
            return _sdpa(module, query, key, value, mask, scaling, dropout, kwargs)
        if seq_q == seq_k:
            if exact_by_sdpa(state, plan, seq_q, window, query.device.type):
                state.calls["dense_sdpa"] += 1
                if state.on_prefill is not None:
                    state.on_prefill(plan.layer_idx, 1.0)
                return _sdpa(module, query, key, value, None, scaling, dropout, kwargs)
            out = _prefill(state, plan, query, key, value, scaling, window)
        elif seq_q == 1:
            out = _decode(state, plan, query, key, value, scaling, window)
        else:
            state.calls["sdpa"] += 1
            return _sdpa(module, query, key, value, attention_mask, scaling, dropout, kwargs)
        return out.transpose(1, 2).contiguous(), None
    padding = _padding_of(attention_mask, seq_k) if seq_q == seq_k and window is None else None
    if padding is None:
        state.calls["sdpa"] += 1
        return _sdpa(module, query, key, value, attention_mask, scaling, dropout, kwargs)
    out = _prefill_padded(state, plan, query, key, value, scaling, padding)
    return out.transpose(1, 2).contiguous(), None


def exact_by_sdpa(state: PatchState, plan: LayerPlan, seq_q: int, window: int | None, device_type: str) -> bool:
    """Whether a dense prefill of a sparse patch goes to PyTorch's SDPA (the ``dense_sdpa`` route).

    A model patched with a pattern computes its dense prefills (dense layers, prompts shorter than
    ``min_sparse_len``, sliding-window layers whose context fits their window) exactly as the unpatched model
    would, with transformers' SDPA, on CUDA with ``backend="auto"``: no slower than not patching (our dense kernel
    is 0.88-0.94x of SDPA inside Qwen2.5-Coder-1.5B on an H200, README). ``patch(model, "dense")`` and
    ``backend="triton"`` keep sparseflash's own kernels.
    """
    return (
        device_type == "cuda"
        and state.backend == "auto"
        and state.method != DENSE
        and (plan.method == DENSE or window is not None or seq_q < state.min_sparse_len)
    )


def _prefill(
    state: PatchState,
    plan: LayerPlan,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scaling: float | None,
    window: int | None,
) -> torch.Tensor:
    from sparseflash.ops.prefill.block_sparse import block_sparse_attention
    from sparseflash.ops.prefill.dense import flash_attention

    if plan.method == DENSE or window is not None or q.shape[2] < state.min_sparse_len:
        state.calls["dense"] += 1
        if state.on_prefill is not None:
            state.on_prefill(plan.layer_idx, 1.0)
        return flash_attention(q, k, v, causal=True, scale=scaling, backend=state.backend)
    state.calls["sparse"] += 1
    layout = _select(plan, q, k, scaling, state.backend)
    # the last rows (the question and the answer prefix, whose hidden states give the first answer token) attend
    # every key exactly, rounded up to whole query blocks: O(tail * N) work. A plain layout takes them as fully
    # kept rows (one launch, those tiles among the others); token columns or permuted keys: a dense call after.
    tail = exact_row_count(layout, state.dense_last_queries)
    folded = tail > 0 and can_take_exact_rows(layout)
    if folded:
        layout = with_exact_rows(layout, tail)
    if state.approximate_dropped:
        from sparseflash.ops.merge import merge_attention_states
        from sparseflash.ops.prefill.dropped_blocks import dropped_block_attention

        out, lse = block_sparse_attention(
            q,
            k,
            v,
            layout,
            causal=True,
            scale=scaling,
            check_indices=False,
            return_lse=True,
            backend=state.backend,
        )
        out, _ = merge_attention_states(
            out,
            lse,
            *dropped_block_attention(
                q,
                k,
                v,
                layout,
                scale=scaling,
                pool_size=None if state.approximate_dropped is True else state.approximate_dropped,
                backend=state.backend,
            ),
        )
    else:
        out = block_sparse_attention(
            q, k, v, layout, causal=True, scale=scaling, check_indices=False, backend=state.backend
        )
    if tail > 0 and not folded:
        out[:, :, -tail:] = flash_attention(q[:, :, -tail:], k, v, causal=True, scale=scaling, backend=state.backend)
    if state.on_prefill is not None:
        pool = state.approximate_dropped
        pool = (layout.block_size[1] if pool is True else pool) if pool else None
        state.on_prefill(plan.layer_idx, _work_density(layout, 0 if folded else tail, pool))
    return out


def _work_density(layout: Any, tail: int, pool: int | None = None) -> torch.Tensor:
    """The layout's causal block density plus ``tail`` exact rows over all keys and its token columns (a column of a
    query block is ``block_q`` pairs: ``1 / block_k`` of a block), in causal-block units (<= 1). With ``pool``
    (``approximate_dropped``'s keys per pooled token) every eligible dropped block adds its pooled tokens, ``1 /
    pool`` of a block each block.

    Returns a 0-dim float64 tensor on the layout's device, computed without a host sync (reading it syncs), so the
    ``on_prefill`` hook does not stall the forward it observes.
    """
    from sparseflash.layouts import causal_block_mask

    layout = getattr(layout, "blocks", layout)  # a PermutedLayout computes its BlockLayout over permuted keys
    bq, bk = layout.block_size
    allowed_mask = causal_block_mask(layout.seq_len_q, layout.seq_len_k, (bq, bk), device=layout.device)
    allowed = allowed_mask.sum(dtype=torch.float64).clamp_min(1.0)
    kept = (layout.to_dense() & allowed_mask).sum(dtype=torch.float64) / (layout.batch * layout.num_heads)
    extra = tail * layout.seq_len_k / (bq * bk)
    if getattr(layout, "has_columns", False):
        columns_per_head = layout.col_counts.sum(dtype=torch.float64) / (layout.batch * layout.num_heads)
        kept = kept + columns_per_head / bk
    if pool:
        from sparseflash.ops.prefill.dropped_blocks import eligible_dropped

        dropped = eligible_dropped(layout).sum(dtype=torch.float64) / (layout.batch * layout.num_heads)
        kept = kept + dropped / pool
    return ((kept + extra) / allowed).clamp_max(1.0)


def _decode(
    state: PatchState,
    plan: LayerPlan,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scaling: float | None,
    window: int | None,
) -> torch.Tensor:
    """One new token per sequence over the whole cache (batch rows all of length seq_len_k)."""
    from sparseflash.ops.decode.api import decode_attention as kernel

    sparse = state.decode == "sparse" and plan.method != DENSE and window is None and k.shape[2] >= state.min_sparse_len
    lens = torch.full((q.shape[0],), k.shape[2], dtype=torch.int32, device=q.device)
    if sparse:
        state.calls["decode_sparse"] += 1
        indices, counts, block = _decode_block_lists(
            _select(plan, q, k, scaling, state.backend), q.shape[0], q.shape[1], k.shape[1]
        )
        return kernel(
            q,
            k,
            v,
            lens,
            scale=scaling,
            kv_block_indices=indices,
            kv_block_counts=counts,
            block_size=block,
            check_values=False,
            backend=state.backend,
        )
    state.calls["decode"] += 1
    return kernel(q, k, v, lens, scale=scaling, check_values=False, backend=state.backend)


def _decode_block_lists(
    layout: Any, batch: int, num_heads: int, num_kv_heads: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A one-query-block layout as the decode kernel's per-KV-head block lists.

    Returns ``(indices (B, Hkv, Kb) int32, counts (B, Hkv) int32, block_k)``; a per-query-head layout gives
    each KV head the union of its query heads' blocks. No host sync.
    """
    return layout.to_block_lists(batch=batch, num_heads=num_heads, num_kv_heads=num_kv_heads)


def _prefill_padded(
    state: PatchState,
    plan: LayerPlan,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scaling: float | None,
    padding: tuple[list[int], torch.Tensor, str],
) -> torch.Tensor:
    """Prefill of a left/right-padded batch: dense with ``seq_lens``, sparse one sequence at a time."""
    from sparseflash.ops.prefill.dense import flash_attention

    lengths, lens, side = padding
    seq_len = q.shape[2]
    if all(n == seq_len for n in lengths):
        return _prefill(state, plan, q, k, v, scaling, None)
    if plan.method == DENSE or max(lengths) < state.min_sparse_len:
        state.calls["dense_padded"] += 1
        return flash_attention(
            q, k, v, causal=True, scale=scaling, seq_lens=lens, padding_side=side, backend=state.backend
        )
    state.calls["sparse_padded"] += 1
    out = torch.zeros_like(q)
    for b, n in enumerate(lengths):
        if n == 0:
            continue
        lo = seq_len - n if side == "left" else 0
        rows = slice(lo, lo + n)
        out[b : b + 1, :, rows] = _prefill(
            state, plan, q[b : b + 1, :, rows], k[b : b + 1, :, rows], v[b : b + 1, :, rows], scaling, None
        )
    return out
