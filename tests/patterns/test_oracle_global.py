"""The oracle's global rule (issue 14): the top-mass block set of each head's whole block grid at a given density
(or the fewest blocks reaching a mean recall), checked against a float64 brute force from the dense softmax, and
the grid-wide selection helpers it uses."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import randn

from sparseflash import patterns
from sparseflash.layouts import geometry as geo
from sparseflash.metrics import attention_recall
from sparseflash.patterns import selection as sel

# (Sq, Sk, block_size, Hq, Hkv, causal): ragged, chunked prefill (bottom-right), GQA, rectangular blocks, full
CASES = [
    (300, 300, (64, 64), 4, 2, True),
    (130, 400, (32, 32), 2, 2, True),
    (200, 264, (32, 64), 2, 1, True),
    (200, 200, (32, 32), 2, 1, False),
]
MARGIN = 1e-5  # the float32 block masses must order the boundary blocks as the float64 brute force does


def _inputs(gen, sq, sk, hq, hkv):
    q = randn(gen, 1, hq, sq, 16, dtype=torch.float32) * 3  # peaked softmax: block masses far apart
    k = randn(gen, 1, hkv, sk, 16, dtype=torch.float32)
    return q, k


def _block_mass(q, k, bs, causal):
    """Brute-force float64 ``E[b, h, I, J]`` from the dense softmax (bottom-right causal; rows seeing nothing: 0)."""
    group = q.shape[1] // k.shape[1]
    kk = k.double().repeat_interleave(group, 1)
    s = q.double() @ kk.transpose(-1, -2) / math.sqrt(q.shape[-1])
    sq, sk = q.shape[2], k.shape[2]
    if causal:
        s = s.masked_fill(torch.arange(sk)[None, :] > (torch.arange(sq) + sk - sq)[:, None], float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    qb, kb = math.ceil(sq / bs[0]), math.ceil(sk / bs[1])
    pad = torch.zeros(*p.shape[:2], qb * bs[0], kb * bs[1], dtype=torch.float64)
    pad[..., :sq, :sk] = p
    return pad.view(*p.shape[:2], qb, bs[0], kb, bs[1]).sum((3, 5))


def _geometry(sq, sk, bs, causal):
    allowed = geo.causal_block_mask(sq, sk, bs, causal=causal)
    return allowed, geo.diagonal_mask(sq, sk, bs) & allowed


def _order(mass, eligible):
    """Flat indices of the eligible blocks by decreasing mass, ties by flat position (row-major)."""
    flat, idx = mass.flatten().tolist(), torch.nonzero(eligible.flatten()).flatten().tolist()
    return sorted(idx, key=lambda i: (-flat[i], i))


def _brute_topk(mass, allowed, forced, density):
    """Per (b, h): forced blocks plus the largest allowed others, ``max(F, floor(density * A + 0.5))`` in all."""
    num_allowed, num_forced = int(allowed.sum()), int(forced.sum())
    n = max(num_forced, math.floor(density * num_allowed + 0.5))
    keep = torch.zeros(mass.shape, dtype=torch.bool)
    for b in range(mass.shape[0]):
        for h in range(mass.shape[1]):
            order = _order(mass[b, h], allowed & ~forced)
            extra = n - num_forced
            flat = mass[b, h].flatten()
            if 0 < extra < len(order):  # the test is well posed: no near-tie at the cut
                assert float(flat[order[extra - 1]] - flat[order[extra]]) > MARGIN
            row = forced.flatten().clone()
            row[order[:extra]] = True
            keep[b, h] = row.view(forced.shape)
    return keep, n


def _brute_cumulative(mass, allowed, forced, target):
    """Per (b, h): forced blocks, then the largest others until the kept mass reaches ``target * total``."""
    keep = torch.zeros(mass.shape, dtype=torch.bool)
    for b in range(mass.shape[0]):
        for h in range(mass.shape[1]):
            m = mass[b, h]
            goal = target * float(m[allowed].sum())
            acc = float(m[forced].sum())
            row = forced.flatten().clone()
            flat = m.flatten()
            for i in _order(m, allowed & ~forced):
                if acc >= goal:
                    assert acc - goal > MARGIN  # well posed: the float32 sums cross at the same block
                    break
                assert goal - acc > MARGIN
                row[i] = True
                acc += float(flat[i])
            keep[b, h] = row.view(forced.shape)
    return keep


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:2])) + f"-{c[2][0]}x{c[2][1]}-{c[5]}")
@pytest.mark.parametrize("density", [0.1, 0.3, 0.55])
def test_global_density_is_the_brute_force_top_k(gen, case, density):
    sq, sk, bs, hq, hkv, causal = case
    q, k = _inputs(gen, sq, sk, hq, hkv)
    mass = _block_mass(q, k, bs, causal)
    allowed, forced = _geometry(sq, sk, bs, causal)
    expected, n = _brute_topk(mass, allowed, forced, density)
    layout = patterns.select("oracle", q, k, block_size=bs, causal=causal, density=density)
    got = layout.to_dense()
    assert torch.equal(got, expected)
    assert (got & allowed).sum((2, 3)).tolist() == [[n] * hq]  # round(density * allowed), exactly, per head
    assert not bool((got & ~allowed).any())
    explicit = patterns.select("oracle", q, k, block_size=bs, causal=causal, density=density, scope="global")
    assert torch.equal(explicit.to_dense(), got)  # scope=None means "global" for the density rule
    # the layout's recall is the bound computed from the masses: sum of the kept E over the rows that see a key
    bound = float((mass * expected).sum() / mass.sum())
    assert attention_recall(q, k, layout, causal=causal) == pytest.approx(bound, abs=1e-5)


def test_default_density_keeps_round_of_a_tenth_and_never_fewer_than_the_diagonal(gen):
    q, k = _inputs(gen, 640, 640, 2, 2)
    allowed, forced = _geometry(640, 640, (32, 32), True)  # A = 210, F = 20: round(21.0) = 21 blocks
    got = patterns.select("oracle", q, k, block_size=(32, 32)).to_dense()
    assert got.sum((2, 3)).tolist() == [[math.floor(0.1 * int(allowed.sum()) + 0.5)] * 2] == [[21, 21]]
    tiny = patterns.select("oracle", q, k, block_size=(32, 32), density=0.01).to_dense()  # round(2.1) < F
    assert torch.equal(tiny, forced.expand_as(tiny))


@pytest.mark.parametrize("case", CASES[:2], ids=["ragged", "chunked"])
@pytest.mark.parametrize("density", [0.1, 0.3])
def test_global_beats_row_scope_at_the_same_count(gen, case, density):
    sq, sk, bs, hq, hkv, causal = case
    q, k = _inputs(gen, sq, sk, hq, hkv)
    allowed, forced = _geometry(sq, sk, bs, causal)
    row = patterns.select("oracle", q, k, block_size=bs, density=density, scope="row")
    kept = (row.to_dense() & allowed).sum((2, 3))
    assert bool((kept == kept[0, 0]).all())  # per-row budgets depend on the geometry only
    matched = int(kept[0, 0]) / int(allowed.sum())
    glob = patterns.select("oracle", q, k, block_size=bs, density=matched)
    assert torch.equal((glob.to_dense() & allowed).sum((2, 3)), kept)
    r_row = attention_recall(q, k, row, per_head=True)
    r_glob = attention_recall(q, k, glob, per_head=True)
    assert bool((r_glob >= r_row - 1e-6).all()), (r_glob, r_row)
    if int(kept[0, 0]) > int(forced.sum()):  # more than the diagonal: on random inputs the row constraint costs
        assert float(r_glob.mean()) > float(r_row.mean())


@pytest.mark.parametrize("threshold", [0.3, 0.6, 0.8])
def test_global_beats_xattention_at_matched_density(gen, threshold):
    """The issue's failure: at XAttention's density the per-row oracle had less recall than XAttention."""
    q, k = _inputs(gen, 512, 512, 1, 1)
    bs = (32, 32)
    x = patterns.select("xattention", q, k, block_size=bs, stride=4, threshold=threshold)
    o = patterns.select("oracle", q, k, block_size=bs, density=x.density())
    assert o.density() == x.density()
    assert attention_recall(q, k, o) >= attention_recall(q, k, x) - 1e-6


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:2])) + f"-{c[2][0]}x{c[2][1]}-{c[5]}")
@pytest.mark.parametrize("target", [0.5, 0.9])
def test_global_target_recall_is_minimal_and_reaches_the_target(gen, case, target):
    sq, sk, bs, hq, hkv, causal = case
    q, k = _inputs(gen, sq, sk, hq, hkv)
    mass = _block_mass(q, k, bs, causal)
    allowed, forced = _geometry(sq, sk, bs, causal)
    expected = _brute_cumulative(mass, allowed, forced, target)
    layout = patterns.select("oracle", q, k, block_size=bs, causal=causal, target_recall=target, scope="global")
    got = layout.to_dense()
    assert torch.equal(got, expected)
    recall = attention_recall(q, k, layout, causal=causal, per_head=True)
    assert bool((recall >= target - 1e-6).all()), recall
    for h in range(hq):  # minimal: without its lightest non-forced block, every such head falls below the target
        others = got[0, h] & ~forced
        if bool(others.any()):
            lightest = float(mass[0, h][others].min())
            assert float((mass[0, h] * got[0, h]).sum()) - lightest < target * float(mass[0, h].sum())
    default = patterns.select("oracle", q, k, block_size=bs, causal=causal, target_recall=target)
    row = patterns.select("oracle", q, k, block_size=bs, causal=causal, target_recall=target, scope="row")
    assert torch.equal(default.to_dense(), row.to_dense())  # scope=None keeps target_recall per row
    assert int(got.sum()) <= int(row.to_dense().sum())  # the row rule's layout also reaches the mean target


@pytest.mark.parametrize("rule", [{"density": 0.2}, {"target_recall": 0.8, "scope": "global"}])
def test_kv_heads_is_the_union_of_the_group(gen, rule):
    sq, sk, bs, hq, hkv, causal = CASES[0]
    q, k = _inputs(gen, sq, sk, hq, hkv)
    mass = _block_mass(q, k, bs, causal)
    allowed, forced = _geometry(sq, sk, bs, causal)
    if "density" in rule:
        per_q, _ = _brute_topk(mass, allowed, forced, rule["density"])
    else:
        per_q = _brute_cumulative(mass, allowed, forced, rule["target_recall"])
    kv = patterns.select("oracle", q, k, block_size=bs, heads="kv", **rule)
    assert kv.num_heads == hkv
    assert torch.equal(kv.to_dense(), per_q.view(1, hkv, hq // hkv, *per_q.shape[2:]).any(2))
    assert kv.density() >= patterns.select("oracle", q, k, block_size=bs, **rule).density()  # the union adds


@pytest.mark.parametrize("value", ["grid", "Global", "", True, 1])
@pytest.mark.parametrize("rule", [{}, {"target_recall": 0.9}])
def test_bad_scope_names_the_option(value, rule):
    q, k = torch.zeros(1, 2, 64, 16), torch.zeros(1, 1, 64, 16)
    expected = rf"oracle: scope: expected one of \(None, 'global', 'layer', 'row'\), got {value!r}"
    with pytest.raises(ValueError, match=expected):
        patterns.select("oracle", q, k, block_size=(16, 16), scope=value, **rule)


# ----------------------------------------------------------------------------------- grid-wide selectors


def test_select_topk_global_ties_and_budgets():
    scores = torch.tensor([[[1.0, 2.0, 2.0], [2.0, 0.5, 2.0]], [[0.0, 0.0, 0.0], [3.0, 1.0, 1.0]]])  # (H=2, 2, 3)
    allowed = torch.tensor([[True, True, False], [True, True, True]])
    forced = torch.tensor([[True, False, False], [False, False, False]])
    keep = sel.select_topk_global(scores, torch.tensor([2, 1]), allowed, forced=forced)
    # head 0: forced (0,0); ties at 2.0 among (0,1), (1,0), (1,2) ((0,2) not allowed): the two first by position
    assert keep[0].tolist() == [[True, True, False], [True, False, False]]
    assert keep[1].tolist() == [[True, False, False], [True, False, False]]  # forced + the single 3.0
    everything = sel.select_topk_global(scores, 100, allowed, forced=forced)
    assert torch.equal(everything, allowed.expand_as(scores))
    assert torch.equal(sel.select_topk_global(scores, 0, allowed, forced=forced), forced.expand_as(scores))


def test_grid_selectors_match_the_row_selectors_on_the_flattened_grid(gen):
    """Without ties, the grid-wide rule is the per-row rule applied to the flattened grid."""
    scores = torch.rand(2, 3, 5, 7, generator=gen) ** 3
    allowed = torch.rand(5, 7, generator=gen) < 0.8
    forced = (torch.rand(5, 7, generator=gen) < 0.1) & allowed
    for k in (0, 4, 11):
        got = sel.select_topk_global(scores, k, allowed, forced=forced)
        ref = sel.select_topk(scores.flatten(-2), k, allowed.flatten(), forced=forced.flatten())
        assert torch.equal(got, ref.view_as(scores))
    per_head = torch.tensor([0.2, 0.7, 1.0])  # a threshold per head, broadcast over (B, H)
    got = sel.select_by_cumulative_mass_global(scores, per_head, allowed, forced=forced)
    ref = sel.select_by_cumulative_mass(scores.flatten(-2), per_head, allowed.flatten(), forced=forced.flatten())
    assert torch.equal(got, ref.view_as(scores))
    assert bool((got | ~allowed).all(-1).all(-1)[:, 2].all())  # threshold 1: every positive allowed block


def _brute_layer_topk(mass, allowed, forced, density):
    """Per batch: every head's forced blocks plus the largest allowed others over all heads' grids at once,
    ``max(H F, floor(density * H A + 0.5))`` in all."""
    heads = mass.shape[1]
    stacked_allowed, stacked_forced = allowed.repeat(heads, 1), forced.repeat(heads, 1)
    stacked = mass.reshape(mass.shape[0], 1, heads * mass.shape[2], mass.shape[3])
    keep, n = _brute_topk(stacked, stacked_allowed, stacked_forced, density)
    return keep.view(mass.shape), n


@pytest.mark.parametrize("case", CASES[:3], ids=["ragged", "chunked", "rect"])
@pytest.mark.parametrize("density", [0.1, 0.3])
def test_layer_scope_is_the_brute_force_top_k_over_all_heads(gen, case, density):
    sq, sk, bs, hq, hkv, causal = case
    q, k = _inputs(gen, sq, sk, hq, hkv)
    q[:, 0] *= 0.2  # one diffuse head: the layer budget gives it more blocks than the others
    mass = _block_mass(q, k, bs, causal)
    allowed, forced = _geometry(sq, sk, bs, causal)
    expected, n = _brute_layer_topk(mass, allowed, forced, density)
    layout = patterns.select("oracle", q, k, block_size=bs, causal=causal, density=density, scope="layer")
    got = layout.to_dense()
    assert torch.equal(got, expected)
    assert int((got & allowed).sum()) == n
    # at the same total count it has at least the per-head global rule's mean recall
    glob = patterns.select("oracle", q, k, block_size=bs, causal=causal, density=density)
    if int((glob.to_dense() & allowed).sum()) == n:
        assert attention_recall(q, k, layout, causal=causal) >= attention_recall(q, k, glob, causal=causal) - 1e-6


def test_layer_scope_bounds_xattention_at_matched_mean_density(gen):
    """XAttention spreads its blocks unevenly over heads; the layer-wide oracle still has at least its recall."""
    q, k = _inputs(gen, 512, 512, 4, 2)
    q[:, 1] *= 0.1
    bs = (32, 32)
    for threshold in (0.5, 0.8):
        x = patterns.select("xattention", q, k, block_size=bs, stride=4, threshold=threshold)
        o = patterns.select("oracle", q, k, block_size=bs, density=x.density(), scope="layer")
        assert o.density() == pytest.approx(x.density(), abs=1e-9)
        assert attention_recall(q, k, o) >= attention_recall(q, k, x) - 1e-6


def test_layer_scope_target_recall_reaches_the_layer_target(gen):
    q, k = _inputs(gen, 300, 300, 4, 2)
    bs = (64, 64)
    layout = patterns.select("oracle", q, k, block_size=bs, target_recall=0.8, scope="layer")
    assert attention_recall(q, k, layout) >= 0.8 - 1e-6
