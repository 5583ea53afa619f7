"""GPU-only prefill checks: large shapes, int32-overflowing offsets, poisoned outputs (skipped without CUDA).

Run on the device:  python -m pytest tests/ops/test_gpu_prefill.py -m gpu -q
"""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_GPU, REL_TOL, rel_err

import sparseflash as sf
from sparseflash.layouts import causal_block_mask
from sparseflash.ops.prefill.reference import masked_attention, token_mask

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")]


def _rows_reference(q, k, v, rows: range, heads: range, *, causal=True, layout=None):
    """float32 reference for a slice of query rows and heads (the full matrix would not fit)."""
    group = q.shape[1] // k.shape[1]
    assert heads.start % group == 0 and len(heads) % group == 0
    kv = range(heads.start // group, heads.stop // group)
    blocks = {}
    if layout is not None:
        blocks = {"blocks": layout.to_dense()[:, :, :, :], "block_size": layout.block_size}
        if layout.num_heads > 1:
            per = q.shape[1] // layout.num_heads
            blocks["blocks"] = blocks["blocks"][:, heads.start // per : (heads.stop - 1) // per + 1]
    mask = token_mask(rows, q.shape[2], k.shape[2], num_heads=len(heads), causal=causal, device=q.device, **blocks)
    return masked_attention(
        q[:, heads.start : heads.stop, rows.start : rows.stop].float(),
        k[:, kv.start : kv.stop].float(),
        v[:, kv.start : kv.stop].float(),
        mask,
        q.shape[-1] ** -0.5,
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("seq", [4095, 16384 + 77])
def test_large_dense(poison_empty, seq, causal, head_dim, dtype):
    gen = torch.Generator(device="cuda").manual_seed(seq + head_dim)
    q = torch.randn(2, 16, seq, head_dim, device="cuda", dtype=dtype, generator=gen)
    k = torch.randn(2, 4, seq, head_dim, device="cuda", dtype=dtype, generator=gen)
    v = torch.randn(2, 4, seq, head_dim, device="cuda", dtype=dtype, generator=gen)
    out, lse = sf.flash_attention(q, k, v, causal=causal, return_lse=True)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    for rows in (range(0, 300), range(seq - 300, seq)):
        ref, ref_lse = _rows_reference(q, k, v, rows, range(4, 8), causal=causal)
        got = out[:, 4:8, rows.start : rows.stop]
        assert rel_err(got, ref) <= REL_TOL[dtype]
        assert (lse[:, 4:8, rows.start : rows.stop] - ref_lse).abs().max() < 1e-3


@pytest.mark.parametrize("layout_heads", [1, 4, 16])
def test_large_block_sparse(poison_empty, layout_heads):
    seq = 16384 + 100
    gen = torch.Generator(device="cuda").manual_seed(layout_heads)
    q = torch.randn(1, 16, seq, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, 4, seq, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(1, 4, seq, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    nb = -(-seq // 128)
    keep = torch.rand(1, layout_heads, nb, nb, device="cuda", generator=gen) < 0.1
    keep = (keep | torch.eye(nb, dtype=torch.bool, device="cuda")) & causal_block_mask(seq, seq, device="cuda")
    layout = sf.BlockLayout.from_dense(keep, seq_len_q=seq, seq_len_k=seq)
    out = sf.block_sparse_attention(q, k, v, layout)
    assert not torch.isnan(out).any()
    for rows in (range(0, 256), range(seq - 256, seq)):
        ref, _ = _rows_reference(q, k, v, rows, range(4, 8), layout=layout)
        assert rel_err(out[:, 4:8, rows.start : rows.stop], ref) <= REL_TOL[torch.bfloat16]
    dense_layout = sf.dense_layout(seq, seq, device="cuda")
    torch.testing.assert_close(
        sf.block_sparse_attention(q, k, v, dense_layout), sf.flash_attention(q, k, v), atol=2e-2, rtol=0
    )


def test_int32_overflowing_batch_offsets(poison_empty):
    """B*H*S*D = 2^31 elements per tensor: batch offsets pass int32."""
    batch, heads, seq, head_dim = 4, 32, 2**17, 128
    q = torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, 8, seq, head_dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(batch, 8, seq, head_dim, device="cuda", dtype=torch.bfloat16)
    assert q.numel() >= 2**31
    out = sf.flash_attention(q, k, v)
    rows = range(seq - 128, seq)
    ref, _ = _rows_reference(q[3:], k[3:], v[3:], rows, range(28, 32))
    assert rel_err(out[3:, 28:32, rows.start : rows.stop], ref) <= REL_TOL[torch.bfloat16]
    assert not torch.isnan(out[3]).any()


def test_int32_overflowing_row_offsets(poison_empty):
    """(B, S, H, D) memory with H*D*S > 2^31 inside one batch: the kernel switches to int64 row offsets."""
    seq, heads, head_dim = 2**17 + 64, 128, 128
    q = torch.randn(1, seq, heads, head_dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn(1, seq, 8, head_dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    v = torch.randn(1, seq, 8, head_dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    from sparseflash.ops.prefill.launcher import _needs_int64

    assert _needs_int64(q)
    out = sf.flash_attention(q, k, v)
    rows = range(seq - 128, seq)
    ref, _ = _rows_reference(q, k, v, rows, range(112, 128))
    assert rel_err(out[:, 112:128, rows.start : rows.stop], ref) <= REL_TOL[torch.bfloat16]
