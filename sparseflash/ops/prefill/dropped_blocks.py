"""Coarse attention over the blocks a layout drops: each dropped key block stands in as one pooled token.

A block-sparse prefill renormalises the softmax over the kept blocks, so every row whose layout leaves out some
attention mass over-weights what it kept. This op gives each dropped block ``J`` of query row ``i`` one pooled
key and value, the block's mean key ``k̄_J`` and mean value ``v̄_J``, with logit ``scale * q_i . k̄_J + log n_J``
(``n_J`` keys in the block): the first-order estimate of the block's softmax mass
``sum_{j in J} exp(scale * q_i . k_j) ~ n_J exp(scale * q_i . k̄_J)`` (a lower bound, by Jensen's inequality)
and of its value average. Merged with the sparse result by log-sum-exp
(:func:`sparseflash.ops.merge.merge_attention_states`), the row's normaliser and output account for the dropped
mass instead of ignoring it (the "compression branch" of NSA-style attention, applied to the complement of a
selection).

Only whole blocks strictly before each row's diagonal blocks are eligible (every key of such a block is visible
to every query of the row under bottom-right causality), so causality holds exactly. Cost: ``Sq * Kb * d`` MACs
per head (``block_k / 2`` times less than causal attention; 1.6 % of it at block 128, d = 64). On CUDA one fused
Triton kernel (:mod:`sparseflash.ops.prefill.dropped_blocks_kernel`) computes it from the block means in one
pass; on the CPU (``backend='torch'``) PyTorch matmuls over query chunks.
"""

from __future__ import annotations

import math

import torch

from sparseflash._validate import check_backend, check_qkv, check_scale
from sparseflash.layouts import BlockLayout

_CHUNK_ROWS = 4096  # query rows per matmul chunk (bounds the (Hq, rows, Kb) float32 logits)


def block_means(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over key blocks: ``(B, H, Kb, D)`` float32 means and ``(Kb,)`` float32 key counts (last block ragged)."""
    batch, heads, seq, dim = x.shape
    num_blocks = -(-seq // block)
    padded = torch.nn.functional.pad(x.float(), (0, 0, 0, num_blocks * block - seq))
    sums = padded.view(batch, heads, num_blocks, block, dim).sum(3)
    # built on the device: assigning the ragged count from Python would be a host-to-device copy (a sync)
    starts = torch.arange(num_blocks, device=x.device) * block
    counts = (seq - starts).clamp(max=block).float()
    return sums / counts[:, None], counts


def eligible_dropped(layout: BlockLayout) -> torch.Tensor:
    """Bool ``(B or 1, H, Qb, Kb)``: blocks the layout drops that lie wholly before each row's first query.

    Row ``I`` (queries at absolute positions ``o + I * block_q ...``, ``o = Sk - Sq``) may take key block ``J``
    whole when the block's last key is ``<=`` the row's first query position.
    """
    bq, bk = layout.block_size
    offset = layout.seq_len_k - layout.seq_len_q
    device = layout.device
    first_query = torch.arange(layout.num_q_blocks, device=device) * bq + offset
    last_key = torch.clamp((torch.arange(layout.num_k_blocks, device=device) + 1) * bk, max=layout.seq_len_k) - 1
    whole = last_key[None, :] <= first_query[:, None]  # (Qb, Kb)
    return whole & ~layout.to_dense()


def check_pool_size(pool_size: object, block_k: int) -> int:
    """``pool_size`` checked against the layout's ``block_k`` (None: ``block_k``); raises ValueError/TypeError."""
    if pool_size is None:
        return block_k
    if isinstance(pool_size, bool) or not isinstance(pool_size, int):
        raise TypeError(f"pool_size: expected an int, got {type(pool_size).__name__} {pool_size!r}")
    if pool_size < 1 or pool_size & (pool_size - 1) or block_k % pool_size:
        raise ValueError(
            f"pool_size: expected a power of two dividing the layout's block_k = {block_k}, got {pool_size}"
        )
    return pool_size


def _pools_of(mask: torch.Tensor, per_block: int, num_pools: int) -> torch.Tensor:
    """A ``(..., Kb)`` block mask as a ``(..., Kp)`` pooled-token mask (each block's ``per_block`` pools)."""
    return mask.repeat_interleave(per_block, dim=-1)[..., :num_pools] if per_block > 1 else mask


def _per_query_head(mask: torch.Tensor, num_heads: int) -> torch.Tensor:
    """A (B, H', Qb, Kb) mask with H' in (1, Hkv, Hq) repeated onto the Hq query heads (group of ``h // G``)."""
    return mask if mask.shape[1] == num_heads else mask.repeat_interleave(num_heads // mask.shape[1], dim=1)


def dropped_block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    *,
    scale: float | None = None,
    pool_size: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of every query row over the pooled tokens of its dropped blocks (module docstring).

    Args:
        q: ``(B, Hq, Sq, D)``. k, v: ``(B, Hkv, Sk, D)``, ``Hq`` a multiple of ``Hkv``; fp16/bf16/fp32.
        layout: the :class:`~sparseflash.BlockLayout` the sparse attention used (heads 1, Hkv or Hq; batch 1 or B).
        scale: softmax scale, default ``1 / sqrt(D)``.
        pool_size: keys per pooled token, a power of two dividing the layout's ``block_k``; default ``block_k``
            (one pooled token per dropped block). Smaller pools estimate the dropped mass and values more
            closely (Jensen's gap shrinks with the spread of the logits inside a pool) for ``block_k / pool_size``
            times the work.
        backend: 'auto' (the Triton kernel on CUDA, PyTorch on the CPU), 'triton' (CUDA, or CPU tensors under
            ``TRITON_INTERPRET=1``) or 'torch'. The kernel reads float32 key means (split in two for fp16/bf16
            tensor-core dots) and value means in q's dtype; PyTorch works in float32.

    Raises:
        TypeError, ValueError: bad q/k/v (as :func:`sparseflash.flash_attention`), a layout that does not fit
            them or is a permuted one (its blocks index permuted keys), a layout with token columns, a bad
            ``scale``, ``pool_size`` or ``backend``.

    Returns:
        ``(out, lse)``: out ``(B, Hq, Sq, D)`` in q's dtype (0 on rows with no eligible dropped block), lse
        ``(B, Hq, Sq)`` float32 natural log (``-inf`` on those rows). Merge with the sparse result by
        :func:`~sparseflash.ops.merge.merge_attention_states`.
    """
    if not isinstance(layout, BlockLayout):  # a PermutedLayout indexes permuted keys
        raise TypeError(f"layout: expected a BlockLayout over the original keys, got {type(layout).__name__}")
    if layout.has_columns:  # a dropped block may hold attended columns: its pooled token would count them twice
        raise ValueError(
            "layout: expected a layout without token columns (col_counts/col_indices): dropped blocks would "
            "count the columns inside them twice"
        )
    check_qkv(q, k, v)
    layout.validate(q, k, check_indices=False)
    batch, num_heads, seq_q, dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    scale = check_scale(scale, dim)
    backend = check_backend(backend, q.device)
    bq, bk = layout.block_size
    pool = check_pool_size(pool_size, bk)
    k_mean, counts = block_means(k, pool)  # (B, Hkv, Kp, D)
    v_mean, _ = block_means(v, pool)
    if backend == "triton":
        from sparseflash.ops.prefill.dropped_blocks_kernel import dropped_blocks_triton

        return dropped_blocks_triton(
            q,
            k_mean,
            v_mean.to(q.dtype),
            layout.to_dense(),
            seq_len_k=k.shape[2],
            block_size=layout.block_size,
            pool_size=pool,
            scale=scale,
        )
    bias = torch.log(counts)  # (Kp,)
    dropped = _pools_of(_per_query_head(eligible_dropped(layout), num_heads), bk // pool, k_mean.shape[2])
    dropped = dropped.expand(batch, num_heads, -1, -1)
    out = torch.zeros(batch, num_heads, seq_q, dim, dtype=torch.float32, device=q.device)
    lse = torch.full((batch, num_heads, seq_q), -math.inf, dtype=torch.float32, device=q.device)
    km = k_mean.repeat_interleave(group, dim=1)  # (B, Hq, Kb, D): Kb << Sk, cheap
    vm = v_mean.repeat_interleave(group, dim=1)
    step = max(bq, _CHUNK_ROWS // bq * bq)
    for start in range(0, seq_q, step):
        stop = min(start + step, seq_q)
        rows = torch.arange(start, stop, device=q.device) // bq
        logits = torch.matmul(q[:, :, start:stop].float(), km.transpose(-1, -2)) * scale + bias
        mask = dropped[:, :, rows]  # (B, Hq, rows, Kp)
        logits = logits.masked_fill(~mask, -math.inf)
        chunk_lse = torch.logsumexp(logits, dim=-1)
        weights = torch.exp(logits - torch.where(torch.isfinite(chunk_lse), chunk_lse, 0.0)[..., None])
        # rows with no eligible block stay 0 even where a value mean is NaN (0 * NaN in the matmul)
        out[:, :, start:stop] = torch.matmul(weights, vm).masked_fill((chunk_lse == -math.inf)[..., None], 0.0)
        lse[:, :, start:stop] = chunk_lse
    return out.to(q.dtype), lse


def dropped_block_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    *,
    scale: float | None = None,
    pool_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 loop version of :func:`dropped_block_attention` (one row, head and block at a time; tests only)."""
    batch, num_heads, seq_q, dim = q.shape
    group = num_heads // k.shape[1]
    scale = dim**-0.5 if scale is None else scale
    bq, bk = layout.block_size
    pool = bk if pool_size is None else pool_size
    dropped = _per_query_head(eligible_dropped(layout), num_heads)
    out = torch.zeros(batch, num_heads, seq_q, dim, dtype=torch.float64)
    lse = torch.full((batch, num_heads, seq_q), -math.inf, dtype=torch.float64)
    for b in range(batch):
        for h in range(num_heads):
            kh, vh = k[b, h // group].double(), v[b, h // group].double()
            for i in range(seq_q):
                blocks = dropped[min(b, dropped.shape[0] - 1), h, i // bq].nonzero().flatten().tolist()
                pools = [(s, min(s + pool, k.shape[2])) for j in blocks for s in range(j * bk, (j + 1) * bk, pool)]
                pools = [(s, e) for s, e in pools if s < e]
                if not pools:
                    continue
                logit = torch.stack([q[b, h, i].double() @ kh[s:e].mean(0) * scale + math.log(e - s) for s, e in pools])
                p = torch.softmax(logit, 0)
                out[b, h, i] = sum(p[n] * vh[s:e].mean(0) for n, (s, e) in enumerate(pools))
                lse[b, h, i] = torch.logsumexp(logit, 0)
    return out, lse
