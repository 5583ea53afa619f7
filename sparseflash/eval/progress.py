"""Progress of an evaluation run: reporters of finished groups (a rich bar, or one plain line per group for logs
and pipes). A group is the runner's :class:`~sparseflash.eval.runner.GroupDone` (``unit``, ``cases``, ``line()``).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any, TextIO

PROGRESS_STYLES = ("bar", "lines", "none")


@contextlib.contextmanager
def progress(
    total: int, style: str = "bar", stream: TextIO | None = None, description: str = "eval"
) -> Iterator[Callable[[Any], None]]:
    """Progress over ``total`` groups; yields the ``on_group`` callback for :class:`Runner`.

    Args:
        total: number of groups (``len(runner.plan())``).
        style: ``bar`` (a rich bar with elapsed time and ETA), ``lines`` (one plain line per finished group,
            flushed: for logs and pipes) or ``none``.
        stream: where ``lines`` go (default ``sys.stdout``).

    Raises:
        ValueError: unknown ``style``.
    """
    if style not in PROGRESS_STYLES:
        raise ValueError(f"style: expected one of {list(PROGRESS_STYLES)}, got {style!r}")
    if style == "none":
        yield lambda group: None
        return
    if style == "lines":
        out = stream or sys.stdout

        def line(group: Any) -> None:
            print(group.line(), file=out, flush=True)

        yield line
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("elapsed"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[last]}"),
    ) as prog:
        bar = prog.add_task(description, total=total, last="")

        def advance(group: Any) -> None:
            u = group.unit
            prog.update(
                bar, advance=1, last=f"{u.task} {u.length} {','.join(u.methods)}: {format_outcome(group.cases)}"
            )

        yield advance


def format_outcome(cases: list[dict[str, Any]]) -> str:
    """A group's outcome in a few characters: mean score, ppl, KL / top-1 or recall per method."""
    if not cases:
        return "-"
    if all(c.get("recall") is not None for c in cases):
        return " ".join(f"{c['method']}={c['recall']:.2f}" for c in cases)
    if all(c.get("kl") is not None for c in cases):
        kl = sum(c["kl"] for c in cases) / len(cases)
        top1 = sum(c["top1"] for c in cases) / len(cases)
        return f"kl {kl:.4g} top1 {top1:.3f}"
    if all(c.get("ppl") is not None for c in cases):
        return f"ppl {sum(c['ppl'] for c in cases) / len(cases):.2f}"
    scores = [c["score"] for c in cases if c.get("score") is not None]
    return f"{sum(scores) / len(scores):.2f}" if scores else "-"
