"""Perplexity over a long window of real prose, full-context mode (MInference ``run_ppl.py``).

One forward pass over exactly ``length`` tokens of the haystack corpus; the runner reports the perplexity over all
predicted tokens and over the last ``last_tokens`` of the window (those that have the longest context, where a
sparse prefill can differ from dense). Each seed starts the window at a different sentence of the corpus.
"""

from __future__ import annotations

from typing import Any

from sparseflash.eval.tasks.base import (
    PromptFormat,
    Sample,
    Task,
    Tokenizer,
    check_length_depth,
    count_tokens,
    plain_format,
    register_task,
    rng_for,
)
from sparseflash.eval.text import load_corpus


def corpus_window(
    tokenizer: Tokenizer, length: int, seed: int, text_source: str = "auto", last_tokens: int = 0
) -> tuple[str, dict[str, Any]]:
    """A seeded window of the corpus with at least ``length`` tokens (the runner cuts it to exactly ``length``).

    Returns:
        (text, meta) with meta ``haystack`` (the corpus name), ``start_sentence`` and ``last_tokens`` (the given
        value, or ``min(1024, length // 4)`` when it is 0).

    Raises:
        ValueError: ``length`` < 64, ``last_tokens`` < 0, an unknown ``text_source``.
    """
    check_length_depth(length, None, False)
    if last_tokens < 0:
        raise ValueError(f"last_tokens: expected >= 0 (0 = min(1024, length // 4)), got {last_tokens}")
    rng = rng_for(seed)
    corpus = load_corpus(text_source)
    start = rng.randrange(len(corpus.sentences))
    chars = length * 6
    text = corpus.text(start, chars)
    while count_tokens(tokenizer, text) < length:
        chars *= 2
        text = corpus.text(start, chars)
    last = last_tokens or min(1024, length // 4)
    return text, {"haystack": corpus.name, "start_sentence": start, "last_tokens": last}


@register_task
class Perplexity(Task):
    name = "perplexity"
    kind = "perplexity"
    uses_depth = False
    description = "perplexity of a long window of real prose, all tokens and the last quarter (max 1024)"
    options = {"text_source": "auto", "last_tokens": 0}
    metric = "ppl"

    def build(
        self,
        tokenizer: Tokenizer,
        length: int,
        depth: float | None,
        seed: int,
        fmt: PromptFormat = plain_format,
        **options: Any,
    ) -> Sample:
        opts = self.check_options(options)
        text, meta = corpus_window(tokenizer, length, seed, opts["text_source"], int(opts["last_tokens"]))
        return Sample(
            task=self.name,
            length=length,
            depth=None,
            seed=seed,
            prompt=text,
            references=[],
            metric=self.metric,
            max_new_tokens=0,
            num_tokens=length,
            meta=meta,
        )
