"""BlockLayout and block_sparse_attention (Triton under the interpreter, PyTorch path) vs the reference."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_attention_close, randn

import sparseflash as sf
from sparseflash.layouts import causal_block_mask, full_block_mask
from sparseflash.ops.tuning import get_tuning, tuned


def _layout(gen, batch, heads, seq_q, seq_k, block, density, *, causal=True, empty_row=None):
    qb, kb = -(-seq_q // block), -(-seq_k // block)
    mask = torch.rand(batch, heads, qb, kb, generator=gen) < density
    if causal:
        mask &= causal_block_mask(seq_q, seq_k, (block, block))
    if empty_row is not None:
        mask[..., empty_row, :] = False
    return sf.BlockLayout.from_dense(mask, seq_len_q=seq_q, seq_len_k=seq_k, block_size=block)


# ------------------------------------------------------------------------------------------- layout
def test_layout_dense_round_trip(gen):
    mask = torch.rand(2, 3, 5, 7, generator=gen) < 0.5
    layout = sf.BlockLayout.from_dense(mask, seq_len_q=300, seq_len_k=400, block_size=64)
    assert torch.equal(layout.to_dense(), mask)
    assert layout.kv_num_blocks.dtype == layout.kv_indices.dtype == torch.int32
    for b, h, i in [(0, 0, 0), (1, 2, 4)]:
        n = int(layout.kv_num_blocks[b, h, i])
        assert layout.kv_indices[b, h, i, :n].tolist() == torch.nonzero(mask[b, h, i]).flatten().tolist()
    layout.check_indices()
    assert layout.nbytes == 4 * (2 * 3 * 5 + 2 * 3 * 5 * 7)


def test_layout_docstring_example():
    mask = torch.tensor([[1, 0], [1, 1]], dtype=torch.bool)[None, None]
    layout = sf.BlockLayout.from_dense(mask, seq_len_q=256, seq_len_k=256)
    assert layout.kv_num_blocks.tolist() == [[[1, 2]]]
    assert layout.kv_indices[0, 0, 1].tolist() == [0, 1]
    assert torch.equal(layout.to_dense(), mask)


def test_layout_capacity_truncates_rows(gen):
    mask = torch.zeros(1, 1, 4, 8, dtype=torch.bool)
    mask[0, 0, :, :3] = True
    layout = sf.BlockLayout.from_dense(mask, block_size=128, capacity=3)
    assert layout.capacity == 3 and torch.equal(layout.to_dense(), mask)


def test_density_counts_causal_blocks_only():
    dense = sf.dense_layout(1000, 1000, block_size=128)
    assert dense.density() == pytest.approx(1.0)
    assert dense.kv_num_blocks.sum().item() == 8 * 9 // 2
    # a layout keeping every block (above the diagonal too) is still density 1 under causal counting
    everything = sf.BlockLayout.from_dense(torch.ones(1, 1, 8, 8, dtype=torch.bool), seq_len_q=1000, seq_len_k=1000)
    assert everything.density() == pytest.approx(1.0)
    assert everything.density(causal=False) == pytest.approx(1.0)
    diag = sf.BlockLayout.from_dense(torch.eye(8, dtype=torch.bool)[None, None], seq_len_q=1000, seq_len_k=1000)
    assert diag.density() == pytest.approx(8 / 36)


def test_block_masks_brute_force():
    for seq_q, seq_k, block in [(300, 300, 64), (100, 333, 32), (333, 100, 32), (64, 64, 64)]:
        q_pos = torch.arange(seq_q)[:, None]
        k_pos = torch.arange(seq_k)[None, :]
        allowed = k_pos <= q_pos + seq_k - seq_q
        qb, kb = -(-seq_q // block), -(-seq_k // block)
        pad = torch.zeros(qb * block, kb * block, dtype=torch.bool)
        pad[:seq_q, :seq_k] = allowed
        tiles = pad.reshape(qb, block, kb, block)
        any_ok = tiles.any(dim=(1, 3))
        # "full": every real query row sees every key slot of the block (padded key slots count as unseen)
        key_slots = torch.zeros(kb * block, dtype=torch.bool)
        key_slots[:seq_k] = True
        rows = torch.zeros(qb * block, dtype=torch.bool)
        rows[:seq_q] = True
        full = ((pad | ~rows[:, None]) & key_slots[None, :]).reshape(qb, block, kb, block).all(dim=(1, 3))
        assert torch.equal(causal_block_mask(seq_q, seq_k, (block, block)), any_ok)
        assert torch.equal(full_block_mask(seq_q, seq_k, (block, block)), full)


def test_split_full_and_flex_round_trip(gen):
    layout = _layout(gen, 1, 2, 300, 300, 64, 0.6)
    p_num, p_idx, f_num, f_idx = layout.split_full()
    full = full_block_mask(300, 300, (64, 64))
    dense = layout.to_dense()
    as_dense = lambda n, i: sf.BlockLayout(n, i, 300, 300, (64, 64)).to_dense()  # noqa: E731
    assert torch.equal(as_dense(f_num, f_idx), dense & full)
    assert torch.equal(as_dense(p_num, p_idx), dense & ~full)
    block_mask = layout.to_flex()
    back = sf.BlockLayout.from_flex(block_mask)
    assert torch.equal(back.to_dense(), dense)
    assert back.seq_len_q == 300 and back.block_size == (64, 64)


def test_from_flex_zero_copy():
    from torch.nn.attention.flex_attention import BlockMask

    layout = sf.dense_layout(256, 256)
    bm = BlockMask.from_kv_blocks(layout.kv_num_blocks, layout.kv_indices, seq_lengths=(256, 256))
    back = sf.BlockLayout.from_flex(bm)
    assert back.kv_indices.data_ptr() == layout.kv_indices.data_ptr()


def test_flex_runs_our_layout_like_our_kernel(gen):
    """FlexAttention (eager, CPU) on to_flex() computes the same function as our PyTorch path."""
    from torch.nn.attention.flex_attention import flex_attention

    q, k, v = (randn(gen, 1, 2, 256, 64, dtype=torch.float32) for _ in range(3))
    layout = _layout(gen, 1, 2, 256, 256, 128, 0.7)
    ref, _ = sf.attention_reference(q, k, v, layout=layout)
    flex = flex_attention(q, k, v, block_mask=layout.to_flex())
    torch.testing.assert_close(flex.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"kv_num_blocks": torch.zeros(1, 1, 2, dtype=torch.int64)}, "kv_num_blocks: expected dtype torch.int32"),
        ({"kv_indices": torch.zeros(1, 1, 3, 2, dtype=torch.int32)}, "kv_indices: expected shape"),
        ({"kv_indices": torch.zeros(1, 1, 2, 5, dtype=torch.int32)}, "capacity in"),
        ({"seq_len_q": 1000}, "query blocks"),
        ({"block_size": (128, 100)}, "block_size: expected"),
        ({"seq_len_k": 0}, "seq_len_k: expected a positive int"),
    ],
)
def test_layout_construction_errors(kwargs, words):
    args = {
        "kv_num_blocks": torch.ones(1, 1, 2, dtype=torch.int32),
        "kv_indices": torch.zeros(1, 1, 2, 2, dtype=torch.int32),
        "seq_len_q": 256,
        "seq_len_k": 256,
    }
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=words.replace("(", r"\(")):
        sf.BlockLayout(**args)


# ------------------------------------------------------------------------------------------- kernel
# (batch, heads_q, heads_kv, seq_q, seq_k, block, layout_batch, layout_heads, density)
CASES = [
    (1, 4, 2, 300, 300, 64, 1, 2, 0.5),  # per-KV-head layout, GQA packed
    (2, 4, 2, 200, 200, 32, 2, 4, 0.4),  # per-query-head layout, a layout per sequence
    (1, 8, 2, 130, 260, 64, 1, 1, 0.6),  # one layout for all heads, chunked prefill Sq < Sk
    (1, 4, 2, 300, 120, 32, 1, 2, 0.5),  # Sq > Sk
    (1, 2, 2, 129, 129, 128, 1, 2, 1.0),  # 128-blocks, one key past the block
    (1, 6, 2, 150, 150, 64, 1, 2, 0.5),  # group of 3: not packable, per-KV-head layout still shared
]


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-H{}-KV{}-Sq{}-Sk{}-blk{}-LB{}-LH{}-d{}".format(*c))
def test_triton_matches_reference(gen, case, dtype):
    batch, hq, hkv, sq, sk, block, lb, lh, density = case
    q, k, v = (
        randn(gen, batch, hq, sq, 64, dtype=dtype),
        *(randn(gen, batch, hkv, sk, 64, dtype=dtype) for _ in range(2)),
    )
    layout = _layout(gen, lb, lh, sq, sk, block, density, empty_row=1)
    out, lse = sf.block_sparse_attention(q, k, v, layout, return_lse=True, backend="triton")
    ref_out, ref_lse = sf.attention_reference(q, k, v, layout=layout)
    assert_attention_close(out, lse, ref_out, ref_lse, dtype)
    assert torch.all(out[:, :, block : 2 * block] == 0)  # the dropped row
    torch_out, torch_lse = sf.block_sparse_attention(q, k, v, layout, return_lse=True, backend="torch")
    assert_attention_close(torch_out, torch_lse, ref_out, ref_lse, dtype)


@pytest.mark.interpret
def test_gqa_packing_on_and_off_agree(gen):
    q = randn(gen, 1, 8, 160, 64)
    k, v = randn(gen, 1, 2, 160, 64), randn(gen, 1, 2, 160, 64)
    layout = _layout(gen, 1, 2, 160, 160, 32, 0.5)
    packed = sf.block_sparse_attention(q, k, v, layout, pack_gqa=True, backend="triton")
    plain = sf.block_sparse_attention(q, k, v, layout, pack_gqa=False, backend="triton")
    torch.testing.assert_close(packed, plain, atol=2e-3, rtol=0)
    with pytest.raises(ValueError, match="pack_gqa"):
        sf.block_sparse_attention(q, k, v, _layout(gen, 1, 8, 160, 160, 32, 0.5), pack_gqa=True, backend="triton")


@pytest.mark.interpret
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_full_layout_equals_dense_kernel(gen, causal):
    q, k, v = randn(gen, 1, 4, 190, 64), randn(gen, 1, 2, 190, 64), randn(gen, 1, 2, 190, 64)
    layout = sf.dense_layout(190, 190, block_size=64, causal=causal)
    sparse = sf.block_sparse_attention(q, k, v, layout, causal=causal, backend="triton")
    dense = sf.flash_attention(q, k, v, causal=causal, backend="triton")
    torch.testing.assert_close(sparse, dense, atol=2e-3, rtol=0)


@pytest.mark.interpret
def test_non_causal_random_layout(gen):
    q, k, v = randn(gen, 1, 2, 100, 64), randn(gen, 1, 2, 170, 64), randn(gen, 1, 2, 170, 64)
    layout = _layout(gen, 1, 2, 100, 170, 32, 0.5, causal=False)
    out, lse = sf.block_sparse_attention(q, k, v, layout, causal=False, return_lse=True, backend="triton")
    ref_out, ref_lse = sf.attention_reference(q, k, v, causal=False, layout=layout)
    assert_attention_close(out, lse, ref_out, ref_lse, torch.float16)


@pytest.mark.interpret
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_padded_batch_with_per_sequence_layouts(gen, padding_side):
    q, k, v = randn(gen, 2, 4, 150, 64), randn(gen, 2, 2, 150, 64), randn(gen, 2, 2, 150, 64)
    layout = _layout(gen, 2, 2, 150, 150, 32, 0.6)
    seq_lens = torch.tensor([150, 67], dtype=torch.int32)
    out, lse = sf.block_sparse_attention(
        q, k, v, layout, return_lse=True, seq_lens=seq_lens, padding_side=padding_side, backend="triton"
    )
    ref_out, ref_lse = sf.attention_reference(q, k, v, layout=layout, seq_lens=seq_lens, padding_side=padding_side)
    assert_attention_close(out, lse, ref_out, ref_lse, torch.float16)


def test_longest_first_order(gen):
    from sparseflash.ops.prefill.launcher import _longest_first

    num = torch.tensor([[[1, 5, 3], [2, 2, 9]]], dtype=torch.int32)  # (1, 2, 3)
    order = _longest_first(
        num, batch=1, num_packs=2, pack=1, layout_div=1, num_tiles=3, queries_per_tile=64, block_q=64
    )
    work = num.reshape(-1)[order.long()]
    assert sorted(order.tolist()) == list(range(6))
    assert torch.all(work[:-1] >= work[1:])


# ---------------------------------------------------------------------------------------- bad input
def test_layout_errors(gen):
    q, k, v = randn(gen, 1, 4, 256, 64), randn(gen, 1, 2, 256, 64), randn(gen, 1, 2, 256, 64)
    good = _layout(gen, 1, 2, 256, 256, 64, 0.5)
    with pytest.raises(TypeError, match="layout: expected a sparseflash.BlockLayout"):
        sf.block_sparse_attention(q, k, v, None)
    with pytest.raises(ValueError, match="built for"):
        sf.block_sparse_attention(q[:, :, :200], k, v, good)
    with pytest.raises(ValueError, match="layout: expected heads 1, 2"):
        sf.block_sparse_attention(q, k, v, _layout(gen, 1, 3, 256, 256, 64, 0.5))
    with pytest.raises(ValueError, match="layout: expected batch 1 or 1"):
        sf.block_sparse_attention(q, k, v, _layout(gen, 2, 2, 256, 256, 64, 0.5))
    bad_range = sf.BlockLayout(good.kv_num_blocks, good.kv_indices + 10, 256, 256, (64, 64))
    with pytest.raises(ValueError, match=r"kv_indices: expected block ids in \[0, 4\)"):
        sf.block_sparse_attention(q, k, v, bad_range)
    unordered = sf.BlockLayout(
        torch.full_like(good.kv_num_blocks, 2), good.kv_indices.flip(-1).contiguous(), 256, 256, (64, 64)
    )
    with pytest.raises(ValueError, match="strictly ascending"):
        sf.block_sparse_attention(q, k, v, unordered)
    too_many = sf.BlockLayout(torch.full_like(good.kv_num_blocks, 9), good.kv_indices, 256, 256, (64, 64))
    with pytest.raises(ValueError, match=r"counts in \[0, 4\]"):
        sf.block_sparse_attention(q, k, v, too_many)


@pytest.mark.interpret
def test_plain_sparse_loop_matches_reference(gen):
    """The loop without the one-step-ahead block id load (``Tuning(sparse_prefetch=False)``; on by default)."""
    q, k, v = randn(gen, 1, 4, 230, 64), randn(gen, 1, 2, 230, 64), randn(gen, 1, 2, 230, 64)
    layout = _layout(gen, 1, 2, 230, 230, 32, 0.5, empty_row=2)
    with tuned(sparse_prefetch=False):
        out, lse = sf.block_sparse_attention(q, k, v, layout, return_lse=True, backend="triton")
    assert get_tuning().sparse_prefetch  # the default is restored after the block
    ref_out, ref_lse = sf.attention_reference(q, k, v, layout=layout)
    assert_attention_close(out, lse, ref_out, ref_lse, torch.float16)


# ------------------------------------------------------------------------------- NaN, the torch path
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN keys in the interpreter
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpret)])
def test_dropped_blocks_and_padding_are_never_read(gen, backend):
    """NaN/inf in K/V of blocks the layout drops and of padded tokens never reach the output."""
    q, k, v = randn(gen, 2, 4, 96, 32), randn(gen, 2, 2, 96, 32), randn(gen, 2, 2, 96, 32)
    keep = causal_block_mask(96, 96, (16, 16)).clone()[None, None].repeat(2, 2, 1, 1)
    keep[..., 2] = False  # key block 2 (keys 32..47) dropped everywhere
    keep[1, 0, :, 4] = False  # key block 4 dropped by KV head 0 of sequence 1
    keep[0, 1, 5, :3] = False
    layout = sf.BlockLayout.from_dense(keep, seq_len_q=96, seq_len_k=96, block_size=16)
    seq_lens = torch.tensor([96, 75], dtype=torch.int32)
    ref_out, ref_lse = sf.attention_reference(q, k, v, layout=layout, seq_lens=seq_lens)
    kp, vp = k.clone(), v.clone()
    for t in (kp, vp):
        t[:, :, 32:48] = float("nan")
        t[1, 0, 64:80] = float("inf")
        t[1, :, 75:] = float("nan")  # padding of sequence 1
    for return_lse in (True, False):
        res = sf.block_sparse_attention(q, kp, vp, layout, seq_lens=seq_lens, return_lse=return_lse, backend=backend)
        out, lse = res if return_lse else (res, None)
        assert torch.isfinite(out).all()
        assert_attention_close(out, lse, ref_out, ref_lse, torch.float16)
    # a NaN value inside a kept block, past some rows' causal horizon: only the rows seeing it turn NaN
    vp = v.clone()
    vp[:, :, 90] = float("nan")
    for return_lse in (True, False):
        res = sf.block_sparse_attention(q, k, vp, layout, return_lse=return_lse, backend=backend)
        out = res[0] if return_lse else res
        ref_out, ref_lse = sf.attention_reference(q, k, v, layout=layout)
        assert_attention_close(out[:, :, :90], None, ref_out[:, :, :90], ref_lse[:, :, :90], torch.float16)
        assert torch.isnan(out[:, :, 90:]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "case",
    CASES + [(2, 4, 4, 100, 100, 16, 2, 4, 0.3)],
    ids=lambda c: "B{}-H{}-KV{}-Sq{}-Sk{}-blk{}-LB{}-LH{}-d{}".format(*c),
)
def test_torch_path_matches_reference(gen, case, dtype):
    batch, hq, hkv, sq, sk, block, lb, lh, density = case
    q, k, v = (
        randn(gen, batch, hq, sq, 32, dtype=dtype),
        *(randn(gen, batch, hkv, sk, 32, dtype=dtype) for _ in range(2)),
    )
    layout = _layout(gen, lb, lh, sq, sk, block, density, empty_row=1)
    for causal in (True, False):
        out, lse = sf.block_sparse_attention(q, k, v, layout, causal=causal, return_lse=True, backend="torch")
        ref_out, ref_lse = sf.attention_reference(q, k, v, causal=causal, layout=layout)
        assert_attention_close(out, lse, ref_out, ref_lse, dtype)
    if sq == sk:
        seq_lens = torch.tensor([sq // 2 + 1] * batch, dtype=torch.int32)
        for side in ("left", "right"):
            out = sf.block_sparse_attention(q, k, v, layout, seq_lens=seq_lens, padding_side=side, backend="torch")
            ref_out, ref_lse = sf.attention_reference(q, k, v, layout=layout, seq_lens=seq_lens, padding_side=side)
            assert_attention_close(out, None, ref_out, ref_lse, dtype)


def test_torch_path_computes_kept_blocks_only(gen, monkeypatch):
    """The CPU path gathers each query block's kept key blocks: no Sq x Sk score tensor is formed."""
    import sparseflash.ops.prefill.reference as reference

    widths = []
    for owner, name in ((reference, "masked_attention"), (torch.nn.functional, "scaled_dot_product_attention")):
        real = getattr(owner, name)
        monkeypatch.setattr(
            owner, name, lambda q, k, *a, _real=real, **kw: widths.append(k.shape[2]) or _real(q, k, *a, **kw)
        )
    q, k, v = randn(gen, 1, 2, 512, 32), randn(gen, 1, 2, 512, 32), randn(gen, 1, 2, 512, 32)
    keep = torch.eye(16, dtype=torch.bool)[None, None].clone()
    keep[..., 0] = True  # a sink and the diagonal: 2 blocks of 32 per row
    layout = sf.BlockLayout.from_dense(keep, seq_len_q=512, seq_len_k=512, block_size=32)
    ref = sf.attention_reference(q, k, v, layout=layout)
    for return_lse in (False, True):  # SDPA, then the float32 path that gives the lse
        widths.clear()
        res = sf.block_sparse_attention(q, k, v, layout, return_lse=return_lse, backend="torch")
        assert widths and max(widths) <= 2 * 32
        out, lse = res if return_lse else (res, None)
        assert_attention_close(out, lse, *ref, torch.float16)


def test_torch_path_is_differentiable(gen):
    q, k, v = (
        randn(gen, 1, 4, 48, 16, dtype=torch.float32),
        randn(gen, 1, 2, 48, 16, dtype=torch.float32),
        randn(gen, 1, 2, 48, 16, dtype=torch.float32),
    )
    layout = _layout(gen, 1, 2, 48, 48, 16, 0.7)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = sf.block_sparse_attention(*leaves, layout, backend="torch")
    out.square().sum().backward()
    ref_leaves = [t.double().requires_grad_(True) for t in (q, k, v)]
    sf.attention_reference(*ref_leaves, layout=layout)[0].square().sum().backward()
    for got, want in zip(leaves, ref_leaves, strict=True):
        torch.testing.assert_close(got.grad.double(), want.grad, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="no backward"):
        sf.block_sparse_attention(*leaves, layout, backend="triton" if not torch.cuda.is_available() else "auto")


def test_layout_argument_errors(gen):
    """Errors name the argument, what was expected and what came."""
    layout = _layout(gen, 1, 2, 64, 64, 32, 0.5)
    q3 = randn(gen, 2, 64, 32)
    with pytest.raises(ValueError, match=r"q: expected a 4-D tensor.*got 3-D"):
        layout.validate(q3, q3)
    with pytest.raises(ValueError, match=r"k: expected a 4-D tensor.*got 3-D"):
        layout.validate(q3[None], q3)
    for bad in (0, -2):
        with pytest.raises(ValueError, match=rf"num_heads: expected a positive int.*got {bad}"):
            layout.to_flex(num_heads=bad)
    with pytest.raises(TypeError, match=r"num_heads: expected a positive int.*got '4'"):
        layout.to_flex(num_heads="4")
    mask = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    with pytest.raises(TypeError, match=r"capacity: expected a positive int.*got 2.5"):
        sf.BlockLayout.from_dense(mask, capacity=2.5)
    for bad in (-1, 0):
        with pytest.raises(ValueError, match=rf"capacity: expected a positive int.*got {bad}"):
            sf.BlockLayout.from_dense(mask, capacity=bad)
