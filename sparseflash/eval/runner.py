"""The evaluation grid: tasks x lengths x depths x samples, each prompt run under the baseline and every method.

Every prompt is generated once from its case seed and run by the baseline ``sdpa`` (the model as loaded) first,
then by each method (``dense`` = sparseflash's exact kernels, or a sparse pattern), so the comparison is paired:
same prompt, same greedy decoding. Each (prompt, method) is one case, written to the
:class:`~sparseflash.eval.results.ResultsStore` (flushed) as soon as it finishes; cases already stored are
skipped, so a rerun resumes. Case seeds come from the base seed and the case coordinates (task, length, depth,
sample index), so any case can be regenerated alone.

The grid itself (:class:`~sparseflash.eval.grid.EvalConfig`, prompts, case seeds, batches) is
:mod:`sparseflash.eval.grid`. Work is done in *groups* (:class:`~sparseflash.eval.grid.Unit`): one method over
one batch of prompts. Generation tasks take
``batch_size`` consecutive prompts of the same (task, length) at once (left-padded, one prefill, batched greedy
decoding); the batches are fixed by the grid alone, so every method runs the very batches the baseline ran (same
composition and order) and a resumed run rebuilds them identically. Perplexity and agreement run one prompt per
group; ``recall`` runs all its methods on one capture of q/k.

Agreement keeps the baseline's log-probabilities of the current prompt in memory (on the model's device,
float32) and compares each method with them; when resuming with the baseline case stored but a method's not, the
baseline's log-probabilities are recomputed (not stored again).
"""

from __future__ import annotations

import datetime as _dt
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from sparseflash.eval.engine import Engine, Generation
from sparseflash.eval.grid import EvalConfig, Prompt, Unit, batches, grid
from sparseflash.eval.methods import BASELINE, DENSE, SDPA, use_method
from sparseflash.eval.model import LoadedModel
from sparseflash.eval.progress import format_outcome
from sparseflash.eval.results import ResultsStore
from sparseflash.eval.tasks import Sample, get_task, plain_format
from sparseflash.eval.tasks.base import PromptFormat, Task


def _task_options(task: str, options: dict[str, Any]) -> dict[str, Any]:
    known = get_task(task).options
    return {k: v for k, v in options.items() if k in known}


def chat_format(tokenizer: Any) -> PromptFormat:
    """A prompt format that puts the task text in a user turn and the answer prefix after the assistant header."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat: the tokenizer has no chat template; run without --chat")

    def fmt(user_text: str, answer_prefix: str) -> str:
        head = tokenizer.apply_chat_template(
            [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
        )
        return head + answer_prefix.lstrip()

    return fmt


def _base_case(
    loaded: LoadedModel, p: Prompt, task_opts: dict[str, Any], method: str, options: dict[str, Any]
) -> dict[str, Any]:
    return {
        "model": loaded.name,
        "task": p.task,
        "task_options": task_opts,
        "method": method,
        "options": options,
        "length": p.length,
        "depth": p.depth,
        "seed": p.seed,
        "baseline": BASELINE,
    }


@dataclass
class _Item:
    """A prompt ready to run: its grid point, the generated sample and its token ids (1, S) int64."""

    prompt: Prompt
    sample: Sample
    ids: torch.Tensor


@dataclass
class GroupDone:
    """A finished group, for progress reports: its position, the unit, the cases it wrote and its wall time."""

    index: int
    total: int
    unit: Unit
    cases: list[dict[str, Any]]
    seconds: float

    def line(self) -> str:
        """One plain progress line, e.g. ``[12/96] niah_single 32768 xattention: 1.00 (12.3 s)``."""
        u = self.unit
        return (
            f"[{self.index}/{self.total}] {u.task} {u.length} {','.join(u.methods)}: "
            f"{format_outcome(self.cases)} ({self.seconds:.1f} s)"
        )


class Runner:
    """Runs a grid on a loaded model into a store.

    Args:
        loaded: the model. store: where cases go. config: the grid.
        on_case: called with every case dict as soon as it is written.
        on_group: called with a :class:`GroupDone` after every group (one method over one batch).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        store: ResultsStore,
        config: EvalConfig,
        on_case: Callable[[dict[str, Any]], None] | None = None,
        on_group: Callable[[GroupDone], None] | None = None,
    ) -> None:
        self.loaded = loaded
        self.engine = Engine(loaded)
        self.store = store
        self.config = config
        self.on_case = on_case or (lambda case: None)
        self.on_group = on_group or (lambda group: None)
        self.fmt = chat_format(loaded.tokenizer) if config.chat else plain_format
        self._warm: set[tuple[Any, ...]] = set()
        self._items: dict[Prompt, _Item] = {}  # the current batch's prompts, built once for all methods
        self._reference: tuple[Prompt, torch.Tensor] | None = None  # baseline log-probs of the agreement prompt

    # ---------------------------------------------------------------- the plan
    def _case(self, p: Prompt, method: str) -> dict[str, Any]:
        return _base_case(
            self.loaded,
            p,
            _task_options(p.task, self.config.task_options),
            method,
            self.config.method_options.get(method, {}),
        )

    def _pending(self, p: Prompt, method: str) -> bool:
        return not self.store.done(self._case(p, method))

    def plan(self) -> list[Unit]:
        """The groups still to run, in run order: per batch, the baseline first, then each method."""
        units = []
        for batch in batches(self.config):
            todo = [m for m in self.config.all_methods() if any(self._pending(p, m) for p in batch)]
            if not todo:
                continue
            task, length = batch[0].task, batch[0].length
            if get_task(task).kind == "recall":
                units.append(Unit(task, length, batch, tuple(todo)))
            else:
                units.extend(Unit(task, length, batch, (m,)) for m in todo)
        return units

    def pending(self) -> int:
        """Number of (prompt, method) cases of the grid not yet in the store."""
        return sum(self._pending(p, m) for p in grid(self.config) for m in self.config.all_methods())

    # ---------------------------------------------------------------- running
    def run(self) -> list[dict[str, Any]]:
        """Run every pending case, writing each to the store as it finishes; returns the cases written."""
        written: list[dict[str, Any]] = []
        units = self.plan()
        for i, unit in enumerate(units, 1):
            t0 = time.perf_counter()
            cases = self._run_unit(unit)
            for case in cases:
                self.store.append(case)
                written.append(case)
                self.on_case(case)
            self.on_group(GroupDone(i, len(units), unit, cases, time.perf_counter() - t0))
        self._items.clear()
        self._reference = None
        return written

    def _run_unit(self, unit: Unit) -> list[dict[str, Any]]:
        items = self._prepare(unit)
        if self._reference is not None and self._reference[0] not in unit.prompts:
            self._reference = None  # free the previous agreement prompt's log-probs
        kind = get_task(unit.task).kind
        if kind == "recall":
            return self._recall(items[0], list(unit.methods))
        method = unit.methods[0]
        if kind == "generate":
            return self._generate(items, method)
        if kind == "agreement":
            return self._agreement(items[0], method)
        if kind == "perplexity":
            return self._perplexity(items[0], method)
        raise ValueError(f"task kind: expected generate, perplexity, agreement or recall, got {kind!r}")

    def _prepare(self, unit: Unit) -> list[_Item]:
        """The unit's prompts built and tokenized, reusing the current batch's when the batch is the same."""
        if set(self._items) != set(unit.prompts):
            self._items = {p: self._build(p) for p in unit.prompts}
        return [self._items[p] for p in unit.prompts]

    def _build(self, p: Prompt) -> _Item:
        task = get_task(p.task)
        opts = _task_options(p.task, self.config.task_options)
        sample = task.build(self.loaded.tokenizer, p.length, p.depth, p.seed, self.fmt, **opts)
        exact = task.kind in ("perplexity", "agreement")  # a window of exactly `length` tokens
        ids = self.engine.encode(sample.prompt, max_tokens=p.length if exact else None)
        return _Item(p, sample, ids)

    def _options(self, method: str) -> dict[str, Any]:
        return self.config.method_options.get(method, {})

    def _finish(self, item: _Item, method: str, density: float | None, **fields: Any) -> dict[str, Any]:
        case = self._case(item.prompt, method)
        case.update(fields)
        case.update(
            density=density,
            references=item.sample.references,
            prompt_tokens=int(item.ids.shape[1]),
            sample_index=item.prompt.index,
            **self._context(item.sample),
        )
        return case

    # ---------------------------------------------------------------- generation (batched)
    def _generate(self, items: list[_Item], method: str) -> list[dict[str, Any]]:
        task = get_task(items[0].prompt.task)
        prompts = [it.ids for it in items]
        with use_method(self.loaded.model, method, self._options(method)) as run:
            self._warmup(method, items[0].prompt.length, prompts)
            run.reset()
            gens = self.engine.generate_batch(
                prompts, [it.sample.max_new_tokens for it in items], [_stop_when_full(task, it.sample) for it in items]
            )
            density = run.density()  # over the whole batch's prefill
        return [
            self._answer_case(it, method, gen, task, density)
            for it, gen in zip(items, gens, strict=True)
            if self._pending(it.prompt, method)
        ]

    def _answer_case(
        self, item: _Item, method: str, gen: Generation, task: Task, density: float | None
    ) -> dict[str, Any]:
        return self._finish(
            item,
            method,
            density,
            answer=gen.text,
            answer_tokens=gen.tokens,
            score=task.score(gen.text, item.sample),
            prefill_ms=gen.prefill_ms,
            decode_ms=gen.decode_ms,
            new_tokens=gen.new_tokens,
            batch_size=gen.batch_size,
        )

    def _warmup(self, method: str, length: int, prompts: list[torch.Tensor]) -> None:
        """On a GPU, one untimed prefill per (method, length, batch size) so compilation and autotuning are not
        timed."""
        key = (method, length, len(prompts))
        if self.loaded.device.type != "cuda" or key in self._warm:
            return
        self.engine.prefill_ms(self.engine.batch(prompts))
        self._warm.add(key)

    # ---------------------------------------------------------------- perplexity
    def _perplexity(self, item: _Item, method: str) -> list[dict[str, Any]]:
        with use_method(self.loaded.model, method, self._options(method)) as run:
            self._warmup(method, item.prompt.length, [item.ids])
            run.reset()
            res = self.engine.perplexity(item.ids, item.sample.meta["last_tokens"])
            density = run.density()
        return [self._finish(item, method, density, score=None, **res)]

    # ---------------------------------------------------------------- agreement with the baseline
    def _agreement(self, item: _Item, method: str) -> list[dict[str, Any]]:
        last = item.sample.meta["last_tokens"]
        if method == BASELINE:
            self._reference = None
            res, ref = self._baseline_logprobs(item, last)
            self._reference = (item.prompt, ref)
            return [self._finish(item, method, 1.0, score=None, **res)]
        reference = self._reference_for(item, last)
        with use_method(self.loaded.model, method, self._options(method)) as run:
            self._warmup(method, item.prompt.length, [item.ids])
            run.reset()
            res, _ = self.engine.agreement(item.ids, last, reference)
            density = run.density()
        return [self._finish(item, method, density, score=None, **res)]

    def _baseline_logprobs(self, item: _Item, last: int) -> tuple[dict[str, Any], torch.Tensor]:
        """The baseline's agreement result (kl 0, top1 1) and its (P, V) float32 log-probs on the device."""
        with use_method(self.loaded.model, BASELINE) as run:
            self._warmup(BASELINE, item.prompt.length, [item.ids])
            run.reset()
            res, ref = self.engine.agreement(item.ids, last, None, keep=True)
        assert ref is not None
        return res, ref

    def _reference_for(self, item: _Item, last: int) -> torch.Tensor:
        """The baseline's log-probs of ``item``: kept from its baseline run, or recomputed (resume)."""
        if self._reference is None or self._reference[0] != item.prompt:
            self._reference = None
            self._reference = (item.prompt, self._baseline_logprobs(item, last)[1])
        return self._reference[1]

    # ---------------------------------------------------------------- recall: all methods on one capture
    def _recall(self, item: _Item, methods: list[str]) -> list[dict[str, Any]]:
        from sparseflash.eval.recall import layer_recall

        per: dict[str, list[tuple[int, float, float]]] = {m: [] for m in methods}

        def on_layer(layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
            for m in methods:
                name = DENSE if m == SDPA else m  # exact attention either way: recall 1, density 1
                rec, dens = layer_recall(name, self._options(m), q, k)
                per[m].append((layer, rec, dens))

        ms = self.engine.capture_qk(item.ids, on_layer)
        cases = []
        for m in methods:
            if not self._pending(item.prompt, m):
                continue
            rows = sorted(per[m])
            recalls = [r for _, r, _ in rows]
            dens = [d for _, _, d in rows]
            mean_recall = sum(recalls) / max(1, len(recalls))
            cases.append(
                self._finish(
                    item,
                    m,
                    sum(dens) / max(1, len(dens)),
                    score=mean_recall,
                    recall=mean_recall,
                    recall_per_layer=recalls,
                    density_per_layer=dens,
                    layers=[layer for layer, _, _ in rows],
                    capture_ms=ms,
                )
            )
        for case in cases:
            case["references"] = []
        return cases

    def _context(self, sample: Sample) -> dict[str, Any]:
        needles = sample.meta.get("needles")
        return {
            "device": str(self.loaded.device),
            "dtype": str(self.loaded.model.dtype).removeprefix("torch."),
            "haystack": sample.meta.get("haystack"),
            "needle_depths": [n["actual_depth"] for n in needles] if needles else None,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }


def _stop_when_full(task: Task, sample: Sample) -> Callable[[str], bool] | None:
    """For string-match-all tasks, stop once every reference is in the answer (the score cannot change)."""
    if sample.metric != "all":
        return None
    return lambda text: task.score(text, sample) >= 1.0
