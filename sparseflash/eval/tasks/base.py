"""What every task shares: the sample record, the task registry and the token-budget fitting.

A task turns ``(tokenizer, length, depth, seed, options)`` into a :class:`Sample` deterministically: the same
arguments give the same prompt, byte for byte. ``length`` counts prompt tokens plus the generation budget, as in
RULER (``max_seq_length``); ``depth`` is a percentage in [0, 100] (``None`` for tasks without one).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol


class Tokenizer(Protocol):
    """The one tokenizer call the generators need (a transformers tokenizer has it)."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


PromptFormat = Callable[[str, str], str]


def plain_format(user_text: str, answer_prefix: str) -> str:
    """No chat template (RULER's ``base``): the task text followed by the answer prefix."""
    return user_text + answer_prefix


@dataclass
class Sample:
    """One generated case.

    Attributes:
        task: task name. length: the asked context length in tokens (prompt + generation budget).
        depth: the asked needle depth in percent, or None. seed: the seed it was generated from.
        prompt: the full text given to the model, answer prefix included.
        references: the strings scoring looks for (empty for perplexity, agreement and recall).
        metric: ``all``, ``part``, ``passkey`` (see :mod:`sparseflash.eval.scoring`), ``ppl``, ``agreement``
            or ``recall``.
        max_new_tokens: generation budget. num_tokens: prompt tokens (no special tokens).
        meta: task details (needles, their asked and actual depths, haystack source, options).
    """

    task: str
    length: int
    depth: float | None
    seed: int
    prompt: str
    references: list[str]
    metric: str
    max_new_tokens: int
    num_tokens: int
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Task:
    """Base class of a task: subclasses set the class attributes and implement :meth:`build`.

    Attributes:
        name: registry name. kind: ``generate`` (greedy answer, string-match score; batched), ``perplexity``,
            ``agreement`` (next-token distributions against the baseline's) or ``recall``.
        uses_depth: whether the depth axis applies. options: option names and defaults.
    """

    name: str = ""
    kind: str = "generate"
    uses_depth: bool = True
    description: str = ""
    options: dict[str, Any] = {}

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """``options`` merged over the defaults; ``ValueError`` naming unknown ones."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise ValueError(f"task {self.name}: unknown option(s) {unknown}; expected some of {sorted(self.options)}")
        return {**self.options, **options}

    def build(
        self,
        tokenizer: Tokenizer,
        length: int,
        depth: float | None,
        seed: int,
        fmt: PromptFormat = plain_format,
        **options: Any,
    ) -> Sample:
        raise NotImplementedError

    def score(self, prediction: str, sample: Sample) -> float:
        from sparseflash.eval.scoring import score

        return score(sample.metric, prediction, sample.references)


_TASKS: dict[str, Task] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator adding one instance of ``cls`` to the registry under ``cls.name``."""
    if not cls.name or cls.name in _TASKS:
        raise ValueError(f"task name {cls.name!r} is empty or registered twice")
    _TASKS[cls.name] = cls()
    return cls


def available_tasks() -> list[str]:
    """Registered task names, sorted."""
    return sorted(_TASKS)


def get_task(name: str) -> Task:
    """The task registered as ``name``; ``ValueError`` listing the known names otherwise."""
    if name not in _TASKS:
        raise ValueError(f"task: expected one of {available_tasks()}, got {name!r}")
    return _TASKS[name]


def count_tokens(tokenizer: Tokenizer, text: str) -> int:
    """Number of tokens of ``text`` without special tokens."""
    return len(tokenizer.encode(text, add_special_tokens=False))


def check_length_depth(length: int, depth: float | None, uses_depth: bool) -> None:
    if not isinstance(length, int) or isinstance(length, bool) or length < 64:
        raise ValueError(f"length: expected an int >= 64 tokens, got {length!r}")
    if uses_depth and (depth is None or not 0 <= depth <= 100):
        raise ValueError(f"depth: expected a percentage in [0, 100], got {depth!r}")


def insert_at_depths(sentences: Sequence[str], needles: Sequence[tuple[float, str]]) -> list[str]:
    """Insert needle sentences between haystack sentences at their depths.

    Args:
        sentences: the haystack, n sentences.
        needles: (depth percent, sentence) pairs; a needle at depth d goes before sentence
            ``floor(n * d / 100)`` (depth 100 appends it at the end), so it always starts a sentence.

    Returns:
        the n + len(needles) sentences in order; needles at the same index keep their given order.
    """
    n = len(sentences)
    at: dict[int, list[str]] = {}
    for depth, needle in needles:
        at.setdefault(min(n, int(n * depth / 100)), []).append(needle)
    out: list[str] = []
    for i in range(n + 1):
        out.extend(at.get(i, []))
        if i < n:
            out.append(sentences[i])
    return out


def fit_to_budget(
    render: Callable[[int], str], tokenizer: Tokenizer, budget: int, unit_chars: float
) -> tuple[int, str, int]:
    """The largest haystack size whose rendered prompt fits ``budget`` tokens (binary search, as RULER does).

    Args:
        render: builds the whole prompt from a haystack of n units (sentences or lines).
        budget: the most prompt tokens allowed.
        unit_chars: average characters per unit, used for the first upper bound.

    Returns:
        (n, prompt, num_tokens) for the largest n that fits.

    Raises:
        ValueError: even an empty haystack does not fit ``budget``.
    """
    base = count_tokens(tokenizer, render(0))
    if base > budget:
        raise ValueError(
            f"length: expected room for the task's own text ({base} tokens), got a budget of "
            f"{budget} tokens; ask for a longer length"
        )
    hi = max(8, int(budget * 6 / max(unit_chars, 1.0)))  # ~6 characters per token or more on prose
    while count_tokens(tokenizer, render(hi)) <= budget:
        hi *= 2
        if hi > 50_000_000:
            break
    lo = 0  # render(lo) fits, render(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count_tokens(tokenizer, render(mid)) <= budget:
            lo = mid
        else:
            hi = mid
    prompt = render(lo)
    return lo, prompt, count_tokens(tokenizer, prompt)


def depth_fraction(haystack: str, needle: str) -> float:
    """Where ``needle`` starts in ``haystack``, as a fraction of the haystack's characters without it."""
    pos = haystack.find(needle)
    if pos < 0:
        raise ValueError("needle: not found in the haystack")
    return pos / max(1, len(haystack) - len(needle))


def rng_for(seed: int) -> random.Random:
    """The RNG a generator draws from: Python's Mersenne Twister, seeded, so runs replay exactly."""
    return random.Random(seed)
