"""The prefill kernel's optional paths (``Tuning.tma``, ``Tuning.lazy_rescale``) under the interpreter vs float64.

Both change the unmasked key tiles only, so the cases fix small tiles (``SMALL``) to get many of them, and a spy on
the launch checks which constexprs the kernel actually got (Triton 3.6's interpreter runs tensor descriptors, so
``USE_TMA`` is exercised here, not only compiled). The ``gpu`` tests at the end compare the switches with the
default path on large shapes, one with a K row stride times S_K past int32.
"""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_GPU, assert_attention_close, randn

import sparseflash as sf
from sparseflash.layouts import causal_block_mask
from sparseflash.ops.prefill import launcher
from sparseflash.ops.prefill.tma import tma_usable
from sparseflash.ops.tuning import TileConfig, Tuning, tuned

SMALL = TileConfig(32, 16, 4, 1)
SWITCHES = {
    "tma": dict(tma=True),
    "lazy": dict(lazy_rescale=True),
    "both": dict(tma=True, lazy_rescale=True),
}


class _LaunchSpy:
    """Stands in for ``prefill_fwd_kernel``: launches it and records each launch's keyword arguments."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.launches.append(kwargs)
            return launch(*args, **kwargs)

        return run


@pytest.fixture
def spy(monkeypatch):
    s = _LaunchSpy(launcher.prefill_fwd_kernel)
    monkeypatch.setattr(launcher, "prefill_fwd_kernel", s)
    return s


def _qkv(gen, batch, hq, hkv, sq, sk, d, dtype=torch.bfloat16, bshd=False):
    shapes = ((batch, hq, sq, d), (batch, hkv, sk, d), (batch, hkv, sk, d))
    if bshd:  # (B, S, H, D) memory, as a model hands it over
        return tuple(randn(gen, b, s, h, dd, dtype=dtype).transpose(1, 2) for b, h, s, dd in shapes)
    return tuple(randn(gen, *shape, dtype=dtype) for shape in shapes)


def _run(switch, q, k, v, *, config=SMALL, layout=None, **kwargs):
    with tuned(prefill=config, **SWITCHES[switch]):
        if layout is None:
            return sf.flash_attention(q, k, v, return_lse=True, backend="triton", **kwargs)
        return sf.block_sparse_attention(q, k, v, layout, return_lse=True, backend="triton", **kwargs)


def _check(spy, switch, *, tma=True):
    """The last launch got the switch's constexprs (TMA where ``tma``: the inputs allow it)."""
    got = spy.launches[-1]
    assert got["USE_TMA"] is (tma and switch in ("tma", "both"))
    assert got["LAZY_RESCALE"] is (switch in ("lazy", "both"))


# (batch, heads_q, heads_kv, seq_q, seq_k, head_dim, causal)
SHAPES = {
    "gqa-causal-Sq<Sk": (1, 4, 2, 100, 130, 64, True),
    "gqa-full-Sq<Sk": (1, 4, 2, 100, 130, 64, False),
    "mqa-causal-Sq>Sk": (1, 4, 1, 120, 70, 32, True),  # the first 50 rows see nothing: out 0, lse -inf
    "batch2-full-d16": (2, 2, 2, 70, 90, 16, False),
}


@pytest.mark.interpret
@pytest.mark.parametrize("switch", SWITCHES)
@pytest.mark.parametrize("case", SHAPES)
def test_dense_matches_reference(gen, poison_empty, spy, case, switch):
    batch, hq, hkv, sq, sk, d, causal = SHAPES[case]
    q, k, v = _qkv(gen, batch, hq, hkv, sq, sk, d)
    out, lse = _run(switch, q, k, v, causal=causal)
    _check(spy, switch)
    ref_out, ref_lse = sf.attention_reference(q, k, v, causal=causal)
    assert_attention_close(out, lse, ref_out, ref_lse, torch.bfloat16)


@pytest.mark.interpret
@pytest.mark.parametrize("switch", SWITCHES)
def test_noncontiguous_bshd_views(gen, spy, switch):
    """Transposed (B, S, H, D) memory: row stride H * D, still 16-byte aligned, so TMA applies."""
    q, k, v = _qkv(gen, 2, 4, 2, 80, 96, 32, bshd=True)
    assert not k.is_contiguous() and tma_usable(k, v, 32)
    out, lse = _run(switch, q, k, v, causal=True, scale=0.3)
    _check(spy, switch)
    ref_out, ref_lse = sf.attention_reference(q, k, v, causal=True, scale=0.3)
    assert_attention_close(out, lse, ref_out, ref_lse, torch.bfloat16)


@pytest.mark.interpret
@pytest.mark.parametrize("switch", SWITCHES)
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_padded_batch(gen, spy, switch, padding_side):
    q, k, v = _qkv(gen, 3, 4, 2, 70, 70, 32)
    seq_lens = torch.tensor([70, 33, 1], dtype=torch.int32)
    out, lse = _run(switch, q, k, v, seq_lens=seq_lens, padding_side=padding_side)
    ref_out, ref_lse = sf.attention_reference(q, k, v, seq_lens=seq_lens, padding_side=padding_side)
    assert_attention_close(out, lse, ref_out, ref_lse, torch.bfloat16)


@pytest.mark.interpret
@pytest.mark.parametrize("switch", SWITCHES)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_block_sparse_layout(gen, spy, switch, causal):
    """A random layout (blocks of 32, one query block keeping nothing), packed GQA, both kinds of tile."""
    hq, hkv, seq, block = 4, 2, 160, 32
    q, k, v = _qkv(gen, 1, hq, hkv, seq, seq, 32)
    nb = seq // block
    mask = torch.rand(1, hkv, nb, nb, generator=gen) < 0.6
    mask[..., :, 0] = True  # unmasked blocks first in most rows
    if causal:
        mask &= causal_block_mask(seq, seq, (block, block))
    mask[..., 2, :] = False  # rows with nothing to attend
    layout = sf.BlockLayout.from_dense(mask, seq_len_q=seq, seq_len_k=seq, block_size=block)
    out, lse = _run(switch, q, k, v, layout=layout, causal=causal)
    _check(spy, switch)
    ref_out, ref_lse = sf.attention_reference(q, k, v, causal=causal, layout=layout)
    assert_attention_close(out, lse, ref_out, ref_lse, torch.bfloat16)


def _ramped_keys(gen, steps: list[float], *, d=32, tile=16, dtype=torch.bfloat16):
    """q (1, 2, 64, d) and k, v (1, 1, tile * len(steps), d): in key tile j every logit of every row is near
    ``steps[j]`` in base-2 units (q ~ 1 + noise, k ~ c_j + noise), so the running maximum follows ``steps``."""
    sk = tile * len(steps)
    q = (1 + 0.05 * randn(gen, 1, 2, 64, d, dtype=torch.float32)).to(dtype)
    unit = d**0.5 / (d * 1.4426950408889634)  # k = unit * s gives a logit of about s (base 2) with q = 1
    levels = torch.tensor(steps).repeat_interleave(tile)[None, None, :, None]
    k = (unit * levels + 0.05 * randn(gen, 1, 1, sk, d, dtype=torch.float32)).to(dtype)
    return q, k, randn(gen, 1, 1, sk, d, dtype=dtype)


LAZY_CASES = {
    # a jump of 20 (base 2) after three tiles: the program-wide branch rescales
    "jump-above-8": [0.0, 1.0, 0.5, 20.0, 19.0, 3.0],
    # growth of at most 7.5 over the first tile: never rescaled, p up to 2**7.5 (fp16 and bf16 hold it)
    "growth-below-8": [0.0, 1.5, 3.0, 4.5, 6.0, 7.5, 7.0, 7.5],
    # steps of 3 per tile: each below the threshold, the total past it, so some tiles rescale
    "drift-past-8": [0.0, 3.0, 6.0, 9.0, 12.0, 15.0, 18.0, 21.0],
    # a decreasing maximum: the stale one is the exact one
    "falling": [12.0, 9.0, 6.0, 3.0, 0.0, -3.0],
}


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", LAZY_CASES)
def test_lazy_rescale_maximum_paths(gen, spy, case, dtype):
    q, k, v = _ramped_keys(gen, LAZY_CASES[case], dtype=dtype)
    for causal in (False, True):  # non-causal: every tile unmasked; causal (Sq < Sk): the last ones masked
        out, lse = _run("lazy", q, k, v, causal=causal)
        _check(spy, "lazy")
        ref_out, ref_lse = sf.attention_reference(q, k, v, causal=causal)
        assert_attention_close(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.interpret
def test_skipping_turns_lazy_rescale_off(gen, spy):
    """Skipping decides against the exact running maximum: with a skip threshold the kernel runs the exact step
    (so the result and the skipped-tile counts are those of the plain kernel)."""
    q, k, v = _ramped_keys(gen, [0.0, 1.0, 30.0, 2.0, 1.0, 0.0])
    results = []
    for lazy in (False, True):
        stats = torch.zeros(2, dtype=torch.int32)
        with tuned(prefill=SMALL, lazy_rescale=lazy):
            out = sf.flash_attention(q, k, v, causal=False, backend="triton", skip_threshold=5.0, skip_stats=stats)
        assert spy.launches[-1]["LAZY_RESCALE"] is False
        results.append((out, stats.tolist()))
    assert torch.equal(results[0][0], results[1][0]) and results[0][1] == results[1][1]
    assert results[0][1][0] > 0  # tiles were skipped


@pytest.mark.interpret
def test_tma_falls_back_where_it_does_not_apply(gen, spy):
    """A head dim that is not a power of two, a strided head dim: the pointer path, with the same result."""
    q96, k96, v96 = _qkv(gen, 1, 2, 1, 40, 50, 96)
    q, _, v = _qkv(gen, 1, 2, 1, 40, 50, 32)
    k_strided = randn(gen, 1, 1, 50, 64, dtype=torch.bfloat16)[..., ::2]  # stride 2 along the head dim
    assert not tma_usable(k96, v96, 96) and not tma_usable(k_strided, v, 32)
    for qq, kk, vv in ((q96, k96, v96), (q, k_strided, v)):
        out, lse = _run("tma", qq, kk, vv, causal=False)
        assert spy.launches[-1]["USE_TMA"] is False
        ref_out, ref_lse = sf.attention_reference(qq, kk, vv, causal=False)
        assert_attention_close(out, lse, ref_out, ref_lse, torch.bfloat16)


@pytest.mark.interpret
def test_tma_usable_rules():
    k = torch.zeros(2, 3, 64, 64, dtype=torch.bfloat16)
    assert tma_usable(k, k, 64)
    assert not tma_usable(k[..., :48], k[..., :48], 48)  # not a power of two
    assert not tma_usable(k[..., 1:9], k[..., 1:9], 8)  # base 2 bytes past an aligned address
    odd_rows = torch.zeros(1, 1, 10, 36, dtype=torch.bfloat16)[..., :32]  # row stride 72 bytes
    assert not tma_usable(odd_rows, odd_rows, 32)
    # head stride 513 elements (1026 bytes): misaligns every head but the first, harmless with one head
    flat = torch.zeros(2 * 513, dtype=torch.bfloat16)
    odd_heads = flat.as_strided((1, 2, 64, 8), (2 * 513, 513, 8, 1))
    assert not tma_usable(odd_heads, odd_heads, 8)
    assert tma_usable(odd_heads[:, :1], odd_heads[:, :1], 8)
    tiny = torch.zeros(1, 1, 4, 4, dtype=torch.bfloat16)  # 8 bytes wide: below TMA's 16
    assert not tma_usable(tiny, tiny, 4)


@pytest.mark.parametrize(
    "changes, match",
    [(dict(tma=1), "tma: expected a bool"), (dict(lazy_rescale="yes"), "lazy_rescale: expected a bool")],
)
def test_switches_are_validated(changes, match):
    with pytest.raises(TypeError, match=match):
        Tuning(**changes)
    assert Tuning().tma is False and Tuning().lazy_rescale is False


needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("switch", SWITCHES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_gpu_switches_match_default(spy, causal, head_dim, switch):
    seq = 16384 + 77
    gen = torch.Generator(device="cuda").manual_seed(seq + head_dim)
    q, k, v = (torch.randn(2, h, seq, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen) for h in (16, 4, 4))
    default_out, default_lse = sf.flash_attention(q, k, v, causal=causal, return_lse=True)
    with tuned(**SWITCHES[switch]):
        out, lse = sf.flash_attention(q, k, v, causal=causal, return_lse=True)
    _check(spy, switch, tma=torch.cuda.get_device_capability()[0] >= 9)
    torch.testing.assert_close(out, default_out, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(lse, default_lse, atol=1e-3, rtol=0)


@pytest.mark.gpu
@needs_gpu
def test_gpu_tma_row_stride_past_int32(spy):
    """(B, S, H, D) keys with S_K * stride_ks > 2^31 elements: the descriptor's int64 stride reaches the last rows."""
    seq, heads, head_dim = 2**17 + 64, 128, 128
    q, k, v = (
        torch.randn(1, seq, h, head_dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        for h in (16, heads, heads)
    )
    assert seq * k.stride(2) > 2**31
    q_tail, k_last, v_last = q[:, :, -256:], k[:, -2:], v[:, -2:]  # the last heads, every key (non-causal)
    default = sf.flash_attention(q_tail, k_last, v_last, causal=False)
    with tuned(tma=True, lazy_rescale=True):
        out = sf.flash_attention(q_tail, k_last, v_last, causal=False)
    assert spy.launches[-1]["USE_TMA"] is (torch.cuda.get_device_capability()[0] >= 9)
    assert spy.launches[-1]["OFFS_64"] is True
    torch.testing.assert_close(out, default, atol=2e-2, rtol=1e-2)
