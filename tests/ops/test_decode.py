"""decode_attention (Triton kernels under the interpreter, and the PyTorch path) vs the float64 reference."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_attention_close, randn

import sparseflash as sf
from sparseflash.layouts import BlockLayout
from sparseflash.ops.decode.api import decode_attention
from sparseflash.ops.decode.launcher import choose_num_splits
from sparseflash.ops.decode.reference import decode_key_mask, decode_reference, gather_pages
from sparseflash.ops.tuning import DecodeConfig, tuned


def _cache(gen, batch, hq, hkv, sq, d, s_max, dtype):
    return (
        randn(gen, batch, hq, sq, d, dtype=dtype),
        randn(gen, batch, hkv, s_max, d, dtype=dtype),
        randn(gen, batch, hkv, s_max, d, dtype=dtype),
    )


def _to_paged(gen, k, v, page_size, lengths, spare=3):
    """k and v as pages in one shuffled order plus junk spare pages; table slots past each length are -1."""
    batch, hkv, s_max, d = k.shape
    max_pages = -(-s_max // page_size)
    num_pages = batch * max_pages + spare
    perm = torch.randperm(num_pages, generator=gen)[: batch * max_pages]
    out = []
    for cache in (k, v):
        padded = torch.zeros(batch, hkv, max_pages * page_size, d, dtype=cache.dtype)
        padded[:, :, :s_max] = cache
        logical = padded.reshape(batch, hkv, max_pages, page_size, d).permute(0, 2, 1, 3, 4)
        pages = randn(gen, num_pages, hkv, page_size, d, dtype=cache.dtype)
        pages[perm] = logical.reshape(batch * max_pages, hkv, page_size, d)
        out.append(pages)
    table = perm.reshape(batch, max_pages).to(torch.int32)
    used = torch.arange(max_pages)[None, :] < (-(-lengths.long() // page_size))[:, None]
    return out[0], out[1], torch.where(used, table, -1).to(torch.int32)


def _block_lists(gen, batch, hkv, num_blocks, keep, slots=None):
    """Random distinct block ids per (batch, KV head), in shuffled order, ``keep`` of them valid."""
    slots = slots or num_blocks
    ids = torch.stack([torch.randperm(num_blocks, generator=gen)[:slots] for _ in range(batch * hkv)])
    ids = ids.reshape(batch, hkv, slots).to(torch.int32)
    counts = torch.full((batch, hkv), keep, dtype=torch.int32)
    return ids, counts


def _check(out, lse, ref, dtype):
    ref_out, ref_lse = ref
    assert_attention_close(out, lse, ref_out, ref_lse, dtype)


# -------------------------------------------------------------------------------- reference semantics
def test_key_mask_brute_force(gen):
    lengths = torch.tensor([0, 1, 5, 37, 64], dtype=torch.int32)
    sq, capacity, block = 3, 64, 16
    ids, counts = _block_lists(gen, 5, 2, 4, 2)
    mask = decode_key_mask(lengths, sq, capacity, kv_block_indices=ids, kv_block_counts=counts, block_size=block)
    assert mask.shape == (5, 2, sq, capacity)
    for b, length in enumerate(lengths.tolist()):
        tail_first = max(length - sq, 0) // block
        for h in range(2):
            listed = set(ids[b, h, : counts[b, h]].tolist())
            for i in range(sq):
                for j in range(capacity):
                    expect = j <= length - sq + i and (j // block in listed or j // block >= tail_first)
                    assert bool(mask[b, h, i, j]) == expect, (b, h, i, j)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2)])
def test_reference_matches_prefill_reference(gen, hq, hkv):
    """Decoding = the last Sq_new rows of bottom-right causal attention over the valid cache."""
    lengths = torch.tensor([1, 3, 70, 129], dtype=torch.int32)
    q, k, v = _cache(gen, 4, hq, hkv, 3, 32, 130, torch.float32)
    out, lse = decode_reference(q, k, v, lengths)
    for b, length in enumerate(lengths.tolist()):
        kb, vb = k[b : b + 1, :, :length], v[b : b + 1, :, :length]
        ref_out, ref_lse = sf.attention_reference(q[b : b + 1], kb, vb, causal=True)
        assert_attention_close(out[b : b + 1], lse[b : b + 1], ref_out, ref_lse, torch.float32)


def test_gather_pages_round_trip(gen):
    k = randn(gen, 2, 3, 100, 16, dtype=torch.float32)
    lengths = torch.tensor([100, 100], dtype=torch.int32)
    k_pages, v_pages, table = _to_paged(gen, k, k + 1, 16, lengths)
    assert torch.equal(gather_pages(k_pages, table)[:, :, :100], k)
    assert torch.equal(gather_pages(v_pages, table)[:, :, :100], k + 1)


# --------------------------------------------------------------------------------------- dense, Triton
# (batch, heads_q, heads_kv, new tokens, head_dim, max_seq_len, cache_seqlens): GQA 1/4/8, ragged lengths
# with 1 and non-multiples of the 64-key tile, a sequence shorter than Sq_new, an idle slot (0)
DENSE = [
    (3, 4, 4, 1, 32, 150, [1, 150, 77]),
    (3, 8, 2, 4, 64, 140, [4, 1, 131]),
    (2, 16, 2, 1, 32, 200, [200, 65]),
    (2, 8, 1, 4, 16, 100, [2, 0]),
    (2, 12, 4, 2, 96, 90, [90, 33]),  # group of 3, head dim not a power of two
]


@pytest.mark.interpret
@pytest.mark.parametrize("num_splits", [None, 1, 3], ids=["auto", "ns1", "ns3"])
@pytest.mark.parametrize("case", DENSE, ids=lambda c: "B{}-H{}-KV{}-Sq{}-D{}-S{}".format(*c[:6]))
def test_dense_triton(gen, poison_empty, case, num_splits):
    batch, hq, hkv, sq, d, s_max, lengths = case
    dtype = torch.bfloat16 if hq // hkv == 4 else torch.float16
    q, k, v = _cache(gen, batch, hq, hkv, sq, d, s_max, dtype)
    lengths = torch.tensor(lengths, dtype=torch.int32)
    out, lse = decode_attention(q, k, v, lengths, return_lse=True, num_splits=num_splits, backend="triton")
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == q.shape[:3] and lse.dtype == torch.float32
    _check(out, lse, decode_reference(q, k, v, lengths), dtype)


@pytest.mark.interpret
def test_dense_small_tiles_strided_inputs(gen):
    """16-key tiles (many steps per split) and (B, S, H, D) memory handed over as transposed views."""
    with tuned(decode=DecodeConfig(16, 4, 1)):
        _small_tiles_strided_inputs(gen)


def _small_tiles_strided_inputs(gen):
    batch, hq, hkv, sq, d, s_max = 2, 8, 2, 4, 32, 120
    q = randn(gen, batch, sq, hq, d).transpose(1, 2)
    k = randn(gen, batch, s_max, hkv, d).transpose(1, 2)
    v = randn(gen, batch, s_max, hkv, d).transpose(1, 2)
    lengths = torch.tensor([120, 57], dtype=torch.int32)
    for splits in (1, 4):
        out, lse = decode_attention(q, k, v, lengths, return_lse=True, num_splits=splits, backend="triton", scale=0.3)
        _check(out, lse, decode_reference(q, k, v, lengths, scale=0.3), torch.float16)


# --------------------------------------------------------------------------------------- paged, Triton
@pytest.mark.interpret
# page 16: per-key page lookup within a 64-key tile; 64 and 128: one page-table load per tile
@pytest.mark.parametrize(
    "page_size,hq,hkv,sq", [(16, 8, 2, 4), (64, 4, 4, 1), (128, 8, 1, 1), (32, 4, 1, 4)], ids=lambda x: str(x)
)
def test_paged_triton(gen, poison_empty, page_size, hq, hkv, sq):
    batch, d, s_max = 3, 32, 200
    q, k, v = _cache(gen, batch, hq, hkv, sq, d, s_max, torch.bfloat16)
    lengths = torch.tensor([1, 200, 97], dtype=torch.int32)
    k_pages, v_pages, table = _to_paged(gen, k, v, page_size, lengths)
    out, lse = decode_attention(q, k_pages, v_pages, lengths, page_table=table, return_lse=True, backend="triton")
    _check(out, lse, decode_reference(q, k, v, lengths), torch.bfloat16)
    out_split = decode_attention(q, k_pages, v_pages, lengths, page_table=table, num_splits=3, backend="triton")
    assert_attention_close(out_split, None, *decode_reference(q, k, v, lengths), torch.bfloat16)


# -------------------------------------------------------------------------------------- sparse, Triton
# (block_size, lists, heads_q, heads_kv, new tokens): 16-key blocks (16-key tiles) and 64-key blocks
SPARSE = [
    (16, "current_only", 8, 2, 4),
    (16, "random", 4, 4, 1),
    (16, "all", 8, 1, 1),
    (64, "current_only", 4, 4, 1),
    (64, "random", 8, 1, 1),
    (64, "all", 8, 2, 4),
]


@pytest.mark.interpret
@pytest.mark.parametrize("block,lists,hq,hkv,sq", SPARSE, ids=lambda x: str(x))
def test_sparse_triton(gen, poison_empty, block, lists, hq, hkv, sq):
    batch, d, s_max = 3, 32, 200
    q, k, v = _cache(gen, batch, hq, hkv, sq, d, s_max, torch.float16)
    lengths = torch.tensor([1, 200, 130], dtype=torch.int32)  # 130 with Sq 4: new tokens span two 64-blocks
    num_blocks = -(-s_max // block)
    keep = {"current_only": 0, "all": num_blocks, "random": num_blocks // 3}[lists]
    ids, counts = _block_lists(gen, batch, hkv, num_blocks, keep)
    kwargs = dict(kv_block_indices=ids, kv_block_counts=counts, block_size=block)
    out, lse = decode_attention(q, k, v, lengths, return_lse=True, backend="triton", **kwargs)
    ref = decode_reference(q, k, v, lengths, **kwargs)
    _check(out, lse, ref, torch.float16)
    if lists == "all":  # every block listed: the dense result
        _check(out, lse, decode_reference(q, k, v, lengths), torch.float16)
    if lists == "current_only":  # only the blocks holding the new tokens: causal attention over those keys
        for b, length in enumerate(lengths.tolist()):
            first = max(length - sq, 0) // block * block
            window = (q[b : b + 1], k[b : b + 1, :, first:length], v[b : b + 1, :, first:length])
            assert_attention_close(out[b : b + 1], lse[b : b + 1], *sf.attention_reference(*window), torch.float16)


@pytest.mark.interpret
@pytest.mark.parametrize("num_splits", [1, 4])
def test_sparse_paged_triton(gen, poison_empty, num_splits):
    """Sparse lists over a paged cache, shorter lists than blocks (C < Kb), listed blocks inside the tail."""
    batch, hq, hkv, sq, d, s_max, block, page_size = 2, 8, 2, 2, 32, 256, 32, 16
    q, k, v = _cache(gen, batch, hq, hkv, sq, d, s_max, torch.bfloat16)
    lengths = torch.tensor([256, 101], dtype=torch.int32)
    k_pages, v_pages, table = _to_paged(gen, k, v, page_size, lengths)
    # 8 blocks of 32; sequence 1 (101 tokens, 2 new) has its tail from block 3 on, where listing adds nothing
    ids = torch.tensor([[[5, 0, 2, 9, 9], [7, 6, 1, 0, 0]], [[1, 0, 3, 9, 9], [2, 6, 0, 0, 0]]], dtype=torch.int32)
    counts = torch.tensor([[3, 4], [3, 2]], dtype=torch.int32)  # slots past the count hold junk
    kwargs = dict(kv_block_indices=ids, kv_block_counts=counts, block_size=block)
    out, lse = decode_attention(
        q,
        k_pages,
        v_pages,
        lengths,
        page_table=table,
        return_lse=True,
        num_splits=num_splits,
        backend="triton",
        **kwargs,
    )
    _check(out, lse, decode_reference(q, k, v, lengths, **kwargs), torch.bfloat16)


# ------------------------------------------------------------------------------------ layouts for decode
def test_layout_to_block_lists():
    """Per-query-head layouts give each KV head the union of its group's blocks; shared ones broadcast."""
    keep = torch.tensor([[1, 0, 0, 1, 1], [0, 1, 0, 0, 1], [0, 0, 0, 0, 1], [1, 0, 0, 0, 1]], dtype=torch.bool)
    layout = BlockLayout.from_dense(keep[None, :, None], seq_len_q=1, seq_len_k=70, block_size=(16, 16))
    indices, counts, block = layout.to_block_lists(batch=2, num_heads=4, num_kv_heads=2)
    assert block == 16 and indices.dtype == counts.dtype == torch.int32
    assert counts.tolist() == [[4, 2]] * 2
    assert indices[0, 0, :4].tolist() == [0, 1, 3, 4] and indices[1, 1, :2].tolist() == [0, 4]
    shared = BlockLayout.from_dense(keep[None, None, None, 2], seq_len_q=1, seq_len_k=70, block_size=(16, 16))
    indices, counts, _ = shared.to_block_lists(batch=1, num_heads=4, num_kv_heads=2)
    assert counts.tolist() == [[1, 1]] and indices[0, :, 0].tolist() == [4, 4]
    with pytest.raises(ValueError, match="layout: expected one query block"):
        BlockLayout.from_dense(
            keep[None, :, None].expand(-1, -1, 2, -1), seq_len_q=20, seq_len_k=70, block_size=(16, 16)
        ).to_block_lists(batch=1, num_heads=4, num_kv_heads=2)
    with pytest.raises(ValueError, match="layout: expected batch 1 or 1 and heads 1, 3 or 6"):
        layout.to_block_lists(batch=1, num_heads=6, num_kv_heads=3)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpret)])
def test_sparse_decode_takes_a_layout(gen, backend):
    """``layout=`` is the same call as the block lists it stands for."""
    q, k, v = _cache(gen, 2, 4, 2, 1, 32, 70, torch.float16)
    lengths = torch.tensor([70, 70], dtype=torch.int32)
    keep = torch.rand(1, 4, 1, 5, generator=gen) < 0.5
    layout = BlockLayout.from_dense(keep, seq_len_q=1, seq_len_k=70, block_size=(16, 16))
    indices, counts, block = layout.to_block_lists(batch=2, num_heads=4, num_kv_heads=2)
    lists = dict(kv_block_indices=indices, kv_block_counts=counts, block_size=block)
    out, lse = decode_attention(q, k, v, lengths, layout=layout, return_lse=True, backend=backend)
    ref_out, ref_lse = decode_attention(q, k, v, lengths, return_lse=True, backend=backend, **lists)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    _check(out, lse, decode_reference(q, k, v, lengths, **lists), torch.float16)
    with pytest.raises(ValueError, match="layout: expected either layout or kv_block_indices"):
        decode_attention(q, k, v, lengths, layout=layout, **lists)
    with pytest.raises(TypeError, match="layout: expected a sparseflash.BlockLayout"):
        decode_attention(q, k, v, lengths, layout=keep)


# ------------------------------------------------------------------------------- PyTorch path, helpers
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_backend(gen, dtype):
    q, k, v = _cache(gen, 3, 8, 2, 4, 64, 90, dtype)
    lengths = torch.tensor([90, 2, 45], dtype=torch.int32)
    k_pages, v_pages, table = _to_paged(gen, k, v, 32, lengths)
    ids, counts = _block_lists(gen, 3, 2, 6, 2)
    kwargs = dict(kv_block_indices=ids, kv_block_counts=counts, block_size=16)
    out, lse = decode_attention(q, k_pages, v_pages, lengths, page_table=table, return_lse=True, **kwargs)
    assert out.dtype == dtype and lse.dtype == torch.float32
    _check(out, lse, decode_reference(q, k, v, lengths, **kwargs), dtype)
    dense = decode_attention(q, k, v, lengths, check_values=False)
    assert_attention_close(dense, None, *decode_reference(q, k, v, lengths), dtype)


def test_choose_num_splits():
    # the grid on an H100 (132 SMs), Hkv=8
    assert choose_num_splits(1, 8, 131072, 132) == 32
    assert choose_num_splits(8, 8, 131072, 132) == 4
    assert choose_num_splits(64, 8, 131072, 132) == 1
    for batch in (1, 2, 3, 8, 13, 64):
        for kv_len in (1, 100, 1000, 8192, 131072):
            s = choose_num_splits(batch, 8, kv_len, 132)
            assert 1 <= s <= 128
            assert s == 1 or -(-kv_len // 64) >= 4 * s  # at least 4 key tiles per split
            assert s == 1 or batch * 8 * s <= 2 * 2 * 132  # never more than two waves of programs
    assert choose_num_splits(1, 8, 200, 132) == 1  # short caches are not split


# ---------------------------------------------------------------------------------------- bad inputs
def _inputs(gen):
    q, k, v = _cache(gen, 2, 8, 2, 1, 32, 64, torch.float16)
    return q, k, v, torch.tensor([64, 10], dtype=torch.int32)


def _raises(exc, fn, *words):
    with pytest.raises(exc) as info:
        fn()
    msg = str(info.value)
    for word in ("expected", "got", *words):
        assert word in msg, msg


def test_bad_inputs(gen):
    q, k, v, lengths = _inputs(gen)
    call = lambda **kw: lambda: decode_attention(**{"q": q, "k_cache": k, "v_cache": v, "cache_seqlens": lengths, **kw})
    _raises(ValueError, call(cache_seqlens=torch.tensor([65, 1], dtype=torch.int32)), "cache_seqlens", "65")
    _raises(ValueError, call(cache_seqlens=torch.tensor([-1, 1], dtype=torch.int32)), "cache_seqlens")
    _raises(TypeError, call(cache_seqlens=lengths.float()), "cache_seqlens", "float32")
    _raises(TypeError, call(cache_seqlens=[64.0, 10]), "cache_seqlens", "float")
    _raises(TypeError, call(cache_seqlens=[64, True]), "cache_seqlens", "bool")
    _raises(TypeError, call(cache_seqlens="64"), "cache_seqlens", "str")
    _raises(ValueError, call(cache_seqlens=[64, -1]), "cache_seqlens", "-1")
    _raises(ValueError, call(cache_seqlens=[65, 1], check_values=False), "cache_seqlens", "65")
    _raises(ValueError, call(cache_seqlens=[64]), "cache_seqlens", "(2,)")
    _raises(ValueError, call(cache_seqlens=lengths.long() + 2**32), "cache_seqlens", str(64 + 2**32))
    _raises(ValueError, call(cache_seqlens=lengths[:1]), "cache_seqlens", "(2,)")
    _raises(TypeError, call(q=q.double()), "q", "float64")
    _raises(TypeError, call(k_cache=k.float()), "k_cache", "float32")
    _raises(TypeError, call(q=q.float(), k_cache=k.float(), v_cache=v.float(), backend="triton"), "q", "float32")
    _raises(ValueError, call(q=q[:, :7]), "num_heads", "num_kv_heads=2", "7")
    _raises(ValueError, call(k_cache=k[:1], v_cache=v[:1]), "k_cache")
    _raises(ValueError, call(v_cache=v[:, :, :32]), "v_cache")
    _raises(ValueError, call(q=q[..., :24]), "head_dim")
    _raises(TypeError, call(k_cache=k.numpy()), "k_cache", "Tensor")
    _raises(ValueError, call(num_splits=0), "num_splits")
    _raises(ValueError, call(backend="cuda"), "backend")
    _raises(ValueError, call(scale=-1.0), "scale")


def test_bad_paged_inputs(gen):
    q, k, v, lengths = _inputs(gen)
    k_pages, v_pages, table = _to_paged(gen, k, v, 16, lengths)
    call = lambda **kw: (
        lambda: decode_attention(
            **{"q": q, "k_cache": k_pages, "v_cache": v_pages, "cache_seqlens": lengths, "page_table": table, **kw}
        )
    )
    decode_attention(q, k_pages, v_pages, lengths, page_table=table)  # -1 past each length is fine
    bad = table.clone()
    bad[1, 0] = k_pages.shape[0]  # sequence 1 holds 10 tokens: page slot 0 is read
    _raises(ValueError, call(page_table=bad), "page_table", f"[0, {k_pages.shape[0]})", str(k_pages.shape[0]))
    bad[1, 0] = -1
    _raises(ValueError, call(page_table=bad), "page_table", "-1")
    _raises(TypeError, call(page_table=table.long()), "page_table", "int64")
    _raises(ValueError, call(page_table=table[:1]), "page_table")
    _raises(ValueError, call(cache_seqlens=torch.tensor([65, 1], dtype=torch.int32)), "cache_seqlens", "[0, 64]")
    _raises(ValueError, call(q=q[:, :5]), "num_heads")


def test_bad_sparse_inputs(gen):
    q, k, v, lengths = _inputs(gen)
    ids, counts = _block_lists(gen, 2, 2, 4, 2)
    call = lambda **kw: (
        lambda: decode_attention(
            **{
                "q": q,
                "k_cache": k,
                "v_cache": v,
                "cache_seqlens": lengths,
                "kv_block_indices": ids,
                "kv_block_counts": counts,
                "block_size": 16,
                **kw,
            }
        )
    )
    call()()
    _raises(ValueError, call(kv_block_counts=None), "kv_block_counts")
    _raises(ValueError, lambda: decode_attention(q, k, v, lengths, block_size=16), "block_size")
    _raises(TypeError, call(block_size=None), "block_size")
    _raises(ValueError, call(block_size=24), "block_size", "24")
    _raises(TypeError, call(kv_block_indices=ids.long()), "kv_block_indices", "int64")
    _raises(ValueError, call(kv_block_indices=ids[:, :1]), "kv_block_indices")
    _raises(ValueError, call(kv_block_counts=counts + 3), "kv_block_counts", "[0, 4]", "5")
    far = ids.clone()
    far[0, 0, 0] = 4
    _raises(ValueError, call(kv_block_indices=far), "kv_block_indices", "[0, 4)", "4")
    twice = ids.clone()
    twice[1, 1, 1] = twice[1, 1, 0]
    _raises(ValueError, call(kv_block_indices=twice), "kv_block_indices", "distinct")
    twice[1, 1, 3] = twice[1, 1, 2]  # a repeat past the count is not read: fine
    twice[1, 1, 1] = (twice[1, 1, 0] + 1) % 4
    if twice[1, 1, 1] not in twice[1, 1, 2:].tolist():
        call(kv_block_indices=twice)()


# ----------------------------------------------------------------------------- cache_seqlens, NaN, grad
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpret)])
def test_cache_seqlens_as_int64_or_list(gen, backend):
    """transformers holds lengths as int64 tensors or Python ints: both are converted to int32."""
    q, k, v = _cache(gen, 2, 4, 2, 1, 32, 40, torch.float16)
    want = decode_attention(q, k, v, torch.tensor([40, 9], dtype=torch.int32), backend=backend)
    for lengths in (torch.tensor([40, 9]), [40, 9], (40, 9)):
        for check_values in (True, False):
            got = decode_attention(q, k, v, lengths, check_values=check_values, backend=backend)
            assert torch.equal(got, want)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN keys in the interpreter
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpret)])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_nan_outside_the_attended_keys_does_not_leak(gen, backend, sparse):
    """NaN/inf past cache_seqlens, in blocks not read, and in keys of later new tokens stay out of each row."""
    batch, hq, hkv, sq, d, s_max, block = 2, 8, 2, 3, 32, 96, 16
    q, k, v = _cache(gen, batch, hq, hkv, sq, d, s_max, torch.float16)
    lengths = torch.tensor([70, 96], dtype=torch.int32)
    kwargs = {}
    if sparse:  # KV head 0 lists blocks 0 and 2, KV head 1 block 1; the tail blocks are read anyway
        ids = torch.tensor([[[0, 2, 5], [1, 0, 0]]] * batch, dtype=torch.int32)
        counts = torch.tensor([[2, 1]] * batch, dtype=torch.int32)
        kwargs = dict(kv_block_indices=ids, kv_block_counts=counts, block_size=block)
    ref_out, ref_lse = decode_reference(q, k, v, lengths, **kwargs)
    kp, vp = k.clone(), v.clone()
    for t in (kp, vp):
        t[0, :, 70:] = float("nan")  # past the length of sequence 0
        t[0, :, 70] = float("inf")
        if sparse:
            t[:, 0, 16:32] = float("nan")  # block 1: not listed for KV head 0
            t[:, 1, 0:16] = float("nan")  # block 0: not listed for KV head 1
    out, lse = decode_attention(q, kp, vp, lengths, return_lse=True, backend=backend, **kwargs)
    assert torch.isfinite(out).all()
    _check(out, lse, (ref_out, ref_lse), torch.float16)
    # the last new token's key: only that token (row 2) sees it
    for t in (kp, vp):
        t.copy_(k if t is kp else v)
    vp[1, :, 95] = float("nan")
    out = decode_attention(q, k, vp, lengths, backend=backend, **kwargs)
    assert torch.isfinite(out[1, :, :2]).all() and torch.isnan(out[1, :, 2]).all()
    _check(out[1:, :, :2], None, (ref_out[1:, :, :2], ref_lse[1:, :, :2]), torch.float16)


def test_torch_backend_is_differentiable_and_triton_refuses_grad(gen):
    q, k, v = _cache(gen, 2, 4, 2, 2, 16, 20, torch.float32)
    lengths = torch.tensor([20, 7], dtype=torch.int32)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    decode_attention(*leaves, lengths, backend="torch").square().sum().backward()
    ref_leaves = [t.double().requires_grad_(True) for t in (q, k, v)]
    decode_reference(*ref_leaves, lengths)[0].square().sum().backward()
    for got, want in zip(leaves, ref_leaves, strict=True):
        torch.testing.assert_close(got.grad.double(), want.grad, atol=1e-5, rtol=1e-4)
    half = [t.half().requires_grad_(True) for t in (q, k, v)]
    with pytest.raises(ValueError, match="no backward"):
        decode_attention(*half, lengths, backend="triton" if not torch.cuda.is_available() else "auto")
