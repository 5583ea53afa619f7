"""The evaluation grid: tasks x lengths x depths x samples, the case seeds, and the groups of work (batches).

Case seeds come from the base seed and the case coordinates (task, length, depth, sample index), so any case can
be regenerated alone; generation tasks go in batches of ``batch_size`` consecutive prompts of the same (task,
length), fixed by the grid alone, so every method runs the very batches the baseline ran.
:class:`~sparseflash.eval.runner.Runner` runs the grid.
"""

from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass, field
from typing import Any

from sparseflash.eval.methods import BASELINE
from sparseflash.eval.tasks import get_task


@dataclass
class EvalConfig:
    """One evaluation grid.

    Attributes:
        tasks: task names. methods: method names (the baseline ``sdpa`` is added first if missing).
        method_options: per-method options, e.g. ``{"xattention": {"threshold": 0.9}}``.
        lengths: context lengths in tokens (prompt + generation budget). depths: needle depths in percent.
        samples: prompts per (task, length, depth). seed: base seed.
        task_options: options given to every task that takes them (e.g. ``value_type``).
        chat: wrap prompts in the tokenizer's chat template (the answer prefix follows the assistant header).
        batch_size: prompts of one (task, length) run together by generation tasks (>= 1).

    Raises:
        ValueError: ``batch_size`` or ``samples`` < 1.
    """

    tasks: list[str]
    methods: list[str]
    lengths: list[int]
    depths: list[float] = field(default_factory=lambda: [50.0])
    samples: int = 1
    seed: int = 42
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    task_options: dict[str, Any] = field(default_factory=dict)
    chat: bool = False
    batch_size: int = 1

    def __post_init__(self) -> None:
        for name in ("batch_size", "samples"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")

    def all_methods(self) -> list[str]:
        """The baseline first, then the other methods in the given order."""
        return [BASELINE] + [m for m in self.methods if m != BASELINE]


def case_seed(base: int, task: str, length: int, depth: float | None, index: int) -> int:
    """A case's seed: a stable hash (CRC-32) of the base seed and the case coordinates."""
    return zlib.crc32(f"{base}|{task}|{length}|{depth}|{index}".encode()) & 0x7FFFFFFF


@dataclass(frozen=True)
class Prompt:
    """A grid point before generation: task, length, depth (None if the task has none), sample index, seed."""

    task: str
    length: int
    depth: float | None
    index: int
    seed: int


def grid(config: EvalConfig) -> list[Prompt]:
    """The grid's prompts in run order (short lengths first)."""
    out = []
    for length in sorted(config.lengths):
        for task in config.tasks:
            depths = config.depths if get_task(task).uses_depth else [None]
            for depth in depths:
                for i in range(config.samples):
                    out.append(Prompt(task, length, depth, i, case_seed(config.seed, task, length, depth, i)))
    return out


@dataclass(frozen=True)
class Unit:
    """One group of work: ``methods`` (one, or every pending one for ``recall``) over a batch of ``prompts``."""

    task: str
    length: int
    prompts: tuple[Prompt, ...]
    methods: tuple[str, ...]


def batches(config: EvalConfig) -> list[tuple[Prompt, ...]]:
    """The grid's prompts cut into batches: ``batch_size`` consecutive prompts of one (task, length) for
    generation tasks, one prompt otherwise. Fixed by the grid alone (not by what is already stored)."""
    out: list[tuple[Prompt, ...]] = []
    for (_, task), group in itertools.groupby(grid(config), key=lambda p: (p.length, p.task)):
        prompts = list(group)
        size = config.batch_size if get_task(task).kind == "generate" else 1
        out.extend(tuple(prompts[i : i + size]) for i in range(0, len(prompts), size))
    return out
