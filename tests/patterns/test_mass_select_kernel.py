"""The fused cumulative-mass selection kernel against its PyTorch path (select_by_cumulative_mass + from_dense)."""

from __future__ import annotations

import pytest
import torch

from sparseflash.patterns import registry
from sparseflash.patterns import selection as sel
from sparseflash.patterns.mass_select_kernel import (
    MAX_KEY_BLOCKS,
    fused_selection_fits,
    mass_select_layout_reference,
    mass_select_layout_triton,
)


def _dyadic_scores(gen, shape):
    """Distinct-valued scores whose partial sums are exact in float32 (multiples of 2**-12 below 2**10), so both
    paths compare the same sums and must agree exactly."""
    numel = 1
    for n in shape:
        numel *= n
    values = torch.randperm(numel, generator=gen)[:numel].float() + 1.0
    return (values / 4096.0).view(shape)


def _both(scores, threshold, sq, sk, bs, *, sink=1, local=0, extra=0, causal=True):
    allowed, forced = sel.selection_geometry(sq, sk, bs, sink_blocks=sink, local_blocks=local, causal=causal)
    args = dict(extra=extra, seq_len_q=sq, seq_len_k=sk, block_size=bs)
    return (
        mass_select_layout_triton(scores, threshold, allowed, forced, **args),
        mass_select_layout_reference(scores, threshold, allowed, forced, **args),
    )


def _same_layout(got, want):
    assert torch.equal(got.kv_num_blocks, want.kv_num_blocks)
    assert torch.equal(got.kv_indices, want.kv_indices)  # kept ascending, then dropped ascending
    assert (got.seq_len_q, got.seq_len_k, got.block_size) == (want.seq_len_q, want.seq_len_k, want.block_size)


@pytest.mark.parametrize(
    "sq,sk,bs,threshold,extra",
    [
        (1000, 1000, (64, 64), 0.9, 0),
        (1000, 1000, (64, 64), 0.95, 2),
        (300, 1000, (64, 64), 0.5, 1),
        (777, 777, (32, 32), 0.0, 0),
        (777, 777, (32, 32), 1.0, 0),
        (640, 640, (64, 64), 0.0, 2),
        (64, 64, (64, 64), 0.9, 0),
    ],
    ids=["ragged", "ragged_extra", "chunked", "threshold_0", "threshold_1", "threshold_0_extra", "one_block"],
)
def test_matches_the_sort_path_exactly(gen, sq, sk, bs, threshold, extra):
    qb, kb = -(-sq // bs[0]), -(-sk // bs[1])
    scores = _dyadic_scores(gen, (2, 2, qb, kb))
    got, want = _both(scores, threshold, sq, sk, bs, local=1, extra=extra)
    _same_layout(got, want)


def test_per_head_thresholds_and_no_forced_blocks(gen):
    scores = _dyadic_scores(gen, (1, 4, 12, 12))
    tau = torch.tensor([0.0, 0.3, 0.8, 1.0]).view(4, 1)
    got, want = _both(scores, tau, 12 * 32, 12 * 32, (32, 32), sink=0)
    _same_layout(got, want)
    allowed, forced = sel.selection_geometry(12 * 32, 12 * 32, (32, 32), causal=False)
    args = dict(extra=0, seq_len_q=12 * 32, seq_len_k=12 * 32, block_size=(32, 32))
    _same_layout(
        mass_select_layout_triton(scores, tau.view(4), allowed, forced, **args),  # (H,) as (H, 1)
        mass_select_layout_reference(scores, tau, allowed, forced, **args),
    )


def test_random_float_scores_differ_only_at_float_rounding(gen):
    """On softmax-like float scores the sums are rounded in another order: rows may differ only where the mass
    before the boundary entry is within float32 rounding of the target."""
    scores = torch.rand(1, 2, 40, 40, generator=gen) ** 4
    got, want = _both(scores, 0.9, 40 * 16, 40 * 16, (16, 16), local=1)
    differ = (got.kv_num_blocks != want.kv_num_blocks).float().mean().item()
    assert differ <= 0.02
    # where the counts agree, so do the index lists
    same = got.kv_num_blocks == want.kv_num_blocks
    assert torch.equal(got.kv_indices[same], want.kv_indices[same])


def test_ties_at_the_cut_are_all_kept():
    scores = torch.tensor([1.0, 4.0, 2.0, 2.0, 2.0, 0.0]).view(1, 1, 1, 6)
    allowed = torch.ones(1, 6, dtype=torch.bool)
    forced = torch.zeros(1, 6, dtype=torch.bool)
    args = dict(extra=0, seq_len_q=16, seq_len_k=96, block_size=(16, 16))
    layout = mass_select_layout_triton(scores, 0.5, allowed, forced, **args)  # target 5.5: 4 then the tie of 2s
    assert layout.kv_num_blocks.item() == 4
    assert layout.kv_indices[0, 0, 0, :4].tolist() == [1, 2, 3, 4]
    assert sorted(layout.kv_indices[0, 0, 0, 4:].tolist()) == [0, 5]


def test_rows_with_no_mass_keep_only_forced_blocks_and_nan_is_not_kept():
    scores = torch.zeros(1, 2, 4, 4)
    scores[0, 1, 3, 1] = float("nan")
    got, want = _both(scores, 0.9, 4 * 16, 4 * 16, (16, 16))
    _same_layout(got, want)
    dense = got.to_dense()
    allowed, forced = sel.selection_geometry(64, 64, (16, 16), sink_blocks=1)
    assert torch.equal(dense, forced.expand_as(dense))


@pytest.mark.parametrize("heads", ["q", "kv"])
def test_xattention_triton_and_torch_backends_give_the_same_layout(gen, heads):
    q = torch.randn(1, 4, 700, 32, generator=gen)
    k = torch.randn(1, 2, 700, 32, generator=gen)
    opts = dict(block_size=(64, 64), stride=8, threshold=0.9, local_blocks=1, extra_blocks=1, heads=heads)
    fast = registry.select("xattention", q, k, backend="triton", **opts)
    slow = registry.select("xattention", q, k, backend="torch", **opts)
    fast.check_indices()
    mismatch = (fast.to_dense() != slow.to_dense()).float().mean().item()
    assert mismatch <= 0.01  # the estimates themselves differ by float rounding between the two backends


def test_fits_and_bad_input():
    scores = torch.rand(1, 2, 3, 3)
    assert fused_selection_fits(scores, 0.9)
    assert fused_selection_fits(scores, torch.rand(2, 1))
    assert not fused_selection_fits(scores, torch.rand(1, 2, 3))
    assert not fused_selection_fits(torch.rand(1, 1, 1, MAX_KEY_BLOCKS + 1), 0.9)
    allowed, forced = sel.selection_geometry(48, 48, (16, 16))
    with pytest.raises(ValueError, match="allowed/forced"):
        mass_select_layout_triton(
            torch.rand(1, 2, 4, 4), 0.9, allowed, forced, extra=0, seq_len_q=48, seq_len_k=48, block_size=(16, 16)
        )
    with pytest.raises(ValueError, match="scores"):
        mass_select_layout_triton(
            torch.rand(2, 3, 3), 0.9, allowed, forced, extra=0, seq_len_q=48, seq_len_k=48, block_size=(16, 16)
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_large_grid_with_int32_overflowing_offsets():
    """B*H*Qb*Kb > 2^31 entries (offsets in int64), rows of 4096 key blocks in one program: rows sampled across the
    grid against the sort path. Each row is a shifted permutation of 1..Kb, so its values are distinct and its sums
    exact in float32 (< 2^24): both paths must agree exactly."""
    b, h, qb, kb = 1, 129, 4096, 4096
    assert b * h * qb * kb > 2**31
    perm = torch.randperm(kb, device="cuda").float() + 1.0
    cols = torch.arange(kb, device="cuda")
    scores = torch.empty(b, h, qb, kb, device="cuda")
    for head in range(h):
        shift = torch.randint(0, kb, (qb, 1), device="cuda")
        scores[0, head] = perm[(cols[None, :] + shift) % kb]
    geometry = dict(sink_blocks=1, local_blocks=1, device="cuda")
    allowed, forced = sel.selection_geometry(qb * 128, kb * 128, (128, 128), **geometry)
    args = dict(extra=1, seq_len_q=qb * 128, seq_len_k=kb * 128, block_size=(128, 128))
    got = mass_select_layout_triton(scores, 0.9, allowed, forced, **args)
    for head, rows in ((0, slice(0, 64)), (h - 1, slice(qb - 64, qb)), (h // 2, slice(2000, 2064))):
        part = mass_select_layout_reference(
            scores[:, head : head + 1], 0.9, allowed, forced, **args
        )  # one head at a time: the sort path of the whole grid would not fit
        assert torch.equal(got.kv_num_blocks[:, head, rows], part.kv_num_blocks[:, 0, rows])
        assert torch.equal(got.kv_indices[:, head, rows], part.kv_indices[:, 0, rows])
