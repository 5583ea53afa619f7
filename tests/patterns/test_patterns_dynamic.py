"""Dynamic patterns: xattention, block_max, oracle. Scoring kernels vs their PyTorch references (interpreter on
CPU), references vs brute force from the definitions, and the selection rules."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import randn

from sparseflash import patterns
from sparseflash.layouts import geometry as geo
from sparseflash.metrics import attention_recall
from sparseflash.ops._triton_env import triton_runs_on
from sparseflash.ops.scores.block_scores import (
    block_scores_reference,
    block_scores_triton,
    dense_lse_reference,
)
from sparseflash.patterns import selection as sel
from sparseflash.patterns.block_max import BlockMaxCalibration, calibrate_block_max, row_thresholds
from sparseflash.patterns.xattention import xattention_scores_reference, xattention_scores_triton

needs_triton = pytest.mark.skipif(
    not triton_runs_on(torch.device("cpu")) and not torch.cuda.is_available(), reason="needs CUDA or TRITON_INTERPRET=1"
)


def _dense_probs(q, k, causal=True):
    """Brute-force (B, Hq, Sq, Sk) float64 softmax with bottom-right causal mask (rows seeing nothing: 0)."""
    group = q.shape[1] // k.shape[1]
    kk = k.double().repeat_interleave(group, 1)
    s = q.double() @ kk.transpose(-1, -2) / math.sqrt(q.shape[-1])
    sq, sk = q.shape[2], k.shape[2]
    if causal:
        bad = torch.arange(sk)[None, :] > (torch.arange(sq) + sk - sq)[:, None]
        s = s.masked_fill(bad, float("-inf"))
    return torch.softmax(s, -1).nan_to_num(0.0), s


def _block_reduce(x, bs, fn):
    b, h, sq, sk = x.shape
    qb, kb = math.ceil(sq / bs[0]), math.ceil(sk / bs[1])
    fill = float("-inf") if fn == "max" else 0.0
    pad = torch.full((b, h, qb * bs[0], kb * bs[1]), fill, dtype=x.dtype)
    pad[..., :sq, :sk] = x
    v = pad.view(b, h, qb, bs[0], kb, bs[1])
    return v.amax((3, 5)) if fn == "max" else v.sum((3, 5))


# ----------------------------------------------------------------------------------------- xattention


def _antidiag_naive(q, k, stride, block, causal=True):
    """The definition, one sub-tile at a time (tiny shapes only)."""
    b, hq, sq, d = q.shape
    group = hq // k.shape[1]
    rows, cols = math.ceil(sq / stride), math.ceil(k.shape[2] / stride)
    off = k.shape[2] - sq
    a = torch.full((b, hq, rows, cols), float("-inf"), dtype=torch.float64)
    for h in range(hq):
        for t in range(rows):
            for u in range(cols):
                vals = []
                for j in range(stride):
                    qi, kj = t * stride + stride - 1 - j, u * stride + j
                    if qi < sq and kj < k.shape[2] and (not causal or kj <= qi + off):
                        vals.append((q[:, h, qi].double() * k[:, h // group, kj].double()).sum(-1))
                if vals:
                    a[:, h, t, u] = torch.stack(vals).mean(0) / math.sqrt(d)
    p = torch.softmax(a, -1).nan_to_num(0.0)
    r = block // stride
    qb, kb = math.ceil(sq / block), math.ceil(k.shape[2] / block)
    pad = torch.zeros(b, hq, qb * r, kb * r, dtype=torch.float64)
    pad[..., :rows, :cols] = p
    return pad.view(b, hq, qb, r, kb, r).sum((3, 5))


@pytest.mark.parametrize(
    "sq,sk,stride,block,causal", [(37, 37, 4, 16, True), (20, 45, 2, 16, True), (30, 30, 8, 16, False)]
)
def test_xattention_reference_matches_definition(gen, sq, sk, stride, block, causal):
    q, k = randn(gen, 1, 2, sq, 8, dtype=torch.float32), randn(gen, 1, 1, sk, 8, dtype=torch.float32)
    est = xattention_scores_reference(q, k, stride=stride, block_size=block, causal=causal)
    torch.testing.assert_close(est.double(), _antidiag_naive(q, k, stride, block, causal), atol=1e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize(
    "b,hq,hkv,sq,sk,d,stride,block,causal,dtype",
    [
        (1, 4, 2, 150, 233, 32, 4, 32, True, torch.float32),  # chunked prefill, GQA, ragged
        (2, 2, 1, 70, 70, 24, 8, 16, True, torch.float16),  # ragged, head_dim not a power of two
        (1, 1, 1, 64, 64, 16, 16, 32, False, torch.float32),  # non-causal, r = 2 < 16
        (1, 2, 2, 90, 40, 16, 2, 16, True, torch.bfloat16),  # Sq > Sk: leading rows see nothing
        # long enough for unmasked tiles strictly below the causal edge (the kernel's fast path)
        (1, 2, 1, 320, 320, 16, 2, 16, True, torch.float32),
        (1, 2, 1, 300, 300, 24, 2, 16, True, torch.float16),  # fast path with head_dim padded to 32
        (1, 2, 2, 150, 600, 32, 4, 32, True, torch.float32),  # chunked prefill: offset 450
        (1, 1, 1, 300, 300, 16, 4, 16, False, torch.float32),  # non-causal: full tiles up to Sk
    ],
)
def test_xattention_triton_matches_reference(gen, b, hq, hkv, sq, sk, d, stride, block, causal, dtype):
    q, k = randn(gen, b, hq, sq, d, dtype=dtype), randn(gen, b, hkv, sk, d, dtype=dtype)
    ref = xattention_scores_reference(q, k, stride=stride, block_size=block, causal=causal)
    out = xattention_scores_triton(q, k, stride=stride, block_size=block, causal=causal)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


@needs_triton
@pytest.mark.parametrize("flatten", [False, True])
@pytest.mark.parametrize("config", [(16, 64, 4, 1), (32, 32, 4, 2), (64, 128, 8, 3)])
def test_xattention_triton_tile_configs_agree(gen, config, flatten):
    """Every tile shape and loop form gives the reference's estimate (fast and masked tiles, several query blocks a
    program)."""
    q, k = randn(gen, 1, 4, 260, 16, dtype=torch.float32), randn(gen, 1, 2, 330, 16, dtype=torch.float32)
    ref = xattention_scores_reference(q, k, stride=2, block_size=32)
    out = xattention_scores_triton(q, k, stride=2, block_size=32, config=config, flatten=flatten)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_xattention_triton_config_must_hold_whole_blocks(gen):
    q = randn(gen, 1, 1, 64, 16, dtype=torch.float32)
    with pytest.raises(ValueError, match="config"):
        xattention_scores_triton(q, q, stride=2, block_size=32, config=(8, 64, 4, 1))
    for bad in [(16, 64), (16, 64, 4, 0), (16, 64, 4.0, 1), "16,64,4,1"]:
        with pytest.raises(ValueError, match=r"config: expected \(BLOCK_T, BLOCK_U, num_warps, num_stages\)"):
            xattention_scores_triton(q, q, stride=2, block_size=32, config=bad)
    with pytest.raises(TypeError, match="flatten: expected a bool"):
        xattention_scores_triton(q, q, stride=2, block_size=32, flatten=1)


def test_xattention_stride_one_is_the_exact_block_mass(gen):
    q, k = randn(gen, 1, 2, 50, 16, dtype=torch.float32), randn(gen, 1, 2, 77, 16, dtype=torch.float32)
    est = xattention_scores_reference(q, k, stride=1, block_size=16)
    mass = block_scores_reference(q, k, block_size=(16, 16), mode="mass")
    torch.testing.assert_close(est, mass, atol=1e-5, rtol=1e-5)


def _xattn_select_naive(est, tau, sq, sk, bs):
    """XAttention's find_blocks rule, one row at a time (methods.md §2.1)."""
    allowed = geo.causal_block_mask(sq, sk, bs)
    diag = geo.diagonal_mask(sq, sk, bs)
    keep = torch.zeros(est.shape, dtype=torch.bool)
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in est.shape[:3]]).tolist():
        bb, h, i = idx
        row = torch.where(allowed[i], est[bb, h, i].double(), 0.0)
        forced = (diag[i] | (torch.arange(row.numel()) == 0)) & allowed[i]
        acc = float(row[forced].sum())
        total = float(row.sum())
        keep[bb, h, i] = forced
        for j in torch.argsort(torch.where(forced, -1.0, row), descending=True).tolist():
            if forced[j] or row[j] <= 0 or acc >= tau * total:
                continue
            keep[bb, h, i, j] = True
            acc += float(row[j])
    return keep


@pytest.mark.parametrize("sq,sk,tau", [(200, 200, 0.5), (120, 300, 0.9), (250, 250, 0.99)])
def test_xattention_selection_rule(gen, sq, sk, tau):
    q, k = randn(gen, 1, 4, sq, 16, dtype=torch.float32), randn(gen, 1, 2, sk, 16, dtype=torch.float32)
    q = q * 3  # peakier attention: selections differ between thresholds
    layout = patterns.select("xattention", q, k, block_size=(32, 32), stride=4, threshold=tau)
    est = xattention_scores_reference(q, k, stride=4, block_size=32)
    assert torch.equal(layout.to_dense(), _xattn_select_naive(est, tau, sq, sk, (32, 32)))
    # target_recall is the same knob for this selector
    same = patterns.select("xattention", q, k, block_size=(32, 32), stride=4, target_recall=tau)
    assert torch.equal(same.to_dense(), layout.to_dense())


def test_xattention_per_head_thresholds_and_kv_union(gen):
    q, k = randn(gen, 1, 4, 256, 16, dtype=torch.float32) * 3, randn(gen, 1, 2, 256, 16, dtype=torch.float32)
    taus = [0.3, 0.95, 0.0, 0.7]
    per = patterns.select("xattention", q, k, block_size=(32, 32), stride=4, threshold=taus).to_dense()
    for h, tau in enumerate(taus):
        if tau == 0.0:
            forced = sel.forced_mask(256, 256, (32, 32), sink_blocks=1)
            assert torch.equal(per[0, h], forced)  # 0: sink + diagonal only
        else:
            one = patterns.select(
                "xattention", q[:, h : h + 1], k[:, h // 2 : h // 2 + 1], block_size=(32, 32), stride=4, threshold=tau
            ).to_dense()
            assert torch.equal(per[0, h], one[0, 0])
    kv = patterns.select("xattention", q, k, block_size=(32, 32), stride=4, threshold=taus, heads="kv")
    assert kv.num_heads == 2
    assert torch.equal(kv.to_dense(), per.view(1, 2, 2, *per.shape[2:]).any(2))


# ---------------------------------------------------------------------------------------- block scores


@pytest.mark.parametrize(
    "sq,sk,bs,causal",
    [(70, 70, (16, 32), True), (33, 90, (16, 16), True), (50, 30, (32, 16), True), (40, 40, (16, 16), False)],
)
def test_block_scores_reference_matches_brute_force(gen, sq, sk, bs, causal):
    q, k = randn(gen, 2, 4, sq, 16, dtype=torch.float32), randn(gen, 2, 2, sk, 16, dtype=torch.float32)
    probs, logits = _dense_probs(q, k, causal)
    mx = block_scores_reference(q, k, block_size=bs, mode="max", causal=causal)
    ms = block_scores_reference(q, k, block_size=bs, mode="mass", causal=causal)
    torch.testing.assert_close(mx.double(), _block_reduce(logits, bs, "max"), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ms.double(), _block_reduce(probs, bs, "sum"), atol=1e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize(
    "b,hq,hkv,sq,sk,d,bs,causal,dtype",
    [
        (1, 4, 2, 100, 150, 32, (32, 16), True, torch.float32),
        (1, 2, 1, 45, 45, 24, (16, 32), True, torch.float16),
        (1, 1, 1, 40, 33, 16, (16, 16), False, torch.float32),
        (1, 2, 2, 60, 30, 16, (16, 16), True, torch.bfloat16),
    ],
)
def test_block_scores_triton_matches_reference(gen, b, hq, hkv, sq, sk, d, bs, causal, dtype):
    q, k = randn(gen, b, hq, sq, d, dtype=dtype), randn(gen, b, hkv, sk, d, dtype=dtype)
    lse = dense_lse_reference(q, k, causal=causal)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for mode in ("max", "mass"):
        ref = block_scores_reference(q, k, block_size=bs, mode=mode, causal=causal, lse=lse)
        out = block_scores_triton(q, k, block_size=bs, mode=mode, causal=causal, lse=lse)
        finite = torch.isfinite(ref)
        assert torch.equal(torch.isfinite(out), finite), mode
        torch.testing.assert_close(out[finite], ref[finite], atol=tol, rtol=tol)


# ------------------------------------------------------------------------------------------- block_max


def test_block_max_rule_and_thresholds(gen):
    q, k = randn(gen, 1, 2, 256, 16, dtype=torch.float32), randn(gen, 1, 1, 256, 16, dtype=torch.float32)
    bs = (32, 16)
    maxima = block_scores_reference(q, k, block_size=bs, mode="max")
    valid = geo.causal_block_mask(256, 256, bs) & ~geo.diagonal_mask(256, 256, bs)
    forced = sel.forced_mask(256, 256, bs)
    thr = 0.3
    layout = patterns.select("block_max", q, k, block_size=bs, threshold=thr)
    assert torch.equal(layout.to_dense(), ((maxima >= thr) & valid) | forced)
    # a huge threshold keeps only the diagonal; -inf keeps every causal block
    only_diag = patterns.select("block_max", q, k, block_size=bs, threshold=1e9).to_dense()
    assert torch.equal(only_diag, forced.expand_as(only_diag))
    everything = patterns.select("block_max", q, k, block_size=bs, threshold=float("-inf")).to_dense()
    assert torch.equal(everything, geo.causal_block_mask(256, 256, bs).expand_as(everything))
    # top_k on the input itself keeps exactly min(k, valid) off-diagonal blocks per row (no ties in random data)
    top = patterns.select("block_max", q, k, block_size=bs, top_k=3).to_dense()
    assert torch.equal((top & valid).sum(-1), valid.sum(-1).clamp(max=3).expand(1, 2, -1))


def test_calibrate_block_max_fits_mean_midpoints(gen):
    bs = (32, 16)
    samples = [
        (randn(gen, 2, 2, 192, 16, dtype=torch.float32), randn(gen, 2, 1, 192, 16, dtype=torch.float32)),
        (randn(gen, 1, 2, 128, 16, dtype=torch.float32), randn(gen, 1, 1, 128, 16, dtype=torch.float32)),
    ]
    cal = calibrate_block_max(samples, top_k=2, block_size=bs)
    assert isinstance(cal, BlockMaxCalibration) and cal.num_samples == 3 and cal.thresholds.shape == (2, 6)
    per = []
    for q, k in samples:
        m = block_scores_reference(q, k, block_size=bs, mode="max")
        valid = geo.causal_block_mask(q.shape[2], k.shape[2], bs) & ~geo.diagonal_mask(q.shape[2], k.shape[2], bs)
        for b in range(q.shape[0]):
            rows = []
            for h in range(2):
                for i in range(m.shape[2]):
                    v = sorted(m[b, h, i][valid[i]].tolist(), reverse=True)
                    rows.append((v[1] + v[2]) / 2 if len(v) > 2 else float("-inf"))
            per.append(torch.tensor(rows).view(2, -1))
    want = torch.stack([torch.stack([p[:, i] for p in per if p.shape[1] > i]).mean(0) for i in range(6)], 1)
    torch.testing.assert_close(cal.thresholds, want.float())
    # rows past the calibrated length reuse the last threshold; block size must match
    q, k = randn(gen, 1, 2, 320, 16, dtype=torch.float32), randn(gen, 1, 1, 320, 16, dtype=torch.float32)
    layout = patterns.select("block_max", q, k, block_size=bs, calibration=cal)
    m = block_scores_reference(q, k, block_size=bs, mode="max")
    thr = cal.thresholds[:, torch.arange(10).clamp(max=5)]
    valid = geo.causal_block_mask(320, 320, bs) & ~geo.diagonal_mask(320, 320, bs)
    assert torch.equal(layout.to_dense(), ((m >= thr[..., None]) & valid) | sel.forced_mask(320, 320, bs))
    with pytest.raises(ValueError, match=r"block_size: expected \(32, 16\) \(from the calibration\)"):
        patterns.select("block_max", q, k, block_size=(32, 32), calibration=cal)


def test_row_thresholds_keeps_all_when_few_blocks():
    maxima = torch.tensor([[[1.0, 5.0, 3.0, 4.0]]])
    valid = torch.tensor([True, True, True, False])
    assert row_thresholds(maxima, valid, 2).tolist() == [[2.0]]
    assert row_thresholds(maxima, valid, 3).tolist() == [[float("-inf")]]


# ---------------------------------------------------------------------------------------------- oracle


def test_oracle_density_one_is_recall_one(gen):
    q, k = randn(gen, 1, 4, 200, 16, dtype=torch.float32), randn(gen, 1, 2, 200, 16, dtype=torch.float32)
    layout = patterns.select("oracle", q, k, block_size=(32, 32), density=1.0)
    assert layout.density() == 1.0
    assert attention_recall(q, k, layout) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("sq,sk", [(300, 300), (130, 400)])
def test_oracle_keeps_the_heaviest_blocks(gen, sq, sk):
    """The per-row rule (``scope="row"``); the global one is tests/patterns/test_oracle_global.py."""
    q, k = randn(gen, 1, 2, sq, 16, dtype=torch.float32) * 4, randn(gen, 1, 2, sk, 16, dtype=torch.float32)
    bs = (32, 32)
    probs, _ = _dense_probs(q, k)
    mass = _block_reduce(probs, bs, "sum")
    allowed = geo.causal_block_mask(sq, sk, bs)
    forced = geo.diagonal_mask(sq, sk, bs) & allowed
    keep = patterns.select("oracle", q, k, block_size=bs, density=0.3, scope="row").to_dense()
    for h in range(2):
        for i in range(allowed.shape[0]):
            budget = math.ceil(0.3 * int(allowed[i].sum()) - 1e-9)
            row = keep[0, h, i]
            assert bool(row[forced[i]].all()) and not bool(row[~allowed[i]].any())
            assert int(row.sum()) == max(budget, int(forced[i].sum()))
            dropped = mass[0, h, i][allowed[i] & ~row]
            chosen = mass[0, h, i][row & ~forced[i]]
            if dropped.numel() and chosen.numel():
                assert float(chosen.min()) >= float(dropped.max()) - 1e-12
    # target_recall: the layout's recall reaches it; recall grows with the target
    recalls = []
    for target in (0.5, 0.8, 0.95):
        layout = patterns.select("oracle", q, k, block_size=bs, target_recall=target)
        recalls.append(attention_recall(q, k, layout))
        assert recalls[-1] >= target - 1e-6
    assert recalls == sorted(recalls)


def test_oracle_beats_dynamic_methods_at_equal_density(gen):
    q, k = randn(gen, 1, 2, 512, 16, dtype=torch.float32) * 3, randn(gen, 1, 2, 512, 16, dtype=torch.float32)
    bs = (32, 32)
    x = patterns.select("xattention", q, k, block_size=bs, stride=4, threshold=0.7)
    target = x.density()
    o = patterns.select("oracle", q, k, block_size=bs, density=target)
    while o.density() > x.density():  # per-row budgets round up: step down to at most xattention's density
        target -= 0.01
        o = patterns.select("oracle", q, k, block_size=bs, density=target)
    assert attention_recall(q, k, o) >= attention_recall(q, k, x) - 1e-3


# ------------------------------------------------------------------------------------- shared selectors


@pytest.mark.parametrize("tau", [0.05, 0.5, 0.9, 1.0])
def test_select_by_cumulative_mass_is_the_smallest_prefix(gen, tau):
    scores = torch.rand(3, 5, 12, generator=gen) ** 4
    scores[0, 0] = 0.0  # a row without mass keeps nothing
    allowed = torch.rand(5, 12, generator=gen) < 0.7
    keep = sel.select_by_cumulative_mass(scores, tau, allowed)
    for idx in range(15):
        b, i = divmod(idx, 5)
        row = torch.where(allowed[i], scores[b, i].double(), 0.0)
        total, acc, want = float(row.sum()), 0.0, torch.zeros(12, dtype=torch.bool)
        for j in torch.argsort(row, descending=True).tolist():
            if acc >= tau * total or row[j] <= 0:
                break
            want[j], acc = True, acc + float(row[j])
        assert torch.equal(keep[b, i], want)
    # per-row thresholds broadcast like the rows
    per_row = sel.select_by_cumulative_mass(scores, torch.full((3, 5), tau), allowed)
    assert torch.equal(per_row, keep)
    # extra: the same prefix of the sorted row, `extra` entries longer where positive entries remain
    for extra in (1, 3):
        more = sel.select_by_cumulative_mass(scores, tau, allowed, extra=extra)
        for idx in range(15):
            b, i = divmod(idx, 5)
            row = torch.where(allowed[i], scores[b, i].double(), 0.0)
            n = min(int(keep[b, i].sum()) + extra, int((row > 0).sum()))
            want = torch.zeros(12, dtype=torch.bool)
            want[torch.argsort(row, descending=True)[:n]] = True
            assert torch.equal(more[b, i], want & (row > 0))


def test_select_topk_with_per_row_budgets_and_forced(gen):
    scores = torch.randn(2, 4, 9, generator=gen)
    allowed = torch.rand(4, 9, generator=gen) < 0.8
    forced = torch.zeros(4, 9, dtype=torch.bool)
    forced[:, 0] = True
    budget = torch.tensor([0, 1, 3, 20])
    keep = sel.select_topk(scores, budget, allowed, forced=forced)
    for b in range(2):
        for i in range(4):
            cand = [j for j in range(9) if allowed[i, j] and not forced[i, j]]
            best = sorted(cand, key=lambda j: -float(scores[b, i, j]))[: int(budget[i])]
            want = {j for j in best} | {j for j in range(9) if forced[i, j] and allowed[i, j]}
            assert set(torch.nonzero(keep[b, i]).flatten().tolist()) == want
    same = sel.select_topk(scores, 3, allowed)
    assert torch.equal(same, sel.select_topk(scores, torch.full((4,), 3), allowed))


def test_xattention_local_blocks_forces_the_previous_blocks():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 512, 32, generator=gen)
    k = torch.randn(1, 2, 512, 32, generator=gen)
    for local in (1, 2):
        keep = patterns.select(
            "xattention", q, k, block_size=(64, 64), threshold=[0.0] * 4, local_blocks=local
        ).to_dense()[0]
        rows = torch.arange(8)
        for back in range(1, local + 1):
            ok = rows >= back
            assert keep[:, rows[ok], rows[ok] - back].all()
        base = patterns.select("xattention", q, k, block_size=(64, 64), threshold=[0.0] * 4).to_dense()[0]
        assert keep.sum() > base.sum()  # threshold 0: sink + diagonal only, so the local blocks are new
    with pytest.raises(ValueError, match="local_blocks"):
        patterns.select("xattention", q, k, local_blocks=-1)


def test_xattention_extra_blocks_keeps_one_more_block_per_row_where_one_is_left():
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, 4, 512, 32, generator=gen) * 2
    k = torch.randn(1, 2, 512, 32, generator=gen)
    opts = {"block_size": (64, 64), "threshold": 0.5}
    base = patterns.select("xattention", q, k, **opts).to_dense()[0]
    more = patterns.select("xattention", q, k, extra_blocks=1, **opts).to_dense()[0]
    allowed = torch.ones(8, 8, dtype=torch.bool).tril()
    assert (more >= base).all()  # a superset
    added = (more & ~base).sum(-1)
    left = (allowed & ~base).sum(-1)
    assert torch.equal(added, left.clamp(max=1))  # exactly one more block per row, where one is left
    with pytest.raises(ValueError, match="extra_blocks"):
        patterns.select("xattention", q, k, extra_blocks=-1)


def test_selection_geometry_is_shared_and_never_modified(gen):
    """xattention's (allowed, forced) masks are made once per shape and device, and selecting never changes them."""
    bs = (32, 32)
    allowed, forced = sel.selection_geometry(300, 300, bs, sink_blocks=1, local_blocks=1, device="cpu")
    again = sel.selection_geometry(300, 300, bs, sink_blocks=1, local_blocks=1, device=torch.device("cpu"))
    assert again[0] is allowed and again[1] is forced
    assert torch.equal(allowed, geo.causal_block_mask(300, 300, bs))
    assert torch.equal(forced, sel.forced_mask(300, 300, bs, sink_blocks=1, local_blocks=1))
    before = (allowed.clone(), forced.clone())
    q, k = randn(gen, 1, 2, 300, 16, dtype=torch.float32), randn(gen, 1, 1, 300, 16, dtype=torch.float32)
    first = patterns.select("xattention", q, k, block_size=bs, stride=4, threshold=0.6, local_blocks=1)
    second = patterns.select("xattention", q, k, block_size=bs, stride=4, threshold=0.6, local_blocks=1)
    assert torch.equal(first.to_dense(), second.to_dense())
    assert torch.equal(allowed, before[0]) and torch.equal(forced, before[1])
    other = sel.selection_geometry(300, 300, bs, sink_blocks=1, local_blocks=2, device="cpu")[1]
    assert not torch.equal(other, forced)  # the options are part of the key
