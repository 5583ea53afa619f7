"""Variable tracking (RULER ``vt``): follow a chain of assignments hidden in filler lines.

One chain of 5 distinct 5-letter upper-case names: ``VAR A = 12345``, ``VAR B = VAR A``, ... (4 hops), inserted in
order at sorted random lines of the repeated filler. The question asks for every variable holding the value; the
answer is all 5 names (``string_match_all``). A short one-shot example with its answer comes first, as in RULER.
No depth axis: the positions are random, drawn from the seed.
"""

from __future__ import annotations

import random
from typing import Any

from sparseflash.eval.tasks.base import (
    PromptFormat,
    Sample,
    Task,
    Tokenizer,
    check_length_depth,
    fit_to_budget,
    plain_format,
    register_task,
    rng_for,
)
from sparseflash.eval.text import NOISE_SENTENCES
from sparseflash.eval.words import random_var_name

HOPS = 4
INSTRUCTION = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"


def _chain(rng: random.Random, name_len: int, value: int) -> tuple[list[str], list[str]]:
    names: list[str] = []
    while len(names) < HOPS + 1:
        name = random_var_name(rng, name_len)
        if name not in names:
            names.append(name)
    lines = [f"VAR {names[0]} = {value}"] + [f"VAR {names[i]} = VAR {names[i - 1]}" for i in range(1, HOPS + 1)]
    return names, lines


def _context(rng: random.Random, chain_lines: list[str], num_noise: int) -> str:
    noise = [NOISE_SENTENCES[i % len(NOISE_SENTENCES)] for i in range(num_noise)]
    positions = (
        sorted(rng.sample(range(num_noise + 1), len(chain_lines)))
        if num_noise + 1 >= len(chain_lines)
        else list(range(len(chain_lines)))
    )
    out: list[str] = []
    j = 0
    for i in range(num_noise + 1):
        while j < len(chain_lines) and positions[j] == i:
            out.append(chain_lines[j])
            j += 1
        if i < num_noise:
            out.append(noise[i])
    out.extend(chain_lines[j:])
    return "\n".join(out)


def _question(value: int) -> tuple[str, str]:
    question = f"\nQuestion: Find all variables that are assigned the value {value} in the text above."
    answer = (
        f" Answer: According to the chain(s) of variable assignment in the text above, {HOPS + 1} "
        f"variables are assigned the value {value}, they are:"
    )
    return question, answer


@register_task
class VariableTracking(Task):
    name = "variable_tracking"
    uses_depth = False
    description = "follow a 4-hop chain of variable assignments in filler (RULER vt)"
    options = {}

    def build(
        self,
        tokenizer: Tokenizer,
        length: int,
        depth: float | None,
        seed: int,
        fmt: PromptFormat = plain_format,
        **options: Any,
    ) -> Sample:
        self.check_options(options)
        check_length_depth(length, None, False)
        rng = rng_for(seed)
        # the one-shot example: a short instance with its answer
        ex_value = rng.randint(10000, 99999)
        ex_names, ex_lines = _chain(rng, 3, ex_value)
        ex_question, ex_answer = _question(ex_value)
        example = INSTRUCTION + _context(rng, ex_lines, 8) + ex_question + ex_answer + " " + " ".join(ex_names)
        value = rng.randint(10000, 99999)
        names, lines = _chain(rng, 5, value)
        question, answer_prefix = _question(value)
        layout_seed = rng.getrandbits(32)
        max_new = 30

        def render(n: int) -> str:
            context = _context(random.Random(layout_seed), lines, n)
            return fmt(example + "\n\n" + INSTRUCTION + context + question, answer_prefix)

        avg = sum(len(s) + 1 for s in NOISE_SENTENCES) / len(NOISE_SENTENCES)
        n, prompt, num_tokens = fit_to_budget(render, tokenizer, length - max_new - 1, avg)
        return Sample(
            task=self.name,
            length=length,
            depth=None,
            seed=seed,
            prompt=prompt,
            references=names,
            metric="all",
            max_new_tokens=max_new,
            num_tokens=num_tokens,
            meta={"chain": lines, "noise_lines": n, "example_answer": ex_names},
        )
