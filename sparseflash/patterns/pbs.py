"""``permuted``: PBS-Attn's permuted block-sparse selection (the layout and attention path live in layouts/ and ops/).

PBS-Attn (arXiv:2510.21270; xinghaow99/pbs-attn @8ce8e02, ``pbs.py``, ``permute_states.py``, ``utils.py``):
attention is invariant to permuting keys together with their values, so keys are reordered *inside fixed
segments* to gather each segment's important keys into few blocks, and a block selector then covers the
same attention mass with fewer blocks. Steps (``B`` = block size, ``S`` = segment size, a multiple of ``B``):

1. importance ``u[j]``: mean over the last ``B`` queries of their softmax over the keys of the complete
   segments ``[0, floor(N / S) * S)`` (no causal mask, as the release does);
2. permutation: inside each complete segment the keys are sorted by ``u`` descending; the trailing partial
   segment keeps its order. ``perm[p]`` is the original position of the key at slot ``p``;
3. selection on ``(Q, K' = K[perm])``: mean-pooled ``q_I . k'_J * scale`` softmaxed over the blocks of
   *earlier* segments; per row, the shortest descending prefix whose cumulative mass reaches ``threshold``
   (the crossing block included); the block of ``K'`` holding original token 0 (the sink) is forced; the
   query's own segment is always computed (dense, causal by original position).

The result is a :class:`~sparseflash.layouts.PermutedLayout`: a ``BlockLayout`` over the permuted keys plus
``perm`` (:mod:`sparseflash.layouts.permuted` says what its blocks mean). Running it::

    layout = sparseflash.patterns.select("permuted", q, k)        # a PermutedLayout (blocks + perm)
    out = sparseflash.permuted_block_sparse_attention(q, k, v, layout)   # output in the original query order

(:func:`sparseflash.block_sparse_attention` hands a ``PermutedLayout`` to it too;
:mod:`sparseflash.ops.prefill.permuted` runs two launches of the block-sparse kernel, off-diagonal segments over
``K'``/``V'`` and the diagonal segment over ``K``/``V``, merged exactly by log-sum-exp), or use
:meth:`~sparseflash.layouts.PermutedLayout.token_mask` for the equivalent token mask in original key order.

Layout heads: **per query head** (``H = num_heads``) by default; ``heads='kv'`` gives one layout per KV head
(the union over its group). The permutation is per query head by default (``permute_heads='q'``, the
release's behaviour: it expands K/V to the query heads, so ``K'``/``V'`` hold ``num_heads`` heads), or per KV
head (``permute_heads='kv'``: importance averaged over the group, ``K'``/``V'`` keep ``num_kv_heads`` heads,
GQA-friendly; identical for MHA; forced with ``heads='kv'``).

Differences from the release: ``seq_len_q == seq_len_k`` is required (as in the release) and short inputs
need no special case (``N <= S`` gives one segment, i.e. dense causal); pooled means are over real tokens of
a ragged last block; the release's kernel runs both stages in one launch, here they are two launches plus a
merge (the same blocks).

On the GPU (the Triton backend) the selection copies neither Q nor K: the pooled keys of ``K'`` are gathered by a
kernel (:mod:`sparseflash.patterns.permuted_means`) and step 3, from the block probabilities to the layout, is one
kernel without sort (:mod:`sparseflash.patterns.pbs_layout`, which states its tie rule); the PyTorch path (the
CPU's) is their reference.
"""

from __future__ import annotations

import torch

from sparseflash import _options as opt
from sparseflash._validate import check_qk
from sparseflash.layouts.permuted import DEFAULT_SEGMENT, PermutedLayout
from sparseflash.ops.scores.last_queries import last_query_scores
from sparseflash.patterns import selection as sel
from sparseflash.patterns.flexprefill import block_means
from sparseflash.patterns.pbs_layout import pbs_layout, segment_geometry
from sparseflash.patterns.permuted_means import (  # noqa: F401  (re-exported: the pooled keys of K')
    permuted_block_means,
    permuted_block_means_reference,
    permuted_block_means_triton,
)
from sparseflash.patterns.registry import register

DEFAULT_THRESHOLD = 0.9


def identity_perm(batch: int, heads: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """int64 (batch, heads, seq_len): every key in its place."""
    return torch.arange(seq_len, device=device).expand(batch, heads, seq_len).contiguous()


def segment_permutation(importance: torch.Tensor, segment_size: int) -> torch.Tensor:
    """Sort keys by importance, descending, inside each complete segment; the tail keeps its order.

    Args:
        importance: float (batch, heads, seq_len_k).

    Returns:
        int64 (batch, heads, seq_len_k): ``perm[p]`` = original position of the key at slot ``p``.
    """
    batch, heads, seq_len = importance.shape
    body_len = seq_len // segment_size * segment_size
    if not body_len:
        return identity_perm(batch, heads, seq_len, importance.device)
    body = importance[..., :body_len].reshape(batch, heads, -1, segment_size)
    order = body.argsort(dim=-1, descending=True, stable=True)
    order += torch.arange(0, body_len, segment_size, device=importance.device)[:, None]  # segment starts
    perm = order.view(batch, heads, body_len)
    if body_len < seq_len:
        tail = torch.arange(body_len, seq_len, device=importance.device).expand(batch, heads, -1)
        perm = torch.cat([perm, tail], dim=-1)
    return perm


@register("permuted", kind="dynamic", heads="q")
def permuted(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: tuple[int, int] = (128, 128),
    causal: bool = True,
    segment_size: int = DEFAULT_SEGMENT,
    threshold: float | None = None,
    target_recall: float | None = None,
    force_sink: bool = True,
    heads: str = "q",
    permute_heads: str | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> PermutedLayout:
    """PBS-Attn selection: a :class:`PermutedLayout` (per query head) with its key permutation.

    Defaults are the release's: block 128, segment 256, threshold 0.9, sink block forced.

    Args:
        q: (batch, num_heads, seq_len, head_dim), fp16/bf16/fp32. k: (batch, num_kv_heads, seq_len, head_dim).
        block_size: square ``(B, B)``.
        causal: must be True.
        segment_size: tokens per permutation segment, a positive multiple of ``B`` (default 256).
        threshold: cumulative mass each row's off-diagonal selection reaches, in (0, 1] (default 0.9).
        target_recall: synonym of ``threshold`` (give one or the other).
        force_sink: keep the block of ``K'`` holding original token 0 in every row.
        heads: 'q' (layout per query head, the release) or 'kv' (one layout per KV head: the union over its
            group, with a per-KV-head permutation).
        permute_heads: 'q' (one permutation per query head, the release: K'/V' get num_heads heads) or 'kv'
            (per KV head, importance averaged over the group; K'/V' keep num_kv_heads heads). Default: as
            ``heads``.
        scale: softmax scale, default ``1 / sqrt(head_dim)``.
        backend: 'auto', 'triton' or 'torch' for the importance scores, the pooled keys and the selection
            ('auto': Triton on CUDA).

    Returns:
        PermutedLayout: ``kv_num_blocks`` int32 (batch, num_heads, Qb) and ``perm`` int64
        (batch, num_heads or num_kv_heads, seq_len). Run it with :func:`permuted_block_sparse_attention`.

    Raises:
        ValueError: bad shapes, non-square blocks, a bad segment size, both ``threshold`` and
            ``target_recall``, or an option out of range.
        NotImplementedError: ``causal=False`` or ``seq_len_q != seq_len_k``.
    """
    name = "permuted"
    batch, num_heads, num_kv_heads, seq_len, seq_len_k, head_dim = check_qk(name, q, k)
    opt.check_causal(name, causal, causal_only=True)
    block_size = opt.check_block_size(name, block_size, square=True)
    scale = opt.check_scale(name, scale)
    opt.check_backend_option(name, backend)
    block = block_size[0]
    if (
        isinstance(segment_size, bool)
        or not isinstance(segment_size, int)
        or segment_size < block
        or segment_size % block
    ):
        raise ValueError(
            f"{name}: segment_size: expected a positive multiple of the block size {block}, got {segment_size!r}"
        )
    threshold = opt.resolve_threshold(name, threshold, target_recall, DEFAULT_THRESHOLD)
    opt.check_choice(f"{name}: force_sink", force_sink, (True, False))
    layout_heads = opt.layout_heads(name, heads, num_heads, num_kv_heads)
    permute_heads = heads if permute_heads is None else permute_heads
    opt.check_choice(f"{name}: permute_heads", permute_heads, opt.HEADS_CHOICES)
    if heads == "kv" and permute_heads == "q":
        raise ValueError(
            f"{name}: permute_heads: expected 'kv' with heads='kv' (one layout per KV head needs one "
            f"permutation per KV head), got {permute_heads!r}"
        )
    if seq_len_k != seq_len:
        raise NotImplementedError(
            f"{name}: PBS-Attn needs seq_len_q == seq_len_k (self-attention prefill), got {seq_len} and {seq_len_k}"
        )
    scale = head_dim**-0.5 if scale is None else scale
    device = q.device
    perm_heads = num_heads if permute_heads == "q" else num_kv_heads
    num_segments = seq_len // segment_size
    num_blocks = -(-seq_len // block)

    # 1-2. importance from the last block of queries, permutation inside complete segments
    if num_segments:
        vert, _ = last_query_scores(
            q,
            k,
            num_queries=block,
            num_keys=num_segments * segment_size,
            causal=False,
            scale=scale,
            slash=False,
            backend=backend,
        )
        if perm_heads != num_heads:
            vert = vert.view(batch, num_kv_heads, num_heads // num_kv_heads, seq_len).mean(2)
        perm = segment_permutation(vert, segment_size)
    else:
        perm = identity_perm(batch, perm_heads, seq_len, device)

    # 3. block selection on (Q, K') over earlier segments
    _, not_earlier, own = segment_geometry(seq_len, block, segment_size, str(device))  # (Qb, Kb), read-only
    if seq_len <= segment_size:  # a single segment: dense causal
        mask = own.expand(batch, layout_heads, -1, -1)
        return PermutedLayout(sel.to_layout(mask, seq_len, seq_len, block_size), perm, segment_size)
    k_mean = permuted_block_means(k, perm, block, backend=backend)  # (B, Hp, Kb, D), no K' copy
    q_mean = block_means(q, block) * scale  # (B, Hq, Qb, D)
    scores = torch.matmul(
        q_mean.view(batch, perm_heads, num_heads // perm_heads, num_blocks, head_dim),
        k_mean.unsqueeze(2).transpose(-1, -2),
    ).view(batch, num_heads, num_blocks, num_blocks)
    probs = torch.softmax(scores.masked_fill_(not_earlier, float("-inf")), dim=-1).nan_to_num_(0.0)
    sink_block = None
    if force_sink:
        sink_slot = (perm[..., :segment_size] == 0).int().argmax(-1)  # (B, Hp): slot of token 0
        sink_block = (sink_slot // block).repeat_interleave(num_heads // perm_heads, dim=1)  # (B, Hq)
    # the cumulative-mass blocks, the sink block, the own segment, the GQA union: one kernel (pbs_layout)
    blocks = pbs_layout(
        probs,
        threshold,
        sink_block,
        seq_len=seq_len,
        block=block,
        segment_size=segment_size,
        layout_heads=layout_heads,
        backend=backend,
    )
    return PermutedLayout(blocks, perm, segment_size)
