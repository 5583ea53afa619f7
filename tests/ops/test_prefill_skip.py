"""In-kernel block skipping (``skip_threshold``): the prefill kernel under the interpreter vs its tile-walk reference.

The decision is taken per kernel program, so every comparison fixes the tile config (``tuned(prefill=...)``) and
hands the reference the geometry the launcher derives from it (``launcher.tile_geometry``). Small head dims and
tiles keep the interpreter fast; the skipped / visited tile counts must agree exactly.
"""

from __future__ import annotations

import re

import pytest
import torch
from conftest import assert_attention_close, randn

import sparseflash as sf
from sparseflash.layouts import causal_block_mask
from sparseflash.ops.prefill.launcher import tile_geometry
from sparseflash.ops.prefill.reference import masked_attention
from sparseflash.ops.prefill.reference_skip import TileGeometry, skip_attention_reference
from sparseflash.ops.tuning import TileConfig, tuned
from sparseflash.patterns.block_max import block_max_attention

SMALL = TileConfig(32, 16, 1, 1)


def _layout(gen, heads, seq_q, seq_k, block, density, *, causal=True, empty_row=None):
    qb, kb = -(-seq_q // block), -(-seq_k // block)
    mask = torch.rand(1, heads, qb, kb, generator=gen) < density
    if causal:
        mask &= causal_block_mask(seq_q, seq_k, (block, block))
    if empty_row is not None:
        mask[..., empty_row, :] = False
    return sf.BlockLayout.from_dense(mask, seq_len_q=seq_q, seq_len_k=seq_k, block_size=block)


def _kernel(q, k, v, thr, *, config=SMALL, layout=None, **kwargs):
    """(out, lse, [skipped, visited]) from the Triton kernel."""
    stats = torch.zeros(2, dtype=torch.int32) if thr is not None else None
    with tuned(prefill=config):
        if layout is None:
            out, lse = sf.flash_attention(
                q, k, v, return_lse=True, backend="triton", skip_threshold=thr, skip_stats=stats, **kwargs
            )
        else:
            out, lse = sf.block_sparse_attention(
                q, k, v, layout, return_lse=True, backend="triton", skip_threshold=thr, skip_stats=stats, **kwargs
            )
    return out, lse, (stats.tolist() if stats is not None else None)


def _reference(q, k, v, thr, *, config=SMALL, layout=None, pack_gqa=None, **kwargs):
    geometry = tile_geometry(q.shape[1], k.shape[1], q.shape[2], config, layout=layout, pack_gqa=pack_gqa)
    out, lse, counts = skip_attention_reference(q, k, v, skip_threshold=thr, geometry=geometry, layout=layout, **kwargs)
    return out, lse, counts.tolist(), geometry


# (heads_q, heads_kv, seq_q, seq_k, causal, layout (None, or (block, layout heads, density)), config, scale)
CASES = {
    "dense-causal-S200-gqa": (4, 2, 200, 200, True, None, SMALL, None),
    "dense-full-Sq97-Sk333": (2, 2, 97, 333, False, None, TileConfig(32, 32, 1, 1), 0.5),
    "dense-chunked-Sq40-Sk333-packed": (4, 2, 40, 333, True, None, TileConfig(64, 32, 1, 1), 0.5),
    "dense-causal-Sq150-Sk61-empty-rows": (2, 1, 150, 61, True, None, SMALL, None),
    "dense-causal-Sq20-Sk150-group3-packed": (6, 2, 20, 150, True, None, SMALL, 0.5),
    "sparse-causal-S200-kvheads-packed": (4, 2, 200, 200, True, (32, 2, 0.6), SMALL, 0.5),
    "sparse-full-Sq97-Sk200-qheads": (2, 2, 97, 200, False, (32, 2, 0.6), TileConfig(32, 16, 1, 1), None),
}


@pytest.mark.interpret
@pytest.mark.parametrize("thr", [0.0, 2.0], ids=["thr0", "thr2"])
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_skip_reference(gen, poison_empty, name, thr):
    hq, hkv, sq, sk, causal, lay, config, scale = CASES[name]
    q, k, v = randn(gen, 1, hq, sq, 16), randn(gen, 1, hkv, sk, 16), randn(gen, 1, hkv, sk, 16)
    layout = None if lay is None else _layout(gen, lay[1], sq, sk, lay[0], lay[2], causal=causal, empty_row=1)
    out, lse, stats = _kernel(q, k, v, thr, config=config, layout=layout, causal=causal, scale=scale)
    ref_out, ref_lse, ref_stats, geometry = _reference(
        q, k, v, thr, config=config, layout=layout, causal=causal, scale=scale
    )
    assert stats == ref_stats
    assert_attention_close(out, lse, ref_out, ref_lse, torch.float16)
    if "packed" in name:
        assert geometry.pack == hq // hkv
    if thr == 0.0 and name.startswith("dense-causal-S200"):
        assert 0 < stats[0] < stats[1]  # random logits at threshold 0: a few tiles go
    if layout is not None:
        assert torch.all(out[:, :, 32:64] == 0) and torch.all(lse[:, :, 32:64] == float("-inf"))  # the empty row


@pytest.mark.interpret
@pytest.mark.parametrize("layout", [False, True], ids=["dense", "sparse"])
def test_huge_threshold_is_exact_attention(gen, layout):
    """Nothing is ever skipped: the same bits as the plain kernel, and exact attention."""
    q, k, v = randn(gen, 1, 4, 133, 16), randn(gen, 1, 2, 133, 16), randn(gen, 1, 2, 133, 16)
    lay = _layout(gen, 2, 133, 133, 32, 0.7) if layout else None
    config = TileConfig(32, 32, 1, 1)
    out, lse, stats = _kernel(q, k, v, 1e9, layout=lay, config=config)
    plain, plain_lse, _ = _kernel(q, k, v, None, layout=lay, config=config)
    assert stats[0] == 0 and stats[1] > 0
    assert torch.equal(out, plain) and torch.equal(lse, plain_lse)
    ref_out, ref_lse = sf.attention_reference(q, k, v, layout=lay)
    assert_attention_close(out, lse, ref_out, ref_lse, torch.float16)


def _spiky(gen, seq, heads=2, head_dim=16, spike=4.0):
    """Scaled logits about ``spike`` on keys [0, 16) for every query, about 0 elsewhere: with a threshold below
    ``spike`` every full tile after the first is skipped."""
    direction = torch.zeros(head_dim)
    direction[0] = 1.0
    q = (direction * 4.0 + 0.05 * torch.randn(1, heads, seq, head_dim, generator=gen)).half()
    k = 0.05 * torch.randn(1, heads, seq, head_dim, generator=gen)
    k[:, :, :16] += direction * spike  # q.k * 0.25 ~ spike for the first tile
    v = torch.randn(1, heads, seq, head_dim, generator=gen)
    return q, k.half(), v.half()


def _kept_keys(seq: int, geometry: TileGeometry) -> torch.Tensor:
    """(seq, seq) bool: what a program keeps when every full tile but the first is skipped (dense causal)."""
    qpt = geometry.block_m // geometry.pack
    rows, keys = torch.arange(seq)[:, None], torch.arange(seq)[None, :]
    full_hi = (((rows // qpt) * qpt + 1) // geometry.block_n) * geometry.block_n  # first masked tile of each program
    return (keys <= rows) & ((keys < 16) | (keys >= full_hi))


@pytest.mark.interpret
def test_certain_skips_drop_exactly_their_mass(gen):
    """Tiles far below the first one are dropped, and only them: the output is exact attention renormalised over
    the kept keys, and exact attention mixes it with the dropped keys' attention by the dropped mass."""
    q, k, v = _spiky(gen, 160)
    out, lse, stats = _kernel(q, k, v, 2.0)
    geometry = tile_geometry(2, 2, 160, SMALL)
    kept = _kept_keys(160, geometry)
    assert geometry == (32, 16, 1)
    # program t (rows 32t..32t+31, 2 heads) sees 2t full tiles, then 2 masked ones; all full tiles but the first go
    assert stats == [2 * sum(max(2 * t - 1, 0) for t in range(5)), 2 * sum(2 * t + 2 for t in range(5))]
    kept_out, kept_lse = masked_attention(q.double(), k.double(), v.double(), kept[None, None], 0.25)
    assert_attention_close(out, lse, kept_out, kept_lse, torch.float16)
    exact_out, exact_lse = sf.attention_reference(q, k, v)
    dropped = torch.tril(torch.ones(160, 160, dtype=torch.bool)) & ~kept
    drop_out, drop_lse = masked_attention(q.double(), k.double(), v.double(), dropped[None, None], 0.25)
    w = torch.exp(lse.double() - exact_lse)  # kept mass, from the kernel's lse
    assert torch.all(w <= 1 + 1e-6) and float(w.min()) < 0.9  # up to 144 keys of weight e^-4 against 16 of 1
    mix = w[..., None] * out.double() + (1 - w[..., None]) * torch.nan_to_num(drop_out)
    assert float((mix - exact_out).norm() / exact_out.norm()) < 2e-3
    assert float((out.double() - exact_out).norm() / exact_out.norm()) > 1e-3  # it did change something


@pytest.mark.interpret
def test_nan_in_skipped_tiles_never_read(gen):
    q, k, v = _spiky(gen, 160, heads=1)
    clean, clean_lse, stats = _kernel(q, k, v, 2.0)
    assert stats[0] > 0
    v_bad = v.clone()
    v_bad[:, :, 40] = float("nan")  # key 40: in a skipped full tile of every row that sees it whole (rows >= 64)
    out, lse, _ = _kernel(q, k, v_bad, 2.0)
    rows = torch.arange(160)
    sees_masked = (rows >= 40) & (rows < 64)  # rows whose program reaches key 40 through a masked tile
    assert torch.equal(out[:, :, ~sees_masked], clean[:, :, ~sees_masked])
    assert torch.equal(lse, clean_lse)
    # NaN in a tile that is not skipped spreads as in the plain kernel
    plain, _, _ = _kernel(q, k, v_bad, None)
    assert torch.equal(torch.isnan(out[:, :, sees_masked]), torch.isnan(plain[:, :, sees_masked]))
    assert torch.isnan(plain[:, :, 64:]).all()  # without skipping every row past key 40 attends the NaN
    v_kept = v.clone()
    v_kept[:, :, 5] = float("nan")  # in the first tile: never skipped, every row attends it
    out, _, _ = _kernel(q, k, v_kept, 2.0)
    assert torch.isnan(out[:, :, 5:]).all() and not torch.isnan(out[:, :, :5]).any()


@pytest.mark.interpret
def test_pack_decides_over_the_whole_group(gen):
    """A packed program spans two heads: a head with flat logits keeps the tiles the spiky head alone would skip."""
    q, k, v = _spiky(gen, 128, heads=1)
    q = torch.cat([q, randn(gen, 1, 1, 128, 16)], dim=1)  # head 1: plain random queries on the same KV head
    layout = sf.dense_layout(128, 128, block_size=32)
    packed, packed_lse, packed_stats = _kernel(q, k, v, 2.0, layout=layout, pack_gqa=True)
    plain, plain_lse, plain_stats = _kernel(q, k, v, 2.0, layout=layout, pack_gqa=False)
    assert packed_stats[0] < plain_stats[0]
    for out, lse, stats, pack in ((packed, packed_lse, packed_stats, True), (plain, plain_lse, plain_stats, False)):
        ref_out, ref_lse, ref_stats, geometry = _reference(q, k, v, 2.0, layout=layout, pack_gqa=pack)
        assert geometry.pack == (2 if pack else 1) and stats == ref_stats
        assert_attention_close(out, lse, ref_out, ref_lse, torch.float16)


@pytest.mark.interpret
def test_noncontiguous_views_and_torch_backend(gen):
    """(B, S, H, D) transposed views give the same result; the PyTorch path replays the same tile walk."""
    bshd = lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)  # noqa: E731  same values, (B, S, H, D) memory
    q, k, v = (bshd(t) for t in _spiky(gen, 150, head_dim=32))
    assert not q.is_contiguous()
    out, lse, stats = _kernel(q, k, v, 0.0)
    same, same_lse, same_stats = _kernel(q.contiguous(), k.contiguous(), v.contiguous(), 0.0)
    assert torch.equal(out, same) and torch.equal(lse, same_lse) and stats == same_stats and stats[0] > 0
    torch_stats = torch.zeros(2, dtype=torch.int32)
    with tuned(prefill=SMALL):
        t_out, t_lse = sf.flash_attention(
            q, k, v, return_lse=True, backend="torch", skip_threshold=0.0, skip_stats=torch_stats
        )
    assert torch_stats.tolist() == stats
    assert_attention_close(out, lse, t_out.double(), t_lse.double(), torch.float16)


@pytest.mark.interpret
def test_block_max_attention_runs_in_kernel(gen, monkeypatch):
    """No separate Q K^T pass (block_scores is never called); the same as the kernel option, dense or in a layout."""
    import sparseflash.patterns.block_max as bm

    monkeypatch.setattr(bm, "block_scores", lambda *a, **kw: pytest.fail("block_max_attention ran a QK^T pass"))
    q, k, v = randn(gen, 1, 2, 100, 16), randn(gen, 1, 2, 100, 16), randn(gen, 1, 2, 100, 16)
    layout = _layout(gen, 2, 100, 100, 32, 0.8)
    for lay in (None, layout):
        stats = torch.zeros(2, dtype=torch.int32)
        with tuned(prefill=SMALL):
            out = block_max_attention(q, k, v, skip_threshold=0.0, layout=lay, backend="triton", skip_stats=stats)
        want, _, want_stats = _kernel(q, k, v, 0.0, layout=lay)
        assert torch.equal(out, want) and stats.tolist() == want_stats


@pytest.mark.parametrize(
    "geometry, layout, seq_lens",
    [
        (TileGeometry(32, 16, 1), None, None),
        (TileGeometry(32, 16, 3), None, None),  # 3 heads x 10 queries per program, 2 padding rows
        (TileGeometry(16, 16, 1), (32, 2), None),
        (TileGeometry(32, 16, 1), None, [70, 33]),
        (TileGeometry(32, 32, 1), (32, 6), [70, 33]),
    ],
    ids=["dense", "dense-pack3", "sparse", "dense-seq-lens", "sparse-seq-lens"],
)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_reference_without_threshold_is_exact(gen, geometry, layout, seq_lens, causal):
    """The tile walk itself (no threshold) is exact attention, whatever the geometry, layout or padding."""
    q, k, v = (
        randn(gen, 2, 6, 70, 16, dtype=torch.float64),
        *(randn(gen, 2, 2, 70, 16, dtype=torch.float64) for _ in "kv"),
    )
    lay = None if layout is None else _layout(gen, layout[1], 70, 70, layout[0], 0.6, causal=causal)
    lens = None if seq_lens is None else torch.tensor(seq_lens, dtype=torch.int32)
    out, lse, counts = skip_attention_reference(
        q, k, v, skip_threshold=None, geometry=geometry, causal=causal, layout=lay, seq_lens=lens
    )
    ref_out, ref_lse = sf.attention_reference(q, k, v, causal=causal, layout=lay, seq_lens=lens)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-12, rtol=0)
    assert counts[0] == 0 and counts[1] > 0


# ---------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "2", True, [1.0]])
def test_skip_threshold_errors(gen, monkeypatch, bad):
    import sparseflash.ops.prefill.launcher as launcher

    for fn in ("prefill_forward", "skip_attention_torch", "sparse_forward"):  # raised before any work
        monkeypatch.setattr(launcher, fn, lambda *a, **kw: pytest.fail("work started"))
    q, k, v = randn(gen, 1, 2, 64, 16), randn(gen, 1, 2, 64, 16), randn(gen, 1, 2, 64, 16)
    want = re.escape(f"skip_threshold: expected a finite float >= 0 or None, got {bad!r}")
    with pytest.raises(ValueError, match=want):
        sf.flash_attention(q, k, v, skip_threshold=bad)
    with pytest.raises(ValueError, match=want):
        sf.block_sparse_attention(q, k, v, sf.dense_layout(64, 64, block_size=32), skip_threshold=bad)
    with pytest.raises(ValueError, match=want):
        block_max_attention(q, k, v, skip_threshold=bad)


def test_skip_stats_errors(gen):
    q, k, v = randn(gen, 1, 2, 64, 16), randn(gen, 1, 2, 64, 16), randn(gen, 1, 2, 64, 16)
    with pytest.raises(ValueError, match="skip_stats: expected None without a skip_threshold"):
        sf.flash_attention(q, k, v, skip_stats=torch.zeros(2, dtype=torch.int32))
    for bad in (torch.zeros(2, dtype=torch.int64), torch.zeros(3, dtype=torch.int32), [0, 0]):
        with pytest.raises(ValueError, match="skip_stats: expected an int32 tensor of shape"):
            sf.flash_attention(q, k, v, skip_threshold=1.0, skip_stats=bad)
    with pytest.raises(ValueError, match="skip_stats: expected a contiguous tensor"):
        sf.flash_attention(q, k, v, skip_threshold=1.0, skip_stats=torch.zeros(4, dtype=torch.int32)[::2])


def test_permuted_layout_refuses_skipping(gen):
    q, k, v = randn(gen, 1, 2, 256, 16), randn(gen, 1, 2, 256, 16), randn(gen, 1, 2, 256, 16)
    layout = sf.patterns.select("permuted", q, k)
    with pytest.raises(ValueError, match="skip_threshold: expected None with a PermutedLayout"):
        sf.block_sparse_attention(q, k, v, layout, skip_threshold=1.0)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpret)])
def test_seq_lens_skip_nothing(gen, backend):
    """A padded batch runs every tile through the masked path: nothing is skipped."""
    q, k, v = _spiky(gen, 96)
    seq_lens = torch.tensor([80], dtype=torch.int32)
    stats = torch.zeros(2, dtype=torch.int32)
    with tuned(prefill=SMALL):
        out = sf.flash_attention(q, k, v, seq_lens=seq_lens, skip_threshold=0.0, skip_stats=stats, backend=backend)
    assert stats[0] == 0 and stats[1] > 0
    ref, _ = sf.attention_reference(q, k, v, seq_lens=seq_lens)
    torch.testing.assert_close(out.double(), ref, atol=2e-3, rtol=0)
