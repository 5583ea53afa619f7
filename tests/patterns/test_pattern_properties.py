"""Properties every registered pattern keeps, with hypothesis over shapes (Sq, Sk, blocks, GQA).

Causal blocks only, diagonal always kept, sink kept when asked, valid compressed indices, and the density
falling as the method's knob (threshold, target recall, budget) falls. New patterns are picked up from the
registry; ``KNOBS`` says how to shrink a known method's budget.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparseflash import patterns
from sparseflash.layouts import BlockLayout, PermutedLayout, causal_block_mask
from sparseflash.layouts.geometry import diagonal_mask
from sparseflash.metrics import attention_recall

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# small-shape options so every method does real selection on tiny inputs
SMALL = {
    "xattention": {"stride": 4},
    "streaming": {"sink_tokens": 16, "local_tokens": 40},
    "sliding_window": {"window": 40},
    "vertical_slash": {"vertical_size": 30, "slash_size": 60, "last_q": 16},
    "flexprefill": {"min_budget": 32},
    "permuted": {"segment_size": 64},
    "block_max": {"top_k": 2},
    "strided": {"local_blocks": 0},
}
# knob -> values from large budget to small (density must not rise along the list)
KNOBS = {
    "xattention": ("threshold", [1.0, 0.9, 0.6, 0.3]),
    "oracle": ("density", [1.0, 0.6, 0.3, 0.1]),
    "block_max": ("top_k", [8, 4, 2, 1]),
    "streaming": ("local_tokens", [200, 100, 40, 1]),
    "sliding_window": ("window", [200, 100, 40, 1]),
    "power": ("max_power", [8, 3, 1, 0]),
    "strided": ("stride", [1, 2, 3, 7]),
    "vertical_slash": ("slash_size", [400, 200, 100, 50]),
}
# option that makes key block 0 part of every row
SINK = {
    "streaming": {"sink_tokens": 1},
    "power": {"sink_blocks": 1},
    "strided": {"sink_blocks": 1},
    "xattention": {},
    "vertical_slash": {"sink_tokens": 30},
    "permuted": {"force_sink": True},
}


@st.composite
def shapes(draw, chunked: bool):
    seq_len_q = draw(st.integers(1, 260))
    seq_len_k = seq_len_q + (draw(st.integers(1, 150)) if chunked else 0)
    block = draw(st.sampled_from([16, 32, 64]))
    hq, hkv = draw(st.sampled_from([(1, 1), (2, 1), (4, 2)]))
    seed = draw(st.integers(0, 2**16))
    return seq_len_q, seq_len_k, block, hq, hkv, seed


def _inputs(seq_len_q, seq_len_k, hq, hkv, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, hq, seq_len_q, 16, generator=g) * 2
    k = torch.randn(1, hkv, seq_len_k, 16, generator=g)
    return q, k


def _select(name, q, k, block, **extra):
    opts = {**SMALL.get(name, {}), **extra}
    known = sorted(patterns.options_of(name))
    unknown = sorted(set(opts) - set(known))
    if unknown:  # a test option the method does not take is a mistake in this file, not something to drop
        raise ValueError(f"{name}: unknown test option(s) {unknown}; expected some of {known}")
    return patterns.select(name, q, k, block_size=(block, block), **opts)


def _check_invariants(name, layout, seq_len_q, seq_len_k, block, sink=False):
    assert isinstance(layout, BlockLayout | PermutedLayout)
    # a PermutedLayout's blocks index permuted keys off its own segment, but they keep the same block-grid
    # invariants: earlier segments lie below the diagonal, and the own segment is computed causally
    blocks = layout.blocks if isinstance(layout, PermutedLayout) else layout
    blocks.check_indices()
    bs = (block, block)
    dense = blocks.to_dense()
    allowed = causal_block_mask(seq_len_q, seq_len_k, bs)
    assert not bool((dense & ~allowed).any()), f"{name}: block above the causal diagonal"
    diag = diagonal_mask(seq_len_q, seq_len_k, bs) & allowed
    assert bool(dense[..., diag].all()), f"{name}: diagonal block dropped"
    if isinstance(layout, PermutedLayout):
        segment = layout.segment_size
        perm = layout.perm
        start = torch.arange(seq_len_k) // segment * segment
        assert bool((perm // segment * segment == start).all()), f"{name}: a key moved out of its segment"
        assert torch.equal(perm.sort(-1).values, torch.arange(seq_len_k).expand_as(perm)), f"{name}: not a permutation"
        mask = layout.token_mask()  # (B, H, Sq, Sk) in original key order
        i, j = torch.arange(seq_len_q)[:, None], torch.arange(seq_len_k)[None, :]
        assert not bool((mask & (j > i + seq_len_k - seq_len_q)).any()), f"{name}: a key above the causal diagonal"
        assert bool(mask[..., torch.arange(seq_len_q), torch.arange(seq_len_q)].all()), f"{name}: a row misses itself"
        if sink:
            assert bool(mask[..., 0].all()), f"{name}: sink token dropped"
    elif sink:
        col0 = allowed[:, 0]
        assert bool(dense[..., col0, 0].all()), f"{name}: sink block dropped"


@pytest.mark.parametrize("name", patterns.available())
@SETTINGS
@given(shape=shapes(chunked=False))
def test_invariants_self_attention(name, shape):
    seq_len_q, seq_len_k, block, hq, hkv, seed = shape
    q, k = _inputs(seq_len_q, seq_len_k, hq, hkv, seed)
    layout = _select(name, q, k, block, **SINK.get(name, {}))
    assert layout.num_heads in (1, hkv, hq) and layout.batch == 1
    _check_invariants(name, layout, seq_len_q, seq_len_k, block, sink=name in SINK)


@pytest.mark.parametrize("name", patterns.available())
@SETTINGS
@given(shape=shapes(chunked=True))
def test_invariants_chunked_prefill(name, shape):
    seq_len_q, seq_len_k, block, hq, hkv, seed = shape
    q, k = _inputs(seq_len_q, seq_len_k, hq, hkv, seed)
    try:
        layout = _select(name, q, k, block, **SINK.get(name, {}))
    except NotImplementedError:  # methods defined for Sq == Sk only say so
        pytest.skip(f"{name} does not support chunked prefill")
    _check_invariants(name, layout, seq_len_q, seq_len_k, block, sink=name in SINK)


@pytest.mark.parametrize("name", sorted(KNOBS))
@SETTINGS
@given(shape=shapes(chunked=False))
def test_density_falls_with_the_knob(name, shape):
    if name not in patterns.available():
        pytest.skip(f"{name} not registered")
    seq_len_q, seq_len_k, block, hq, hkv, seed = shape
    q, k = _inputs(seq_len_q, seq_len_k, hq, hkv, seed)
    knob, values = KNOBS[name]
    layouts = [_select(name, q, k, block, **{knob: v}) for v in values]
    densities = [lay.density() for lay in layouts]
    assert all(a >= b - 1e-12 for a, b in zip(densities, densities[1:], strict=False)), (knob, values, densities)
    if name in ("xattention", "oracle", "streaming", "sliding_window", "power"):
        for big, small in zip(layouts, layouts[1:], strict=False):  # nested selections, not just fewer blocks
            assert not bool((small.to_dense() & ~big.to_dense()).any())


@pytest.mark.parametrize("name", [n for n in patterns.available() if "target_recall" in patterns.options_of(n)])
@SETTINGS
@given(shape=shapes(chunked=False))
def test_density_falls_with_target_recall(name, shape):
    seq_len_q, seq_len_k, block, hq, hkv, seed = shape
    q, k = _inputs(seq_len_q, seq_len_k, hq, hkv, seed)
    densities = [_select(name, q, k, block, target_recall=r).density() for r in (1.0, 0.9, 0.6, 0.2)]
    assert all(a >= b - 1e-12 for a, b in zip(densities, densities[1:], strict=False)), densities


@SETTINGS
@given(shape=shapes(chunked=True))
def test_oracle_at_density_one_has_recall_one(shape):
    seq_len_q, seq_len_k, block, hq, hkv, seed = shape
    q, k = _inputs(seq_len_q, seq_len_k, hq, hkv, seed)
    layout = patterns.select("oracle", q, k, block_size=(block, block), density=1.0)
    assert attention_recall(q, k, layout) == pytest.approx(1.0, abs=1e-6)
    kv = patterns.select("oracle", q, k, block_size=(block, block), target_recall=0.9, heads="kv")
    assert kv.num_heads == hkv and attention_recall(q, k, kv) >= 0.9 - 1e-6
