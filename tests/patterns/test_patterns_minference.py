"""MInference Vertical-Slash: the last-query scoring kernel, the token index, its block union, the pattern."""

from __future__ import annotations

import pytest
import torch
from conftest import randn

from sparseflash.layouts import causal_block_mask
from sparseflash.layouts.geometry import diagonal_mask
from sparseflash.ops.scores.last_queries import (
    last_query_scores,
    last_query_scores_reference,
    last_query_scores_triton,
)
from sparseflash.patterns import minference, registry

# (batch, heads_q, heads_kv, seq_q, seq_k, head_dim, last_q, num_keys, causal)
SCORE_CASES = [
    (1, 2, 1, 150, 150, 64, 64, None, True),  # GQA 2, ragged length, MInference's 64 rows
    (2, 2, 1, 70, 203, 32, 128, None, True),  # chunked prefill Sq < Sk, FlexPrefill's 128 rows > Sq
    (1, 3, 3, 200, 200, 48, 128, 128, False),  # PBS: complete segments only, no causal mask
    (1, 2, 2, 20, 20, 16, 64, None, True),  # shorter than one row block
]


def _brute_scores(q, k, last_q, num_keys, causal):
    """Per head, per row, per key loops over an explicit float64 softmax."""
    batch, heads, seq_q, dim = q.shape
    seq_k = k.shape[2]
    group = heads // k.shape[1]
    rows = min(last_q, seq_q)
    num_keys = seq_k if num_keys is None else num_keys
    vert = torch.zeros(batch, heads, seq_k, dtype=torch.float64)
    slash = torch.zeros(batch, heads, seq_k, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            qq = q[b, h, seq_q - rows :].double()
            kk = k[b, h // group, :num_keys].double()
            s = qq @ kk.T * dim**-0.5
            for i in range(rows):
                pos = seq_k - rows + i
                if causal:
                    s[i, pos + 1 :] = float("-inf")
            p = torch.softmax(s, -1)
            vert[b, h, :num_keys] = p.sum(0)
            for i in range(rows):
                pos = seq_k - rows + i
                for j in range(num_keys):
                    delta = pos - j
                    if 0 <= delta < seq_k:
                        slash[b, h, seq_k - 1 - delta] += p[i, j]
    return vert, slash


@pytest.mark.parametrize("case", SCORE_CASES[:2] + SCORE_CASES[3:], ids=["gqa", "chunked", "short"])
def test_score_reference_matches_brute_force(gen, case):
    batch, hq, hkv, sq, sk, d, last_q, num_keys, causal = case
    q, k = randn(gen, batch, hq, sq, d, dtype=torch.float32), randn(gen, batch, hkv, sk, d, dtype=torch.float32)
    vert, slash = last_query_scores_reference(q, k, num_queries=last_q, num_keys=num_keys, causal=causal)
    ref_vert, ref_slash = _brute_scores(q, k, last_q, num_keys, causal)
    torch.testing.assert_close(vert.double(), ref_vert, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(slash.double(), ref_slash, atol=1e-5, rtol=1e-4)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", SCORE_CASES, ids=["gqa", "chunked", "pbs", "short"])
def test_score_kernel_matches_reference(gen, case, dtype):
    batch, hq, hkv, sq, sk, d, last_q, num_keys, causal = case
    q, k = randn(gen, batch, hq, sq, d, dtype=dtype), randn(gen, batch, hkv, sk, d, dtype=dtype)
    vert, slash = last_query_scores_triton(q, k, num_queries=last_q, num_keys=num_keys, causal=causal)
    ref_vert, ref_slash = last_query_scores_reference(q, k, num_queries=last_q, num_keys=num_keys, causal=causal)
    assert vert.dtype == torch.float32 and vert.shape == (batch, hq, sk)
    torch.testing.assert_close(vert, ref_vert, atol=2e-5, rtol=1e-3)
    torch.testing.assert_close(slash, ref_slash, atol=2e-5, rtol=1e-3)
    rows = min(last_q, sq)
    torch.testing.assert_close(vert.sum(-1), torch.full((batch, hq), float(rows)), atol=1e-3, rtol=0)
    if num_keys is not None:
        assert torch.all(vert[..., num_keys:] == 0)
    # without slash the second pass skips the skew
    vert2, none = last_query_scores(
        q, k, num_queries=last_q, num_keys=num_keys, causal=causal, slash=False, backend="triton"
    )
    assert none is None and torch.equal(vert2, vert)


def test_score_options_rejected():
    q, k = torch.randn(1, 2, 10, 16), torch.randn(1, 1, 10, 16)
    with pytest.raises(ValueError, match="num_queries: expected a positive int, got 0"):
        last_query_scores(q, k, num_queries=0)
    with pytest.raises(ValueError, match=r"num_keys: expected an int in \[0, 10\], got 11"):
        last_query_scores(q, k, num_queries=4, num_keys=11)
    with pytest.raises(ValueError, match="k: expected shape"):
        last_query_scores(q, torch.randn(1, 3, 10, 16), num_queries=4)
    with pytest.raises(ValueError, match="backend: expected 'auto', 'triton' or 'torch'"):
        last_query_scores(q, k, num_queries=4, backend="cuda")


def _brute_indices(q, k, last_q, v_size, s_size, sink, local):
    """MInference's per-head estimation loop (minference_forward.py), float64."""
    vert, slash = _brute_scores(q, k, last_q, None, True)
    seq_k = k.shape[2]
    v_size, s_size = min(seq_k, max(v_size, 30)), min(seq_k, max(s_size, 50))
    cols, dists = [], []
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            vv = vert[b, h].clone()
            vv[:sink] = float("inf")
            diag = slash[b, h].flip(0).clone()  # diag[delta]
            diag[:local] = float("inf")
            cols.append(set(torch.topk(vv, v_size).indices.tolist()))
            dists.append(set(torch.topk(diag, s_size).indices.tolist()))
    return cols, dists


@pytest.mark.parametrize("shape", [(1, 2, 1, 300, 300, 32), (1, 2, 2, 120, 260, 32)], ids=["gqa", "chunked"])
def test_indices_match_minference_loop(gen, shape):
    batch, hq, hkv, sq, sk, d = shape
    q, k = randn(gen, batch, hq, sq, d, dtype=torch.float32), randn(gen, batch, hkv, sk, d, dtype=torch.float32)
    opts = dict(last_q=64, vertical_size=40, slash_size=120, sink_tokens=30, local_diagonals=100)
    cols, dists = minference.vertical_slash_indices(q, k, backend="torch", **opts)
    ref_cols, ref_dists = _brute_indices(q, k, 64, 40, 120, 30, 100)
    assert cols.shape == (batch, hq, 40) and dists.shape == (batch, hq, 120)
    for n, (rc, rd) in enumerate(zip(ref_cols, ref_dists, strict=True)):
        b, h = divmod(n, hq)
        assert set(cols[b, h].tolist()) == rc
        assert set(dists[b, h].tolist()) == rd
        assert set(range(30)) <= rc and set(range(100)) <= rd  # forced sinks and local diagonals


@pytest.mark.parametrize(
    "seq_q, seq_k, block_size",
    [(300, 300, (64, 64)), (100, 333, (32, 64)), (257, 257, (64, 32)), (90, 200, (16, 16))],
    ids=["square", "chunked", "tall-blocks", "small-blocks"],
)
def test_block_mask_is_block_union_of_token_pattern(gen, seq_q, seq_k, block_size):
    """Each kept block holds a kept (query, key) pair, and every kept pair lies in a kept block."""
    batch, heads = 2, 3
    cols = torch.randint(0, seq_k, (batch, heads, 7), generator=gen)
    dists = torch.randint(0, seq_k, (batch, heads, 9), generator=gen)
    dists[..., 0] = 0  # MInference always keeps the main diagonal (its local window)
    mask = minference.vertical_slash_block_mask(cols, dists, seq_q, seq_k, block_size)
    pos = torch.arange(seq_q)[:, None] + seq_k - seq_q
    j = torch.arange(seq_k)[None, :]
    tokens = torch.zeros(batch, heads, seq_q, seq_k, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            in_cols = torch.isin(j, cols[b, h]).expand(seq_q, -1)
            in_slash = torch.isin(pos - j, dists[b, h])
            tokens[b, h] = (in_cols | in_slash) & (j <= pos)
    bq, bk = block_size
    qb, kb = -(-seq_q // bq), -(-seq_k // bk)
    padded = torch.nn.functional.pad(tokens, (0, kb * bk - seq_k, 0, qb * bq - seq_q))
    expected = padded.view(batch, heads, qb, bq, kb, bk).any(5).any(3)
    assert torch.equal(mask, expected)


def _qk(gen, shape, dtype=torch.float32, hot=range(100, 120)):
    """Random q, k plus a shared direction that makes keys ``hot`` attended by every query (a vertical)."""
    batch, hq, hkv, sq, sk, d = shape
    q, k = randn(gen, batch, hq, sq, d), randn(gen, batch, hkv, sk, d)
    u = randn(gen, d)
    u = u / u.norm() * 4
    k[:, :, hot.start : hot.stop] += u
    return (q + u).to(dtype), k.to(dtype)


@pytest.mark.parametrize(
    "shape, block_size",
    [((1, 4, 2, 333, 333, 32), (16, 16)), ((2, 2, 1, 150, 400, 32), (16, 32))],
    ids=["gqa", "chunked"],
)
def test_pattern_properties(gen, shape, block_size):
    q, k = _qk(gen, shape)
    sq, sk = shape[3], shape[4]
    small = dict(vertical_size=30, slash_size=50, local_diagonals=20, sink_tokens=10)
    layout = registry.select("vertical_slash", q, k, block_size=block_size, backend="torch", **small)
    dense = layout.to_dense()
    assert layout.num_heads == shape[1] and registry.get("vertical_slash").heads == "q"
    allowed = causal_block_mask(sq, sk, block_size)
    assert not (dense & ~allowed).any(), "a block above the causal diagonal"
    diag = diagonal_mask(sq, sk, block_size)
    assert (dense | ~diag).all(), "a diagonal block is missing"
    assert (dense[..., 0] | ~allowed[:, 0]).all(), "the sink column is missing"
    assert layout.density() < 1.0
    # larger budgets keep a superset of blocks (same scores, longer top-k)
    big = registry.select(
        "vertical_slash",
        q,
        k,
        block_size=block_size,
        backend="torch",
        **{**small, "vertical_size": 90, "slash_size": 150},
    )
    assert not (dense & ~big.to_dense()).any() and big.density() >= layout.density()
    # per-KV-head layout: the union over each group
    kv = registry.select("vertical_slash", q, k, block_size=block_size, backend="torch", heads="kv", **small)
    group = shape[1] // shape[2]
    assert torch.equal(kv.to_dense(), dense.view(shape[0], shape[2], group, *dense.shape[2:]).any(2))


@pytest.mark.interpret
def test_pattern_triton_scores_give_same_layout(gen):
    q, k = _qk(gen, (1, 2, 1, 260, 260, 32), dtype=torch.float16)
    opts = dict(block_size=(64, 64), vertical_size=40, slash_size=60)
    a = registry.select("vertical_slash", q, k, backend="triton", **opts)
    b = registry.select("vertical_slash", q, k, backend="torch", **opts)
    assert torch.equal(a.to_dense(), b.to_dense())


@pytest.mark.parametrize(
    "options, error, match",
    [
        (dict(last_q=0), ValueError, "vertical_slash: last_q: expected an int >= 1, got 0"),
        (dict(vertical_size=-5), ValueError, "vertical_size: expected an int >= 1, got -5"),
        (dict(slash_size=2.5), ValueError, "slash_size: expected an int >= 1, got 2.5"),
        (dict(sink_tokens=-1), ValueError, "sink_tokens: expected an int >= 0, got -1"),
        (dict(local_diagonals=0), ValueError, "local_diagonals: expected an int >= 1, got 0"),
        (dict(heads="all"), ValueError, r"heads: expected one of \('q', 'kv'\), got 'all'"),
        (dict(block_size=(100, 128)), ValueError, "block_size: expected"),
        (dict(causal=False), NotImplementedError, "only causal prefill"),
        (dict(vertical=10), ValueError, r"unknown option\(s\) \['vertical'\]; expected some of"),
        (dict(backend="gpu"), ValueError, r"backend: expected one of \('auto', 'triton', 'torch'\), got 'gpu'"),
    ],
)
def test_pattern_options_rejected(options, error, match):
    q, k = torch.randn(1, 2, 64, 16), torch.randn(1, 1, 64, 16)
    with pytest.raises(error, match=match):
        registry.select("vertical_slash", q, k, **options)


def test_pattern_rejects_bad_tensors():
    q = torch.randn(1, 3, 64, 16)
    with pytest.raises(ValueError, match="num_kv_heads=2"):
        registry.select("vertical_slash", q, torch.randn(1, 2, 64, 16))
    with pytest.raises(ValueError, match="expected a 4-D tensor"):
        registry.select("vertical_slash", q[0], torch.randn(1, 1, 64, 16))


def test_no_host_sync(monkeypatch):
    """Selection never reads a tensor value on the host (no .item(), .tolist(), bool(), int(), .cpu())."""
    q, k = torch.randn(1, 4, 300, 32), torch.randn(1, 2, 300, 32)

    def boom(*args, **kwargs):
        raise AssertionError("host synchronisation inside a pattern")

    for attr in ("__bool__", "item", "tolist", "__int__", "__float__", "__index__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, attr, boom)
    registry.select("vertical_slash", q, k, block_size=(32, 32), backend="torch")
    registry.select("flexprefill", q, k, block_size=(32, 32), min_budget=32, backend="torch")
    registry.select("permuted", q, k, block_size=(32, 32), segment_size=64, backend="torch")
