"""flash_attention (Triton kernel under the interpreter, and the PyTorch path) vs the float64 reference."""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_GPU, assert_attention_close, randn

import sparseflash as sf

# (batch, heads_q, heads_kv, seq_q, seq_k, head_dim): ragged lengths, GQA/MQA, Sq != Sk both ways
SHAPES = [
    (1, 2, 2, 97, 97, 64),
    (2, 4, 2, 130, 130, 128),
    (1, 8, 1, 33, 200, 64),  # MQA, chunked prefill: Sq < Sk
    (1, 4, 2, 150, 61, 64),  # Sq > Sk: the first 89 rows see nothing under causal
    (1, 2, 1, 70, 70, 256),
    (1, 4, 2, 45, 90, 96),  # head dim that is not a power of two
    (1, 6, 2, 17, 150, 64),  # GQA group of 3 (not a power of two), short prompt: packed heads
    (2, 3, 3, 1, 129, 32),  # one query row
    (1, 2, 1, 70, 132, 64),  # causal offset 62: the last unmasked tile ends right at a row's horizon
    (1, 2, 2, 200, 263, 64),  # causal offset 63
]


def _qkv(gen, shape, dtype, layout="bhsd"):
    batch, hq, hkv, sq, sk, d = shape
    if layout == "bshd":  # how a model hands them over: (B, S, H, D) memory, transposed view
        q = randn(gen, batch, sq, hq, d, dtype=dtype).transpose(1, 2)
        k = randn(gen, batch, sk, hkv, d, dtype=dtype).transpose(1, 2)
        v = randn(gen, batch, sk, hkv, d, dtype=dtype).transpose(1, 2)
        return q, k, v
    return (randn(gen, batch, hq, sq, d, dtype=dtype), randn(gen, batch, hkv, sk, d, dtype=dtype),
            randn(gen, batch, hkv, sk, d, dtype=dtype))


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-H{}-KV{}-Sq{}-Sk{}-D{}".format(*s))
def test_triton_matches_reference(gen, poison_empty, shape, causal, dtype):
    q, k, v = _qkv(gen, shape, dtype)
    out, lse = sf.flash_attention(q, k, v, causal=causal, return_lse=True, backend="triton")
    ref_out, ref_lse = sf.attention_reference(q, k, v, causal=causal)
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    assert_attention_close(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_triton_noncontiguous_views(gen, dtype):
    """Transposed (B, S, H, D) views and a strided slice are read in place, with the same result."""
    q, k, v = _qkv(gen, (2, 4, 2, 77, 140, 64), dtype, layout="bshd")
    assert not q.is_contiguous()
    q2 = randn(gen, 2, 4, 77, 128, dtype=dtype)[..., ::2]  # stride 2 along head_dim
    for qq in (q, q2):
        out, lse = sf.flash_attention(qq, k, v, return_lse=True, backend="triton", scale=0.3)
        ref_out, ref_lse = sf.attention_reference(qq, k, v, scale=0.3)
        assert_attention_close(out, lse, ref_out, ref_lse, dtype)
    # the output is a (B, Hq, Sq, D) view of (B, Sq, Hq, D) memory: transposing back is free
    assert out.transpose(1, 2).is_contiguous()


@pytest.mark.interpret
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_triton_padded_batch(gen, padding_side):
    q, k, v = _qkv(gen, (3, 4, 2, 90, 90, 64), torch.float16)
    seq_lens = torch.tensor([90, 41, 1], dtype=torch.int32)
    out, lse = sf.flash_attention(q, k, v, return_lse=True, seq_lens=seq_lens, padding_side=padding_side,
                                  backend="triton")
    ref_out, ref_lse = sf.attention_reference(q, k, v, seq_lens=seq_lens, padding_side=padding_side)
    assert_attention_close(out, lse, ref_out, ref_lse, torch.float16)
    # a padded sequence gives the same rows as that sequence alone
    valid = slice(0, 41) if padding_side == "right" else slice(90 - 41, 90)
    alone = sf.flash_attention(q[1:2, :, valid], k[1:2, :, valid], v[1:2, :, valid], backend="triton")
    torch.testing.assert_close(out[1:2, :, valid], alone, atol=2e-3, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES[:5], ids=lambda s: "B{}-H{}-KV{}-Sq{}-Sk{}-D{}".format(*s))
def test_torch_path_matches_reference(gen, shape, dtype):
    q, k, v = _qkv(gen, shape, dtype)
    out, lse = sf.flash_attention(q, k, v, return_lse=True, backend="torch")
    ref_out, ref_lse = sf.attention_reference(q, k, v)
    assert_attention_close(out, lse, ref_out, ref_lse, dtype)


def test_auto_backend_on_cpu_is_torch(gen):
    q, k, v = _qkv(gen, (1, 2, 2, 40, 40, 64), torch.float32)
    out = sf.flash_attention(q, k, v)  # fp32 on CPU: the PyTorch path
    ref, _ = sf.attention_reference(q, k, v)
    assert (out.double() - ref).abs().max() < 1e-5


def test_reference_agrees_with_sdpa(gen):
    """The reference's bottom-right causal mask is the one SDPA documents for Sq == Sk."""
    q, k, v = _qkv(gen, (1, 4, 4, 50, 50, 64), torch.float32)
    ref, _ = sf.attention_reference(q, k, v)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    torch.testing.assert_close(ref, sdpa)


# ------------------------------------------------------------------------------------------ bad input
def _good(gen):
    return _qkv(gen, (1, 4, 2, 16, 16, 64), torch.float16)


@pytest.mark.parametrize(
    "mutate, exc, words",
    [
        (lambda q, k, v: (q[0], k, v), ValueError, "q: expected a 4-D tensor"),
        (lambda q, k, v: (q, k, v.float()), TypeError, "k, v: expected dtype"),
        (lambda q, k, v: (q.int(), k, v), TypeError, "q: expected dtype"),
        (lambda q, k, v: (q, k[..., :32], v[..., :32]), ValueError, "k: expected shape"),
        (lambda q, k, v: (q, k, v[:, :, :8]), ValueError, "v: expected shape"),
        (lambda q, k, v: (q[:, :3], k, v), ValueError, "multiple of k's num_kv_heads=2"),
        (lambda q, k, v: (q.repeat(2, 1, 1, 1), k, v), ValueError, "k: expected shape (2,"),
        (lambda q, k, v: (q[..., :12], k[..., :12], v[..., :12]), ValueError, "head_dim a multiple of 8"),
        (lambda q, k, v: (q.numpy(), k, v), TypeError, "q: expected a torch.Tensor"),
        (lambda q, k, v: (q[:, :, :0], k, v), ValueError, "non-empty"),
    ],
)
def test_bad_input_raises_clear_errors(gen, mutate, exc, words):
    q, k, v = mutate(*_good(gen))
    with pytest.raises(exc, match=words.replace("(", r"\(")):
        sf.flash_attention(q, k, v)


def test_bad_options_raise(gen):
    q, k, v = _good(gen)
    with pytest.raises(ValueError, match="scale: expected a finite positive"):
        sf.flash_attention(q, k, v, scale=-1.0)
    with pytest.raises(ValueError, match="backend: expected"):
        sf.flash_attention(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match="padding_side"):
        sf.flash_attention(q, k, v, seq_lens=torch.tensor([3], dtype=torch.int32), padding_side="top")
    with pytest.raises(TypeError, match="seq_lens: expected dtype torch.int32"):
        sf.flash_attention(q, k, v, seq_lens=torch.tensor([3]))
    with pytest.raises(ValueError, match=r"seq_lens: expected values in \[0, 16\]"):
        sf.flash_attention(q, k, v, seq_lens=torch.tensor([17], dtype=torch.int32))
    if not HAS_GPU:
        with pytest.raises(TypeError, match="float16 or bfloat16 for the Triton kernel"):
            sf.flash_attention(q.float(), k.float(), v.float(), backend="triton")
