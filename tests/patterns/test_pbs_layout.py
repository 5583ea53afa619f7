"""PBS-Attn's kernels against their PyTorch paths: the step-3 layout (pbs_layout) and the pooled keys of K'."""

from __future__ import annotations

import pytest
import torch

from sparseflash.patterns import selection as sel
from sparseflash.patterns.pbs import segment_permutation
from sparseflash.patterns.pbs_layout import MAX_KEY_BLOCKS, pbs_layout_reference, pbs_layout_triton, segment_geometry
from sparseflash.patterns.permuted_means import permuted_block_means_reference, permuted_block_means_triton


def _probs(gen, batch, heads, seq_len, block, segment, kind):
    """Block probabilities over the earlier segments (0 elsewhere), (B, H, Qb, Kb).

    ``distinct``: distinct dyadic masses (sums exact in float32: both paths compare the same sums and must agree
    exactly); ``ties``: a few integer levels (ties at every cut, sums exact: the stable sort's choice, by index);
    ``softmax``: float probabilities (sums rounded in another order; equal here)."""
    qb = -(-seq_len // block)
    earlier = segment_geometry(seq_len, block, segment, "cpu")[0]
    shape = (batch, heads, qb, qb)
    if kind == "distinct":
        values = (torch.randperm(batch * heads * qb * qb, generator=gen).float() + 1.0).view(shape) / 4096
    elif kind == "ties":
        values = torch.randint(0, 4, shape, generator=gen).float()
    else:
        values = torch.softmax(torch.randn(shape, generator=gen) * 2, dim=-1)
    return torch.where(earlier, values, 0.0)


def _stable_select(scores, threshold, allowed):
    """select_by_cumulative_mass with a stable sort: tied blocks taken by increasing index (its sort is unstable,
    so with ties it keeps some other subset of the same size)."""
    s = torch.where(allowed, scores.float().clamp_min(0), 0.0)
    sorted_s, order = torch.sort(s, dim=-1, descending=True, stable=True)
    before = torch.cumsum(sorted_s, dim=-1) - sorted_s
    keep_sorted = (before < threshold * s.sum(-1, keepdim=True)) & (sorted_s > 0)
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)


def _same_layout(got, want):
    assert torch.equal(got.kv_num_blocks, want.kv_num_blocks)
    assert torch.equal(got.kv_indices, want.kv_indices)  # kept ascending, then dropped ascending


@pytest.mark.interpret
@pytest.mark.parametrize("kind", ["distinct", "ties", "softmax"])
@pytest.mark.parametrize(
    "heads, layout_heads, seq_len, block, segment, threshold, sink",
    [(2, 2, 500, 32, 64, 0.9, True), (4, 2, 333, 32, 64, 0.5, True), (1, 1, 640, 64, 128, 1.0, False)],
    ids=["per_query_head_ragged", "gqa_union", "threshold_1_no_sink"],
)
def test_matches_the_sort_path(gen, monkeypatch, kind, heads, layout_heads, seq_len, block, segment, threshold, sink):
    if kind == "ties":  # the tie rule is the stable sort's
        monkeypatch.setattr(sel, "select_by_cumulative_mass", _stable_select)
    probs = _probs(gen, 1, heads, seq_len, block, segment, kind)
    qb = probs.shape[-1]
    sink_block = torch.randint(0, qb, (1, heads), generator=gen) if sink else None
    args = dict(seq_len=seq_len, block=block, segment_size=segment, layout_heads=layout_heads)
    got = pbs_layout_triton(probs, threshold, sink_block, **args)
    _same_layout(got, pbs_layout_reference(probs, threshold, sink_block, **args))
    got.check_indices()


@pytest.mark.interpret
def test_tie_rule_and_edge_thresholds():
    # one row of earlier blocks [1, 4, 2, 2, 2, 0, 2] (x 1/16): threshold 5.5 / 13 keeps 4 then the first 2 (before
    # it 4 < 5.5, after it 6); 0 keeps nothing; 1 keeps every positive block, never the zero one
    seq_len, block, segment = 8 * 16, 16, 16
    probs = torch.zeros(1, 1, 8, 8)
    probs[0, 0, 7, :7] = torch.tensor([1.0, 4.0, 2.0, 2.0, 2.0, 0.0, 2.0]) / 16
    args = dict(seq_len=seq_len, block=block, segment_size=segment, layout_heads=1)
    for threshold, kept in ((5.5 / 13, [1, 2]), (6.5 / 13, [1, 2, 3]), (0.0, []), (1.0, [0, 1, 2, 3, 4, 6])):
        got = pbs_layout_triton(probs, threshold, None, **args)
        row = got.kv_indices[0, 0, 7, : got.kv_num_blocks[0, 0, 7]].tolist()
        assert row == kept + [7], (threshold, row)  # plus the own segment's block


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_permuted_block_means(gen, dtype):
    k = torch.randn(2, 2, 333, 32, generator=gen).to(dtype)
    perm = segment_permutation(torch.rand(2, 4, 333, generator=gen), 64)  # 4 heads on 2 KV heads, ragged tail
    got = permuted_block_means_triton(k, perm, 32)
    want = permuted_block_means_reference(k, perm, 32)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    gathered = k.float().repeat_interleave(2, dim=1).gather(2, perm[..., None].expand(-1, -1, -1, 32))
    torch.testing.assert_close(got[:, :, -1], gathered[:, :, 320:].mean(2), rtol=1e-6, atol=1e-6)  # ragged block


def test_bad_input(gen):
    probs = torch.rand(1, 2, 4, 4)
    args = dict(seq_len=64, block=16, segment_size=32, layout_heads=2)
    with pytest.raises(ValueError, match="probs: expected a float tensor"):
        pbs_layout_reference(probs[0], 0.9, None, **args)
    with pytest.raises(ValueError, match="sink_block: expected int64"):
        pbs_layout_reference(probs, 0.9, torch.zeros(1, 3, dtype=torch.int64), **args)
    with pytest.raises(ValueError, match="layout_heads: expected a divisor of 2"):
        pbs_layout_reference(probs, 0.9, None, **{**args, "layout_heads": 3})
    with pytest.raises(ValueError, match="probs: expected at most"):
        pbs_layout_triton(torch.zeros(1, 1, 1, MAX_KEY_BLOCKS + 1), 0.9, None, **{**args, "layout_heads": 1})
    with pytest.raises(ValueError, match="perm: expected int64"):
        permuted_block_means_reference(torch.rand(1, 1, 8, 16), torch.zeros(1, 1, 8, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="perm: expected a multiple of 2 heads"):
        permuted_block_means_triton(torch.rand(1, 2, 8, 16), torch.zeros(1, 3, 8, dtype=torch.int64), 4)
