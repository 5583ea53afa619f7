"""``flexprefill``: FlexPrefill's per-head choice between query-aware and vertical-slash blocks.

FlexPrefill (Lai et al., ICLR 2025, arXiv:2502.20766; bytedance/FlexPrefill @a24b27b,
``flex_prefill_attention.py::get_active_blocks``), per query head, with ``B`` the (square) block size:

1. the last ``B`` queries' softmax rows (causal) give a vertical distribution ``a`` (column means) and a
   slash distribution ``c`` (diagonal means), token level;
2. budgets: ``n = (#sorted-descending prefix of the distribution whose cumsum <= gamma) + 1`` tokens,
   turned into ``n // B + 1`` blocks and clamped to ``[min_budget, max_budget]`` (tokens, rounded up to
   blocks), separately for ``a`` and ``c``;
3. ``a`` and ``c`` are sum-pooled per key block (``c`` by the key each diagonal meets in the last row);
4. decision: ``p_hat = softmax_J(mean(last queries) . mean_J(k) * scale)`` is compared with the pooled ``a``
   by the square-root Jensen-Shannon divergence; below ``tau`` the head is **query-aware** and both budgets
   drop to ``min_budget``;
5. the sink column (key block 0) and the main diagonal group get score +inf (after the divergence test);
6. the top ``n_v`` block columns are kept in every row they are causal for, and the top ``n_s`` diagonal
   groups ``Delta`` give blocks ``(I, I - Delta)``;
7. query-aware heads add, on top of step 6, the blocks of ``softmax_J(mean_I(q) . mean_J(k) * scale)``
   (causal) taken in descending order over the *whole* matrix while the running sum stays ``<= gamma`` times
   the number of query blocks (global coverage, FlexPrefill's code; the paper's Algorithm 1 uses this set
   alone, the code unions it with step 6 — we follow the code);
8. the diagonal blocks are always kept.

Below ``max(2 B, min_budget rounded up to blocks)`` keys the layout is dense causal, as in FlexPrefill.
Deviations, all documented in ``methods.md`` §2.3: the block count uses ``// B + 1`` where FlexPrefill
hard-codes ``// 128 + 1`` (equal at the default ``B = 128``); pooled means are over the real tokens of a
ragged last block (FlexPrefill's official code rescales the same way); ``seq_len_q < seq_len_k`` is accepted
(bottom-right aligned: diagonal group ``Delta`` of query block ``I`` is ``Delta`` blocks left of the key
block holding the last query of ``I``). Everything stays on the device: no host synchronisation, the
query-aware branch is computed for every head and kept where the test says so.

With the Triton backend the only sorts left are step 6's top-``n`` choices (rows of ``Kb`` entries): steps 2 and 7
count and select the covered entries of the vertical and slash lines and of the pooled matrix with
:mod:`sparseflash.patterns.cover_kernel` (its sort path, the CPU's path, is the reference; the module states the
tie rule), and steps 6 to 8 end in one kernel that writes the layout (:mod:`sparseflash.patterns.flexprefill_layout`).
Block means read Q and K in their dtype, summed in float32 (no float32 copy).

``gamma`` is a cumulative attention-mass threshold, so ``target_recall`` is accepted as its synonym.

Layout heads: **per query head** (``H = num_heads``) by default, as FlexPrefill scores per query head
(grouped onto its KV head without copying K); ``heads='kv'`` gives one layout per KV head, the union over its
group.
"""

from __future__ import annotations

import math
import struct

import torch

from sparseflash import _options as opt
from sparseflash._validate import check_qk
from sparseflash.layouts import BlockLayout
from sparseflash.layouts import geometry as geo
from sparseflash.ops.scores.last_queries import last_query_scores
from sparseflash.patterns import selection as sel
from sparseflash.patterns.cover_kernel import cover_select
from sparseflash.patterns.flexprefill_layout import flexprefill_layout, slash_geometry
from sparseflash.patterns.registry import register

DEFAULT_GAMMA = 0.9  # README; the RULER scripts use 0.95 for Llama-3.1-8B and GLM-4-9B


def cover_count(dist: torch.Tensor, gamma: float) -> torch.Tensor:
    """FlexPrefill's ``score_cover_topk``: 1 + the length of the sorted prefix whose cumsum stays <= gamma.

    Args:
        dist: float (..., n), a distribution along the last dim.

    Returns:
        int64 (...): the number of entries needed to cover ``gamma`` of the mass (the crossing one included).
    """
    cumsum = dist.sort(dim=-1, descending=True).values.cumsum(-1)
    return (cumsum <= gamma).sum(-1) + 1


def block_means(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean of ``x`` (batch, heads, seq, dim) over blocks of ``block`` tokens (the last one ragged), float32.

    Read in ``x``'s dtype and summed in float32 (no float32 copy of ``x``, no padded copy): the full blocks as one
    view, the ragged last block apart.
    """
    batch, heads, seq, dim = x.shape
    full = seq // block
    parts = []
    if full:
        blocks = x[:, :, : full * block].view(batch, heads, full, block, dim)
        parts.append(blocks.sum(3, dtype=torch.float32) / block)
    if seq > full * block:
        parts.append(x[:, :, full * block :].sum(2, keepdim=True, dtype=torch.float32) / (seq - full * block))
    return torch.cat(parts, 2) if len(parts) > 1 else parts[0]


def block_sums(lines: torch.Tensor, block: int) -> torch.Tensor:
    """Sums of ``lines`` (..., seq), last dim contiguous, over blocks of ``block`` (the last one ragged): (..., Kb)."""
    seq = lines.shape[-1]
    num_blocks = -(-seq // block)
    if seq < num_blocks * block:
        lines = torch.nn.functional.pad(lines, (0, num_blocks * block - seq))
    return lines.view(*lines.shape[:-1], num_blocks, block).sum(-1)


def sqrt_js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``sqrt(JSD(p || q))`` along the last dim, natural log, with ``0 * log 0 = 0``."""
    m = (p + q) / 2
    kl_p = torch.where(p > 0, p * torch.log(p / m), 0.0).sum(-1)
    kl_q = torch.where(q > 0, q * torch.log(q / m), 0.0).sum(-1)
    return torch.sqrt((0.5 * kl_p + 0.5 * kl_q).clamp(min=0))


def _grouped_dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x (B, Hq, M, D) . y (B, Hkv, N, D)^T`` per query head, y shared by its group: (B, Hq, M, N)."""
    batch, num_heads, rows, dim = x.shape
    num_kv = y.shape[1]
    out = torch.matmul(x.view(batch, num_kv, num_heads // num_kv, rows, dim), y.unsqueeze(2).transpose(-1, -2))
    return out.view(batch, num_heads, rows, y.shape[2])


def _float32(x: float) -> float:
    """``x`` rounded to float32 (the value a float32 tensor holds)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _dense(
    batch: int, heads: int, seq_len_q: int, seq_len_k: int, block_size: tuple[int, int], device: torch.device
) -> BlockLayout:
    mask = geo.causal_block_mask(seq_len_q, seq_len_k, block_size, device=device)
    return sel.to_layout(mask.expand(batch, heads, *mask.shape), seq_len_q, seq_len_k, block_size)


@register("flexprefill", kind="dynamic", heads="q")
def flexprefill(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: tuple[int, int] = (128, 128),
    causal: bool = True,
    gamma: float | None = None,
    target_recall: float | None = None,
    tau: float = 0.1,
    min_budget: int | None = 512,
    max_budget: int | None = None,
    heads: str = "q",
    scale: float | None = None,
    backend: str = "auto",
) -> BlockLayout:
    """FlexPrefill block selection as a per-query-head :class:`~sparseflash.BlockLayout` (module docstring).

    Args:
        q: (batch, num_heads, seq_len_q, head_dim), fp16/bf16/fp32. k: (batch, num_kv_heads, seq_len_k,
            head_dim), ``seq_len_q <= seq_len_k`` in the intended use.
        block_size: square ``(B, B)``; FlexPrefill supports 32, 64 and 128 (default 128).
        causal: must be True.
        gamma: cumulative attention mass each budget covers, in (0, 1]; default 0.9 (README; 0.95 in the
            RULER scripts for Llama-3.1-8B and GLM-4-9B).
        target_recall: synonym of ``gamma`` (give one or the other).
        tau: square-root JS divergence below which a head is query-aware, >= 0 (default 0.1; 0 disables the
            query-aware branch).
        min_budget: minimum vertical and slash budget in tokens, rounded up to blocks (default 512, the
            README; 1024 in the experiment scripts; None means one block).
        max_budget: maximum budget in tokens (None: no limit).
        heads: 'q' (per query head, FlexPrefill) or 'kv' (union over each GQA group, one layout per KV head).
        scale: softmax scale, default ``1 / sqrt(head_dim)``.
        backend: 'auto', 'triton' or 'torch' for the last-query scores, the coverage and the layout ('auto':
            Triton on CUDA).

    Returns:
        BlockLayout with ``kv_num_blocks`` int32 (batch, num_heads, Qb), or (batch, num_kv_heads, Qb) with
        ``heads='kv'``.

    Raises:
        ValueError: bad shapes, a non-square block size, both ``gamma`` and ``target_recall``, or an option
            out of range.
        NotImplementedError: ``causal=False``.
    """
    name = "flexprefill"
    batch, num_heads, num_kv_heads, seq_len_q, seq_len_k, head_dim = check_qk(name, q, k)
    opt.check_causal(name, causal, causal_only=True)
    block_size = opt.check_block_size(name, block_size, square=True)
    scale = opt.check_scale(name, scale)
    opt.check_backend_option(name, backend)
    if gamma is not None and target_recall is not None:
        raise ValueError(f"{name}: expected gamma or target_recall, not both; got {gamma!r} and {target_recall!r}")
    if target_recall is not None:
        gamma = opt.check_fraction(f"{name}: target_recall", target_recall)
    else:
        gamma = opt.check_fraction(f"{name}: gamma", DEFAULT_GAMMA if gamma is None else gamma)
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau >= 0:
        raise ValueError(f"{name}: tau: expected a float >= 0, got {tau!r}")
    if min_budget is not None:
        opt.check_positive_int(f"{name}: min_budget", min_budget)
    if max_budget is not None:
        opt.check_positive_int(f"{name}: max_budget", max_budget)
        if min_budget is not None and max_budget < min_budget:
            raise ValueError(f"{name}: max_budget: expected >= min_budget={min_budget}, got {max_budget}")
    layout_heads = opt.layout_heads(name, heads, num_heads, num_kv_heads)
    block = block_size[0]
    scale = head_dim**-0.5 if scale is None else scale
    num_q_blocks, num_k_blocks = math.ceil(seq_len_q / block), math.ceil(seq_len_k / block)
    min_blocks = 1 if min_budget is None else math.ceil(min_budget / block)
    max_blocks = num_k_blocks if max_budget is None else min(math.ceil(max_budget / block), num_k_blocks)
    min_blocks = min(min_blocks, max_blocks)
    if seq_len_k <= max(2 * block, min_blocks * block):
        return _dense(batch, layout_heads, seq_len_q, seq_len_k, block_size, q.device)
    device = q.device
    allowed = sel.selection_geometry(seq_len_q, seq_len_k, block_size, device=device)[0]  # read-only
    rows_with_blocks = slash_geometry(seq_len_q, seq_len_k, block, str(device))[2]

    # 1. last-block statistics (token level), as distributions (FlexPrefill divides by the row count)
    rows = min(block, seq_len_q)
    vert, slash = last_query_scores(q, k, num_queries=rows, causal=True, scale=scale, slash=True, backend=backend)
    lines = torch.empty(2, batch, num_heads, seq_len_k, dtype=torch.float32, device=device)  # vertical, slash
    torch.div(vert, rows, out=lines[0])
    torch.div(slash, rows, out=lines[1])
    # 2. budgets: gamma coverage of each line without a sort (cover_kernel), plus the crossing entry
    count = cover_select(lines.view(-1, seq_len_k), gamma, backend=backend)[0].view(2, batch, num_heads)
    budgets = ((count + 1) // block + 1).clamp(min_blocks, max_blocks)  # (2, B, Hq): vertical, slash
    # 3. both pooled per key block (slash by the key each diagonal meets in the last row): (2, B, Hq, Kb)
    line_blocks = block_sums(lines, block)
    # 4. query-aware test: pooled estimate of the last block's distribution vs the measured one
    k_mean = block_means(k, block)  # (B, Hkv, Kb, D)
    q_last = q[:, :, seq_len_q - rows :].float().mean(2, keepdim=True) * scale  # (B, Hq, 1, D)
    p_hat = torch.softmax(_grouped_dot(q_last, k_mean).squeeze(2), dim=-1)
    query_aware = sqrt_js_divergence(p_hat, line_blocks[0]) < tau  # (B, Hq)
    budgets = torch.where(query_aware, min_blocks, budgets)
    # 7 (first half). global gamma coverage of the pooled block attention, again without a sort: a row with an
    # allowed block sums to 1, so the rows cover gamma times their number (as float32, as the sort path has it)
    q_mean = block_means(q, block) * scale  # (B, Hq, Qb, D)
    pooled = _grouped_dot(q_mean, k_mean).masked_fill_(~allowed, float("-inf"))
    pooled = torch.softmax(pooled, dim=-1).nan_to_num_(0.0).view(batch * num_heads, -1)  # no allowed block: 0
    pooled_target = _float32(_float32(gamma) * rows_with_blocks)  # the sort path's float32 product
    coverage = cover_select(pooled, pooled_target, backend=backend)[1].view(
        batch, num_heads, num_q_blocks, num_k_blocks
    )
    # 5. forced sink column and main diagonal group (after the divergence test)
    line_blocks[0, ..., 0] = float("inf")
    line_blocks[1, ..., (seq_len_k - 1) // block] = float("inf")
    # 6 to 8. top vertical columns and slash groups; the layout: those, the covered blocks of query-aware heads,
    # the diagonal, the union over each GQA group with heads='kv' (flexprefill_layout: one kernel, no mask)
    line_keep = sel.select_topk(line_blocks, budgets)  # (2, B, Hq, Kb)
    return flexprefill_layout(
        line_keep,
        coverage,
        query_aware,
        seq_len_q=seq_len_q,
        seq_len_k=seq_len_k,
        block=block,
        layout_heads=layout_heads,
        backend=backend,
    )
