"""``vertical_slash``: MInference's Vertical-Slash pattern, estimated online and mapped onto blocks.

MInference 1.0 (Jiang et al., NeurIPS 2024, arXiv:2407.02490; microsoft/MInference @fb56c91,
``minference_forward.py``): per query head, the last 64 queries' softmax rows give a score per key column
(vertical) and per diagonal (slash). The ``vertical_size`` best columns and ``slash_size`` best diagonals
(token counts, default head config (1000, 6096)) are kept, with the first 30 keys (attention sinks) and the
100 nearest diagonals (local window) always in. ``vertical_size`` is raised to at least 30 and ``slash_size``
to at least 50, both capped at the key length, as MInference does.

Pipeline (score -> select -> layout):

1. :func:`sparseflash.ops.scores.last_queries.last_query_scores` (Triton on CUDA, PyTorch reference beside it);
2. :func:`vertical_slash_indices`: top-k columns and diagonals, the token-level index MInference's kernel uses;
3. :func:`vertical_slash_block_mask`: block ``(I, J)`` is kept iff some kept column or diagonal has an
   allowed (query, key) pair inside it. This is exactly the block union of the token pattern (a superset).

What the block layout loses against MInference's own index format (``block_count/block_offset`` of 64-key
tiles at *unaligned* token offsets plus ``column_count/column_index`` of single gathered keys, §2.2.4 of
``methods.md``):

* a kept column costs a whole ``block_k``-wide key block in every query block below it, instead of one
  gathered key: the work for ``v`` columns grows by up to ``block_k`` times when they are spread out;
* a kept diagonal crosses two aligned key blocks per query block (one, only when it is block-aligned),
  where MInference's merged 64-wide tiles follow the diagonal; and the forced 100 local diagonals always
  add the key block before the diagonal one;
* MInference merges neighbouring slash tiles per 64-query tile and masks each column only once; the block
  layout has no per-token structure, so everything inside a kept block is computed.

So the layout computes every pair MInference computes (recall is at least MInference's on the same scores)
at a higher density than the ``(vertical_size + slash_size) / row length`` token budget suggests.

``columns=True`` removes the first loss: the verticals become the layout's token columns (MInference's single
gathered keys, :func:`sparseflash.layouts.with_columns`), listed for each query block that has a row seeing
them and not already inside one of its kept blocks; only the slashes (and the forced diagonal blocks) map onto
blocks. The prefill kernel gathers the columns, so their cost follows the vertical budget
(:meth:`BlockLayout.token_density`). The slashes keep their block mapping (no unaligned tiles).

Layout heads: **per query head** (``H = num_heads``) by default, as MInference selects per query head (K/V
are never copied: query head ``h`` scores against KV head ``h // G``); ``heads='kv'`` gives one layout per
KV head, the union over its group.
"""

from __future__ import annotations

import torch

from sparseflash import _options as opt
from sparseflash._validate import check_qk
from sparseflash.layouts import BlockLayout, with_columns
from sparseflash.layouts import geometry as geo
from sparseflash.ops.scores.last_queries import last_query_scores
from sparseflash.patterns import selection as sel
from sparseflash.patterns.registry import register

MIN_VERTICAL = 30  # MInference raises vertical_size to at least this
MIN_SLASH = 50  # and slash_size to at least this


def vertical_slash_indices(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    last_q: int = 64,
    vertical_size: int = 1000,
    slash_size: int = 6096,
    sink_tokens: int = 30,
    local_diagonals: int = 100,
    scale: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """MInference's token-level Vertical-Slash index for every query head.

    Args:
        q: (batch, num_heads, seq_len_q, head_dim). k: (batch, num_kv_heads, seq_len_k, head_dim).
        last_q: queries (the last ones) whose softmax rows score columns and diagonals.
        vertical_size, slash_size: kept columns / diagonals before the minimums 30 / 50 and the cap at
            ``seq_len_k``.
        sink_tokens: the first keys always kept (their column score is set to +inf).
        local_diagonals: the nearest diagonals (distance ``0 .. local_diagonals - 1``) always kept.
        scale: softmax scale of the estimate, default ``1 / sqrt(head_dim)``.
        backend: scoring backend, 'auto', 'triton' or 'torch'.

    Returns:
        ``columns`` int64 (batch, num_heads, v): kept key positions; ``distances`` int64 (batch, num_heads, s):
        kept diagonal distances ``query position - key position`` (0 = main diagonal). Unordered.
    """
    seq_len_k = k.shape[2]
    v = min(seq_len_k, max(vertical_size, MIN_VERTICAL))
    s = min(seq_len_k, max(slash_size, MIN_SLASH))
    vert, slash = last_query_scores(q, k, num_queries=last_q, causal=True, scale=scale, slash=True, backend=backend)
    vert[..., :sink_tokens] = float("inf")
    slash[..., max(seq_len_k - local_diagonals, 0) :] = float("inf")  # slash index c is distance Sk - 1 - c
    columns = vert.topk(v, dim=-1, sorted=False).indices
    distances = (seq_len_k - 1) - slash.topk(s, dim=-1, sorted=False).indices
    return columns, distances


def vertical_slash_block_mask(
    columns: torch.Tensor,
    distances: torch.Tensor,
    seq_len_q: int,
    seq_len_k: int,
    block_size: tuple[int, int],
) -> torch.Tensor:
    """Block union of a Vertical-Slash index: bool (batch, heads, Qb, Kb), causal blocks only.

    Block ``(I, J)`` is True iff a kept column or diagonal has a causal (query, key) pair in it (queries at
    bottom-right-aligned positions ``seq_len_k - seq_len_q + i``).

    Args:
        columns: int64 (batch, heads, v), key positions in ``[0, seq_len_k)``.
        distances: int64 (batch, heads, s), diagonal distances in ``[0, seq_len_k)``.
    """
    block_q, block_k = block_size
    device = columns.device
    lead = columns.shape[:2]
    num_q_blocks = -(-seq_len_q // block_q)
    num_k_blocks = -(-seq_len_k // block_k)
    allowed = geo.causal_block_mask(seq_len_q, seq_len_k, block_size, device=device)  # (Qb, Kb)
    # verticals: any kept column inside key block J (a column past a block's last query only happens in the
    # diagonal key block, which the local diagonals keep anyway)
    col_hit = torch.zeros(*lead, num_k_blocks * block_k, dtype=torch.bool, device=device)
    col_hit.scatter_(-1, columns, True)
    col_blocks = col_hit.view(*lead, num_k_blocks, block_k).any(-1)  # (B, H, Kb)
    mask = col_blocks[:, :, None, :] & allowed
    # slashes: distance d meets key block J from query block I iff d lies in
    # [p_first - J_hi, p_last - J_lo] (p = absolute query positions of block I, clipped at 0)
    hit = torch.zeros(*lead, seq_len_k, dtype=torch.bool, device=device)
    hit.scatter_(-1, distances, True)
    prefix = torch.nn.functional.pad(hit.to(torch.int32).cumsum(-1, dtype=torch.int32), (1, 0))  # (B, H, Sk+1)
    offset = seq_len_k - seq_len_q
    q_first = torch.arange(num_q_blocks, device=device) * block_q + offset
    q_last = torch.clamp(q_first - offset + block_q, max=seq_len_q) - 1 + offset
    q_first = q_first.clamp(min=0)
    k_lo = torch.arange(num_k_blocks, device=device) * block_k
    k_hi = torch.clamp(k_lo + block_k, max=seq_len_k) - 1
    lo = (q_first[:, None] - k_hi[None, :]).clamp(min=0)  # (Qb, Kb)
    hi = (q_last[:, None] - k_lo[None, :]).clamp(max=seq_len_k - 1)
    valid = (lo <= hi) & (q_last[:, None] >= 0)
    lo_c = lo.clamp(0, seq_len_k).reshape(1, 1, -1).expand(*lead, -1)
    hi_c = (hi + 1).clamp(0, seq_len_k).reshape(1, 1, -1).expand(*lead, -1)
    count = prefix.gather(-1, hi_c) - prefix.gather(-1, lo_c)
    mask |= (count > 0).view(*lead, num_q_blocks, num_k_blocks) & valid
    return mask


@register("vertical_slash", kind="dynamic", heads="q")
def vertical_slash(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: tuple[int, int] = (128, 128),
    causal: bool = True,
    last_q: int = 64,
    vertical_size: int = 1000,
    slash_size: int = 6096,
    sink_tokens: int = 30,
    local_diagonals: int = 100,
    heads: str = "q",
    columns: bool = False,
    scale: float | None = None,
    backend: str = "auto",
) -> BlockLayout:
    """MInference Vertical-Slash selection as a per-query-head :class:`~sparseflash.BlockLayout`.

    Defaults are MInference's: ``last_q=64``, the default head config ``(vertical_size, slash_size) =
    (1000, 6096)`` tokens, 30 sink keys and 100 local diagonals forced. The layout is the block union of the
    token pattern (see the module docstring for what that over-approximates).

    Args:
        q: (batch, num_heads, seq_len_q, head_dim), fp16/bf16/fp32. k: (batch, num_kv_heads, seq_len_k,
            head_dim). Queries sit bottom-right (MInference itself assumes ``seq_len_q == seq_len_k``).
        block_size: (block_q, block_k) of the layout.
        causal: must be True (the pattern is defined for causal prefill).
        heads: 'q' (per query head, MInference) or 'kv' (union over each GQA group, one layout per KV head).
        columns: False (default): each vertical keeps its key block in every query block below it. True: the
            verticals become token columns of the layout (MInference's semantics; capacity ``v`` per query
            block, ``G * v`` with ``heads='kv'``), the slashes stay mapped onto blocks.
        last_q, vertical_size, slash_size, sink_tokens, local_diagonals, scale, backend: see
            :func:`vertical_slash_indices`.

    Returns:
        BlockLayout with ``kv_num_blocks`` int32 (batch, num_heads, Qb) (per query head, the default) or
        (batch, num_kv_heads, Qb) with ``heads='kv'``; with ``columns``, its token columns too.

    Raises:
        ValueError: bad q/k shapes or an option out of range (the message names it and what is accepted).
        NotImplementedError: ``causal=False``.
    """
    name = "vertical_slash"
    _, num_heads, num_kv_heads, seq_len_q, seq_len_k, _ = check_qk(name, q, k)
    opt.check_causal(name, causal, causal_only=True)
    block_size = opt.check_block_size(name, block_size)
    scale = opt.check_scale(name, scale)
    opt.check_backend_option(name, backend)
    for option, value in (
        ("last_q", last_q),
        ("vertical_size", vertical_size),
        ("slash_size", slash_size),
        ("local_diagonals", local_diagonals),
    ):
        opt.check_positive_int(f"{name}: {option}", value)
    opt.check_nonnegative_int(f"{name}: sink_tokens", sink_tokens)
    layout_heads = opt.layout_heads(name, heads, num_heads, num_kv_heads)
    if not isinstance(columns, bool):
        raise ValueError(f"{name}: columns: expected True or False, got {columns!r}")
    verticals, distances = vertical_slash_indices(
        q,
        k,
        last_q=last_q,
        vertical_size=vertical_size,
        slash_size=slash_size,
        sink_tokens=sink_tokens,
        local_diagonals=local_diagonals,
        scale=scale,
        backend=backend,
    )
    block_verticals = verticals[..., :0] if columns else verticals  # with columns, only slashes map onto blocks
    mask = vertical_slash_block_mask(block_verticals, distances, seq_len_q, seq_len_k, block_size)
    mask = sel.force_blocks(mask, seq_len_q=seq_len_q, seq_len_k=seq_len_k, block_size=block_size)
    if layout_heads != num_heads:
        mask = sel.group_heads(mask, num_kv_heads)
        verticals = verticals.reshape(verticals.shape[0], num_kv_heads, -1)  # the group's columns, together
    layout = sel.to_layout(mask, seq_len_q, seq_len_k, block_size)
    if not columns:
        return layout
    return with_columns(layout, vertical_columns(verticals, seq_len_q, seq_len_k, block_size[0]), check=False)


def vertical_columns(verticals: torch.Tensor, seq_len_q: int, seq_len_k: int, block_q: int) -> torch.Tensor:
    """Per query block, the kept key positions some of its rows see (bottom-right causal); -1 for the others.

    Args:
        verticals: int64 (batch, heads, v), key positions.

    Returns:
        int64 (batch, heads, Qb, v), for :func:`sparseflash.layouts.with_columns` (which drops the -1 entries and
        the columns inside kept blocks). No host sync.
    """
    num_q_blocks = -(-seq_len_q // block_q)
    q_last = torch.clamp((torch.arange(num_q_blocks, device=verticals.device) + 1) * block_q, max=seq_len_q) - 1
    horizon = q_last + (seq_len_k - seq_len_q)  # the last key some row of the block sees
    rows = verticals[:, :, None, :].expand(-1, -1, num_q_blocks, -1)
    return torch.where(rows <= horizon[:, None], rows, -1)
