"""Static patterns (dense, streaming, sliding_window, strided, power) against brute-force constructions."""

from __future__ import annotations

import math

import pytest
import torch

from sparseflash import patterns
from sparseflash.patterns import selection as sel

# (seq_len_q, seq_len_k, block_size): aligned, ragged, chunked prefill (Sq < Sk), unequal blocks
SHAPES = [
    (256, 256, (64, 64)),
    (300, 300, (64, 64)),
    (97, 451, (32, 32)),
    (200, 333, (32, 64)),
    (130, 290, (64, 16)),
    (1, 77, (16, 16)),
]


def _qk(seq_len_q: int, seq_len_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(1, 4, seq_len_q, 16), torch.zeros(1, 2, seq_len_k, 16)


def _blocks_from_tokens(token_mask: torch.Tensor, block_size: tuple[int, int]) -> torch.Tensor:
    """Bool (Qb, Kb): blocks holding at least one True of a (Sq, Sk) token mask (pad, then any per tile)."""
    seq_len_q, seq_len_k = token_mask.shape
    bq, bk = block_size
    qb, kb = math.ceil(seq_len_q / bq), math.ceil(seq_len_k / bk)
    padded = torch.zeros(qb * bq, kb * bk, dtype=torch.bool)
    padded[:seq_len_q, :seq_len_k] = token_mask
    return padded.view(qb, bq, kb, bk).any(3).any(1)


def _token_rule(seq_len_q: int, seq_len_k: int, rule) -> torch.Tensor:
    """Bool (Sq, Sk): causal pairs (key j <= query position p, bottom-right) where ``rule(p, j)`` holds."""
    p = (torch.arange(seq_len_q) + seq_len_k - seq_len_q)[:, None]
    j = torch.arange(seq_len_k)[None, :]
    return (j <= p) & rule(p, j)


def _diag_blocks(seq_len_q: int, seq_len_k: int, bs: tuple[int, int]) -> list[list[int]]:
    """Per query-block row, the key blocks holding its queries' positions (brute force)."""
    off, (bq, bk) = seq_len_k - seq_len_q, bs
    rows = []
    for i0 in range(0, seq_len_q, bq):
        pos = [off + i for i in range(i0, min(i0 + bq, seq_len_q)) if off + i >= 0]
        rows.append(sorted({p // bk for p in pos}))
    return rows


def _layout_mask(layout) -> torch.Tensor:
    assert layout.batch == 1 and layout.num_heads == 1, "static patterns share one layout"
    layout.check_indices()
    return layout.to_dense()[0, 0]


@pytest.mark.parametrize("seq_len_q,seq_len_k,bs", SHAPES)
def test_dense_is_every_causal_block(seq_len_q, seq_len_k, bs):
    q, k = _qk(seq_len_q, seq_len_k)
    want = _blocks_from_tokens(_token_rule(seq_len_q, seq_len_k, lambda p, j: torch.ones((), dtype=torch.bool)), bs)
    assert torch.equal(_layout_mask(patterns.select("dense", q, k, block_size=bs)), want)
    full = patterns.select("dense", q, k, block_size=bs, causal=False)
    assert bool(_layout_mask(full).all())


@pytest.mark.parametrize("seq_len_q,seq_len_k,bs", SHAPES)
@pytest.mark.parametrize("sink,local", [(0, 1), (4, 40), (64, 100), (130, 7)])
def test_streaming_matches_token_rule(seq_len_q, seq_len_k, bs, sink, local):
    q, k = _qk(seq_len_q, seq_len_k)
    layout = patterns.select("streaming", q, k, block_size=bs, sink_tokens=sink, local_tokens=local)
    want = _blocks_from_tokens(_token_rule(seq_len_q, seq_len_k, lambda p, j: (j < sink) | (p - j < local)), bs)
    assert torch.equal(_layout_mask(layout), want)


@pytest.mark.parametrize("seq_len_q,seq_len_k,bs", SHAPES)
@pytest.mark.parametrize("window", [1, 33, 128, 1000])
def test_sliding_window_matches_token_rule(seq_len_q, seq_len_k, bs, window):
    q, k = _qk(seq_len_q, seq_len_k)
    layout = patterns.select("sliding_window", q, k, block_size=bs, window=window)
    want = _blocks_from_tokens(_token_rule(seq_len_q, seq_len_k, lambda p, j: p - j < window), bs)
    assert torch.equal(_layout_mask(layout), want)


def _block_rule(seq_len_q, seq_len_k, bs, rule) -> torch.Tensor:
    """Brute force: row I keeps diagonal blocks plus J (causal) with rule(I, J, diag_blocks, last_diag)."""
    allowed = _blocks_from_tokens(_token_rule(seq_len_q, seq_len_k, lambda p, j: torch.ones((), dtype=torch.bool)), bs)
    out = torch.zeros_like(allowed)
    for i, diag in enumerate(_diag_blocks(seq_len_q, seq_len_k, bs)):
        for j in range(allowed.shape[1]):
            out[i, j] = bool(allowed[i, j]) and (j in diag or (bool(diag) and rule(j, diag)))
    return out


@pytest.mark.parametrize("seq_len_q,seq_len_k,bs", SHAPES)
@pytest.mark.parametrize("stride,local,sink", [(1, 0, 0), (2, 0, 0), (3, 1, 1), (5, 2, 2), (None, None, 0)])
def test_strided_matches_block_rule(seq_len_q, seq_len_k, bs, stride, local, sink):
    q, k = _qk(seq_len_q, seq_len_k)
    layout = patterns.select("strided", q, k, block_size=bs, stride=stride, local_blocks=local, sink_blocks=sink)
    kb = math.ceil(seq_len_k / bs[1])
    s = math.ceil(math.sqrt(kb)) if stride is None else stride
    lo = s if local is None else local

    def rule(j, diag):
        return (diag[-1] - j) % s == 0 or j < sink or diag[0] - lo <= j < diag[0]

    assert torch.equal(_layout_mask(layout), _block_rule(seq_len_q, seq_len_k, bs, rule))


@pytest.mark.parametrize("seq_len_q,seq_len_k,bs", SHAPES + [(2048, 2048, (16, 16))])
@pytest.mark.parametrize("sink,local,max_power", [(1, 0, None), (0, 0, None), (2, 3, None), (1, 0, 2)])
def test_power_matches_block_rule(seq_len_q, seq_len_k, bs, sink, local, max_power):
    q, k = _qk(seq_len_q, seq_len_k)
    layout = patterns.select("power", q, k, block_size=bs, sink_blocks=sink, local_blocks=local, max_power=max_power)
    powers = [2**e for e in range(0, 20 if max_power is None else max_power + 1)]

    def rule(j, diag):
        return (diag[-1] - j) in powers or j < sink or diag[0] - local <= j < diag[0]

    assert torch.equal(_layout_mask(layout), _block_rule(seq_len_q, seq_len_k, bs, rule))


def test_power_density_matches_the_paper_estimate():
    # methods.md §2.4: about (1 + 1 + log2(1024)) / 512 = 2.3 % at 128K tokens with 128-blocks, sink = w = 1
    q = torch.zeros(1, 1, 131072, 16)
    layout = patterns.select("power", q, q, block_size=(128, 128))
    assert abs(layout.density() - 0.023) < 0.003


def test_static_layouts_run_on_q_device_and_bound_capacity():
    q, k = _qk(4096, 4096)
    layout = patterns.select("streaming", q, k, block_size=(64, 64), sink_tokens=64, local_tokens=256)
    assert layout.capacity <= 1 + 6 + 2
    layout = patterns.select("power", q, k, block_size=(64, 64))
    assert layout.capacity < 64 and layout.device == q.device
    # the row capacity holds the largest row: nothing truncated
    assert torch.equal(layout.kv_num_blocks, sel.to_layout(layout.to_dense(), 4096, 4096, (64, 64)).kv_num_blocks)
