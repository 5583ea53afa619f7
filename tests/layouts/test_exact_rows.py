"""with_exact_rows: the last query rows of a layout made fully kept (the exact tail of a sparse prefill)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_attention_close, randn

import sparseflash as sf
from sparseflash.layouts import BlockLayout, causal_block_mask, with_columns
from sparseflash.layouts.exact_rows import can_take_exact_rows, first_exact_block, with_exact_rows


def _random_layout(gen, b, h, sq, sk, bs, density=0.3):
    allowed = causal_block_mask(sq, sk, (bs, bs))
    keep = (torch.rand(b, h, *allowed.shape, generator=gen) < density) & allowed
    return BlockLayout.from_dense(keep, seq_len_q=sq, seq_len_k=sk, block_size=(bs, bs))


@pytest.mark.parametrize("sq,sk,rows", [(300, 300, 40), (256, 256, 64), (100, 400, 30), (300, 300, 1000)])
def test_rows_are_fully_kept_and_the_rest_unchanged(gen, sq, sk, rows):
    layout = _random_layout(gen, 2, 3, sq, sk, 32)
    out = with_exact_rows(layout, rows)
    first = first_exact_block(layout, rows)
    assert first == max(0, sq - rows) // 32
    allowed = causal_block_mask(sq, sk, (32, 32))
    dense = out.to_dense()
    assert torch.equal(dense[:, :, first:], allowed[first:].expand_as(dense[:, :, first:]))
    assert torch.equal(dense[:, :, :first], layout.to_dense()[:, :, :first])
    # the from_dense format: the same arrays as compressing the new mask
    again = BlockLayout.from_dense(dense, seq_len_q=sq, seq_len_k=sk, block_size=(32, 32))
    assert torch.equal(out.kv_num_blocks, again.kv_num_blocks) and torch.equal(out.kv_indices, again.kv_indices)
    out.check_indices()
    assert not torch.equal(layout.to_dense(), dense) or first == layout.num_q_blocks  # rows changed
    assert layout.kv_num_blocks.data_ptr() != out.kv_num_blocks.data_ptr()


def test_attention_with_exact_rows_equals_dense_on_those_rows(gen):
    b, hq, hkv, s, d = 1, 4, 2, 333, 32
    q, k, v = (randn(gen, b, h, s, d, dtype=torch.float32) for h in (hq, hkv, hkv))
    layout = with_exact_rows(_random_layout(gen, b, hq, s, s, 32, density=0.2), 70)
    exact_from = first_exact_block(layout, 70) * 32
    full, _ = sf.attention_reference(q, k, v, causal=True)
    sparse_rows, _ = sf.attention_reference(q, k, v, causal=True, layout=layout)
    for backend, dtype in (("torch", torch.float32), ("triton", torch.bfloat16)):
        out = sf.block_sparse_attention(q.to(dtype), k.to(dtype), v.to(dtype), layout, causal=True, backend=backend)
        assert_attention_close(out[:, :, exact_from:], None, full[:, :, exact_from:], None, dtype)
        assert_attention_close(out, None, sparse_rows, None, dtype)  # and the other rows as the layout says


def test_zero_rows_and_refused_layouts(gen):
    layout = _random_layout(gen, 1, 2, 128, 128, 32)
    assert with_exact_rows(layout, 0) is layout
    assert can_take_exact_rows(layout)
    cols = with_columns(layout, torch.zeros(1, 2, 4, 1, dtype=torch.int64), check=False)
    assert not can_take_exact_rows(cols)
    truncated = BlockLayout.from_dense(layout.to_dense(), block_size=(32, 32), capacity=2)
    assert not can_take_exact_rows(truncated)
    with pytest.raises(ValueError, match="layout: expected a BlockLayout without token columns"):
        with_exact_rows(truncated, 10)
