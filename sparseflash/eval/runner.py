"""The evaluation grid: tasks x lengths x depths x samples, each prompt run under dense and every method.

Every prompt is generated once from its case seed and run by ``dense`` (the model as loaded) first, then by each
method, so the comparison is paired: same prompt, same greedy decoding. Each (prompt, method) is one case,
written to the :class:`~sparseflash.eval.results.ResultsStore` as soon as it finishes; cases already stored are
skipped, so a rerun resumes. Case seeds come from the base seed and the case coordinates (task, length, depth,
sample index), so any case can be regenerated alone.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from sparseflash.eval.methods import DENSE, use_method
from sparseflash.eval.model import Engine, LoadedModel
from sparseflash.eval.results import ResultsStore
from sparseflash.eval.tasks import Sample, get_task, plain_format
from sparseflash.eval.tasks.base import PromptFormat


@dataclass
class EvalConfig:
    """One evaluation grid.

    Attributes:
        tasks: task names. methods: method names (``dense`` is added first if missing).
        method_options: per-method options, e.g. ``{"xattention": {"threshold": 0.9}}``.
        lengths: context lengths in tokens (prompt + generation budget). depths: needle depths in percent.
        samples: prompts per (task, length, depth). seed: base seed.
        task_options: options given to every task that takes them (e.g. ``value_type``).
        chat: wrap prompts in the tokenizer's chat template (the answer prefix follows the assistant header).
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

    def all_methods(self) -> list[str]:
        return [DENSE] + [m for m in self.methods if m != DENSE]


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


def _task_options(task: str, options: dict[str, Any]) -> dict[str, Any]:
    known = get_task(task).options
    return {k: v for k, v in options.items() if k in known}


def chat_format(tokenizer: Any) -> PromptFormat:
    """A prompt format that puts the task text in a user turn and the answer prefix after the assistant header."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat: the tokenizer has no chat template; run without --chat")

    def fmt(user_text: str, answer_prefix: str) -> str:
        head = tokenizer.apply_chat_template([{"role": "user", "content": user_text}], tokenize=False,
                                             add_generation_prompt=True)
        return head + answer_prefix.lstrip()

    return fmt


def _base_case(loaded: LoadedModel, p: Prompt, task_opts: dict[str, Any], method: str,
               options: dict[str, Any]) -> dict[str, Any]:
    return {"model": loaded.name, "task": p.task, "task_options": task_opts, "method": method,
            "options": options, "length": p.length, "depth": p.depth, "seed": p.seed}


class Runner:
    """Runs a grid on a loaded model into a store.

    Args:
        loaded: the model. store: where cases go. config: the grid.
        on_case: called after every (prompt, method) with the case dict (``None`` for a skipped case).
    """

    def __init__(self, loaded: LoadedModel, store: ResultsStore, config: EvalConfig,
                 on_case: Callable[[dict[str, Any] | None], None] | None = None) -> None:
        self.loaded = loaded
        self.engine = Engine(loaded)
        self.store = store
        self.config = config
        self.on_case = on_case or (lambda case: None)
        self.fmt = chat_format(loaded.tokenizer) if config.chat else plain_format
        self._warm: set[tuple[str, int]] = set()

    def pending(self) -> int:
        """Number of (prompt, method) cases of the grid not yet in the store."""
        n = 0
        for p in grid(self.config):
            opts = _task_options(p.task, self.config.task_options)
            for m in self.config.all_methods():
                n += not self.store.done(_base_case(self.loaded, p, opts, m, self.config.method_options.get(m, {})))
        return n

    def run(self) -> list[dict[str, Any]]:
        """Run every pending case; returns the cases written in this call."""
        written = []
        for p in grid(self.config):
            task_opts = _task_options(p.task, self.config.task_options)
            todo = [m for m in self.config.all_methods()
                    if not self.store.done(_base_case(self.loaded, p, task_opts, m,
                                                      self.config.method_options.get(m, {})))]
            if not todo:
                continue
            task = get_task(p.task)
            sample = task.build(self.loaded.tokenizer, p.length, p.depth, p.seed, self.fmt, **task_opts)
            if task.kind == "recall":
                cases = self._recall(p, sample, task_opts, todo)
            else:
                cases = []
                for m in todo:
                    cases.append(self._one(p, sample, task_opts, m))
            for case in cases:
                self.store.append(case)
                written.append(case)
                self.on_case(case)
        return written

    # ---------------------------------------------------------------- one (prompt, method)
    def _one(self, p: Prompt, sample: Sample, task_opts: dict[str, Any], method: str) -> dict[str, Any]:
        options = self.config.method_options.get(method, {})
        case = _base_case(self.loaded, p, task_opts, method, options)
        task = get_task(p.task)
        if task.kind == "perplexity":
            ids = self.engine.encode(sample.prompt, max_tokens=p.length)
        else:
            ids = self.engine.encode(sample.prompt)
        with use_method(self.loaded.model, method, options) as run:
            self._warmup(method, p.length, ids)
            run.reset()
            if task.kind == "perplexity":
                res = self.engine.perplexity(ids, sample.meta["last_tokens"])
                case.update(res)
                case["score"] = None
            else:
                def done(text: str) -> bool:
                    return sample.metric == "all" and task.score(text, sample) >= 1.0

                gen = self.engine.generate(ids, sample.max_new_tokens, done)
                case.update(answer=gen.text, score=task.score(gen.text, sample), prefill_ms=gen.prefill_ms,
                            decode_ms=gen.decode_ms, new_tokens=gen.new_tokens)
            density = run.density()
        case.update(density=density, references=sample.references, prompt_tokens=int(ids.shape[1]),
                    sample_index=p.index, **self._context(sample))
        return case

    def _warmup(self, method: str, length: int, ids: torch.Tensor) -> None:
        """On a GPU, one untimed prefill per (method, length) so compilation and autotuning are not timed."""
        if self.loaded.device.type != "cuda" or (method, length) in self._warm:
            return
        self.engine.prefill_ms(ids)
        self._warm.add((method, length))

    def _context(self, sample: Sample) -> dict[str, Any]:
        needles = sample.meta.get("needles")
        return {"device": str(self.loaded.device), "dtype": str(self.loaded.model.dtype).removeprefix("torch."),
                "haystack": sample.meta.get("haystack"),
                "needle_depths": [n["actual_depth"] for n in needles] if needles else None,
                "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}

    # ---------------------------------------------------------------- recall: all methods on one capture
    def _recall(self, p: Prompt, sample: Sample, task_opts: dict[str, Any], methods: list[str]
                ) -> list[dict[str, Any]]:
        from sparseflash.eval.recall import layer_recall

        ids = self.engine.encode(sample.prompt)
        per: dict[str, list[tuple[int, float, float]]] = {m: [] for m in methods}

        def on_layer(layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
            for m in methods:
                rec, dens = layer_recall(m, self.config.method_options.get(m, {}), q, k)
                per[m].append((layer, rec, dens))

        ms = self.engine.capture_qk(ids, on_layer)
        cases = []
        for m in methods:
            rows = sorted(per[m])
            case = _base_case(self.loaded, p, task_opts, m, self.config.method_options.get(m, {}))
            recalls = [r for _, r, _ in rows]
            dens = [d for _, _, d in rows]
            case.update(score=sum(recalls) / max(1, len(recalls)), recall=sum(recalls) / max(1, len(recalls)),
                        density=sum(dens) / max(1, len(dens)), recall_per_layer=recalls, density_per_layer=dens,
                        layers=[layer for layer, _, _ in rows], capture_ms=ms, prompt_tokens=int(ids.shape[1]),
                        sample_index=p.index, references=[], **self._context(sample))
            cases.append(case)
        return cases


@contextlib.contextmanager
def progress_bar(total: int, enabled: bool = True, description: str = "eval") -> Iterator[Callable[[Any], None]]:
    """A rich progress bar with elapsed time and ETA; yields an ``advance(case)`` callback."""
    if not enabled:
        yield lambda case: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("elapsed"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                  TextColumn("{task.fields[last]}")) as prog:
        bar = prog.add_task(description, total=total, last="")

        def advance(case: Any) -> None:
            last = "" if case is None else (f"{case['task']} {case['length']} d={case['depth']} {case['method']}: "
                                            f"{_fmt_score(case)}")
            prog.update(bar, advance=1, last=last)

        yield advance


def _fmt_score(case: dict[str, Any]) -> str:
    if case.get("ppl") is not None:
        return f"ppl {case['ppl']:.2f}"
    s = case.get("score")
    return "-" if s is None else f"{s:.2f}"
