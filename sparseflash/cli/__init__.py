"""The ``sparseflash`` command: ``eval``, ``bench``, ``plot``, ``models`` and ``calibrate``.

* :mod:`.args`: parsing and checking of flag values (bad input is a :class:`~.args.UsageError`, exit 2);
* :mod:`.parser`: the subcommands and their flags;
* :mod:`.commands`: what each subcommand does (``cmd_eval``, ``cmd_plot``, ...); :mod:`.bench`: ``cmd_bench``.

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

import sys

from sparseflash.cli.args import UsageError, parse_lengths, parse_method_options
from sparseflash.cli.parser import build_parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sparseflash`` program; returns the exit code (2 for bad input, 130 for an eval stopped
    by Ctrl-C)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # what resumes an interrupted eval
    try:
        return int(args.func(args) or 0)
    except UsageError as err:
        sub = {a.dest: a for a in parser._subparsers._group_actions}["cmd"].choices[args.cmd]  # type: ignore[union-attr]
        sub.error(str(err))  # prints usage and the message, exits 2
    return 2


__all__ = ["build_parser", "main", "parse_lengths", "parse_method_options"]
