"""FlexPrefill: golden comparison with a per-head re-statement of FlexPrefill's code, properties, options."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import randn

from sparseflash.layouts import causal_block_mask
from sparseflash.layouts.geometry import diagonal_mask
from sparseflash.patterns import registry
from sparseflash.patterns.flexprefill import block_means, cover_count, flexprefill, sqrt_js_divergence


def _qk(gen, batch, hq, hkv, sq, sk, d, *, sharp=3.0, dtype=torch.float32):
    """q, k with peaked attention (scaled q) and a band of keys every query likes (a vertical line)."""
    q, k = randn(gen, batch, hq, sq, d), randn(gen, batch, hkv, sk, d)
    u = randn(gen, d)
    u = u / u.norm() * 3
    k[:, :, 40:60] += u
    return (sharp * q + u).to(dtype), k.to(dtype)


def _flexprefill_loop(q, k, block, gamma, tau, min_budget, max_budget):
    """FlexPrefill's get_active_blocks (flex_prefill_attention.py @a24b27b) head by head, for Sq == Sk.

    Differs from the release only where sparseflash documents it: ``// block + 1`` instead of ``// 128 + 1``.
    """
    batch, heads, n, d = q.shape
    group = heads // k.shape[1]
    nb = math.ceil(n / block)
    mb = 1 if min_budget is None else math.ceil(min_budget / block)
    big = nb if max_budget is None else min(math.ceil(max_budget / block), nb)
    pad = nb * block - n
    mask = torch.zeros(batch, heads, nb, nb, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            qq, kk = q[b, h].float(), k[b, h // group].float()
            last = qq[n - block :] / math.sqrt(d)
            s = last @ kk.T
            for i in range(block):
                s[i, n - block + i + 1 :] = float("-inf")
            p = torch.softmax(s, -1)
            vertical = p.mean(0)
            slash = torch.zeros(n)
            for i in range(block):  # diagonal through key c of the last row: keys c - (block - 1 - i)
                for c in range(n):
                    j = c - (block - 1 - i)
                    if 0 <= j < n:
                        slash[c] += p[i, j]
            slash /= block

            def budget(x):
                covered = (torch.sort(x, descending=True).values.cumsum(0) <= gamma).sum() + 1
                return int(min(max(int(covered) // block + 1, mb), big))

            n_v, n_s = budget(vertical), budget(slash)
            v_pool = torch.nn.functional.pad(vertical, (0, pad)).view(nb, block).sum(1)
            s_pool = torch.nn.functional.pad(slash, (0, pad)).view(nb, block).sum(1)
            counts = torch.tensor([min(block, n - i * block) for i in range(nb)], dtype=torch.float32)
            k_bar = torch.nn.functional.pad(kk, (0, 0, 0, pad)).view(nb, block, d).sum(1) / counts[:, None]
            p_hat = torch.softmax(last.mean(0) @ k_bar.T, -1)
            m = (p_hat + v_pool) / 2
            jsd = 0.5 * (p_hat * torch.log(p_hat / m)).sum() + 0.5 * (v_pool * torch.log(v_pool / m)).sum()
            query_aware = bool(torch.sqrt(jsd) < tau)
            if query_aware:
                n_v = n_s = mb
            v_pool[0] = float("inf")
            s_pool[-1] = float("inf")
            for col in torch.topk(v_pool, n_v).indices.tolist():
                mask[b, h, col:, col] = True
            for idx in torch.topk(s_pool, n_s).indices.tolist():
                delta = nb - 1 - idx
                for row in range(delta, nb):
                    mask[b, h, row, row - delta] = True
            if query_aware:
                q_bar = torch.nn.functional.pad(qq, (0, 0, 0, pad)).view(nb, block, d).sum(1) / counts[:, None]
                a = (q_bar / math.sqrt(d)) @ k_bar.T
                a = a.masked_fill(~torch.ones(nb, nb, dtype=torch.bool).tril(), float("-inf"))
                flat = torch.softmax(a, -1).flatten()
                values, order = flat.sort(descending=True)
                keep = order[values.cumsum(0) <= gamma * nb]
                mask[b, h].view(-1)[keep] = True
                mask[b, h, 0, 0] = True  # the release pads the dropped entries with index 0
            mask[b, h].diagonal().fill_(True)
    return mask


@pytest.mark.parametrize(
    "n, block, gamma, tau, min_budget",
    [(300, 32, 0.9, 0.1, 32), (257, 32, 0.6, 0.0, 64), (320, 64, 0.95, 10.0, 64), (200, 16, 0.8, 0.3, None)],
    ids=["default-tau", "no-query-aware", "all-query-aware", "ragged-small-blocks"],
)
def test_matches_flexprefill_loop(gen, n, block, gamma, tau, min_budget):
    q, k = _qk(gen, 1, 4, 2, n, n, 32)
    layout = flexprefill(q, k, block_size=(block, block), gamma=gamma, tau=tau, min_budget=min_budget, backend="torch")
    expected = _flexprefill_loop(q, k, block, gamma, tau, min_budget, None)
    assert torch.equal(layout.to_dense(), expected)
    assert 0 < layout.density() < 1 or tau == 10.0


def test_query_aware_branch_adds_blocks(gen):
    q, k = _qk(gen, 1, 2, 1, 300, 300, 32)
    opts = dict(block_size=(32, 32), gamma=0.9, min_budget=32, backend="torch")
    vs_only = flexprefill(q, k, tau=0.0, **opts).to_dense()
    aware = flexprefill(q, k, tau=100.0, **opts).to_dense()  # every head query-aware: budgets drop to min
    assert not torch.equal(vs_only, aware)


@pytest.mark.parametrize(
    "shape, block", [((1, 4, 2, 333, 333, 32), 32), ((2, 2, 1, 130, 390, 32), 32)], ids=["gqa", "chunked"]
)
def test_properties(gen, shape, block):
    batch, hq, hkv, sq, sk, d = shape
    q, k = _qk(gen, batch, hq, hkv, sq, sk, d)
    bs = (block, block)
    masks = [
        registry.select("flexprefill", q, k, block_size=bs, gamma=g, min_budget=block, backend="torch")
        for g in (0.3, 0.6, 0.9, 0.99)
    ]
    allowed = causal_block_mask(sq, sk, bs)
    diag = diagonal_mask(sq, sk, bs)
    for layout in masks:
        dense = layout.to_dense()
        assert layout.num_heads == hq and registry.get("flexprefill").heads == "q"
        assert not (dense & ~allowed).any(), "a block above the causal diagonal"
        assert (dense | ~diag).all(), "a diagonal block is missing"
        assert (dense[..., 0] | ~allowed[:, 0]).all(), "the sink column is missing"
    for low, high in zip(masks, masks[1:], strict=False):  # lower gamma keeps a subset
        assert not (low.to_dense() & ~high.to_dense()).any()
    densities = [m.density() for m in masks]
    assert densities == sorted(densities) and densities[0] < densities[-1]
    # target_recall is gamma
    same = registry.select("flexprefill", q, k, block_size=bs, target_recall=0.6, min_budget=block, backend="torch")
    assert torch.equal(same.to_dense(), masks[1].to_dense())
    # per-KV-head layout: union over the group
    kv = registry.select("flexprefill", q, k, block_size=bs, gamma=0.6, min_budget=block, heads="kv", backend="torch")
    dense = masks[1].to_dense()
    assert torch.equal(kv.to_dense(), dense.view(batch, hkv, hq // hkv, *dense.shape[2:]).any(2))


def test_budgets_clamp(gen):
    q, k = _qk(gen, 1, 2, 1, 320, 320, 32)
    opts = dict(block_size=(32, 32), gamma=0.3, tau=0.0, backend="torch")
    small = flexprefill(q, k, min_budget=32, **opts)
    large = flexprefill(q, k, min_budget=160, **opts)  # at least 5 vertical and 5 slash blocks
    capped = flexprefill(q, k, min_budget=32, max_budget=32, **{**opts, "gamma": 0.99})
    assert small.density() < large.density()
    assert not (small.to_dense() & ~large.to_dense()).any()
    # one vertical (the sink) and one slash (the diagonal) block per row at most, plus the diagonal
    assert torch.all(capped.kv_num_blocks <= 2)


def test_short_input_is_dense(gen):
    q, k = _qk(gen, 1, 2, 1, 64, 64, 32)
    layout = flexprefill(q, k, block_size=(32, 32), backend="torch")  # 64 <= max(2 * 32, 512)
    assert layout.density() == 1.0 and layout.num_heads == 2


def test_helpers():
    dist = torch.tensor([[0.5, 0.1, 0.3, 0.1]])
    assert cover_count(dist, 0.5).tolist() == [2]  # 0.5 <= 0.5, then one more
    assert cover_count(dist, 0.85).tolist() == [3]
    x = torch.randn(2, 3, 70, 8)
    means = block_means(x, 32)
    torch.testing.assert_close(means[:, :, 2], x[:, :, 64:].mean(2))
    p = torch.tensor([0.5, 0.5, 0.0])
    assert sqrt_js_divergence(p, p).item() == 0
    jsd = sqrt_js_divergence(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])).item()
    assert math.isclose(jsd, math.sqrt(math.log(2)), rel_tol=1e-6)


@pytest.mark.interpret
@pytest.mark.parametrize(
    "shape, dtype, options",
    [
        ((1, 4, 2, 333, 333), torch.float16, dict(gamma=0.9)),
        ((1, 4, 1, 300, 300), torch.bfloat16, dict(gamma=0.6, tau=10.0, heads="kv")),
        ((1, 2, 2, 130, 390), torch.float32, dict(gamma=0.95, tau=0.3, max_budget=96)),
        ((2, 2, 1, 257, 257), torch.float32, dict(gamma=0.99, tau=100.0)),
    ],
    ids=["gqa-ragged", "all-query-aware-kv-layout", "chunked", "batch-high-gamma"],
)
def test_triton_path_gives_the_torch_layout(gen, shape, dtype, options):
    """The Triton path (last-query kernels, the sort-free coverage, the layout kernel) against the PyTorch path
    (the sort path, the bool mask and from_dense: the behaviour before the kernels): the very same layout."""
    batch, hq, hkv, sq, sk = shape
    q, k = _qk(gen, batch, hq, hkv, sq, sk, 32, dtype=dtype)
    opts = dict(block_size=(32, 32), min_budget=32, **options)
    fast = registry.select("flexprefill", q, k, backend="triton", **opts)
    slow = registry.select("flexprefill", q, k, backend="torch", **opts)
    assert torch.equal(fast.kv_num_blocks, slow.kv_num_blocks)
    assert torch.equal(fast.kv_indices, slow.kv_indices)
    assert 0 < fast.density() < 1


@pytest.mark.parametrize(
    "options, error, match",
    [
        (dict(gamma=0.9, target_recall=0.9), ValueError, "expected gamma or target_recall, not both"),
        (dict(gamma=0.0), ValueError, r"flexprefill: gamma: expected a float in \(0, 1\], got 0.0"),
        (dict(target_recall=1.5), ValueError, r"target_recall: expected a float in \(0, 1\], got 1.5"),
        (dict(tau=-0.1), ValueError, "tau: expected a float >= 0, got -0.1"),
        (dict(min_budget=0), ValueError, "min_budget: expected an int >= 1, got 0"),
        (dict(min_budget=512, max_budget=256), ValueError, "max_budget: expected >= min_budget=512, got 256"),
        (dict(block_size=(64, 128)), ValueError, "block_size: expected block_q == block_k"),
        (dict(heads="group"), ValueError, "heads: expected one of"),
        (dict(causal=False), NotImplementedError, "only causal prefill"),
        (dict(threshold=0.9), ValueError, r"unknown option\(s\) \['threshold'\]"),
    ],
)
def test_options_rejected(options, error, match):
    q, k = torch.randn(1, 2, 64, 16), torch.randn(1, 1, 64, 16)
    with pytest.raises(error, match=match):
        registry.select("flexprefill", q, k, **options)
