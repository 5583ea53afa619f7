"""xattention(columns=c): XAttention's blocks plus the c keys the last queries attend most, as token columns."""

from __future__ import annotations

import pytest
import torch
from conftest import randn

import sparseflash as sf
from sparseflash.layouts.columns import columns_to_dense
from sparseflash.patterns import registry


def _qk(gen, b, hq, hkv, sq, sk, d=32):
    return randn(gen, b, hq, sq, d, dtype=torch.float32), randn(gen, b, hkv, sk, d, dtype=torch.float32)


def _top_keys_of_last_queries(q, k, count, last=64):
    """Reference: the ``count`` keys with the largest summed softmax over the last ``last`` rows (bottom-right causal),
    per query head, float64."""
    b, hq, sq, d = q.shape
    sk = k.shape[2]
    kk = k.double().repeat_interleave(hq // k.shape[1], 1)
    rows = torch.arange(sq - last, sq)
    logits = q[:, :, -last:].double() @ kk.transpose(-1, -2) * d**-0.5
    visible = torch.arange(sk)[None, :] <= (rows + sk - sq)[:, None]
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), -1)
    return probs.sum(2).topk(count, -1).indices  # (B, Hq, count)


@pytest.mark.parametrize("shape", [(1, 4, 2, 333, 333), (2, 2, 1, 150, 400)], ids=["gqa", "chunked"])
@pytest.mark.parametrize("heads", ["q", "kv"])
def test_columns_are_the_last_queries_top_keys_on_top_of_the_same_blocks(gen, shape, heads):
    b, hq, hkv, sq, sk = shape
    q, k = _qk(gen, *shape)
    opts = dict(block_size=(32, 32), threshold=0.6, local_blocks=1, heads=heads, backend="torch")
    plain = registry.select("xattention", q, k, **opts)
    layout = registry.select("xattention", q, k, columns=12, **opts)
    layout.check_indices()
    assert torch.equal(layout.to_dense(), plain.to_dense())  # the blocks are unchanged
    want = torch.zeros(b, hq, sk, dtype=torch.bool).scatter_(-1, _top_keys_of_last_queries(q, k, 12), True)
    if heads == "kv":
        want = want.view(b, hkv, hq // hkv, sk).any(2)
    qb = -(-sq // 32)
    horizon = torch.clamp((torch.arange(qb) + 1) * 32, max=sq) - 1 + sk - sq
    want = want[:, :, None, :] & (torch.arange(sk)[None, :] <= horizon[:, None])
    kept = layout.to_dense().repeat_interleave(32, -1)[..., :sk]
    cols = columns_to_dense(layout)
    assert torch.equal(cols, want & ~kept)  # each top key, where the row block sees it and keeps no block over it
    assert cols.any()
    # the kernel attends exactly blocks + columns
    v = randn(gen, b, hkv, sk, 32, dtype=torch.float32)
    ref, _ = sf.attention_reference(q, k, v, layout=layout)
    out = sf.block_sparse_attention(q, k, v, layout, backend="torch")
    assert torch.allclose(out, ref.to(out.dtype), atol=1e-5)


def test_columns_option_is_validated():
    q, k = torch.randn(1, 2, 64, 16), torch.randn(1, 1, 64, 16)
    for bad in (-1, 2.5, "8"):
        with pytest.raises((ValueError, TypeError), match="xattention: columns"):
            registry.select("xattention", q, k, columns=bad, block_size=32)


def test_patch_refuses_columns_with_approximate_dropped():
    from sparseflash.integrations import hf

    with pytest.raises(ValueError, match="approximate_dropped.*token columns"):
        hf.check_patch_options("xattention", {"columns": 64, "approximate_dropped": True})
    with pytest.raises(ValueError, match="approximate_dropped.*token columns"):
        hf.check_patch_options("vertical_slash", {"columns": True, "approximate_dropped": True})
    hf.check_patch_options("xattention", {"columns": 64})
