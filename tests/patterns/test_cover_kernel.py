"""The sort-free gamma-coverage kernel against its sort path (cover_select_reference), and FlexPrefill's count."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparseflash.patterns.cover_kernel import cover_select, cover_select_reference, cover_select_triton
from sparseflash.patterns.flexprefill import cover_count


def _integer_rows(gen, rows, cols, high):
    """Non-negative integer-valued rows (ties plenty when ``high`` is small): every running sum is exact in float32
    (below 2^24), so both paths compare the same sums and must agree exactly, ties included (the kernel covers
    the lowest-position tied entries first, as the stable sort does)."""
    return torch.randint(0, high, (rows, cols), generator=gen).float()


def _same(values, target, chunk=256):
    with np.errstate(all="ignore"):  # the interpreter's NumPy warns on inf - inf in rows with +inf
        got = cover_select_triton(values, target, chunk=chunk)
    want = cover_select_reference(values, target)
    assert torch.equal(got[0], want[0]), (got[0], want[0])
    assert torch.equal(got[1], want[1]), (got[1] ^ want[1]).nonzero()[:8]
    return got


@pytest.mark.interpret
@pytest.mark.parametrize("cols", [1, 255, 700], ids=["one", "under_chunk", "three_chunks"])
def test_distinct_values_every_fraction(gen, cols):
    values = (torch.randperm(cols, generator=gen).float() + 1.0) / 4096  # distinct, sums exact in float32
    fractions = torch.tensor([0.0, 1e-6, 0.3, 0.9, 1.0, 1.5])  # 0 covers nothing, >= the total everything
    rows = values.expand(len(fractions), cols)
    count, _ = _same(rows, rows.sum(-1) * fractions)
    assert count[0] == 0 and count[-1] == cols and count[-2] == cols


@pytest.mark.interpret
def test_ties_and_zeros_follow_the_stable_sort(gen):
    values = _integer_rows(gen, 1, 600, 5).expand(4, 600)  # five values, about 120 ties each, zeros among them
    count, keep = _same(values, values.sum(-1) * torch.tensor([0.1, 0.5, 0.77, 1.0]))
    assert torch.equal(count, keep.sum(-1)) and count[-1] == 600
    # by hand: target 5.5 over [1, 4, 2, 2, 2, 0, 2]: 4 (4 <= 5.5), then one of the 2s (6 > 5.5 stops)
    count, keep = _same(torch.tensor([[1.0, 4.0, 2.0, 2.0, 2.0, 0.0, 2.0]]), 5.5)
    assert count.tolist() == [1] and keep.nonzero()[:, 1].tolist() == [1]
    count, keep = _same(torch.tensor([[1.0, 4.0, 2.0, 2.0, 2.0, 0.0, 2.0]]), 8.0)  # 4, 2, 2: the first two 2s
    assert count.tolist() == [3] and keep.nonzero()[:, 1].tolist() == [1, 2, 3]
    count, keep = _same(torch.tensor([[1.0, 4.0, 2.0, 2.0, 2.0, 0.0, 2.0]]), 13.0)  # all, the zero too
    assert count.tolist() == [7] and bool(keep.all())


@pytest.mark.interpret
def test_rows_of_zeros_and_a_scalar_target(gen):
    values = (torch.randperm(4 * 600, generator=gen).float().view(4, 600) + 1.0) / 4096
    values[1] = 0.0
    values[2, 300:] = 0.0
    for target in (0.0, 0.5, 20.0):  # a float target: one for every row
        count, _ = _same(values, target)
        assert count[1] == 600  # zeros add nothing: all covered, even at target 0
    count, keep = _same(values, 1000.0)  # everything fits
    assert count.tolist() == [600] * 4 and bool(keep.all())


@pytest.mark.interpret
def test_nan_and_inf_cover_nothing_as_in_the_sort_path():
    values = torch.rand(5, 40)
    values[0, 7] = float("nan")
    values[1, 25] = float("inf")
    values[2, :] = float("inf")
    values[3, 3] = float("nan")
    values[3, 9] = float("inf")
    for target in (0.5, 1e9, float("inf")):  # a +inf target covers rows with +inf (not NaN), as cumsum <= inf
        _same(values, target)
    count, _ = _same(values, torch.tensor([1.0, 1.0, 1.0, 1.0, float("nan")]))  # a NaN target covers nothing
    assert count[:4].tolist() == [0, 0, 0, 0] and count[4] == 0


@pytest.mark.interpret
def test_softmax_rows_at_float_rounding(gen):
    """Float probabilities: the running sums are rounded in another order, so only a row whose sum at the cut is
    within float32 rounding of the target may differ; none does here. (Not so with a target equal to the row's mass,
    gamma = 1: the tail of entries below the sum's rounding is then covered or not by rounding alone.)"""
    values = torch.softmax(torch.randn(2, 1000, generator=gen) * 3, dim=-1).repeat(3, 1)
    _same(values, torch.tensor([0.3, 0.3, 0.9, 0.9, 0.95, 0.95]), chunk=512)


@pytest.mark.interpret
def test_flexprefill_cover_count_is_count_plus_one(gen):
    dist = torch.softmax(torch.randn(1, 3, 300, generator=gen) * 2, dim=-1)
    count, _ = cover_select(dist.view(3, 300), 0.9, backend="triton")
    assert torch.equal(count.view(1, 3) + 1, cover_count(dist, 0.9))


def test_reference_is_the_sort_path(gen):
    values = torch.rand(3, 50, generator=gen)
    count, keep = cover_select(values, 7.0)  # CPU: the sort path
    sorted_values, order = values.sort(-1, descending=True)
    covered = sorted_values.cumsum(-1) <= 7.0
    assert torch.equal(count, covered.sum(-1))
    assert torch.equal(keep, torch.zeros_like(covered).scatter_(-1, order, covered))


def test_bad_input():
    with pytest.raises(ValueError, match="values: expected a 2-D tensor"):
        cover_select(torch.rand(2, 3, 4), 0.9)
    with pytest.raises(TypeError, match="values: expected a floating-point tensor"):
        cover_select(torch.ones(2, 3, dtype=torch.int64), 0.9)
    with pytest.raises(ValueError, match="target: expected a float or a float tensor of 2 values"):
        cover_select(torch.rand(2, 3), torch.rand(3))
    with pytest.raises(TypeError, match="target: expected a float or a tensor"):
        cover_select(torch.rand(2, 3), "0.9")
    with pytest.raises(ValueError, match="chunk: expected a power of two >= 256"):
        cover_select_triton(torch.rand(2, 3), 0.9, chunk=300)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_long_rows_against_the_sort_path():
    """4 rows of 262144 entries (FlexPrefill's pooled rows at 64K tokens), 32 chunks each, then strided and ragged:
    integer values below 64, so every running sum is exact in float32 and the kernel must match the stable sort
    path exactly, ties included; then softmax rows, which may differ only by float rounding of the sums."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    values = torch.randint(0, 64, (4, 262144), generator=gen, device="cuda").float()
    values[3, 1000:] = 0.0  # a row of mostly zeros
    total = values.sum(-1)
    for fraction in (0.001, 0.5, 0.9, 0.999, 1.0):
        got = cover_select_triton(values, total * fraction)
        want = cover_select_reference(values, total * fraction)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    strided = values[:, : 262144 - 3]  # rows with a stride, ragged in the last chunk
    got, want = cover_select_triton(strided, 1e6), cover_select_reference(strided, 1e6)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # softmax rows: both cover a prefix of the same (stable) descending order, so one set holds the other, and
    # the entries between them weigh no more than the rounding of the running sums
    probs = torch.softmax(torch.randn(4, 262144, generator=gen, device="cuda") * 4, dim=-1)
    for gamma in (0.5, 0.9, 0.99):
        (count, keep), (ref_count, ref_keep) = cover_select_triton(probs, gamma), cover_select_reference(probs, gamma)
        assert torch.equal(keep & ref_keep, keep) or torch.equal(keep & ref_keep, ref_keep)
        assert torch.equal(count, keep.sum(-1)) and torch.equal(ref_count, ref_keep.sum(-1))
        assert float(torch.where(keep ^ ref_keep, probs, 0.0).sum(-1).max()) <= 1e-5
