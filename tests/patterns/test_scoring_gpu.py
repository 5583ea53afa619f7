"""GPU-only checks of XAttention's scoring kernel: model-sized shapes, both loop forms, int32-overflowing offsets.

Run on the device:  python -m pytest tests/patterns/test_scoring_gpu.py -m gpu -q
"""

from __future__ import annotations

import pytest
import torch

from sparseflash.ops.scores.antidiagonal import xattention_scores_reference, xattention_scores_triton

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("flatten", [False, True])
@pytest.mark.parametrize(
    "hq,hkv,sq,sk,d,stride",
    [
        (12, 2, 4096, 4096, 128, 8),  # Qwen2.5-Coder-1.5B's heads, the default stride
        (14, 2, 3000, 5000, 64, 16),  # chunked prefill, ragged, the 0.5B model's head_dim
        (4, 4, 2500, 2500, 96, 4),  # head_dim padded to 128
    ],
)
def test_scoring_matches_reference_at_model_sizes(hq, hkv, sq, sk, d, stride, flatten):
    gen = torch.Generator(device="cuda").manual_seed(sq + sk + d)
    q = torch.randn(1, hq, sq, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, hkv, sk, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    ref = xattention_scores_reference(q, k, stride=stride)
    out = xattention_scores_triton(q, k, stride=stride, flatten=flatten)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)


def test_scoring_with_int32_overflowing_offsets():
    """q/k are views into a 5.4 GB buffer: the last head starts past 2^31 elements, and rows are non-contiguous."""
    heads, length, window, d = 5, 1 << 22, 2048, 128
    base = torch.empty(1, heads, length, d, device="cuda", dtype=torch.bfloat16)
    assert (heads - 1) * length * d >= 2**31
    gen = torch.Generator(device="cuda").manual_seed(3)
    base[:, :, :window].normal_(generator=gen)
    base[:, :, -window:].normal_(generator=gen)
    q, k = base[:, :, :window], base[:, :, -window:]
    out = xattention_scores_triton(q, k, stride=8, flatten=True)
    ref = xattention_scores_reference(q.contiguous(), k.contiguous(), stride=8)
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)
