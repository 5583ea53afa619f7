"""The subcommands of ``sparseflash``: ``eval``, ``bench``, ``plot``, ``models`` and ``calibrate`` (``cmd_*``).

``sparseflash eval`` runs the accuracy grid (tasks x lengths x depths x samples, the ``sdpa`` baseline + methods)
on a model that loads offline, writes one JSON line per case (as each finishes) and ``summary.json`` to the
results folder, prints the summary table and draws the figures. Rerunning the same command resumes: finished
cases are skipped.

Bad input (an unknown task or method, a model path that does not exist, a malformed option or option value, a
device this torch cannot use, an output path that cannot be written, a length too short for a task's prompt)
prints a one-line message naming the flag, what was expected and what was given, and exits with code 2, before
any model loads. Ctrl-C during ``eval`` prints how many cases the results folder holds and the command that
resumes, and exits with code 130.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from sparseflash.cli.args import (
    UsageError,
    _check_device,
    _check_eval_methods,
    _check_lengths_fit,
    _check_model,
    _check_option_values,
    _check_out_dir,
    _check_tasks,
    _device_kind,
    parse_depths,
    parse_lengths,
    parse_method_options,
    parse_task_options,
)

CPU_LENGTHS = "1024"  # fp32 prefill of the 0.5B model takes ~15 s per 1K prompt on 2 cores: 16 cases, ~5 min
GPU_LENGTHS = "4096,8192,16384,32768"
CPU_DEPTHS = "20,80"
GPU_DEPTHS = "0,25,50,75,100"
DEFAULT_TASKS = "passkey,niah_single"
CPU_BATCH, GPU_BATCH = 1, 8  # prompts per batch of a generation task (eval)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C


def _console() -> Any:
    """A rich console; wide when writing to a file or pipe (logs), the terminal's width otherwise."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 150)


def _sanitize(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


# ---------------------------------------------------------------------------- subcommands
def _command(args: argparse.Namespace) -> str:
    """The command line that ran (and reruns) this command: ``--command-line`` if given, else ``sparseflash`` and
    the arguments :func:`main` received."""
    if args.command_line is not None:
        return args.command_line
    argv = getattr(args, "argv", None)
    return "sparseflash " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))


def _check_eval_out(out: str | None) -> None:
    """``--out`` of eval before loading: a writable folder whose cases.jsonl, if any, reads back."""
    from sparseflash.eval.results import CASES, read_cases

    _check_out_dir(Path(out) if out else Path("results"))
    if out and (Path(out) / CASES).exists():
        path = Path(out) / CASES
        if not path.is_file() or not os.access(path, os.R_OK | os.W_OK):
            raise UsageError(f"--out: expected a readable and writable {CASES}, cannot use {str(path)!r}")
        try:
            read_cases(path)
        except ValueError as err:
            raise UsageError(f"--out: {str(err).removeprefix('results: ')}") from None


def cmd_eval(args: argparse.Namespace) -> int:

    tasks = _check_tasks(args.tasks)
    _check_device(args.device)
    method_options = parse_method_options(args.method_option)
    methods = _check_eval_methods(args.methods, method_options)
    task_options = parse_task_options(args.task_option)
    if args.needle:
        task_options["value_type"] = args.needle
    if args.text_source:
        task_options["text_source"] = args.text_source
    from sparseflash.eval.tasks import get_task

    known = set().union(*(get_task(t).options for t in tasks))
    unknown = sorted(set(task_options) - known)
    if unknown:
        raise UsageError(f"--task-option: {unknown} not taken by any of {tasks}; expected some of {sorted(known)}")
    kind = _device_kind(args.device)
    lengths = parse_lengths(args.lengths or (GPU_LENGTHS if kind == "cuda" else CPU_LENGTHS))
    depths = parse_depths(args.depths or (GPU_DEPTHS if kind == "cuda" else CPU_DEPTHS))
    samples = args.samples if args.samples is not None else (4 if kind == "cuda" else 1)
    if samples < 1:
        raise UsageError(f"--samples: expected >= 1, got {samples}")
    batch_size = args.batch_size if args.batch_size is not None else (GPU_BATCH if kind == "cuda" else CPU_BATCH)
    if batch_size < 1:
        raise UsageError(f"--batch-size: expected an integer >= 1, got {batch_size}")
    _check_lengths_fit(tasks, lengths, depths, samples, args.seed, task_options)
    _check_eval_out(args.out)
    _check_model(args.model)

    from sparseflash.eval.model import load_model
    from sparseflash.eval.plots import plot_all
    from sparseflash.eval.progress import progress
    from sparseflash.eval.results import CASES, ResultsStore, read_cases
    from sparseflash.eval.runner import EvalConfig, Runner
    from sparseflash.eval.summary import render_table, write_summary

    command = _command(args)
    console = _console()
    console.print(
        f"[bold]sparseflash eval[/]: model {args.model}, tasks {tasks}, methods {methods}, "
        f"lengths {lengths}, depths {depths}, samples {samples}, batch size {batch_size}, "
        f"seed {args.seed}"
    )
    out: Path | None = Path(args.out) if args.out else None
    store = None
    try:
        with console.status(f"loading {args.model} ..."):
            loaded = load_model(args.model, device=args.device, dtype=args.dtype)
        num_layers = getattr(loaded.model.config, "num_hidden_layers", None)
        if isinstance(num_layers, int):  # layer indices of -O ... dense_layers / layer_options
            for m in methods:
                _check_option_values(m, method_options.get(m, {}), num_layers, loaded.name)
        too_long = [n for n in lengths if loaded.max_positions and n > loaded.max_positions]
        if too_long:
            console.print(
                f"[yellow]warning[/]: lengths {too_long} exceed the model's context "
                f"({loaded.max_positions} tokens); its answers there are extrapolation"
            )
        out = Path(args.out or f"results/eval_{_sanitize(loaded.name)}_{loaded.device.type}")
        try:
            store = ResultsStore(out)
        except (ValueError, OSError) as err:
            raise UsageError(f"--out: {str(err).removeprefix('results: ')}") from None
        config = EvalConfig(
            tasks=tasks,
            methods=methods,
            lengths=lengths,
            depths=depths,
            samples=samples,
            seed=args.seed,
            method_options=method_options,
            task_options=task_options,
            chat=args.chat,
            batch_size=batch_size,
        )
        try:
            runner = Runner(loaded, store, config)
        except ValueError as err:  # no chat template
            raise UsageError(f"--chat: {str(err).removeprefix('chat: ')}") from None
        _check_lengths_fit(tasks, lengths, depths, samples, args.seed, task_options, loaded.tokenizer, runner.fmt)
        pending, groups = runner.pending(), len(runner.plan())
        console.print(f"results: {out}/{CASES} ({len(store)} cases stored, {pending} to run in {groups} groups)")
        style = "bar" if sys.stdout.isatty() and not args.no_progress else "lines"
        with progress(groups, style=style) as on_group:
            runner.on_group = on_group
            runner.run()
        keys = {(t, n) for t in tasks for n in lengths}
        mine = [
            c
            for c in store
            if (c["task"], c["length"]) in keys and c["method"] in methods and c["model"] == loaded.name
        ]
        summary = write_summary(
            out,
            mine,
            command,
            {
                "model": loaded.name,
                "config": {
                    "tasks": tasks,
                    "methods": methods,
                    "lengths": lengths,
                    "depths": depths,
                    "samples": samples,
                    "batch_size": batch_size,
                    "seed": args.seed,
                    "method_options": method_options,
                    "task_options": task_options,
                    "chat": args.chat,
                },
            },
        )
        console.print(render_table(summary["rows"], title=f"sparseflash eval: {loaded.name} on {summary['gpu']}"))
        if not args.no_plots:
            paths = plot_all(mine, out)
            console.print("plots: " + ", ".join(str(p) for p in paths))
        console.print(f"summary: {out / 'summary.json'}")
    except KeyboardInterrupt:
        if store is not None:
            saved = len(store)
        else:
            saved = len(read_cases(out)) if out is not None and (out / CASES).is_file() else 0
        where = f"in {out / CASES}" if out is not None else "(stopped before the results folder was opened)"
        print(
            f"\ninterrupted: {saved} case{'s' if saved != 1 else ''} saved {where}; the same command resumes "
            f"(finished cases are skipped):\n  {command}",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_INTERRUPTED
    return 0


def cmd_plot(args: argparse.Namespace) -> int:

    from sparseflash.eval.plots import check_cases, plot_all
    from sparseflash.eval.results import read_cases
    from sparseflash.eval.summary import render_table, summarize

    try:
        cases = read_cases(args.results)
        check_cases(cases)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(f"results: {str(err).removeprefix('results: ')}") from None
    out = (
        Path(args.out)
        if args.out
        else (Path(args.results) if Path(args.results).is_dir() else Path(args.results).parent)
    )
    _check_out_dir(out)
    console = _console()
    console.print(render_table(summarize(cases)))
    for p in plot_all(cases, out):
        console.print(str(p))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from rich.table import Table

    from sparseflash.eval.model import EMBEDDED_DEFAULT, TINY
    from sparseflash.integrations import models as catalogue

    table = Table(title="models that load offline (sparseflash eval --model NAME)")
    for col in ("name", "installed", "details"):
        table.add_column(col)
    entries = [(m.name, "yes" if m.installed else "no", m.description) for m in catalogue.available()]
    entries.append((TINY, "yes", "2-layer random-weight Llama, byte tokenizer, built in memory (plumbing checks)"))
    for name, inst, detail in entries:
        star = " (default)" if name == EMBEDDED_DEFAULT else ""
        table.add_row(name + star, inst, detail)
    _console().print(table)
    print("--model also takes a local Hugging Face model folder or a .gguf file.")
    return 0
