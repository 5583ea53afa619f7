"""RULER's scoring (scripts/eval/synthetic/constants.py), re-implemented from its description.

* post-processing: strip, every control character (code < 0x20) becomes a newline, strip again;
* ``string_match_all``: the fraction of references found as case-insensitive substrings of the prediction;
* ``string_match_part``: 1 if any reference is found, else 0;
* ``passkey_match`` (Landmark Attention): 1 if the first integer in the prediction equals the key.

Scores are in [0, 1] per sample (RULER multiplies the mean by 100).
"""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x1f]")
_INTEGER = re.compile(r"\d+")


def postprocess(prediction: str) -> str:
    """RULER's post-processing of a model output."""
    return _CONTROL.sub("\n", prediction.strip()).strip()


def string_match_all(prediction: str, references: list[str]) -> float:
    """Fraction of ``references`` that occur, case-insensitively, in ``prediction``."""
    if not references:
        raise ValueError("references: expected at least one reference string, got []")
    pred = postprocess(prediction).lower()
    return sum(r.lower() in pred for r in references) / len(references)


def string_match_part(prediction: str, references: list[str]) -> float:
    """1.0 if any of ``references`` occurs, case-insensitively, in ``prediction``, else 0.0."""
    if not references:
        raise ValueError("references: expected at least one reference string, got []")
    pred = postprocess(prediction).lower()
    return float(any(r.lower() in pred for r in references))


def passkey_match(prediction: str, references: list[str]) -> float:
    """1.0 if the first integer in ``prediction`` equals the pass key ``references[0]``, else 0.0."""
    found = _INTEGER.search(postprocess(prediction))
    return float(found is not None and found.group(0) == references[0])


METRICS = {"all": string_match_all, "part": string_match_part, "passkey": passkey_match}


def score(metric: str, prediction: str, references: list[str]) -> float:
    """Score ``prediction`` with the metric named ``metric`` (``all``, ``part`` or ``passkey``)."""
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {sorted(METRICS)}, got {metric!r}")
    return METRICS[metric](prediction, references)
