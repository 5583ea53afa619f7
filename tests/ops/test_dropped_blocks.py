"""Coarse attention over dropped blocks (ops/dropped_blocks.py): PyTorch and Triton paths against a float64 loop."""

import math

import pytest
import torch
from conftest import HAS_GPU, LSE_TOL, REL_TOL, assert_attention_close, randn, rel_err

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
    for bad in (0, 3, 32):  # not a power of two dividing block_k = 16
        with pytest.raises(ValueError, match="pool_size.*block_k = 16.*got " + str(bad)):
            dropped_block_attention(q, k, v, layout, pool_size=bad)
    with pytest.raises(TypeError, match="pool_size"):
        dropped_block_attention(q, k, v, layout, pool_size=4.0)


@pytest.mark.parametrize("pool", [1, 4, 8])
@pytest.mark.parametrize("sq,sk,heads,kv", [(100, 100, 4, 2), (64, 150, 2, 2)])
def test_pools_match_loop_reference(gen, sq, sk, heads, kv, pool):
    """Pools of ``pool`` keys inside each dropped block (a ragged last pool where Sk is ragged)."""
    q = torch.randn(1, heads, sq, 16, generator=gen)
    k, v = (torch.randn(1, kv, sk, 16, generator=gen) for _ in range(2))
    layout = _layout(gen, heads, sq, sk, 16)
    out, lse = dropped_block_attention(q, k, v, layout, scale=0.3, pool_size=pool)
    ref_out, ref_lse = dropped_block_attention_reference(q, k, v, layout, scale=0.3, pool_size=pool)
    finite = torch.isfinite(ref_lse)
    assert finite.any() and torch.equal(torch.isfinite(lse), finite)
    assert torch.allclose(lse[finite].double(), ref_lse[finite], atol=1e-4)
    assert torch.allclose(out.double(), ref_out, atol=1e-4)


def test_single_key_pools_are_exact_attention_over_dropped_blocks(gen):
    """pool_size 1: each pooled token is a key, so the merged result is exact attention over the kept tokens and
    every key of the eligible dropped blocks."""
    q, k, v = (torch.randn(1, 2, 96, 16, generator=gen) for _ in range(3))
    layout = _layout(gen, 2, 96, 96, 16)
    sparse, lse = block_sparse_attention(q, k, v, layout, return_lse=True, scale=0.25)
    merged, _ = merge_attention_states(sparse, lse, *dropped_block_attention(q, k, v, layout, scale=0.25, pool_size=1))
    kept = token_mask(range(96), 96, 96, num_heads=2, causal=True, blocks=layout.to_dense(), block_size=(16, 16))
    drop = eligible_dropped(layout).repeat_interleave(16, 2).repeat_interleave(16, 3)  # (1, 2, 96, 96)
    scores = q.double() @ k.double().transpose(-1, -2) * 0.25
    ref = torch.softmax(scores.masked_fill(~(kept | drop), -math.inf), -1) @ v.double()
    assert drop.any()
    assert torch.allclose(merged.double(), ref, atol=1e-5)


# ------------------------------------------------------------------------------ Triton kernel (interpreter)
def _random_layout(gen, batch, heads, sq, sk, block_size, keep=0.35, empty_row=None):
    """Random keep mask (causal blocks only), block_size (bq, bk); ``empty_row`` keeps every block of that row.

    The last block of the last row is dropped: when that row's first query is the last key (``Sq = n * bq + 1``)
    the ragged last key block is then eligible.
    """
    bq, bk = block_size
    mask = torch.rand(batch, heads, -(-sq // bq), -(-sk // bk), generator=gen) < keep
    mask &= causal_block_mask(sq, sk, block_size)
    mask[..., -1, -1] = False
    if empty_row is not None:
        mask[..., empty_row, :] = True  # nothing dropped: no eligible block
    return BlockLayout.from_dense(mask, seq_len_q=sq, seq_len_k=sk, block_size=block_size)


TRITON_POOL_CASES = [
    # batch, Hq, Hkv, Sq, Sk, block_size, layout batch, layout heads, dtype, pool_size
    (1, 4, 2, 200, 200, (32, 32), 1, 4, torch.float32, 8),
    (2, 2, 1, 100, 250, (32, 32), 1, 1, torch.bfloat16, 16),  # ragged last pool eligible
    (1, 2, 2, 97, 97, (16, 16), 1, 2, torch.float16, 1),
]

TRITON_CASES = [
    # batch, Hq, Hkv, Sq, Sk, block_size, layout batch, layout heads, dtype
    (2, 4, 2, 200, 200, (32, 32), 2, 4, torch.float32),  # ragged, per query head
    (2, 4, 2, 100, 260, (32, 32), 1, 2, torch.float16),  # chunked prefill (bottom-right), per KV head, shared
    (2, 2, 2, 97, 97, (16, 16), 1, 1, torch.bfloat16),  # Hq = Hkv, one layout; a 1-key last block eligible
    (1, 4, 1, 150, 170, (64, 16), 1, 4, torch.float16),  # block_q != block_k, MQA
]


@pytest.mark.interpret
@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: "B{}-H{}-KV{}-Sq{}-Sk{}-blk{}-LB{}-LH{}-{}".format(*c))
def test_triton_matches_reference_and_torch(gen, case):
    batch, heads, kv, sq, sk, block_size, lb, lh, dtype = case
    q = randn(gen, batch, sq, heads, 32, dtype=dtype).transpose(1, 2)  # non-contiguous q
    k, v = (randn(gen, batch, kv, sk, 32, dtype=dtype) for _ in range(2))
    layout = _random_layout(gen, lb, lh, sq, sk, block_size, empty_row=0)
    out, lse = dropped_block_attention(q, k, v, layout, scale=0.3, backend="triton")
    ref_out, ref_lse = dropped_block_attention_reference(q, k, v, layout, scale=0.3)
    assert out.dtype == dtype and lse.dtype == torch.float32 and out.shape == q.shape
    assert (~torch.isfinite(ref_lse[..., 0])).all() and torch.isfinite(ref_lse).any()  # empty rows are covered
    assert_attention_close(out, lse, ref_out, ref_lse, dtype)
    torch_out, torch_lse = dropped_block_attention(q, k, v, layout, scale=0.3, backend="torch")
    assert torch.equal(torch.isfinite(lse), torch.isfinite(torch_lse))
    finite = torch.isfinite(lse)
    assert torch.allclose(lse[finite], torch_lse[finite], atol=LSE_TOL)
    assert rel_err(out, torch_out.float()) <= 2 * REL_TOL[dtype]


@pytest.mark.interpret
@pytest.mark.parametrize(
    "case", TRITON_POOL_CASES, ids=lambda c: "B{}-H{}-KV{}-Sq{}-Sk{}-blk{}-LB{}-LH{}-{}-pool{}".format(*c)
)
def test_triton_pools_match_reference(gen, case):
    batch, heads, kv, sq, sk, block_size, lb, lh, dtype, pool = case
    q = randn(gen, batch, heads, sq, 32, dtype=dtype)
    k, v = (randn(gen, batch, kv, sk, 32, dtype=dtype) for _ in range(2))
    layout = _random_layout(gen, lb, lh, sq, sk, block_size, empty_row=0)
    out, lse = dropped_block_attention(q, k, v, layout, scale=0.3, pool_size=pool, backend="triton")
    ref_out, ref_lse = dropped_block_attention_reference(q, k, v, layout, scale=0.3, pool_size=pool)
    assert torch.isfinite(ref_lse).any()
    assert_attention_close(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpret)])
def test_rows_without_eligible_blocks_are_zero_not_nan(gen, backend):
    """A NaN value in a block no row may take whole (the last one) leaves the rows with nothing eligible 0."""
    q, k, v = (torch.randn(1, 2, 96, 16, generator=gen) for _ in range(3))
    v[:, :, 90] = float("nan")
    layout = _random_layout(gen, 1, 2, 96, 96, (16, 16), empty_row=2)
    out, lse = dropped_block_attention(q, k, v, layout, backend=backend)
    empty = ~torch.isfinite(dropped_block_attention_reference(q, k, v, layout)[1])
    assert empty[:, :, :16].all() and empty[:, :, 32:48].all()  # first row block; row 2 keeps everything
    assert torch.equal(lse == -math.inf, empty) and (out[empty] == 0).all()
    assert not torch.isnan(lse).any()
    if backend == "triton":  # the kernel never loads a block past the row's reach
        assert not torch.isnan(out).any()


def test_backend_is_validated(gen):
    q, k, v = (torch.randn(1, 2, 64, 16, generator=gen) for _ in range(3))
    layout = _random_layout(gen, 1, 2, 64, 64, (16, 16))
    with pytest.raises(ValueError, match="backend"):
        dropped_block_attention(q, k, v, layout, backend="cuda")


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("pool", [None, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_triton_matches_torch(dtype, pool):
    """Realistic shape (Qwen2.5-1.5B-like, 8K): Triton path against the float32 PyTorch path."""
    gen = torch.Generator(device="cuda").manual_seed(8192)
    q = torch.randn(1, 12, 8192, 128, device="cuda", dtype=dtype, generator=gen)
    k, v = (torch.randn(1, 2, 8192, 128, device="cuda", dtype=dtype, generator=gen) for _ in range(2))
    mask = torch.rand(1, 2, 64, 64, device="cuda", generator=gen) < 0.3
    mask &= causal_block_mask(8192, 8192, (128, 128), device="cuda")
    layout = BlockLayout.from_dense(mask, seq_len_q=8192, seq_len_k=8192, block_size=(128, 128))
    out, lse = dropped_block_attention(q, k, v, layout, pool_size=pool)  # auto: Triton on CUDA
    ref_out, ref_lse = dropped_block_attention(q, k, v, layout, pool_size=pool, backend="torch")
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse))
    finite = torch.isfinite(lse)
    assert (lse[finite] - ref_lse[finite]).abs().max() <= LSE_TOL
    assert rel_err(out, ref_out.float()) <= REL_TOL[dtype]
    assert (out[~finite] == 0).all()
