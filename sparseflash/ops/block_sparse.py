"""``block_sparse_attention``: attention over the (query block, key block) tiles a layout keeps."""

from __future__ import annotations

import torch

from sparseflash._validate import GPU_DTYPES, check_backend, check_grad, check_qkv, check_scale, check_seq_lens
from sparseflash.layout import BlockLayout
from sparseflash.ops import reference


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    *,
    causal: bool = True,
    scale: float | None = None,
    return_lse: bool = False,
    seq_lens: torch.Tensor | None = None,
    padding_side: str = "right",
    check_indices: bool = True,
    pack_gqa: bool | None = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention that computes only the blocks ``layout`` keeps; time scales with the kept fraction.

    Same tensor conventions as :func:`sparseflash.flash_attention` (q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D),
    GQA, bottom-right causal, fp16/bf16, head dims 16-256).

    Args:
        layout: a :class:`sparseflash.BlockLayout` built for (Sq, Sk), batch 1 or B, heads 1, Hkv or Hq.
            The causal mask (and the sequence ends) are applied inside the blocks that need it only. A
            ``PermutedLayout`` (PBS-Attn) runs through :func:`sparseflash.permuted_block_sparse_attention`.
        seq_lens: optional int32 (B,) valid lengths of a padded batch (Sq == Sk); each sequence may have its
            own layout (layout batch B). Padded tokens neither attend nor are attended. Its values are checked
            on the host (one sync).
        check_indices: check the layout's index values before launch (one host sync); turn off for layouts
            from sparseflash's own patterns inside a captured graph.
        pack_gqa: pack the query heads of a GQA group into one tile so each K/V tile load serves the group
            (default: on for a layout shared by the group and a power-of-two group size).
        backend: 'auto' (Triton on CUDA, PyTorch on CPU), 'triton' or 'torch'. The PyTorch path gathers the
            kept key blocks of each query block (float32, a few query blocks at a time): its work scales with
            the kept fraction too. It reads the block counts on the host (one sync).

    Autograd: only the 'torch' backend is differentiable. The Triton kernels have no backward, so a call that
    would build a graph on them (grad mode on and an input with ``requires_grad``) raises ``ValueError``: wrap
    inference in ``torch.no_grad()`` or pass ``backend='torch'``.

    Non-finite inputs: dropped blocks are never read, and NaN/inf in padding or in keys past a row's causal
    horizon never reach that row; a row attending a non-finite value comes out non-finite.

    Returns:
        out (B, Hq, Sq, D) in q's dtype, and with ``return_lse`` lse (B, Hq, Sq) float32. A row with no kept
        block (or no allowed key in its kept blocks) gives 0 and lse -inf.

    Raises:
        TypeError: bad tensor types/dtypes, or a layout that is not a BlockLayout (``None`` included: use
            :func:`sparseflash.flash_attention` for dense attention).
        ValueError: shape/device mismatches, a layout that does not fit q and k, and inputs requiring grad on
            the Triton backend.
    """
    dims = check_qkv(q, k, v)
    if not isinstance(layout, BlockLayout):
        raise TypeError(
            f"layout: expected a sparseflash.BlockLayout (use flash_attention for dense attention), "
            f"got {type(layout).__name__}"
        )
    from sparseflash.patterns.pbs import PermutedLayout, permuted_block_sparse_attention

    if isinstance(layout, PermutedLayout):  # its key blocks index permuted keys: PBS-Attn's own two-pass path
        if not causal or seq_lens is not None:
            raise ValueError(
                "layout: a PermutedLayout (PBS-Attn) supports causal attention without seq_lens, "
                f"got causal={causal}, seq_lens={'given' if seq_lens is not None else None}"
            )
        return permuted_block_sparse_attention(q, k, v, layout, scale=scale, return_lse=return_lse, backend=backend)
    scale = check_scale(scale, dims.head_dim)
    check_seq_lens(seq_lens, dims, q.device, padding_side)
    layout.validate(q, k, check_indices=check_indices)
    backend = check_backend(backend, q.device)
    check_grad(backend, q=q, k=k, v=v)
    if backend == "torch":
        out, lse = block_sparse_torch(q, k, v, layout, causal=causal, scale=scale, seq_lens=seq_lens,
                                      padding_side=padding_side, return_lse=return_lse)
    else:
        if q.dtype not in GPU_DTYPES:
            raise TypeError(f"q: expected float16 or bfloat16 for the Triton kernel, got {q.dtype}")
        from sparseflash.ops.prefill import prefill_forward

        out, lse = prefill_forward(q, k, v, causal=causal, scale=scale, layout=layout, seq_lens=seq_lens,
                                   padding_side=padding_side, return_lse=return_lse, pack_gqa=pack_gqa)
    return (out, lse) if return_lse else out


def block_sparse_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    *,
    causal: bool,
    scale: float,
    seq_lens: torch.Tensor | None = None,
    padding_side: str = "right",
    return_lse: bool = True,
    max_scores: int = 2**23,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The PyTorch path: per run of query blocks, gather their kept key blocks and attend over those only.

    Query blocks go in runs whose score tensor ``(B, Hq, rows, kept keys)`` stays under ``max_scores``
    elements and wastes at most a quarter on rows keeping fewer blocks than the widest. Slots past a row's
    count, keys past Sk and masked keys are masked. Without ``return_lse`` a run goes through SDPA when what
    it gathered is finite; otherwise (and for the lse) through float32
    :func:`sparseflash.ops.reference.masked_attention`, which keeps non-finite values out of rows that do not
    attend them. Differentiable.

    Returns out (B, Hq, Sq, D) in q's dtype and lse (B, Hq, Sq) float32 (None without ``return_lse``).
    """
    widths = layout.kv_num_blocks.amax(dim=(0, 1)).clamp(1, layout.capacity).tolist()  # per query block
    block_q, block_k = layout.block_size
    per_block = q.shape[0] * q.shape[1] * block_q * block_k  # scores of one (query block, key block) pair
    # K/V as rows of whole key blocks (B * Hkv * Kb, block_k * D), the last block zero-padded: a gather copies
    # whole blocks (index_select of contiguous rows)
    pad = layout.num_k_blocks * block_k - k.shape[2]
    k_blocks, v_blocks = (torch.nn.functional.pad(t, (0, 0, 0, pad)).reshape(-1, block_k * t.shape[3])
                          for t in (k, v))
    outs, lses = [], []
    first = 0
    while first < len(widths):
        last, width = first + 1, widths[first]
        while last < len(widths):
            wider = max(width, widths[last])
            n = last + 1 - first
            if n * wider * per_block > max_scores or sum(widths[first : last + 1]) < 0.75 * n * wider:
                break
            last, width = last + 1, wider
        out, lse = _query_block_run(q, k_blocks, v_blocks, k.shape, layout, first, last, width, causal=causal,
                                    scale=scale, seq_lens=seq_lens, padding_side=padding_side,
                                    return_lse=return_lse)
        outs.append(out)
        lses.append(lse)
        first = last
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2) if return_lse else None


def _query_block_run(
    q: torch.Tensor,
    k_blocks: torch.Tensor,
    v_blocks: torch.Tensor,
    k_shape: torch.Size,
    layout: BlockLayout,
    first: int,
    last: int,
    width: int,
    *,
    causal: bool,
    scale: float,
    seq_lens: torch.Tensor | None,
    padding_side: str,
    return_lse: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Query blocks ``[first, last)`` over their first ``width`` kept key blocks: out and lse of their rows.

    The ``n = last - first`` query blocks join the batch dimension: q ``(B * n, Hq, block_q, D)`` against the
    gathered keys ``(B * n, heads, width * block_k, D)``, heads the KV heads when the layout is shared by each
    GQA group, else the query heads.
    """
    batch, num_heads, seq_len_q, head_dim = q.shape
    num_kv_heads, seq_len_k = k_shape[1], k_shape[2]
    block_q, block_k = layout.block_size
    n, device = last - first, q.device
    heads = num_kv_heads if layout.num_heads in (1, num_kv_heads) else num_heads

    def fold(t: torch.Tensor) -> torch.Tensor:  # (B or 1, H, n, ...) -> (B * n, H, ...)
        return t.expand(batch, *t.shape[1:]).transpose(1, 2).flatten(0, 1)

    # kept key blocks (Bl, Hl, n, width); unused slots read block 0 and are masked (zeroed if non-finite)
    used = torch.arange(width, device=device) < layout.kv_num_blocks[:, :, first:last, None]
    ids = layout.kv_indices[:, :, first:last, :width].long().masked_fill(~used, 0)
    pos = (ids[..., None] * block_k + torch.arange(block_k, device=device)).flatten(-2)  # (Bl, Hl, n, L)
    key_ok = used.repeat_interleave(block_k, dim=-1) & (pos < seq_len_k)
    q_pos = (first * block_q + torch.arange(n * block_q, device=device)).view(n, block_q)
    mask = key_ok[..., None, :] & (q_pos < seq_len_q)[:, :, None]  # (Bl, Hl, n, block_q, L)
    if causal:
        mask = mask & (pos[..., None, :] <= q_pos[:, :, None] + (seq_len_k - seq_len_q))
    if seq_lens is not None:
        lo, hi = (t.long() for t in reference.valid_range(seq_lens, seq_len_k, padding_side))
        in_range = lambda p, d: (p >= lo.view(-1, *[1] * d)) & (p < hi.view(-1, *[1] * d))  # noqa: E731
        mask = mask & in_range(pos, 3)[..., None, :] & in_range(q_pos, 2)[:, None, :, :, None]

    # rows of k_blocks to gather, (B * n, heads, width): row (b * Hkv + kv_head) * Kb + block id
    b_idx = torch.arange(batch, device=device).view(-1, 1, 1, 1)
    h_idx = (torch.arange(heads, device=device) * num_kv_heads // heads).view(1, -1, 1, 1)
    flat = fold((b_idx * num_kv_heads + h_idx) * layout.num_k_blocks + ids)
    k_sel, v_sel = (t.index_select(0, flat.flatten()).view(batch * n, heads, width * block_k, head_dim)
                    for t in (k_blocks, v_blocks))
    rows = q[:, :, first * block_q : last * block_q]
    rows = fold(torch.nn.functional.pad(rows, (0, 0, 0, n * block_q - rows.shape[2])).unflatten(2, (n, block_q)))
    mask = fold(mask)
    out = lse = None
    if not return_lse:
        out = _sdpa_run(rows, k_sel, v_sel, mask, fold(key_ok), scale)
    if out is None:
        out, lse = reference.masked_attention(rows.float(), k_sel.float(), v_sel.float(), mask, scale)
    real = min(last * block_q, seq_len_q) - first * block_q
    unfold = lambda t: t.unflatten(0, (batch, n)).transpose(1, 2).flatten(2, 3)[:, :, :real]  # noqa: E731
    return unfold(out).to(q.dtype), None if lse is None else unfold(lse)


def _sdpa_run(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, key_ok: torch.Tensor, scale: float
) -> torch.Tensor | None:
    """One run through SDPA: q (N, Hq, M, D), k/v (N, H, L, D), mask (N, 1 or H, M, L), key_ok (N, 1 or H, L).

    Slots no row may read hold junk (block 0, or the zero padding past Sk) and are zeroed when anything read is
    non-finite; None when a key/value a row may skip is still non-finite (SDPA would spread it through
    ``0 * NaN``: :func:`reference.masked_attention` handles that). Rows with nothing to attend see every slot,
    then come out 0, so SDPA meets no empty row.
    """

    def finite(*ts: torch.Tensor) -> bool:  # one pass each: a NaN/inf anywhere (or an overflow) shows in the sum
        return all(bool(torch.isfinite(t.sum(dtype=torch.float32))) for t in ts)

    if not finite(k, v):
        k, v = (t.masked_fill(~key_ok[..., None], 0.0) for t in (k, v))
        if not finite(k, v):
            return None
    if mask.shape[1] not in (1, q.shape[1]):
        mask = mask.repeat_interleave(q.shape[1] // mask.shape[1], dim=1)
    empty = ~mask.any(-1, keepdim=True)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask | empty, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
    return out.masked_fill(empty, 0.0)
