"""Coarse attention over dropped blocks (ops/dropped_blocks.py) against a float64 loop reference."""

import math

import pytest
import torch

from sparseflash import BlockLayout, block_sparse_attention, causal_block_mask
from sparseflash.ops.merge import merge_attention_states
from sparseflash.ops.prefill.dropped_blocks import (
    dropped_block_attention,
    dropped_block_attention_reference,
    eligible_dropped,
)
from sparseflash.ops.prefill.reference import token_mask


def _layout(gen, heads, sq, sk, block, keep=0.4):
    nq, nk = -(-sq // block), -(-sk // block)
    causal = causal_block_mask(sq, sk, (block, block))
    rand = torch.rand(1, heads, nq, nk, generator=gen) < keep
    # diagonal kept: the blocks holding each row's own position
    diag = torch.zeros(nq, nk, dtype=torch.bool)
    for i in range(nq):
        lo, hi = i * block + sk - sq, min((i + 1) * block, sq) - 1 + sk - sq
        for j in range(nk):
            diag[i, j] = j * block <= hi and min((j + 1) * block, sk) - 1 >= lo
    return BlockLayout.from_dense((rand | diag) & causal, seq_len_q=sq, seq_len_k=sk, block_size=(block, block))


@pytest.mark.parametrize("sq,sk,heads,kv", [(100, 100, 4, 2), (64, 150, 2, 2), (77, 77, 6, 1)])
def test_matches_loop_reference(gen, sq, sk, heads, kv):
    q = torch.randn(2, heads, sq, 16, generator=gen)
    k = torch.randn(2, kv, sk, 16, generator=gen)
    v = torch.randn(2, kv, sk, 16, generator=gen)
    layout = _layout(gen, heads, sq, sk, 16)
    out, lse = dropped_block_attention(q, k, v, layout, scale=0.3)
    ref_out, ref_lse = dropped_block_attention_reference(q, k, v, layout, scale=0.3)
    finite = torch.isfinite(ref_lse)
    assert finite.any()
    if sq == sk:
        assert (~finite).any()  # the first query block has nothing before it
    assert torch.equal(torch.isfinite(lse), finite)
    assert torch.allclose(lse[finite].double(), ref_lse[finite], atol=1e-4)
    assert torch.allclose(out.double(), ref_out, atol=1e-4)
    assert (out[~finite] == 0).all()


def test_eligible_blocks_are_dropped_and_wholly_visible(gen):
    layout = _layout(gen, 2, 96, 96, 16)
    elig = eligible_dropped(layout)[0]
    kept = layout.to_dense()[0]
    assert not (elig & kept).any()
    for i in range(elig.shape[1]):
        for j in elig[:, i].nonzero()[:, 1].tolist():
            assert (j + 1) * 16 - 1 <= i * 16  # the block's last key precedes the row's first query


def test_merged_equals_attention_over_kept_tokens_plus_pooled_tokens(gen):
    """sparse (kept tokens) merged with coarse (pooled dropped blocks) = one softmax over both sets, float64."""
    sq = sk = 80
    q, k, v = (torch.randn(1, 2, n, 16, generator=gen) for n in (sq, sk, sk))
    layout = _layout(gen, 2, sq, sk, 16, keep=0.3)
    sparse, lse = block_sparse_attention(q, k, v, layout, return_lse=True, scale=0.25)
    merged, _ = merge_attention_states(sparse, lse, *dropped_block_attention(q, k, v, layout, scale=0.25))
    # reference (float64): keys = the tokens the layout keeps + one pooled token per dropped block, bias log(16)
    q, k, v = q.double(), k.double(), v.double()
    kept = token_mask(range(sq), sq, sk, num_heads=2, causal=True, blocks=layout.to_dense(), block_size=(16, 16))
    pooled_k, pooled_v = k.view(1, 2, 5, 16, 16).mean(3), v.view(1, 2, 5, 16, 16).mean(3)
    drop = eligible_dropped(layout).repeat_interleave(16, dim=2)[:, :, :sq]  # (1, 2, Sq, 5)
    logits = torch.cat([q @ k.transpose(-1, -2) * 0.25, q @ pooled_k.transpose(-1, -2) * 0.25 + math.log(16)], -1)
    mask = torch.cat([kept.expand(1, 2, sq, sk), drop], -1)
    p = torch.softmax(logits.masked_fill(~mask, -math.inf), -1)
    ref = p @ torch.cat([v, pooled_v], 2)
    assert torch.allclose(merged.double(), ref, atol=1e-5)
    assert not torch.allclose(merged, sparse, atol=1e-3)  # the correction is real


def test_bad_input_is_named(gen):
    q, k, v = (torch.randn(1, 2, 64, 16, generator=gen) for _ in range(3))
    layout = _layout(gen, 2, 64, 64, 16)
    with pytest.raises(TypeError, match="layout"):
        dropped_block_attention(q, k, v, "blocks")
    with pytest.raises(ValueError, match="q"):
        dropped_block_attention(q[0], k, v, layout)
    with pytest.raises(ValueError, match="scale"):
        dropped_block_attention(q, k, v, layout, scale=float("nan"))
    with pytest.raises(ValueError):
        dropped_block_attention(q[:, :, :32], k[:, :, :32], v[:, :, :32], layout)  # layout for 64 tokens
