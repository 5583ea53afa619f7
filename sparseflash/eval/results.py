"""The results store: one JSON line per case in ``<folder>/cases.jsonl``, appended and flushed case by case.

* A rerun skips every case whose key is already in the file (:func:`case_key`: model, task, task options,
  method, method options, length, depth, seed), so an interrupted grid resumes where it stopped.
* A crash in the middle of a write leaves a last line without its newline: :class:`ResultsStore` drops that
  partial line when it opens the file (it cuts the file back to the last complete line), so the case simply runs
  again and no line is ever glued to a broken one.
* Appending a case that is already stored raises, so the file never holds duplicates.
* Every case names the ``baseline`` it was paired with (``sdpa``). Files from before the rename (no such field;
  their ``dense`` meant the model as loaded, today's ``sdpa``) are refused with a clear message rather than
  mixed with today's ``dense`` (sparseflash's exact kernels).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CASES = "cases.jsonl"
KEY_FIELDS = ("model", "task", "task_options", "method", "options", "length", "depth", "seed")
BASELINE_FIELD = "baseline"


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def case_key(case: dict[str, Any]) -> str:
    """The identity of a case: its :data:`KEY_FIELDS` as canonical JSON (missing fields count as null)."""
    return _canon([case.get(f) for f in KEY_FIELDS])


def read_cases(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every complete case in a ``cases.jsonl`` file (or a folder holding one); a partial last line is skipped.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a corrupt line that is not the last one (the file was edited, not interrupted); a case without
            a ``baseline`` field (written before the baseline was renamed ``sdpa``).
    """
    path = Path(path)
    if path.is_dir():
        path = path / CASES
    if not path.is_file():
        raise FileNotFoundError(f"results: expected a cases.jsonl file or a folder holding one, got {str(path)!r}")
    lines = path.read_bytes().split(b"\n")
    cases = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            cases.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i == len(lines) - 1:  # unterminated last line: a write cut short
                break
            raise ValueError(f"results: line {i + 1} of {path} is not valid JSON ({err})") from None
        if BASELINE_FIELD not in cases[-1]:
            raise ValueError(
                f"results: line {i + 1} of {path} has no {BASELINE_FIELD!r} field: it was written "
                f"before the baseline was renamed 'sdpa' (its 'dense' meant the model as loaded); "
                f"expected a results folder written by this version, use a new one"
            )
    return cases


class ResultsStore:
    """Append-only case store under ``folder`` (created if missing).

    Args:
        folder: the results folder; cases go to ``folder/cases.jsonl``.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / CASES
        self._repair()
        self.cases: list[dict[str, Any]] = read_cases(self.path) if self.path.exists() else []
        self._keys = {case_key(c) for c in self.cases}

    def _repair(self) -> None:
        """Cut a partial last line (no trailing newline) off the file."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            with open(self.path, "r+b") as f:
                f.truncate(keep)

    def __len__(self) -> int:
        return len(self.cases)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.cases)

    def done(self, case: dict[str, Any]) -> bool:
        """Whether a case with the same key is stored."""
        return case_key(case) in self._keys

    def append(self, case: dict[str, Any]) -> None:
        """Write ``case`` as one line, flushed and fsynced before returning.

        Raises:
            ValueError: a case with the same key is already stored.
        """
        key = case_key(case)
        if key in self._keys:
            raise ValueError(f"results: case already stored: {key}")
        line = json.dumps(case, sort_keys=True, default=str) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.cases.append(case)
        self._keys.add(key)
