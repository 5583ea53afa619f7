"""Needle-in-a-haystack tasks after RULER (``niah_single``, ``niah_multikey``, ``niah_multivalue``,
``niah_multiquery``), with the needle depth under our control so results draw a depth x length heatmap.

Needle: ``One of the special magic {numbers|words|uuids} for {key} is: {value}.`` with an "adjective-noun" key.
The first needle of the queried key(s) sits at the asked depth; further needles of the queried key(s) are spread
evenly over the rest of the haystack after it (the multi-needle rule of LLMTest_NeedleInAHaystack); distractor
keys (``niah_multikey``) sit at random depths. Haystack: real public-domain prose (``essay``, see
:mod:`sparseflash.eval.text`) or RULER's repeated filler (``noise``). Score: RULER's ``string_match_all``.
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
from sparseflash.eval.words import random_value, random_word_key

_SINGULAR = {"numbers": "number", "words": "word", "uuids": "uuid"}


def _join_keys(keys: list[str]) -> str:
    if len(keys) == 1:
        return keys[0]
    return ", ".join(keys[:-1]) + ", and " + keys[-1]


class _Niah(Task):
    num_keys = 1  # keys inserted
    num_values = 1  # values per key
    num_queries = 1  # keys asked for
    options = {"value_type": "numbers", "haystack": "essay", "text_source": "auto"}

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
        value_type = opts["value_type"]
        rng = rng_for(seed)
        corpus = load_corpus(opts["text_source"]) if opts["haystack"] == "essay" else noise_corpus()
        start = rng.randrange(len(corpus.sentences))

        keys: list[str] = []
        while len(keys) < self.num_keys:
            key = random_word_key(rng)
            if key not in keys:
                keys.append(key)
        values: dict[str, list[str]] = {}
        seen: set[str] = set()
        for key in keys:
            vals: list[str] = []
            while len(vals) < self.num_values:
                val = random_value(rng, value_type)
                if val not in seen:
                    seen.add(val)
                    vals.append(val)
            values[key] = vals
        queried = keys[: self.num_queries]
        distractors = keys[self.num_queries :]

        plural = len(queried) * self.num_values > 1
        type_v = value_type if plural else _SINGULAR[value_type]
        needle_of = {
            (key, val): f"One of the special magic {value_type} for {key} is: {val}."
            for key in keys
            for val in values[key]
        }
        real = [needle_of[(key, val)] for key in queried for val in values[key]]
        step = (100.0 - depth) / len(real)
        needles = [(depth + i * step, s) for i, s in enumerate(real)]
        needles += [(rng.uniform(0, 100), needle_of[(key, val)]) for key in distractors for val in values[key]]

        query = _join_keys(queried)
        prefix = (
            f"Some special magic {value_type} are hidden within the following text. Make sure to "
            f"memorize them. I will quiz you about the {value_type} afterwards.\n"
        )
        if plural:
            question = f"\nWhat are all the special magic {value_type} for {query} mentioned in the provided text?"
            answer_prefix = f" The special magic {value_type} for {query} mentioned in the provided text are"
        else:
            question = f"\nWhat is the special magic {type_v} for {query} mentioned in the provided text?"
            answer_prefix = f" The special magic {type_v} for {query} mentioned in the provided text is"
        max_new = 32 if not plural else 24 * len(real)

        def haystack(n: int) -> str:
            return " ".join(insert_at_depths(corpus.take(start, n), needles))

        def render(n: int) -> str:
            return fmt(prefix + haystack(n) + question, answer_prefix)

        avg = corpus.num_chars / len(corpus.sentences)
        n, prompt, num_tokens = fit_to_budget(render, tokenizer, length - max_new - 1, avg)
        hay = haystack(n)
        placed = [{"needle": s, "depth": d, "actual_depth": 100 * depth_fraction(hay, s)} for d, s in needles]
        references = [val for key in queried for val in values[key]]
        return Sample(
            task=self.name,
            length=length,
            depth=depth,
            seed=seed,
            prompt=prompt,
            references=references,
            metric="all",
            max_new_tokens=max_new,
            num_tokens=num_tokens,
            meta={
                "needles": placed,
                "haystack": corpus.name,
                "haystack_sentences": n,
                "keys": keys,
                "queried": queried,
                "options": opts,
            },
        )


@register_task
class NiahSingle(_Niah):
    name = "niah_single"
    description = "one needle (key -> value) in real prose; RULER niah_single_2/3"


@register_task
class NiahMultiKey(_Niah):
    name = "niah_multikey"
    num_keys = 4
    description = "one queried needle among 3 distractor keys; RULER niah_multikey_1"


@register_task
class NiahMultiValue(_Niah):
    name = "niah_multivalue"
    num_values = 4
    description = "one key with 4 values, all asked for; RULER niah_multivalue"


@register_task
class NiahMultiQuery(_Niah):
    name = "niah_multiquery"
    num_keys = 4
    num_queries = 4
    description = "4 keys, all 4 asked for at once; RULER niah_multiquery"
