"""A tiny random-weight causal LM with a byte-level tokenizer, built in memory (no download).

For plumbing checks only (tests, ``sparseflash eval --model tiny-random``): its answers are noise. The model is a
2-layer Llama (GQA 4:2, head_dim 16) whose weights come from a fixed seed; the tokenizer maps each UTF-8 byte to
one token (256 tokens + ``<eos>``), so token counts are byte counts.
"""

from __future__ import annotations

from typing import Any

import torch


def byte_tokenizer() -> Any:
    """A transformers ``PreTrainedTokenizerFast`` over bytes: ids 0-255 are bytes, 256 is ``<eos>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_map = pre_tokenizers.ByteLevel.alphabet()
    from tokenizers.pre_tokenizers import ByteLevel

    # the ByteLevel alphabet in byte order (the same table GPT-2 uses)
    table = _bytes_to_unicode()
    vocab = {table[b]: b for b in range(256)}
    assert set(vocab) == set(byte_map)
    vocab["<eos>"] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def tiny_random_model(seed: int = 0, max_positions: int = 65536) -> tuple[Any, Any]:
    """(model, tokenizer): a 2-layer random Llama in float32, eval mode, and :func:`byte_tokenizer`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=257,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=max_positions,
        eos_token_id=256,
        pad_token_id=256,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.eval()
    model.config.name_or_path = "tiny-random"
    return model, byte_tokenizer()
