"""Paged decode (Triton under the interpreter), both kernel paths, vs the float64 reference on the contiguous cache.

``prefetch=True`` (the default) looks up the next tile's pages (and listed block) one step ahead; ``False`` keeps
each tile's own lookup. Every slot that holds no key a row reads is NaN: spare pages, slots past each length, and
(sparse) keys of blocks a KV head does not read, so a load that strays shows up as NaN in the output.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_attention_close, randn

from sparseflash.ops.decode.checks import check_decode_inputs
from sparseflash.ops.decode.launcher import decode_forward
from sparseflash.ops.decode.reference import decode_key_mask, decode_reference
from sparseflash.ops.tuning import DecodeConfig

pytestmark = [
    pytest.mark.interpret,
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),  # NaN slots in the interpreter
]
PATHS = pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "per_tile"])


def _paged_nan(gen, k, v, page_size, lengths, read):
    """Pages of k and v in one shuffled order, NaN wherever ``read`` (B, Hkv or 1, S) is False, plus NaN spare pages.

    Returns k_pages, v_pages (num_pages, Hkv, page_size, D) and the table (B, max_pages) int32, -1 past each length.
    """
    batch, hkv, s_max, d = k.shape
    max_pages = -(-s_max // page_size)
    num_pages = batch * max_pages + 2
    perm = torch.randperm(num_pages, generator=gen)[: batch * max_pages]
    out = []
    for cache in (k, v):
        padded = torch.full((batch, hkv, max_pages * page_size, d), float("nan"), dtype=cache.dtype)
        padded[:, :, :s_max] = cache.masked_fill(~read[..., None], float("nan"))
        pages = torch.full((num_pages, hkv, page_size, d), float("nan"), dtype=cache.dtype)
        pages[perm] = padded.reshape(batch, hkv, max_pages, page_size, d).transpose(1, 2).reshape(-1, hkv, page_size, d)
        out.append(pages)
    table = perm.reshape(batch, max_pages).to(torch.int32)
    used = torch.arange(max_pages)[None, :] < (-(-lengths.long() // page_size))[:, None]
    return out[0], out[1], torch.where(used, table, -1).to(torch.int32)


def _decode(q, k_pages, v_pages, lengths, table, *, prefetch, num_splits=None, block_n=None, **lists):
    dims = check_decode_inputs(
        q,
        k_pages,
        v_pages,
        lengths,
        table,
        lists.get("kv_block_indices"),
        lists.get("kv_block_counts"),
        lists.get("block_size"),
        num_splits,
    )
    return decode_forward(
        q,
        k_pages,
        v_pages,
        lengths,
        dims,
        scale=q.shape[-1] ** -0.5,
        page_table=table,
        kv_block_indices=lists.get("kv_block_indices"),
        kv_block_counts=lists.get("kv_block_counts"),
        num_splits=num_splits,
        return_lse=True,
        config=DecodeConfig(block_n, 4, 1) if block_n else None,
        prefetch=prefetch,
    )


# (page size, heads_q, heads_kv, new tokens, BLOCK_N or None for the default 64): pages dividing the tile
# (16, 32), one tile per page (64, 128), pages neither dividing nor a multiple of the tile (24, 96), and 16-key
# tiles walking 32-token pages (one page-table load per tile, a page change every other tile)
PAGED = [
    (16, 8, 2, 1, None),
    (32, 4, 1, 4, None),
    (64, 4, 4, 1, None),
    (128, 8, 1, 3, None),
    (24, 8, 2, 2, None),
    (96, 4, 2, 1, None),
    (32, 4, 2, 2, 16),
]


@PATHS
@pytest.mark.parametrize("case", PAGED, ids=lambda c: "P{}-H{}-KV{}-Sq{}-N{}".format(*c))
def test_paged_dense(gen, poison_empty, case, prefetch):
    """Ragged lengths (full, 1, an idle slot, mid-page), GQA, shuffled tables; 1 and 3 splits (mid-page starts)."""
    page_size, hq, hkv, sq, block_n = case
    batch, d, s_max = 4, 32, 300
    q, k, v = (randn(gen, *s, dtype=torch.bfloat16) for s in ((batch, hq, sq, d), *[(batch, hkv, s_max, d)] * 2))
    lengths = torch.tensor([300, 1, 0, 157], dtype=torch.int32)
    read = decode_key_mask(lengths, sq, s_max)[:, :, -1]  # (B, 1, S): keys the last new token attends
    k_pages, v_pages, table = _paged_nan(gen, k, v, page_size, lengths, read)
    ref = decode_reference(q, k, v, lengths)
    for num_splits in (1, 3, None):
        out, lse = _decode(
            q, k_pages, v_pages, lengths, table, prefetch=prefetch, num_splits=num_splits, block_n=block_n
        )
        assert_attention_close(out, lse, *ref, torch.bfloat16)


@PATHS
@pytest.mark.parametrize("page_size", [16, 64])
@pytest.mark.parametrize("num_splits", [1, 4])
def test_paged_sparse(gen, poison_empty, page_size, num_splits, prefetch):
    """Block lists over a paged cache: NaN in every key a KV head does not read (unlisted blocks, past the length),
    lists shorter than the blocks, junk past the counts, listed blocks inside the tail, an empty list."""
    batch, hq, hkv, sq, d, s_max, block = 3, 8, 2, 2, 32, 320, 32
    q, k, v = (randn(gen, *s, dtype=torch.bfloat16) for s in ((batch, hq, sq, d), *[(batch, hkv, s_max, d)] * 2))
    lengths = torch.tensor([320, 101, 250], dtype=torch.int32)
    # 10 blocks of 32; sequence 1 (101 tokens, 2 new) has its tail from block 3 on, where listing adds nothing
    ids = torch.tensor(
        [
            [[5, 0, 2, 9, 7, 9], [7, 6, 1, 0, 3, 8]],
            [[1, 0, 3, 9, 9, 9], [2, 6, 0, 0, 0, 0]],
            [[4, 2, 6, 1, 0, 0], [3, 5, 0, 0, 0, 0]],
        ],
        dtype=torch.int32,
    )
    counts = torch.tensor([[4, 6], [3, 2], [4, 0]], dtype=torch.int32)  # slots past the count hold junk
    lists = dict(kv_block_indices=ids, kv_block_counts=counts, block_size=block)
    read = decode_key_mask(lengths, sq, s_max, **lists).any(dim=2)  # (B, Hkv, S): keys some row attends
    k_pages, v_pages, table = _paged_nan(gen, k, v, page_size, lengths, read)
    out, lse = _decode(q, k_pages, v_pages, lengths, table, prefetch=prefetch, num_splits=num_splits, **lists)
    assert torch.isfinite(out).all()
    assert_attention_close(out, lse, *decode_reference(q, k, v, lengths, **lists), torch.bfloat16)


@PATHS
def test_paged_nan_at_a_new_token_reaches_only_its_row(gen, prefetch):
    """A NaN value at the last new token's key: only that token's rows come out NaN."""
    batch, hq, hkv, sq, d, s_max, page_size = 2, 4, 2, 3, 32, 200, 16
    q, k, v = (randn(gen, *s, dtype=torch.bfloat16) for s in ((batch, hq, sq, d), *[(batch, hkv, s_max, d)] * 2))
    lengths = torch.tensor([200, 75], dtype=torch.int32)
    ref_out, ref_lse = decode_reference(q, k, v, lengths)
    v_bad = v.clone()
    v_bad[1, :, 74] = float("nan")
    read = decode_key_mask(lengths, sq, s_max)[:, :, -1]
    k_pages, v_pages, table = _paged_nan(gen, k, v_bad, page_size, lengths, read)
    out, lse = _decode(q, k_pages, v_pages, lengths, table, prefetch=prefetch, num_splits=2)
    assert torch.isnan(out[1, :, 2]).all() and torch.isfinite(out[1, :, :2]).all() and torch.isfinite(out[0]).all()
    assert_attention_close(out[0], lse[0], ref_out[0], ref_lse[0], torch.bfloat16)
    assert_attention_close(out[1, :, :2], lse[1, :, :2], ref_out[1, :, :2], ref_lse[1, :, :2], torch.bfloat16)
