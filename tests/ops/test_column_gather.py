"""Token columns of a BlockLayout (MInference's vertical lines): the layout, the gathering kernel, the patterns.

The Triton kernel runs under the interpreter on small shapes; the float64 reference builds the dense token mask
from blocks and columns.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_attention_close, randn

import sparseflash as sf
from sparseflash.layouts import causal_block_mask, with_columns
from sparseflash.layouts.columns import columns_to_dense
from sparseflash.metrics import attention_recall, row_recall
from sparseflash.patterns import registry
from sparseflash.patterns.minference import vertical_slash_indices


def _layout(gen, batch, heads, seq_q, seq_k, block, density, num_cols, *, empty_row=None, causal=True):
    """Random blocks, then up to ``num_cols`` random columns per query block (some inside kept blocks: dropped)."""
    qb, kb = -(-seq_q // block), -(-seq_k // block)
    mask = torch.rand(batch, heads, qb, kb, generator=gen) < density
    if causal:
        mask &= causal_block_mask(seq_q, seq_k, (block, block))
    if empty_row is not None:
        mask[..., empty_row, :] = False
    blocks = sf.BlockLayout.from_dense(mask, seq_len_q=seq_q, seq_len_k=seq_k, block_size=block)
    cols = torch.randint(0, seq_k, (batch, heads, qb, num_cols), generator=gen)
    counts = torch.randint(0, num_cols + 1, (batch, heads, qb), generator=gen)
    if empty_row is not None:
        counts[..., empty_row] = 0
    return with_columns(blocks, cols, counts)


def _token_keep(layout):
    """Bool (B, H, Sq, Sk): blocks and columns of the layout (before any causal mask), brute force."""
    bq, bk = layout.block_size
    sq, sk = layout.seq_len_q, layout.seq_len_k
    blocks = layout.to_dense().repeat_interleave(bq, 2).repeat_interleave(bk, 3)[..., :sq, :sk]
    cols = torch.zeros_like(blocks)
    for b, h, i in torch.cartesian_prod(*(torch.arange(n) for n in layout.col_counts.shape)).tolist():
        for j in layout.col_indices[b, h, i, : int(layout.col_counts[b, h, i])].tolist():
            cols[b, h, i * bq : (i + 1) * bq, j] = True
    assert not (blocks & cols).any(), "a column inside a kept block"
    return blocks | cols


# ------------------------------------------------------------------------------------------- layout
def test_with_columns_sorts_merges_and_drops_columns_in_kept_blocks():
    mask = torch.zeros(1, 1, 2, 4, dtype=torch.bool)
    mask[0, 0, 1, 1] = True  # query block 1 keeps key block 1 (keys 64..127)
    blocks = sf.BlockLayout.from_dense(mask, seq_len_q=128, seq_len_k=250, block_size=64)
    cols = torch.tensor([[[[200, 5, 70, 5, 9], [100, 3, 64, 249, 3]]]])
    layout = with_columns(blocks, cols, torch.tensor([[[4, 5]]]))
    assert layout.has_columns and layout.col_capacity == 5
    assert layout.col_indices.dtype == layout.col_counts.dtype == torch.int32
    assert layout.col_counts.tolist() == [[[3, 2]]]  # row 0: 9 is past the count, 5 repeats; row 1: 64, 100 in a block
    assert layout.col_indices[0, 0, 0, :3].tolist() == [5, 70, 200]
    assert layout.col_indices[0, 0, 1, :2].tolist() == [3, 249]
    layout.check_indices()
    assert torch.equal(layout.to_dense(), mask)  # blocks unchanged
    dense_cols = columns_to_dense(layout)
    assert dense_cols.shape == (1, 1, 2, 250) and dense_cols.sum() == 5 and dense_cols[0, 0, 1, 249]
    assert layout.nbytes == blocks.nbytes + 4 * (2 + 2 * 5)
    assert "columns=5" in repr(layout)
    assert layout.to("cpu").col_counts.tolist() == [[[3, 2]]]
    assert not layout.without_columns().has_columns


def test_token_density_brute_force(gen):
    for seq_q, seq_k, causal in [(200, 333, True), (333, 200, True), (150, 150, True), (100, 170, False)]:
        layout = _layout(gen, 2, 3, seq_q, seq_k, 32, 0.3, 12, causal=causal)
        allowed = torch.ones(seq_q, seq_k, dtype=torch.bool)
        if causal:
            allowed = torch.arange(seq_k)[None, :] <= torch.arange(seq_q)[:, None] + seq_k - seq_q
        want = (_token_keep(layout) & allowed).sum().double() / (allowed.sum().double() * 2 * 3)
        assert layout.token_density(causal=causal) == pytest.approx(float(want), rel=1e-12)
    dense = sf.dense_layout(300, 300, block_size=64)
    assert dense.token_density() == pytest.approx(1.0)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"col_counts": torch.zeros(1, 1, 2, dtype=torch.int32)}, ValueError, "col_indices: expected a tensor"),
        ({"col_indices": torch.zeros(1, 1, 2, 3, dtype=torch.int32)}, ValueError, "col_counts: expected a tensor"),
        (
            {"col_counts": torch.zeros(1, 1, 2), "col_indices": torch.zeros(1, 1, 2, 3, dtype=torch.int32)},
            TypeError,
            "col_counts: expected dtype torch.int32",
        ),
        (
            {
                "col_counts": torch.zeros(1, 2, 2, dtype=torch.int32),
                "col_indices": torch.zeros(1, 2, 2, 3, dtype=torch.int32),
            },
            ValueError,
            "col_counts: expected shape (1, 1, 2)",
        ),
        (
            {"col_counts": torch.zeros(1, 1, 2, dtype=torch.int32), "col_indices": torch.zeros(1, 1, 3, 3)},
            TypeError,
            "col_indices: expected dtype torch.int32",
        ),
        (
            {
                "col_counts": torch.zeros(1, 1, 2, dtype=torch.int32),
                "col_indices": torch.zeros(1, 1, 2, 0, dtype=torch.int32),
            },
            ValueError,
            "col_indices: expected shape (1, 1, 2) + (capacity >= 1,)",
        ),
    ],
)
def test_layout_column_metadata_errors(kwargs, error, words):
    args = {
        "kv_num_blocks": torch.ones(1, 1, 2, dtype=torch.int32),
        "kv_indices": torch.zeros(1, 1, 2, 2, dtype=torch.int32),
        "seq_len_q": 256,
        "seq_len_k": 256,
    }
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        sf.BlockLayout(**args, **kwargs)


def test_column_index_errors(gen):
    q, k, v = randn(gen, 1, 2, 256, 32), randn(gen, 1, 2, 256, 32), randn(gen, 1, 2, 256, 32)
    blocks = sf.BlockLayout.from_dense(
        torch.eye(4, dtype=torch.bool)[None, None], seq_len_q=256, seq_len_k=256, block_size=64
    )
    counts = torch.full((1, 1, 4), 2, dtype=torch.int32)

    def cols(*rows):
        return torch.tensor(rows, dtype=torch.int32).view(1, 1, 4, 2)

    cases = [
        (cols([0, 1], [2, 3], [4, 70], [5, 6]), "inside a kept block"),  # block 1 keeps key block 1: 70 is in it
        (cols([0, 1], [2, 3], [4, 5], [6, 256]), r"token positions in \[0, 256\)"),
        (cols([0, 1], [3, 2], [4, 5], [6, 7]), "strictly ascending"),
    ]
    for col_indices, words in cases:
        layout = sf.BlockLayout(
            blocks.kv_num_blocks, blocks.kv_indices, 256, 256, (64, 64), col_counts=counts, col_indices=col_indices
        )
        with pytest.raises(ValueError, match=words):
            sf.block_sparse_attention(q, k, v, layout, backend="torch")
    over = sf.BlockLayout(
        blocks.kv_num_blocks,
        blocks.kv_indices,
        256,
        256,
        (64, 64),
        col_counts=counts + 1,
        col_indices=cols([0, 1], [2, 3], [4, 5], [6, 7]),
    )
    with pytest.raises(ValueError, match=r"col_counts: expected counts in \[0, 2\]"):
        over.check_indices()
    # with_columns: types, shapes, values
    with pytest.raises(TypeError, match="layout: expected a BlockLayout"):
        with_columns(None, cols([0, 1], [2, 3], [4, 5], [6, 7]))
    with pytest.raises(TypeError, match="col_indices: expected an integer tensor"):
        with_columns(blocks, torch.zeros(1, 1, 4, 2))
    with pytest.raises(ValueError, match=r"col_indices: expected shape \(1, 1, 4\)"):
        with_columns(blocks, torch.zeros(1, 2, 4, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"col_counts: expected shape \(1, 1, 4\)"):
        with_columns(blocks, torch.zeros(1, 1, 4, 2, dtype=torch.int64), torch.zeros(1, 1, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"col_indices: expected token positions in \[0, 256\)"):
        with_columns(blocks, cols([0, 1], [2, 3], [4, 5], [-1, 7]))
    with pytest.raises(ValueError, match=r"col_counts: expected counts in \[0, 2\]"):
        with_columns(blocks, cols([0, 1], [2, 3], [4, 5], [6, 7]), counts + 1)
    # check=False drops what lies outside [0, Sk)
    quiet = with_columns(blocks, cols([0, 1], [2, 3], [4, 5], [-1, 300]), check=False)
    assert quiet.col_counts.tolist() == [[[0, 2, 2, 0]]]  # row 0's columns lie in its kept block 0


def test_what_cannot_take_columns(gen):
    q, k, v = randn(gen, 1, 2, 128, 32), randn(gen, 1, 2, 128, 32), randn(gen, 1, 2, 128, 32)
    layout = _layout(gen, 1, 2, 128, 128, 64, 0.5, 4)
    with pytest.raises(ValueError, match="token columns"):
        layout.to_flex()
    assert layout.without_columns().to_flex() is not None
    with pytest.raises(ValueError, match="skip_threshold: expected None with a layout that has token columns"):
        sf.block_sparse_attention(q, k, v, layout, skip_threshold=1.0, backend="torch")
    decode = _layout(gen, 1, 2, 1, 128, 64, 0.5, 4)
    with pytest.raises(ValueError, match="without token columns"):
        decode.to_block_lists(batch=1, num_heads=2, num_kv_heads=2)
    from sparseflash.ops.prefill.dropped_blocks import dropped_block_attention

    with pytest.raises(ValueError, match="without token columns"):
        dropped_block_attention(q, k, v, layout)
    with pytest.raises(ValueError, match="blocks: expected a BlockLayout without token columns"):
        sf.PermutedLayout(layout, torch.zeros(1, 1, 128, dtype=torch.int64))


# ------------------------------------------------------------------------------------------- kernel
# (batch, heads_q, heads_kv, seq_q, seq_k, block, layout_heads, columns per query block)
CASES = [
    (1, 4, 2, 200, 200, 64, 2, 40),  # per-KV-head layout, GQA packed (2 query heads per program)
    (2, 4, 2, 200, 333, 64, 4, 70),  # per-query-head layout, chunked prefill Sq < Sk, two column tiles
    (1, 4, 2, 333, 200, 32, 1, 20),  # one layout for all heads, Sq > Sk (rows seeing nothing)
]


@pytest.mark.interpret
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-H{}-KV{}-Sq{}-Sk{}-blk{}-LH{}-C{}".format(*c))
def test_triton_matches_reference(gen, case):
    batch, hq, hkv, sq, sk, block, lh, num_cols = case
    q = randn(gen, batch, sq, hq, 32).transpose(1, 2)  # non-contiguous q
    k, v = (randn(gen, batch, hkv, sk, 32) for _ in range(2))
    layout = _layout(gen, 1, lh, sq, sk, block, 0.3, num_cols, empty_row=1)
    assert layout.col_counts.sum() > 0
    ref_out, ref_lse = sf.attention_reference(q, k, v, layout=layout)
    out, lse = sf.block_sparse_attention(q, k, v, layout, return_lse=True, backend="triton")
    assert_attention_close(out, lse, ref_out, ref_lse, torch.float16)
    assert torch.all(out[:, :, block : 2 * block] == 0)  # the query block with nothing kept
    assert torch.all(lse[:, :, block : 2 * block] == float("-inf"))
    # the columns matter: the blocks alone give another result
    blocks_out, _ = sf.attention_reference(q, k, v, layout=layout.without_columns())
    assert (blocks_out - ref_out).abs().max() > 1e-2
    torch_out, torch_lse = sf.block_sparse_attention(q, k, v, layout, return_lse=True, backend="torch")
    assert_attention_close(torch_out, torch_lse, ref_out, ref_lse, torch.float16)
    sdpa_out = sf.block_sparse_attention(q, k, v, layout, backend="torch")  # through SDPA without the lse
    assert_attention_close(sdpa_out, None, ref_out, ref_lse, torch.float16)


@pytest.mark.interpret
def test_gqa_packing_on_and_off_agree(gen):
    q, k, v = randn(gen, 1, 4, 160, 32), randn(gen, 1, 2, 160, 32), randn(gen, 1, 2, 160, 32)
    layout = _layout(gen, 1, 2, 160, 160, 32, 0.3, 24)
    packed = sf.block_sparse_attention(q, k, v, layout, pack_gqa=True, backend="triton")
    plain = sf.block_sparse_attention(q, k, v, layout, pack_gqa=False, backend="triton")
    torch.testing.assert_close(packed, plain, atol=2e-3, rtol=0)


@pytest.mark.interpret
def test_future_columns_and_rows_with_nothing(gen):
    """Columns past some rows' causal horizon reach only the rows that see them; rows seeing nothing give 0."""
    q, k, v = randn(gen, 1, 2, 200, 32), randn(gen, 1, 2, 200, 32), randn(gen, 1, 2, 200, 32)
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    mask[0, 0, 3, 3] = True  # only the last query block keeps a block
    blocks = sf.BlockLayout.from_dense(mask, seq_len_q=200, seq_len_k=200, block_size=64)
    cols = torch.tensor([[[[0, 0], [100, 120], [10, 130], [10, 20]]]])  # block 1: both in the future of rows < 100
    layout = with_columns(blocks, cols, torch.tensor([[[0, 2, 2, 2]]]))
    ref_out, ref_lse = sf.attention_reference(q, k, v, layout=layout)
    for backend in ("triton", "torch"):
        out, lse = sf.block_sparse_attention(q, k, v, layout, return_lse=True, backend=backend)
        assert_attention_close(out, lse, ref_out, ref_lse, torch.float16)
        assert torch.all(out[:, :, :100] == 0) and torch.all(lse[:, :, :100] == float("-inf"))
        assert torch.isfinite(lse[:, :, 100:]).all()


@pytest.mark.interpret
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN keys in the interpreter
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_nan_in_columns_a_row_does_not_see(gen, backend):
    """NaN/inf at a column key reach only the rows that attend it; keys nobody keeps are never read."""
    q, k, v = randn(gen, 1, 4, 192, 32), randn(gen, 1, 2, 192, 32), randn(gen, 1, 2, 192, 32)
    mask = torch.zeros(1, 1, 3, 3, dtype=torch.bool)
    mask[..., 0] = True  # every query block keeps key block 0 only
    blocks = sf.BlockLayout.from_dense(mask, seq_len_q=192, seq_len_k=192, block_size=64)
    layout = with_columns(blocks, torch.tensor([[[[0, 0], [70, 100], [90, 150]]]]), torch.tensor([[[0, 2, 2]]]))
    ref_out, ref_lse = sf.attention_reference(q, k, v, layout=layout)
    kp, vp = k.clone(), v.clone()
    kp[:, :, 100] = float("nan")  # column of query block 1, past rows 64..99
    vp[:, :, 150] = float("inf")  # column of query block 2, past rows 128..149
    kp[:, :, 110], vp[:, :, 120] = float("nan"), float("nan")  # keys no row keeps
    out, lse = sf.block_sparse_attention(q, kp, vp, layout, return_lse=True, backend=backend)
    for lo, hi in ((0, 100), (128, 150)):  # rows that attend no bad key
        assert_attention_close(
            out[:, :, lo:hi], lse[:, :, lo:hi], ref_out[:, :, lo:hi], ref_lse[:, :, lo:hi], torch.float16
        )
    assert torch.isnan(out[:, :, 100:128]).all() and torch.isnan(out[:, :, 150:]).all()


@pytest.mark.interpret
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_padded_batch(gen, padding_side):
    q, k, v = randn(gen, 2, 2, 150, 32), randn(gen, 2, 2, 150, 32), randn(gen, 2, 2, 150, 32)
    layout = _layout(gen, 2, 2, 150, 150, 32, 0.3, 16)
    seq_lens = torch.tensor([150, 67], dtype=torch.int32)
    kw = dict(seq_lens=seq_lens, padding_side=padding_side)
    ref_out, ref_lse = sf.attention_reference(q, k, v, layout=layout, **kw)
    for backend in ("triton", "torch"):
        out, lse = sf.block_sparse_attention(q, k, v, layout, return_lse=True, backend=backend, **kw)
        assert_attention_close(out, lse, ref_out, ref_lse, torch.float16)


# ------------------------------------------------------------------------------------------- patterns
def _qk(gen, b, hq, hkv, sq, sk, d=32):
    return randn(gen, b, hq, sq, d, dtype=torch.float32), randn(gen, b, hkv, sk, d, dtype=torch.float32)


@pytest.mark.parametrize("shape", [(1, 4, 2, 333, 333), (2, 2, 1, 150, 400)], ids=["gqa", "chunked"])
@pytest.mark.parametrize("heads", ["q", "kv"])
def test_vertical_slash_columns_are_minference_verticals(gen, shape, heads):
    b, hq, hkv, sq, sk = shape
    q, k = _qk(gen, *shape)
    opts = dict(block_size=(32, 32), vertical_size=30, slash_size=50, local_diagonals=20, sink_tokens=10)
    layout = registry.select("vertical_slash", q, k, backend="torch", heads=heads, columns=True, **opts)
    plain = registry.select("vertical_slash", q, k, backend="torch", heads=heads, **opts)
    layout.check_indices()
    verticals, _ = vertical_slash_indices(
        q, k, vertical_size=30, slash_size=50, local_diagonals=20, sink_tokens=10, backend="torch"
    )
    want = torch.zeros(b, hq, sk, dtype=torch.bool).scatter_(-1, verticals, True)
    if heads == "kv":
        want = want.view(b, hkv, hq // hkv, sk).any(2)
    # per query block: the verticals some row of the block sees (bottom-right causal)
    qb = -(-sq // 32)
    horizon = torch.clamp((torch.arange(qb) + 1) * 32, max=sq) - 1 + sk - sq
    want = want[:, :, None, :] & (torch.arange(sk)[None, :] <= horizon[:, None])
    kept_blocks = layout.to_dense().repeat_interleave(32, -1)[..., :sk]
    cols = columns_to_dense(layout)
    assert torch.equal(cols | (want & kept_blocks), want), "columns are not MInference's verticals"
    assert not (cols & kept_blocks).any()
    assert layout.col_capacity == (30 if heads == "q" else 30 * hq // hkv)
    # the slashes alone map onto blocks: a subset of the block-mapped layout, and the token cost is lower
    assert not (layout.to_dense() & ~plain.to_dense()).any()
    assert layout.token_density() <= plain.token_density()
    assert layout.token_density() <= plain.density()


def test_vertical_slash_columns_option_rejected():
    q, k = torch.randn(1, 2, 64, 16), torch.randn(1, 1, 64, 16)
    with pytest.raises(ValueError, match="vertical_slash: columns: expected True or False, got 'yes'"):
        registry.select("vertical_slash", q, k, columns="yes")


def test_vertical_slash_columns_no_host_sync(monkeypatch):
    q, k = torch.randn(1, 4, 300, 32), torch.randn(1, 2, 300, 32)

    def boom(*args, **kwargs):
        raise AssertionError("host synchronisation inside a pattern")

    for attr in ("__bool__", "item", "tolist", "__int__", "__float__", "__index__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, attr, boom)
    registry.select("vertical_slash", q, k, block_size=(32, 32), columns=True, backend="torch")


# ------------------------------------------------------------------------------------------- metrics
@pytest.mark.parametrize("layout_heads", [1, 2, 4])
def test_attention_recall_counts_column_mass(gen, layout_heads):
    b, hq, hkv, sq, sk = 1, 4, 2, 100, 130
    q, k = _qk(gen, b, hq, hkv, sq, sk, d=16)
    layout = _layout(gen, b, layout_heads, sq, sk, 32, 0.3, 10)
    s = q.double() @ k.double().repeat_interleave(hq // hkv, 1).transpose(-1, -2) / math.sqrt(16)
    s = s.masked_fill(torch.arange(sk)[None, :] > (torch.arange(sq) + sk - sq)[:, None], float("-inf"))
    p = torch.softmax(s, -1)
    keep = _token_keep(layout)
    keep = keep.repeat_interleave(hq // layout_heads, 1)
    want = torch.where(keep, p, 0.0).sum(-1)
    rec, valid = row_recall(q, k, layout, backend="torch")
    assert bool(valid.all())
    torch.testing.assert_close(rec.double(), want, atol=1e-5, rtol=1e-5)
    assert attention_recall(q, k, layout, backend="torch") == pytest.approx(float(want.mean()), abs=1e-6)
    assert attention_recall(q, k, layout, backend="torch") > attention_recall(
        q, k, layout.without_columns(), backend="torch"
    )


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("layout_heads", [12, 2], ids=["per_query_head", "per_kv_head_packed"])
def test_gpu_column_gather_matches_torch_path(layout_heads):
    """Realistic shape (Qwen2.5-1.5B-like, 4K, bf16): the Triton kernel with gathered columns against the PyTorch
    path on the same GPU, blocks at ~20 % plus up to 64 columns per query block."""
    gen = torch.Generator().manual_seed(4096)
    layout = _layout(gen, 1, layout_heads, 4096, 4096, 128, 0.2, 64).to("cuda")
    q = torch.randn(1, 12, 4096, 128, generator=gen).to("cuda", torch.bfloat16)
    k, v = (torch.randn(1, 2, 4096, 128, generator=gen).to("cuda", torch.bfloat16) for _ in range(2))
    out, lse = sf.block_sparse_attention(q, k, v, layout, return_lse=True)
    ref_out, ref_lse = sf.block_sparse_attention(q, k, v, layout, return_lse=True, backend="torch")
    assert not torch.isnan(out).any()
    assert_attention_close(out, lse, ref_out, ref_lse, torch.bfloat16)
