"""PBS-Attn: permutation, selection vs a per-head re-statement of the release, the permuted attention path."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_attention_close, randn

import sparseflash as sf
from sparseflash.layouts import BlockLayout, PermutedLayout, causal_block_mask
from sparseflash.layouts.geometry import diagonal_mask
from sparseflash.layouts.permuted import inverse_perm
from sparseflash.ops.merge import merge_attention_states
from sparseflash.ops.prefill.reference import masked_attention
from sparseflash.patterns import pbs, registry


def _qkv(gen, batch, hq, hkv, n, d, dtype=torch.float32, sharp=2.0):
    q, k, v = randn(gen, batch, hq, n, d), randn(gen, batch, hkv, n, d), randn(gen, batch, hkv, n, d)
    u = randn(gen, d)
    u = u / u.norm() * 2
    k[:, :, 3::37] += u  # scattered keys every query likes: the permutation gathers them
    return (sharp * q + u).to(dtype), k.to(dtype), v.to(dtype)


def _pbs_loop(q, k, block, segment, threshold):
    """The release's pipeline (pbs.py, permute_states.py, utils.py @8ce8e02) head by head, K expanded."""
    batch, heads, n, d = q.shape
    group = heads // k.shape[1]
    num_segments, nb = n // segment, math.ceil(n / block)
    perms = torch.arange(n).repeat(batch, heads, 1)
    mask = torch.zeros(batch, heads, nb, nb, dtype=torch.bool)
    seg = [j * block // segment for j in range(nb)]
    for b in range(batch):
        for h in range(heads):
            qq, kk = q[b, h].float(), k[b, h // group].float()
            if num_segments:
                p = torch.softmax(qq[n - block :] @ kk[: num_segments * segment].T / math.sqrt(d), -1)
                u = p.mean(0)
                for s in range(num_segments):
                    part = u[s * segment : (s + 1) * segment]
                    perms[b, h, s * segment : (s + 1) * segment] = s * segment + part.argsort(
                        descending=True, stable=True
                    )
            perm = perms[b, h]
            kp = kk[perm]
            counts = torch.tensor([min(block, n - i * block) for i in range(nb)], dtype=torch.float32)[:, None]
            pad = nb * block - n
            q_bar = torch.nn.functional.pad(qq, (0, 0, 0, pad)).view(nb, block, d).sum(1) / counts
            k_bar = torch.nn.functional.pad(kp, (0, 0, 0, pad)).view(nb, block, d).sum(1) / counts
            scores = q_bar @ k_bar.T / math.sqrt(d)
            sink_block = int((perm == 0).nonzero()) // block
            for i in range(nb):
                cols = [j for j in range(i + 1) if seg[j] != seg[i]]
                if cols:
                    probs = torch.softmax(scores[i, cols], -1)
                    total = 0.0
                    for idx in probs.argsort(descending=True).tolist():
                        if total >= threshold:
                            break
                        mask[b, h, i, cols[idx]] = True
                        total += float(probs[idx])
                    if seg[sink_block] != seg[i]:
                        mask[b, h, i, sink_block] = True
                for j in range(i + 1):
                    if seg[j] == seg[i]:
                        mask[b, h, i, j] = True
    return perms, mask


@pytest.mark.parametrize(
    "n, block, segment, threshold",
    [(333, 32, 64, 0.9), (256, 32, 128, 0.7), (200, 16, 32, 0.5)],
    ids=["ragged-tail", "aligned", "small-blocks"],
)
def test_matches_release_loop(gen, n, block, segment, threshold):
    q, k, _ = _qkv(gen, 1, 4, 2, n, 32)
    layout = pbs.permuted(q, k, block_size=(block, block), segment_size=segment, threshold=threshold, backend="torch")
    perm, mask = _pbs_loop(q, k, block, segment, threshold)
    assert torch.equal(layout.perm, perm)
    assert torch.equal(layout.blocks.to_dense(), mask)
    assert 0 < layout.density() < 1


def test_segment_permutation():
    importance = torch.rand(2, 3, 300)
    perm = pbs.segment_permutation(importance, 128)
    assert torch.equal(perm.sort(-1).values, torch.arange(300).expand(2, 3, 300))
    assert torch.equal(perm[..., 256:], torch.arange(256, 300).expand(2, 3, -1))  # the tail stays
    for s in range(2):
        part = perm[..., s * 128 : (s + 1) * 128]
        assert torch.all((part >= s * 128) & (part < (s + 1) * 128))
        u = importance.gather(-1, part)
        assert torch.all(u[..., :-1] >= u[..., 1:])
    assert torch.equal(inverse_perm(perm).gather(-1, perm), torch.arange(300).expand(2, 3, 300))


def test_permuted_block_means_match_gather():
    k = torch.randn(2, 2, 150, 16)
    perm = pbs.segment_permutation(torch.rand(2, 4, 150), 64)  # per query head, group of 2
    means = pbs.permuted_block_means(k, perm, 32)
    k_perm = k.repeat_interleave(2, dim=1).gather(2, perm.unsqueeze(-1).expand(-1, -1, -1, 16))
    torch.testing.assert_close(means[:, :, 4], k_perm[:, :, 128:].mean(2))
    torch.testing.assert_close(means[:, :, 1], k_perm[:, :, 32:64].mean(2))


@pytest.mark.interpret
@pytest.mark.parametrize(
    "shape, dtype, options",
    [
        ((1, 4, 2, 333), torch.float16, dict(threshold=0.9)),
        ((2, 4, 1, 300), torch.bfloat16, dict(threshold=0.7, heads="kv", segment_size=128)),
        ((1, 4, 2, 352), torch.float32, dict(threshold=0.5, permute_heads="kv", force_sink=False)),
    ],
    ids=["gqa-ragged", "kv-layout-batch", "kv-perm-aligned-no-sink"],
)
def test_triton_path_gives_the_torch_layout(gen, shape, dtype, options):
    """The Triton path (importance kernels, gathered K' means, the step-3 layout kernel) against the PyTorch path
    (scatter_add means, the sort path, from_dense: the behaviour before the kernels): the same layout and perm."""
    batch, hq, hkv, n = shape
    q, k, _ = _qkv(gen, batch, hq, hkv, n, 32, dtype=dtype)
    opts = {"block_size": (32, 32), "segment_size": 64, **options}
    fast = registry.select("permuted", q, k, backend="triton", **opts)
    slow = registry.select("permuted", q, k, backend="torch", **opts)
    assert torch.equal(fast.perm, slow.perm)
    assert torch.equal(fast.blocks.kv_num_blocks, slow.blocks.kv_num_blocks)
    assert torch.equal(fast.blocks.kv_indices, slow.blocks.kv_indices)
    assert 0 < fast.density() < 1


@pytest.mark.parametrize("heads, permute_heads", [("q", None), ("q", "kv"), ("kv", None)])
def test_properties(gen, heads, permute_heads):
    q, k, _ = _qkv(gen, 2, 4, 2, 333, 32)
    bs, segment = (32, 32), 64
    layouts = [
        registry.select(
            "permuted",
            q,
            k,
            block_size=bs,
            segment_size=segment,
            threshold=t,
            heads=heads,
            permute_heads=permute_heads,
            backend="torch",
        )
        for t in (0.3, 0.6, 0.9, 1.0)
    ]
    allowed = causal_block_mask(333, 333, bs)
    diag = diagonal_mask(333, 333, bs)
    seg = torch.arange(allowed.shape[0]) // (segment // bs[0])
    own = (seg[:, None] == seg[None, :]) & allowed
    for layout in layouts:
        dense = layout.blocks.to_dense()
        assert isinstance(layout, PermutedLayout) and not isinstance(layout, BlockLayout)
        assert layout.num_heads == (4 if heads == "q" else 2)
        assert layout.perm.shape == (2, 4 if (permute_heads or heads) == "q" else 2, 333)
        assert not (dense & ~allowed).any(), "a block above the causal diagonal"
        assert (dense | ~diag).all() and (dense | ~own).all(), "the diagonal segment is missing"
        # the block of K' holding token 0 is kept in every row of a later segment
        sink = inverse_perm(layout.perm)[..., 0] // bs[1]  # (B, perm heads)
        rep = layout.num_heads // sink.shape[1] if layout.num_heads >= sink.shape[1] else 1
        sink = sink.repeat_interleave(rep, dim=1)
        rows = dense[..., seg > 0, :].gather(-1, sink[:, :, None, None].expand(-1, -1, int((seg > 0).sum()), 1))
        assert rows.all(), "the sink block is missing"
    for low, high in zip(layouts, layouts[1:], strict=False):
        assert not (low.blocks.to_dense() & ~high.blocks.to_dense()).any()
    assert layouts[0].density() < layouts[2].density() <= layouts[3].density() == 1.0
    same = registry.select(
        "permuted",
        q,
        k,
        block_size=bs,
        segment_size=segment,
        target_recall=0.6,
        heads=heads,
        permute_heads=permute_heads,
        backend="torch",
    )
    assert torch.equal(same.blocks.to_dense(), layouts[1].blocks.to_dense())
    assert torch.equal(same.perm, layouts[1].perm)


def _permuted_space_reference(q, k, v, layout):
    """Attention over K' = K[perm] with the PBS kernel's rule: earlier segments by kept block, the own segment
    by original position (``perm[p] <= i``); float64. Independent of ``token_mask``."""
    batch, heads, n, d = q.shape
    kp, vp = layout.permute(k.double()), layout.permute(v.double())
    perm = layout.perm
    if perm.shape[1] != heads:
        perm = perm.repeat_interleave(heads // perm.shape[1], dim=1)
        kp, vp = kp.repeat_interleave(heads // kp.shape[1], 1), vp.repeat_interleave(heads // vp.shape[1], 1)
    block, segment = layout.block_size[0], layout.segment_size
    i = torch.arange(n)[:, None]
    slot = torch.arange(n)[None, :]
    dense = layout.blocks.to_dense().repeat_interleave(heads // layout.num_heads, 1)
    kept = dense[:, :, i[:, 0] // block, :][..., slot[0] // block]  # (B, H, n, n) block kept for (i, slot)
    earlier = (slot // segment) < (i // segment)
    own = ((slot // segment) == (i // segment)) & (perm[:, :, None, :] <= i)
    mask = (earlier & kept) | own
    return masked_attention(q.double(), kp, vp, mask, d**-0.5)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.interpret), "torch"])
@pytest.mark.parametrize(
    "shape, block, segment, heads, permute_heads, dtype",
    [
        ((1, 4, 2, 333, 32), 64, 128, "q", None, torch.float16),
        ((2, 2, 2, 256, 64), 64, 64, "q", None, torch.bfloat16),
        ((1, 4, 1, 300, 32), 64, 128, "q", "kv", torch.float16),
        ((1, 4, 2, 280, 32), 64, 128, "kv", None, torch.float16),
    ],
    ids=["gqa-ragged", "mha-aligned", "mqa-kv-perm", "kv-layout"],
)
def test_permuted_attention_matches_token_mask(gen, shape, block, segment, heads, permute_heads, dtype, backend):
    batch, hq, hkv, n, d = shape
    q, k, v = _qkv(gen, batch, hq, hkv, n, d, dtype=dtype)
    layout = registry.select(
        "permuted",
        q,
        k,
        block_size=(block, block),
        segment_size=segment,
        threshold=0.6,
        heads=heads,
        permute_heads=permute_heads,
        backend="torch",
    )
    assert layout.density() < 1
    out, lse = sf.permuted_block_sparse_attention(q, k, v, layout, return_lse=True, backend=backend)
    mask = layout.token_mask()
    assert mask.shape == (batch, layout.num_heads, n, n)
    mask = mask.repeat_interleave(hq // layout.num_heads, dim=1)
    assert not (mask & ~torch.ones(n, n, dtype=torch.bool).tril()).any(), "token mask is not causal"
    ref_out, ref_lse = masked_attention(q.double(), k.double(), v.double(), mask, d**-0.5)
    assert out.shape == q.shape and out.dtype == dtype and lse.dtype == torch.float32
    assert_attention_close(out, lse, ref_out, ref_lse, dtype)
    # the same numbers from the permuted-key definition (PBS-Attn's kernel rule)
    alt_out, alt_lse = _permuted_space_reference(q, k, v, layout)
    torch.testing.assert_close(alt_out, ref_out, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(alt_lse, ref_lse, atol=1e-10, rtol=1e-10)
    # row chunks of the token mask agree with the whole
    assert torch.equal(layout.token_mask(range(100, 140)), layout.token_mask()[:, :, 100:140])


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.interpret), "torch"])
@pytest.mark.parametrize("n, segment", [(300, 128), (100, 128)], ids=["all-blocks", "one-segment"])
def test_all_blocks_is_dense(gen, n, segment, backend):
    q, k, v = _qkv(gen, 1, 4, 2, n, 32, dtype=torch.float16)
    layout = registry.select(
        "permuted", q, k, block_size=(64, 64), segment_size=segment, threshold=1.0, backend="torch"
    )
    assert layout.density() == 1.0
    out, lse = sf.permuted_block_sparse_attention(q, k, v, layout, return_lse=True, backend=backend)
    ref_out, ref_lse = sf.attention_reference(q, k, v, causal=True)
    assert_attention_close(out, lse, ref_out, ref_lse, torch.float16)


def test_merge_matches_union(gen):
    q, k, v = (randn(gen, 2, 3, 40, 16, dtype=torch.float64) for _ in range(3))
    causal = torch.ones(40, 40, dtype=torch.bool).tril()
    split = torch.rand(2, 3, 40, 40, generator=gen) < 0.5
    mask_a, mask_b = causal & split, causal & ~split
    mask_a[:, :, :5] = False  # rows empty in a
    mask_b[:, :, 5:10] = False  # rows empty in b
    mask_a[:, :, 10:12] = mask_b[:, :, 10:12] = False  # rows empty in both
    out_a, lse_a = masked_attention(q, k, v, mask_a, 0.25)
    out_b, lse_b = masked_attention(q, k, v, mask_b, 0.25)
    out, lse = merge_attention_states(out_a, lse_a, out_b, lse_b)
    ref_out, ref_lse = masked_attention(q, k, v, mask_a | mask_b, 0.25)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, ref_lse.float(), atol=1e-6, rtol=0)
    assert torch.all(out[:, :, 10:12] == 0) and torch.all(lse[:, :, 10:12] == float("-inf"))
    with pytest.raises(ValueError, match=r"out_b: expected shape \(2, 3, 40, 16\)"):
        merge_attention_states(out_a, lse_a, out_b[:, :, :5], lse_b)
    with pytest.raises(TypeError, match="out_b: expected dtype torch.float64"):
        merge_attention_states(out_a, lse_a, out_b.float(), lse_b)
    with pytest.raises(ValueError, match=r"lse_b: expected shape \(2, 3, 40\)"):
        merge_attention_states(out_a, lse_a, out_b, lse_b[..., :3])


@pytest.mark.parametrize(
    "options, error, match",
    [
        (dict(segment_size=100), ValueError, "segment_size: expected a positive multiple of the block size 128"),
        (dict(segment_size=64), ValueError, "segment_size: expected a positive multiple"),
        (dict(threshold=0.9, target_recall=0.8), ValueError, "expected threshold or target_recall, not both"),
        (dict(threshold=0), ValueError, r"permuted: threshold: expected a float in \(0, 1\], got 0"),
        (dict(force_sink="yes"), ValueError, "force_sink: expected one of"),
        (dict(heads="kv", permute_heads="q"), ValueError, "permute_heads: expected 'kv' with heads='kv'"),
        (dict(permute_heads="all"), ValueError, "permute_heads: expected one of"),
        (dict(block_size=(64, 128)), ValueError, "block_size: expected block_q == block_k"),
        (dict(causal=False), NotImplementedError, "only causal prefill"),
        (dict(gamma=0.9), ValueError, r"unknown option\(s\) \['gamma'\]"),
    ],
)
def test_options_rejected(options, error, match):
    q, k = torch.randn(1, 2, 300, 16), torch.randn(1, 1, 300, 16)
    with pytest.raises(error, match=match):
        registry.select("permuted", q, k, **options)


def test_bad_inputs_rejected(gen):
    q, k, v = _qkv(gen, 1, 2, 1, 200, 16)
    with pytest.raises(NotImplementedError, match="seq_len_q == seq_len_k"):
        registry.select("permuted", q[:, :, :100], k)
    layout = registry.select("permuted", q, k, block_size=(32, 32), segment_size=64, backend="torch")
    plain = layout.blocks
    with pytest.raises(TypeError, match="layout: expected a PermutedLayout"):
        sf.permuted_block_sparse_attention(q, k, v, plain)
    with pytest.raises(TypeError, match="perm: expected dtype torch.int64"):
        PermutedLayout(plain, layout.perm.int())
    with pytest.raises(ValueError, match=r"perm: expected shape \(1, perm_heads, 200\)"):
        PermutedLayout(plain, layout.perm[..., :9])
    with pytest.raises(ValueError, match="segment_size: expected a positive multiple of block size 32"):
        PermutedLayout(plain, layout.perm, segment_size=48)
    with pytest.raises(TypeError, match="blocks: expected a BlockLayout"):
        PermutedLayout(layout.blocks.to_dense(), layout.perm)
    four = torch.randn(1, 4, 200, 16)
    with pytest.raises(ValueError, match="layout: expected heads 1, 4"):
        sf.permuted_block_sparse_attention(four, four, four, layout)
    moved = layout.to("cpu")
    assert isinstance(moved, PermutedLayout) and torch.equal(moved.perm, layout.perm)
    assert repr(layout).startswith("PermutedLayout(BlockLayout(") and "segment_size=64" in repr(layout)
