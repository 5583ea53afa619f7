"""decode_attention on a CUDA GPU at real sizes: B=64, 128K caches, paged, sparse, CUDA graphs, int64 offsets."""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_GPU, assert_attention_close

from sparseflash.ops.decode.api import decode_attention
from sparseflash.ops.decode.checks import check_decode_inputs
from sparseflash.ops.decode.launcher import decode_forward
from sparseflash.ops.decode.reference import decode_reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")]

HQ, HKV, D = 32, 8, 128
DTYPE = torch.bfloat16


def _rand(gen, *shape):
    return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float32).to(DTYPE)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(seed)


def _reference(q, k, v, lengths, **kw):
    return decode_reference(q, k, v, lengths, dtype=torch.float32, **kw)


def _paged(gen, k, v, page_size):
    """Pages of k and v in one shuffled order: (num_pages, Hkv, page_size, D) twice, table (B, P) int32."""
    batch, hkv, s_max, d = k.shape
    max_pages = s_max // page_size
    perm = torch.randperm(batch * max_pages, generator=gen, device="cuda")
    pages = []
    for cache in (k, v):
        logical = cache.reshape(batch, hkv, max_pages, page_size, d).permute(0, 2, 1, 3, 4)
        out = torch.empty(batch * max_pages, hkv, page_size, d, dtype=cache.dtype, device="cuda")
        out[perm] = logical.reshape(batch * max_pages, hkv, page_size, d)
        pages.append(out)
    return pages[0], pages[1], perm.reshape(batch, max_pages).to(torch.int32)


def _sparse_lists(gen, batch, num_blocks, fraction):
    keep = max(1, int(fraction * num_blocks))
    scores = torch.rand(batch, HKV, num_blocks, generator=gen, device="cuda")
    ids = scores.argsort(dim=-1)[..., :keep].to(torch.int32)  # distinct, unsorted
    return ids, torch.full((batch, HKV), keep, dtype=torch.int32, device="cuda")


@pytest.mark.parametrize("sq", [1, 4])
def test_batch64_ragged(poison_empty, sq):
    gen = _gen(sq)
    batch, s_max = 64, 8192
    q, k, v = _rand(gen, batch, HQ, sq, D), _rand(gen, batch, HKV, s_max, D), _rand(gen, batch, HKV, s_max, D)
    lengths = torch.randint(1, s_max + 1, (batch,), generator=gen, device="cuda", dtype=torch.int32)
    lengths[:4] = torch.tensor([1, s_max, s_max - 1, 1000], dtype=torch.int32)
    out, lse = decode_attention(q, k, v, lengths, return_lse=True)
    assert_attention_close(out, lse, *_reference(q, k, v, lengths), DTYPE)


@pytest.mark.parametrize("num_splits", [None, 1, 100])
def test_128k_batch1(poison_empty, num_splits):
    gen = _gen(7)
    s_max = 131072
    q, k, v = _rand(gen, 1, HQ, 1, D), _rand(gen, 1, HKV, s_max, D), _rand(gen, 1, HKV, s_max, D)
    lengths = torch.tensor([s_max - 77], dtype=torch.int32, device="cuda")
    out, lse = decode_attention(q, k, v, lengths, return_lse=True, num_splits=num_splits)
    assert_attention_close(out, lse, *_reference(q, k, v, lengths), DTYPE)


@pytest.mark.parametrize("page_size", [16, 64, 256])
def test_paged_and_sparse_8x32k(poison_empty, page_size):
    gen = _gen(page_size)
    batch, s_max, block = 8, 32768, 128
    q, k, v = _rand(gen, batch, HQ, 2, D), _rand(gen, batch, HKV, s_max, D), _rand(gen, batch, HKV, s_max, D)
    lengths = torch.randint(1, s_max + 1, (batch,), generator=gen, device="cuda", dtype=torch.int32)
    k_pages, v_pages, table = _paged(gen, k, v, page_size)
    ref = _reference(q, k, v, lengths)
    out, lse = decode_attention(q, k_pages, v_pages, lengths, page_table=table, return_lse=True)
    assert_attention_close(out, lse, *ref, DTYPE)
    ids, counts = _sparse_lists(gen, batch, s_max // block, 0.1)
    kw = dict(kv_block_indices=ids, kv_block_counts=counts, block_size=block)
    out, lse = decode_attention(q, k_pages, v_pages, lengths, page_table=table, return_lse=True, **kw)
    assert_attention_close(out, lse, *_reference(q, k, v, lengths, **kw), DTYPE)


@pytest.mark.parametrize("page_size", [16, 64, 256])
def test_paged_paths_match_contiguous(poison_empty, page_size):
    """Both paged kernel paths (pages looked up one tile ahead, or per tile), dense and sparse, split and not:
    the contiguous cache's output (the same products in the same order) and the reference's."""
    gen = _gen(100 + page_size)
    batch, s_max, block = 4, 32768, 128
    q, k, v = _rand(gen, batch, HQ, 1, D), _rand(gen, batch, HKV, s_max, D), _rand(gen, batch, HKV, s_max, D)
    lengths = torch.tensor([s_max, 1, 20000, s_max - page_size - 3], dtype=torch.int32, device="cuda")
    k_pages, v_pages, table = _paged(gen, k, v, page_size)
    ids, counts = _sparse_lists(gen, batch, s_max // block, 0.1)
    for lists in ({}, dict(kv_block_indices=ids, kv_block_counts=counts, block_size=block)):
        ref = _reference(q, k, v, lengths, **lists)
        for num_splits in (None, 1):
            want = decode_attention(q, k, v, lengths, num_splits=num_splits, **lists)
            for prefetch in (True, False):
                dims = check_decode_inputs(
                    q, k_pages, v_pages, lengths, table, ids if lists else None, counts if lists else None,
                    block if lists else None, num_splits,
                )  # fmt: skip
                out, lse = decode_forward(
                    q, k_pages, v_pages, lengths, dims, scale=D**-0.5, page_table=table, num_splits=num_splits,
                    return_lse=True, prefetch=prefetch, kv_block_indices=lists.get("kv_block_indices"),
                    kv_block_counts=lists.get("kv_block_counts"),
                )  # fmt: skip
                assert_attention_close(out, lse, *ref, DTYPE)
                torch.testing.assert_close(out, want, atol=2e-3, rtol=1e-2)


def test_cuda_graph_replay():
    """Captured once (check_values=False), replayed with new queries, cache contents and lengths."""
    gen = _gen(3)
    batch, s_max = 4, 16384
    q, k, v = _rand(gen, batch, HQ, 1, D), _rand(gen, batch, HKV, s_max, D), _rand(gen, batch, HKV, s_max, D)
    lengths = torch.tensor([100, 16384, 5000, 1], dtype=torch.int32, device="cuda")
    decode_attention(q, k, v, lengths, check_values=False)  # compile outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        out = decode_attention(q, k, v, lengths, check_values=False)
    with pytest.raises(ValueError, match="check_values"), torch.cuda.graph(torch.cuda.CUDAGraph()):
        decode_attention(q, k, v, lengths)
    for step in range(3):
        q.copy_(_rand(gen, *q.shape))
        k[:, :, 16000 + step].copy_(_rand(gen, batch, HKV, D))
        lengths.copy_(torch.tensor([101 + step, 16384, 16001 + step, 2 + step], dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        assert_attention_close(out, None, *_reference(q, k, v, lengths), DTYPE)


def test_int64_offsets():
    """A cache with more than 2**31 elements: the last sequence's offsets pass int32."""
    gen = _gen(11)
    batch, hkv, s_max = 5, 8, 540_000  # 5 * 8 * 540000 * 128 = 2.76e9 elements per cache
    k = torch.empty(batch, hkv, s_max, D, dtype=DTYPE, device="cuda")
    v = torch.empty_like(k)
    k[-1].copy_(_rand(gen, hkv, s_max, D))
    v[-1].copy_(_rand(gen, hkv, s_max, D))
    k[:-1].zero_()
    v[:-1].zero_()
    q = _rand(gen, batch, HQ, 1, D)
    lengths = torch.tensor([1, 1, 1, 1, s_max], dtype=torch.int32, device="cuda")
    out = decode_attention(q, k, v, lengths)
    ref_out, _ = _reference(q[-1:], k[-1:], v[-1:], lengths[-1:])
    assert_attention_close(out[-1:], None, ref_out, None, DTYPE)
