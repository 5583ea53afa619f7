"""Passkey retrieval (Landmark Attention), depth-controlled: a 5-digit key hidden at the asked depth.

Prompt (plain completion, the form ``shared/reference/models.md`` checked on the embedded models): the task line,
the haystack with ``The pass key is NNNNN. Remember it. NNNNN is the pass key.`` inserted between sentences at
the asked depth, then ``What is the pass key? The pass key is``. Score: the first integer in the answer equals the
key. Haystack: the repeated grass/sky/sun filler (``noise``, Landmark's) or real prose (``essay``).
"""

from __future__ import annotations

from typing import Any

from sparseflash.eval.tasks.base import (
    PromptFormat,
    Sample,
    Task,
    Tokenizer,
    check_length_depth,
    depth_fraction,
    fit_to_budget,
    insert_at_depths,
    plain_format,
    register_task,
    rng_for,
)
from sparseflash.eval.text import load_corpus, noise_corpus

PREFIX = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n"
)
QUESTION = "\nWhat is the pass key?"
ANSWER_PREFIX = " The pass key is"


@register_task
class Passkey(Task):
    name = "passkey"
    description = "a 5-digit pass key in filler text at the asked depth (Landmark Attention)"
    options = {"haystack": "noise", "text_source": "auto"}

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
        check_length_depth(length, depth, True)
        if opts["haystack"] not in ("essay", "noise"):
            raise ValueError(f"haystack: expected 'essay' or 'noise', got {opts['haystack']!r}")
        rng = rng_for(seed)
        corpus = load_corpus(opts["text_source"]) if opts["haystack"] == "essay" else noise_corpus()
        start = rng.randrange(len(corpus.sentences))
        key = str(rng.randint(10000, 99999))
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."
        max_new = 10

        def haystack(n: int) -> str:
            return " ".join(insert_at_depths(corpus.take(start, n), [(depth, needle)]))

        def render(n: int) -> str:
            return fmt(PREFIX + haystack(n) + QUESTION, ANSWER_PREFIX)

        avg = corpus.num_chars / len(corpus.sentences)
        n, prompt, num_tokens = fit_to_budget(render, tokenizer, length - max_new - 1, avg)
        hay = haystack(n)
        return Sample(
            task=self.name,
            length=length,
            depth=depth,
            seed=seed,
            prompt=prompt,
            references=[key],
            metric="passkey",
            max_new_tokens=max_new,
            num_tokens=num_tokens,
            meta={
                "needles": [{"needle": needle, "depth": depth, "actual_depth": 100 * depth_fraction(hay, needle)}],
                "haystack": corpus.name,
                "haystack_sentences": n,
                "options": opts,
            },
        )
