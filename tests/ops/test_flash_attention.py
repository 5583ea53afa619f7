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
    return (
        randn(gen, batch, hq, sq, d, dtype=dtype),
        randn(gen, batch, hkv, sk, d, dtype=dtype),
        randn(gen, batch, hkv, sk, d, dtype=dtype),
    )


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
    out, lse = sf.flash_attention(
        q, k, v, return_lse=True, seq_lens=seq_lens, padding_side=padding_side, backend="triton"
    )
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


# ------------------------------------------------------------------------------- NaN never leaks in
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpret)]


def _poison(t, where):
    """A copy of ``t`` with NaN at the key positions ``where`` (a bool (B, S) or (S,) mask), inf at the first."""
    t = t.clone()
    where = where.expand(t.shape[0], t.shape[2])
    t.masked_fill_(where[:, None, :, None], float("nan"))
    first = where.nonzero()[0] if where.any() else None
    if first is not None:
        t[first[0], :, first[1]] = float("inf")
    return t


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN keys in the interpreter
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_nan_in_padding_does_not_leak(gen, backend, padding_side):
    """NaN/inf in padded K/V (and padded query rows) never reach a valid row; padded rows are 0."""
    q, k, v = _qkv(gen, (2, 4, 2, 70, 70, 64), torch.float16)
    seq_lens = torch.tensor([40, 70], dtype=torch.int32)
    pos = torch.arange(70)
    pad = pos >= 40 if padding_side == "right" else pos < 30
    pad = torch.stack([pad, torch.zeros_like(pad)])  # sequence 1 has no padding
    ref_out, ref_lse = sf.attention_reference(q, k, v, seq_lens=seq_lens, padding_side=padding_side)
    qp, kp, vp = _poison(q, pad), _poison(k, pad), _poison(v, pad)
    for lse_wanted in (True, False):
        res = sf.flash_attention(
            qp, kp, vp, seq_lens=seq_lens, padding_side=padding_side, return_lse=lse_wanted, backend=backend
        )
        out, lse = res if lse_wanted else (res, None)
        assert torch.isfinite(out).all()
        assert_attention_close(out, lse, ref_out, ref_lse, torch.float16)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN keys in the interpreter
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sq,sk", [(70, 70), (40, 90), (90, 40)])
def test_nan_in_future_keys_does_not_leak(gen, backend, sq, sk):
    """Causal: a NaN key/value at position j poisons exactly the rows that see j (bottom-right aligned)."""
    q, k, v = _qkv(gen, (1, 4, 2, sq, sk, 64), torch.float16)
    j = sk - 7
    bad = torch.arange(sk) == j
    kp, vp = _poison(k, bad), _poison(v, bad)
    sees_j = torch.arange(sq) + sk - sq >= j  # rows whose causal horizon reaches j
    clean = ~sees_j
    for kk, vv in ((k, vp), (kp, v)):
        out, lse = sf.flash_attention(q, kk, vv, return_lse=True, backend=backend)
        ref_out, ref_lse = sf.attention_reference(q, k, v)
        assert torch.isfinite(out[:, :, clean]).all(), "NaN reached rows that do not see the poisoned key"
        assert_attention_close(
            out[:, :, clean], lse[:, :, clean], ref_out[:, :, clean], ref_lse[:, :, clean], torch.float16
        )
        assert not torch.isfinite(out[:, :, sees_j]).any(), "rows attending a NaN value must not hide it"


# --------------------------------------------------------------------------------------- the torch path
@pytest.mark.parametrize("seq_lens", [None, [37, 60]], ids=["dense", "padded"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize(
    "shape", [(2, 4, 2, 60, 60, 64), (2, 8, 1, 20, 60, 32), (2, 4, 4, 60, 25, 16)], ids=["gqa", "mqa-sq<sk", "sq>sk"]
)
def test_torch_path_without_lse_matches_reference(gen, shape, causal, seq_lens):
    """The SDPA fast path (no lse wanted) and its fallbacks agree with the reference."""
    if seq_lens is not None and shape[3] != shape[4]:
        pytest.skip("seq_lens needs Sq == Sk")
    lens = None if seq_lens is None else torch.tensor(seq_lens, dtype=torch.int32)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        q, k, v = _qkv(gen, shape, dtype)
        for side in ("right", "left"):
            out = sf.flash_attention(q, k, v, causal=causal, seq_lens=lens, padding_side=side, backend="torch")
            ref_out, ref_lse = sf.attention_reference(q, k, v, causal=causal, seq_lens=lens, padding_side=side)
            assert out.dtype == dtype
            assert_attention_close(out, None, ref_out, ref_lse, dtype)
            assert torch.all(out[~torch.isfinite(ref_lse)] == 0)


def test_torch_path_uses_sdpa(gen, monkeypatch):
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        torch.nn.functional, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw)
    )
    q, k, v = _qkv(gen, (1, 4, 2, 64, 64, 32), torch.float32)
    sf.flash_attention(q, k, v)
    sf.flash_attention(q, k, v, seq_lens=torch.tensor([30], dtype=torch.int32), padding_side="left")
    assert len(calls) == 2


def _grads(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    weight = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape)
    (out.double() * weight).sum().backward()
    return [t.grad.double() for t in leaves]


@pytest.mark.parametrize("return_lse", [False, True], ids=["sdpa", "chunked"])
@pytest.mark.parametrize(
    "kwargs", [{}, {"causal": False}, {"seq_lens": [9, 16], "padding_side": "left"}], ids=["causal", "full", "padded"]
)
def test_torch_path_is_differentiable(gen, kwargs, return_lse):
    """backend='torch' keeps autograd: gradients match the float64 reference's."""
    kwargs = dict(kwargs)
    if "seq_lens" in kwargs:
        kwargs["seq_lens"] = torch.tensor(kwargs["seq_lens"], dtype=torch.int32)
    q, k, v = _qkv(gen, (2, 4, 2, 16, 16, 16), torch.float32)

    def ours(q, k, v):
        res = sf.flash_attention(q, k, v, return_lse=return_lse, backend="torch", **kwargs)
        return res[0] + res[1].clamp_min(-5)[..., None] if return_lse else res

    def ref(q, k, v):
        out, lse = sf.attention_reference(q, k, v, **kwargs)
        return out + lse.clamp_min(-5)[..., None] if return_lse else out

    for got, want in zip(_grads(ours, q, k, v), _grads(ref, q, k, v), strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_triton_refuses_autograd(gen):
    """The kernels have no backward: a graph-building call fails before launch instead of dropping grads."""
    q, k, v = _qkv(gen, (1, 2, 2, 16, 16, 16), torch.float16)
    q.requires_grad_(True)
    with pytest.raises(ValueError, match="no backward.*torch.no_grad().*backend='torch'"):
        sf.flash_attention(q, k, v, backend="triton" if not HAS_GPU else "auto")
    if not HAS_GPU:
        with torch.no_grad():
            assert sf.flash_attention(q, k, v, backend="triton").grad_fn is None


@pytest.mark.parametrize("scale", [1e37, 1e300, float("nan"), float("inf"), 0.0, -2.0])
def test_bad_scale_raises_before_work(gen, scale):
    q, k, v = _good(gen)
    with pytest.raises(ValueError, match="scale: expected"):
        sf.flash_attention(q, k, v, scale=scale)
