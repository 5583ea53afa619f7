"""attention_recall and density against brute force from the dense softmax."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import randn

from sparseflash.layouts import BlockLayout, causal_block_mask
from sparseflash.metrics import attention_recall, density, row_recall


def _brute_recall(q, k, keep, bs):
    """Per-row kept dense softmax mass, float64 (B, Hq, Sq), from an explicit (Sq, Sk) matrix."""
    hq, hkv = q.shape[1], k.shape[1]
    sq, sk = q.shape[2], k.shape[2]
    s = q.double() @ k.double().repeat_interleave(hq // hkv, 1).transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = s.masked_fill(torch.arange(sk)[None, :] > (torch.arange(sq) + sk - sq)[:, None], float("-inf"))
    p = torch.softmax(s, -1)
    heads = keep.shape[1]
    keep = keep.repeat_interleave(hq // heads, 1) if heads != hq else keep
    tok = keep.repeat_interleave(bs[0], 2).repeat_interleave(bs[1], 3)[..., :sq, :sk]
    return torch.where(tok, p, 0.0).sum(-1)


def _random_keep(gen, b, heads, sq, sk, bs, frac):
    qb, kb = math.ceil(sq / bs[0]), math.ceil(sk / bs[1])
    return torch.rand(b, heads, qb, kb, generator=gen) < frac  # some rows keep nothing: recall 0


@pytest.mark.parametrize(
    "b,hq,hkv,layout_heads,sq,sk,bs",
    [
        (1, 4, 2, 4, 100, 100, (16, 16)),  # per query head
        (2, 4, 2, 2, 77, 77, (32, 16)),  # per KV head, ragged
        (1, 2, 1, 1, 50, 130, (16, 32)),  # shared layout, chunked prefill
    ],
)
def test_attention_recall_matches_brute_force(gen, b, hq, hkv, layout_heads, sq, sk, bs):
    q, k = randn(gen, b, hq, sq, 16, dtype=torch.float32), randn(gen, b, hkv, sk, 16, dtype=torch.float32)
    keep = _random_keep(gen, b, layout_heads, sq, sk, bs, 0.4)
    layout = BlockLayout.from_dense(keep, seq_len_q=sq, seq_len_k=sk, block_size=bs)
    want = _brute_recall(q, k, keep, bs)
    rec, valid = row_recall(q, k, layout)
    assert bool(valid.all())
    torch.testing.assert_close(rec.double(), want, atol=1e-5, rtol=1e-5)
    assert attention_recall(q, k, layout) == pytest.approx(float(want.mean()), abs=1e-6)
    per_head = attention_recall(q, k, layout, per_head=True)
    torch.testing.assert_close(per_head, want.mean((0, 2)), atol=1e-6, rtol=1e-6)


def test_recall_is_one_for_dense_and_zero_without_blocks(gen):
    q, k = randn(gen, 1, 2, 90, 16, dtype=torch.float32), randn(gen, 1, 2, 90, 16, dtype=torch.float32)
    full = BlockLayout.from_dense(
        causal_block_mask(90, 90, (32, 32))[None, None], seq_len_q=90, seq_len_k=90, block_size=(32, 32)
    )
    assert attention_recall(q, k, full) == pytest.approx(1.0, abs=1e-6)
    empty = BlockLayout.from_dense(
        torch.zeros(1, 1, 3, 3, dtype=torch.bool), seq_len_q=90, seq_len_k=90, block_size=(32, 32)
    )
    assert attention_recall(q, k, empty) == 0.0


def test_rows_seeing_no_key_are_left_out(gen):
    # Sq > Sk: the first Sq - Sk query rows see nothing (causal, bottom-right)
    q, k = randn(gen, 1, 1, 60, 16, dtype=torch.float32), randn(gen, 1, 1, 20, 16, dtype=torch.float32)
    keep = torch.zeros(1, 1, 4, 2, dtype=torch.bool)
    keep[..., 0] = True  # key block 0 (keys 0..15) only
    layout = BlockLayout.from_dense(keep, seq_len_q=60, seq_len_k=20, block_size=(16, 16))
    rec, valid = row_recall(q, k, layout)
    assert torch.equal(valid[0, 0], torch.arange(60) >= 40)
    want = _brute_recall(q[:, :, 40:], k, keep[:, :, 2:], (16, 16))  # rows 40.. align with blocks 2..
    assert attention_recall(q, k, layout) == pytest.approx(float(want.mean()), abs=1e-6)


def test_density_counts_causal_blocks_only():
    keep = torch.ones(2, 3, 4, 4, dtype=torch.bool)
    keep[1, 2] = False
    keep[1, 2, :, 0] = True
    layout = BlockLayout.from_dense(keep, seq_len_q=64, seq_len_k=64, block_size=(16, 16))
    # causal blocks: 10 per head; head 2 of batch 1 keeps 4 of them
    assert density(layout) == pytest.approx((5 * 10 + 4) / 60)
    torch.testing.assert_close(density(layout, per_head=True), torch.tensor([1.0, 1.0, 0.7], dtype=torch.float64))
    assert density(layout, causal=False) == pytest.approx((5 * 16 + 4) / 96)


def test_metrics_reject_non_layouts(gen):
    q = randn(gen, 1, 1, 16, 16, dtype=torch.float32)
    with pytest.raises(TypeError, match="layout: expected a BlockLayout, got Tensor"):
        attention_recall(q, q, torch.ones(1))
    with pytest.raises(TypeError, match="layout: expected a BlockLayout"):
        density("dense")


def test_attention_recall_of_a_permuted_layout_matches_brute_force():
    """PBS layouts index permuted keys: recall goes through their own attention path."""
    import sparseflash as sf

    gen = torch.Generator().manual_seed(7)
    q = torch.randn(1, 2, 1024, 32, generator=gen)
    k = torch.randn(1, 1, 1024, 32, generator=gen)
    layout = sf.patterns.select("permuted", q, k, threshold=0.3, block_size=64, segment_size=128)
    assert layout.density() < 1.0
    scores = (q.double() @ k.double().transpose(-1, -2)) * 32**-0.5
    causal = torch.ones(1024, 1024, dtype=torch.bool).tril()
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    kept = layout.token_mask(range(1024))
    brute = (probs * kept).sum(-1).mean().item()
    assert sf.attention_recall(q, k, layout) == pytest.approx(brute, abs=1e-5)


def test_recall_raises_on_nan_instead_of_reporting_it(gen):
    """A NaN log-sum-exp (NaN in q or k) is an error, never a recall of 1 (or 0) from rows left out."""
    q, k = randn(gen, 1, 2, 64, 16, dtype=torch.float32), randn(gen, 1, 2, 64, 16, dtype=torch.float32)
    layout = BlockLayout.from_dense(
        causal_block_mask(64, 64, (16, 16))[None, None], seq_len_q=64, seq_len_k=64, block_size=(16, 16)
    )
    bad_q = q.clone()
    bad_q[0, 0, 5, 0] = float("nan")
    with pytest.raises(ValueError, match=r"q, k: expected .*finite.*got NaN"):
        attention_recall(bad_q, k, layout)
    bad_k = k.clone()
    bad_k[0, 1, 3] = float("inf")
    with pytest.raises(ValueError, match=r"q, k: expected .*finite.*got NaN"):
        attention_recall(q, bad_k, layout, per_head=True)
    with pytest.raises(ValueError, match="scale: expected"):
        attention_recall(q * 100, k, layout, scale=1e37)
