"""A patched model's sparse prefill adds no host synchronisation to the forward (CUDA only; skipped on the CPU).

A sync per layer stalls the CPU until the GPU drains, so the launches of the next layer can no longer overlap the
current one: at batch 1 the selection's many small launches then add their CPU time to the time to first token.
PyTorch's sync debug mode warns at every synchronising call; the patched forward (with the public ``on_prefill``
hook set, as the evaluation harness does) must warn no more often than the unpatched one.
"""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparseflash.integrations.hf import patch_state, patched  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SEQ_LEN = 4096


def _model() -> torch.nn.Module:
    """A 2-layer random Qwen2 (GQA 4:2, head_dim 64) in bf16 on the GPU."""
    config = transformers.Qwen2Config(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2 * SEQ_LEN,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(config).to("cuda", torch.bfloat16).eval()


def _syncs(forward) -> int:
    """Warnings of torch.cuda's sync debug mode during one ``forward()`` (after a warm-up one)."""
    forward()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            forward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.parametrize(
    "options",
    [{}, {"approximate_dropped": True}, {"threshold": 0.9, "extra_blocks": 1}],
    ids=["safe", "approximate_dropped", "extra_blocks"],
)
def test_sparse_prefill_adds_no_host_sync(options):
    model = _model()
    ids = torch.randint(0, 512, (1, SEQ_LEN), device="cuda", generator=torch.Generator("cuda").manual_seed(1))

    def forward() -> None:
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)

    baseline = _syncs(forward)
    seen = []
    with patched(model, "xattention", min_sparse_len=0, **options):
        patch_state(model).on_prefill = lambda layer, density: seen.append(density)
        patched_syncs = _syncs(forward)
        assert patch_state(model).calls["sparse"] == 4  # 2 layers x (warm-up + checked forward)
    assert patched_syncs <= baseline, f"patched forward synced {patched_syncs} times, unpatched {baseline}"
    assert all(0.0 < float(d) <= 1.0 for d in seen)


def test_short_prompts_of_a_sparse_patch_run_sdpa_exactly():
    """Below min_sparse_len a pattern patch's prefill is transformers' SDPA: the same logits as unpatched."""
    model = _model()
    ids = torch.randint(0, 512, (1, 1024), device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    with torch.inference_mode():
        plain = model(input_ids=ids, use_cache=False).logits
        with patched(model, "xattention", min_sparse_len=2048):
            out = model(input_ids=ids, use_cache=False).logits
            assert patch_state(model).calls == {"dense_sdpa": 2}
    assert torch.equal(out, plain)
