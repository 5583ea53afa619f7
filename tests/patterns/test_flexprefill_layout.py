"""FlexPrefill's layout kernel against its PyTorch path (the bool mask of steps 6 to 8, then from_dense)."""

from __future__ import annotations

import pytest
import torch

from sparseflash.patterns.flexprefill_layout import (
    MAX_KEY_BLOCKS,
    flexprefill_layout_reference,
    flexprefill_layout_triton,
)


def _inputs(gen, batch, heads, sq, sk, block, density=0.2):
    qb, kb = -(-sq // block), -(-sk // block)
    line_keep = torch.rand(2, batch, heads, kb, generator=gen) < density
    cover_rows = torch.rand(batch, heads, qb * kb + 5, generator=gen) < density  # rows with a stride, as the kernel's
    coverage = cover_rows[..., : qb * kb].view(batch, heads, qb, kb)
    query_aware = torch.rand(batch, heads, generator=gen) < 0.5
    return line_keep, coverage, query_aware


def _same_layout(got, want):
    assert torch.equal(got.kv_num_blocks, want.kv_num_blocks)
    assert torch.equal(got.kv_indices, want.kv_indices)  # kept ascending, then dropped ascending
    assert (got.seq_len_q, got.seq_len_k, got.block_size) == (want.seq_len_q, want.seq_len_k, want.block_size)


@pytest.mark.interpret
@pytest.mark.parametrize(
    "batch, heads, layout_heads, sq, sk, block",
    [(1, 4, 4, 1000, 1000, 64), (2, 4, 2, 777, 777, 32), (1, 6, 2, 300, 1000, 64), (1, 2, 1, 64, 64, 64)],
    ids=["per_query_head_ragged", "gqa_union", "chunked_gqa", "one_block"],
)
def test_matches_the_mask_path_exactly(gen, batch, heads, layout_heads, sq, sk, block):
    line_keep, coverage, query_aware = _inputs(gen, batch, heads, sq, sk, block)
    args = dict(seq_len_q=sq, seq_len_k=sk, block=block, layout_heads=layout_heads)
    got = flexprefill_layout_triton(line_keep, coverage, query_aware, **args)
    want = flexprefill_layout_reference(line_keep, coverage, query_aware, **args)
    _same_layout(got, want)
    got.check_indices()


def test_bad_input(gen):
    line_keep, coverage, query_aware = _inputs(gen, 1, 2, 256, 256, 64)
    args = dict(seq_len_q=256, seq_len_k=256, block=64, layout_heads=2)
    with pytest.raises(ValueError, match="line_keep: expected bool"):
        flexprefill_layout_reference(line_keep[0], coverage, query_aware, **args)
    with pytest.raises(ValueError, match="coverage: expected bool"):
        flexprefill_layout_reference(line_keep, coverage[..., :2], query_aware, **args)
    with pytest.raises(ValueError, match="query_aware: expected bool"):
        flexprefill_layout_reference(line_keep, coverage, query_aware.float(), **args)
    with pytest.raises(ValueError, match="layout_heads: expected a divisor of 2"):
        flexprefill_layout_reference(line_keep, coverage, query_aware, **{**args, "layout_heads": 3})
    big = torch.zeros(2, 1, 1, MAX_KEY_BLOCKS + 1, dtype=torch.bool)
    with pytest.raises(ValueError, match="line_keep: expected at most"):
        flexprefill_layout_triton(
            big,
            torch.zeros(1, 1, 1, MAX_KEY_BLOCKS + 1, dtype=torch.bool),
            torch.zeros(1, 1, dtype=torch.bool),
            seq_len_q=16,
            seq_len_k=16 * (MAX_KEY_BLOCKS + 1),
            block=16,
            layout_heads=1,
        )
