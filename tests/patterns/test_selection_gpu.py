"""GPU-only checks of FlexPrefill's and PBS-Attn's selection kernels at model sizes against their PyTorch paths.

Run on the device:  python -m pytest tests/patterns/test_selection_gpu.py -m gpu -q
"""

from __future__ import annotations

import pytest
import torch

from sparseflash.patterns import registry
from sparseflash.patterns.flexprefill_layout import flexprefill_layout_reference, flexprefill_layout_triton
from sparseflash.patterns.permuted_means import permuted_block_means_reference, permuted_block_means_triton

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _qk(seed, hq=12, hkv=2, n=16384, d=128):
    """Qwen2.5-Coder-1.5B's heads, bf16, with a band of keys every query likes."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, hq, n, d, device="cuda", generator=gen)
    k = torch.randn(1, hkv, n, d, device="cuda", generator=gen)
    u = torch.randn(d, device="cuda", generator=gen)
    k[:, :, 100:200] += 2 * u / u.norm()
    return (2 * q + u / u.norm()).bfloat16(), k.bfloat16()


@pytest.mark.parametrize("name", ["flexprefill", "permuted"])
@pytest.mark.parametrize("heads", ["q", "kv"])
def test_triton_path_matches_the_torch_path(name, heads):
    """Both paths score in float32 with sums in other orders, so a block whose mass sits at a cut to float32
    rounding may go either way: at most a few in a thousand differ (a bug moves far more)."""
    q, k = _qk(7)
    opts = dict(heads=heads, permute_heads="kv") if name == "permuted" and heads == "kv" else dict(heads=heads)
    fast = registry.select(name, q, k, backend="triton", **opts)
    slow = registry.select(name, q, k, backend="torch", **opts)
    fast_blocks, slow_blocks = (x.blocks if name == "permuted" else x for x in (fast, slow))
    fast_blocks.check_indices()
    mismatch = (fast_blocks.to_dense() != slow_blocks.to_dense()).float().mean().item()
    assert mismatch <= 5e-3, mismatch
    assert 0 < fast.density() < 1


def test_flexprefill_layout_kernel_at_64k():
    gen = torch.Generator(device="cuda").manual_seed(1)
    qb = kb = 512
    line_keep = torch.rand(2, 1, 12, kb, device="cuda", generator=gen) < 0.05
    coverage = torch.rand(1, 12, qb, kb, device="cuda", generator=gen) < 0.05
    query_aware = torch.rand(1, 12, device="cuda", generator=gen) < 0.5
    for layout_heads in (12, 2):
        args = dict(seq_len_q=65536, seq_len_k=65536, block=128, layout_heads=layout_heads)
        got = flexprefill_layout_triton(line_keep, coverage, query_aware, **args)
        want = flexprefill_layout_reference(line_keep, coverage, query_aware, **args)
        assert torch.equal(got.kv_num_blocks, want.kv_num_blocks) and torch.equal(got.kv_indices, want.kv_indices)


def test_permuted_block_means_at_64k():
    q, k = _qk(3, n=65536)
    perm = torch.argsort(torch.rand(1, 12, 256, 256, device="cuda"), dim=-1)
    perm = (perm + torch.arange(0, 65536, 256, device="cuda")[:, None]).view(1, 12, 65536)
    got = permuted_block_means_triton(k, perm, 128)
    torch.testing.assert_close(got, permuted_block_means_reference(k, perm, 128), atol=1e-5, rtol=1e-5)
