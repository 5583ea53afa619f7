"""Hypothesis fuzz of flash_attention, block_sparse_attention and decode_attention against the float64 references.

Random small shapes (S up to 96, head dims 16/32/64), GQA groups, Sq != Sk, ragged ``seq_lens`` padded left or
right, random layouts (16/32 blocks), paged and sparse decode. Keys and values that rows do not attend are
poisoned with NaN/inf (padding, keys past the causal horizon of most rows, blocks nobody keeps, cache slots past
each length): every row that attends none of them must match the reference computed on clean inputs, finite,
with 0 and lse -inf where there is nothing to attend; a row attending a poisoned key must not come out finite.

The torch backend runs every example; the Triton kernels (interpreter on a CPU) a few, to stay inside CI time.
``derandomize=True``: the examples are the same on every run.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_attention_close
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparseflash as sf
from sparseflash.layouts import causal_block_mask
from sparseflash.ops.decode.reference import decode_key_mask, decode_reference
from sparseflash.ops.prefill.reference import token_mask

FUZZ = dict(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
TORCH_EXAMPLES = 150
TRITON_EXAMPLES = 25
BACKENDS = [pytest.param("torch", id="torch"), pytest.param("triton", id="triton", marks=pytest.mark.interpret)]
# the interpreter's NumPy matmul warns on the NaN keys the fuzz plants on purpose
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def _examples(backend: str) -> int:
    return TORCH_EXAMPLES if backend == "torch" else TRITON_EXAMPLES


def _dtype(draw, backend: str) -> torch.dtype:
    choices = [torch.float16, torch.bfloat16] if backend == "triton" else [torch.float32, torch.bfloat16]
    return draw(st.sampled_from(choices))


def _poisoned(t: torch.Tensor, where: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A copy of ``t`` (B, H, S, D) holding NaN, inf or -inf in the key rows ``where`` (B, H, S) marks."""
    t = t.clone()
    junk = torch.tensor([float("nan"), float("inf"), float("-inf")], dtype=t.dtype)
    pick = torch.randint(0, 3, where.shape, generator=gen)
    t[where] = junk[pick[where]][:, None].expand(-1, t.shape[-1])
    return t


def _check_rows(out, lse, ref_out, ref_lse, attends_poison, dtype) -> None:
    """Rows away from the poison: finite and close to the reference. Rows reading it: not finite."""
    clean = ~attends_poison
    assert torch.isfinite(out[clean]).all(), "a non-finite value reached a row that does not attend it"
    assert_attention_close(out[clean], None if lse is None else lse[clean], ref_out[clean], ref_lse[clean], dtype)
    assert not torch.isfinite(out[attends_poison]).all(-1).any(), "a row attending a NaN/inf came out finite"


def _prefill_case(draw, backend: str, *, sparse: bool) -> dict:
    batch = draw(st.integers(1, 2))
    kv_heads = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 2, 3, 4]))
    head_dim = draw(st.sampled_from([16, 32, 64]))
    seq_q = draw(st.integers(1, 96))
    seq_k = seq_q if draw(st.booleans()) else draw(st.integers(1, 96))
    case = dict(
        batch=batch,
        kv_heads=kv_heads,
        heads=kv_heads * group,
        head_dim=head_dim,
        seq_q=seq_q,
        seq_k=seq_k,
        causal=draw(st.booleans()),
        dtype=_dtype(draw, backend),
        seed=draw(st.integers(0, 2**31)),
        seq_lens=None,
        padding_side=draw(st.sampled_from(["right", "left"])),
        return_lse=draw(st.booleans()),
        tail=draw(st.integers(0, 8)),
    )
    if seq_q == seq_k and draw(st.booleans()):
        case["seq_lens"] = [draw(st.integers(0, seq_q)) for _ in range(batch)]
    if sparse:
        case["block"] = draw(st.sampled_from([16, 32]))
        case["layout_batch"] = draw(st.sampled_from([1, batch]))
        case["layout_heads"] = draw(st.sampled_from(sorted({1, kv_heads, kv_heads * group})))
        case["density"] = draw(st.sampled_from([0.3, 0.6, 1.0]))
        case["pack_gqa"] = draw(st.sampled_from([None, False]))
    return case


def _inputs(case: dict) -> tuple[torch.Generator, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(case["seed"])
    shape_q = (case["batch"], case["heads"], case["seq_q"], case["head_dim"])
    shape_k = (case["batch"], case["kv_heads"], case["seq_k"], case["head_dim"])
    q, k, v = (torch.randn(*s, generator=gen).to(case["dtype"]) for s in (shape_q, shape_k, shape_k))
    return gen, q, k, v


def _random_layout(case: dict, gen: torch.Generator) -> tuple[sf.BlockLayout, torch.Tensor]:
    """A random layout plus, per layout head, the key blocks no query block keeps (poisoned in the test)."""
    block, seq_q, seq_k = case["block"], case["seq_q"], case["seq_k"]
    qb, kb = -(-seq_q // block), -(-seq_k // block)
    shape = (case["layout_batch"], case["layout_heads"], qb, kb)
    keep = torch.rand(*shape, generator=gen) < case["density"]
    nobody = torch.rand(case["layout_batch"], case["layout_heads"], 1, kb, generator=gen) < 0.3
    keep &= ~nobody
    if case["causal"]:
        keep &= causal_block_mask(seq_q, seq_k, (block, block))
    capacity = max(1, int(keep.sum(-1).max()))
    layout = sf.BlockLayout.from_dense(keep, seq_len_q=seq_q, seq_len_k=seq_k, block_size=block, capacity=capacity)
    return layout, ~keep.any(2)  # (Bl, Hl, Kb)


def _prefill_poison(case, mask_blocks=None, block=None) -> torch.Tensor:
    """Key rows to poison, bool (B, Hkv, Sk): padding, the last ``tail`` keys (causal), blocks nobody keeps."""
    batch, kv_heads, seq_k = case["batch"], case["kv_heads"], case["seq_k"]
    pos = torch.arange(seq_k)
    poison = torch.zeros(batch, kv_heads, seq_k, dtype=torch.bool)
    if case["seq_lens"] is not None:
        lens = torch.tensor(case["seq_lens"])[:, None]
        pad = pos >= lens if case["padding_side"] == "right" else pos < seq_k - lens
        poison |= pad[:, None, :]
    if case["causal"] and case["tail"]:
        poison |= pos >= seq_k - case["tail"]
    if mask_blocks is not None:  # (Bl, Hl, Kb): dropped by every query block of that layout head
        heads = mask_blocks.shape[1]
        if heads not in (1, kv_heads):  # per query head: a KV head's key is unread if its whole group drops it
            mask_blocks = mask_blocks.unflatten(1, (kv_heads, heads // kv_heads)).all(2)
        poison |= mask_blocks.repeat_interleave(block, -1)[..., :seq_k]
    return poison


def _attends(case, poison, layout=None) -> torch.Tensor:
    """Bool (B, Hq, Sq): rows whose mask reaches a poisoned key."""
    lens = None if case["seq_lens"] is None else torch.tensor(case["seq_lens"], dtype=torch.int32)
    block_args = {} if layout is None else {"blocks": layout.to_dense(), "block_size": layout.block_size}
    mask = token_mask(
        range(case["seq_q"]),
        case["seq_q"],
        case["seq_k"],
        num_heads=case["heads"],
        causal=case["causal"],
        seq_lens=lens,
        padding_side=case["padding_side"],
        **block_args,
    )
    group = case["heads"] // case["kv_heads"]
    return (mask & poison.repeat_interleave(group, 1)[:, :, None, :]).any(-1)


def _run_prefill(case, backend, *, sparse):
    gen, q, k, v = _inputs(case)
    layout = dropped = None
    if sparse:
        layout, dropped = _random_layout(case, gen)
    poison = _prefill_poison(case, dropped, case.get("block"))
    lens = None if case["seq_lens"] is None else torch.tensor(case["seq_lens"], dtype=torch.int32)
    kwargs = dict(
        causal=case["causal"],
        seq_lens=lens,
        padding_side=case["padding_side"],
        return_lse=case["return_lse"],
        backend=backend,
    )
    ref_out, ref_lse = sf.attention_reference(
        q, k, v, causal=case["causal"], layout=layout, seq_lens=lens, padding_side=case["padding_side"]
    )
    kp, vp = _poisoned(k, poison, gen), _poisoned(v, poison, gen)
    if lens is not None:  # padded query rows too
        pos = torch.arange(case["seq_q"])
        pad = pos >= lens[:, None] if case["padding_side"] == "right" else pos < case["seq_q"] - lens[:, None]
        q = _poisoned(q, pad[:, None, :].expand(q.shape[:3]), gen)
    if sparse:
        res = sf.block_sparse_attention(q, kp, vp, layout, pack_gqa=case["pack_gqa"], **kwargs)
    else:
        res = sf.flash_attention(q, kp, vp, **kwargs)
    out, lse = res if case["return_lse"] else (res, None)
    assert out.shape == q.shape and out.dtype == q.dtype
    _check_rows(out, lse, ref_out, ref_lse, _attends(case, poison, layout), case["dtype"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_flash_attention_fuzz(backend):
    @settings(max_examples=_examples(backend), **FUZZ)
    @given(st.data())
    def run(data):
        _run_prefill(_prefill_case(data.draw, backend, sparse=False), backend, sparse=False)

    run()


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_sparse_attention_fuzz(backend):
    @settings(max_examples=_examples(backend), **FUZZ)
    @given(st.data())
    def run(data):
        _run_prefill(_prefill_case(data.draw, backend, sparse=True), backend, sparse=True)

    run()


# ------------------------------------------------------------------------------------------------ decode
def _decode_case(draw, backend: str) -> dict:
    batch = draw(st.integers(1, 3))
    kv_heads = draw(st.integers(1, 2))
    s_max = draw(st.integers(1, 96))
    case = dict(
        batch=batch,
        kv_heads=kv_heads,
        heads=kv_heads * draw(st.sampled_from([1, 2, 4])),
        seq_q=draw(st.integers(1, 4)),
        head_dim=draw(st.sampled_from([16, 32, 64])),
        s_max=s_max,
        lengths=[draw(st.integers(0, s_max)) for _ in range(batch)],
        dtype=_dtype(draw, backend),
        seed=draw(st.integers(0, 2**31)),
        page_size=draw(st.sampled_from([None, 16, 32])),
        block=draw(st.sampled_from([None, 16, 32])),
        num_splits=draw(st.sampled_from([None, 1, 3])),
        as_list=draw(st.booleans()),
    )
    return case


def _run_decode(case, backend):
    gen = torch.Generator().manual_seed(case["seed"])
    batch, kv_heads, s_max, d = case["batch"], case["kv_heads"], case["s_max"], case["head_dim"]
    q = torch.randn(batch, case["heads"], case["seq_q"], d, generator=gen).to(case["dtype"])
    k, v = (torch.randn(batch, kv_heads, s_max, d, generator=gen).to(case["dtype"]) for _ in range(2))
    lengths = torch.tensor(case["lengths"], dtype=torch.int32)
    kwargs = {}
    block = case["block"]
    if block is not None:  # random distinct block lists, some unlisted blocks
        num_blocks = -(-s_max // block)
        ids = torch.stack([torch.randperm(num_blocks, generator=gen) for _ in range(batch * kv_heads)])
        ids = ids.reshape(batch, kv_heads, num_blocks).to(torch.int32)
        counts = torch.randint(0, num_blocks + 1, (batch, kv_heads), generator=gen).to(torch.int32)
        kwargs = dict(kv_block_indices=ids, kv_block_counts=counts, block_size=block)
    ref_out, ref_lse = decode_reference(q, k, v, lengths, **kwargs)
    mask = decode_key_mask(lengths, case["seq_q"], s_max, **kwargs)  # (B, Hkv or 1, Sq, S)
    # poison: past each length, keys no new token reads, and the last key (only the last new token reads it)
    poison = (~mask.any(2)).expand(batch, kv_heads, s_max).clone()
    last = (lengths.long() - 1).clamp_min(0)
    poison[torch.arange(batch), :, last] |= (lengths > 0)[:, None]
    kp, vp = _poisoned(k, poison, gen), _poisoned(v, poison, gen)
    if case["page_size"] is not None:
        kp, vp, kwargs["page_table"] = _paged(kp, vp, case["page_size"], lengths, gen)
    cache_seqlens = case["lengths"] if case["as_list"] else lengths.long()
    out, lse = sf.decode_attention(
        q, kp, vp, cache_seqlens, return_lse=True, num_splits=case["num_splits"], backend=backend, **kwargs
    )
    group = case["heads"] // kv_heads
    attends = (mask & poison[:, :, None, :]).any(-1).repeat_interleave(group, 1)  # (B, Hq, Sq)
    _check_rows(out, lse, ref_out, ref_lse, attends, case["dtype"])


def _paged(k, v, page_size, lengths, gen):
    """k and v as shuffled pages plus NaN spare pages; table slots past each length are -1."""
    batch, kv_heads, s_max, d = k.shape
    max_pages = -(-s_max // page_size)
    num_pages = batch * max_pages + 2
    perm = torch.randperm(num_pages, generator=gen)[: batch * max_pages]
    out = []
    for cache in (k, v):
        padded = torch.full((batch, kv_heads, max_pages * page_size, d), float("nan"), dtype=cache.dtype)
        padded[:, :, :s_max] = cache
        pages = torch.full((num_pages, kv_heads, page_size, d), float("nan"), dtype=cache.dtype)
        pages[perm] = padded.unflatten(2, (max_pages, page_size)).transpose(1, 2).flatten(0, 1)
        out.append(pages)
    used = torch.arange(max_pages)[None, :] < (-(-lengths.long() // page_size))[:, None]
    table = torch.where(used, perm.reshape(batch, max_pages), -1).to(torch.int32)
    return out[0], out[1], table


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_attention_fuzz(backend):
    @settings(max_examples=_examples(backend), **FUZZ)
    @given(st.data())
    def run(data):
        _run_decode(_decode_case(data.draw, backend), backend)

    run()
