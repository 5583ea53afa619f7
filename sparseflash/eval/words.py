"""Word lists for needle keys and values (RULER draws "adjective-noun" keys from the wonderwords lists; we ship
our own short lists so nothing is needed at run time). 64 x 64 = 4096 distinct keys."""

from __future__ import annotations

import random
import string
import uuid

ADJECTIVES = (
    "ancient",
    "bitter",
    "brave",
    "bright",
    "broad",
    "calm",
    "careful",
    "cheerful",
    "clever",
    "cold",
    "crooked",
    "curious",
    "damp",
    "dark",
    "eager",
    "early",
    "empty",
    "faint",
    "fancy",
    "fierce",
    "gentle",
    "giant",
    "golden",
    "graceful",
    "hollow",
    "humble",
    "hungry",
    "icy",
    "jolly",
    "kind",
    "lazy",
    "little",
    "lively",
    "lonely",
    "loud",
    "lucky",
    "mighty",
    "modern",
    "muddy",
    "narrow",
    "noisy",
    "odd",
    "pale",
    "patient",
    "plain",
    "polite",
    "proud",
    "quick",
    "quiet",
    "rapid",
    "rough",
    "round",
    "rusty",
    "shiny",
    "silent",
    "silly",
    "smooth",
    "soft",
    "steep",
    "sticky",
    "sweet",
    "tall",
    "tender",
    "wild",
)
NOUNS = (
    "anchor",
    "apple",
    "arrow",
    "badge",
    "basket",
    "beacon",
    "bicycle",
    "blanket",
    "bridge",
    "bucket",
    "button",
    "cabin",
    "camera",
    "candle",
    "canyon",
    "carpet",
    "castle",
    "cloud",
    "compass",
    "cradle",
    "crystal",
    "desert",
    "dragon",
    "drum",
    "engine",
    "falcon",
    "feather",
    "forest",
    "garden",
    "glacier",
    "hammer",
    "harbor",
    "helmet",
    "island",
    "jacket",
    "kettle",
    "ladder",
    "lantern",
    "meadow",
    "mirror",
    "needle",
    "orchard",
    "otter",
    "pencil",
    "pillow",
    "planet",
    "pocket",
    "puzzle",
    "rabbit",
    "ribbon",
    "river",
    "rocket",
    "saddle",
    "shadow",
    "spoon",
    "statue",
    "teapot",
    "thunder",
    "tiger",
    "tunnel",
    "violin",
    "wagon",
    "whistle",
    "window",
)


def random_word_key(rng: random.Random) -> str:
    """An "adjective-noun" pair such as ``quiet-lantern``."""
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def random_number(rng: random.Random, digits: int = 7) -> str:
    """A random integer with exactly ``digits`` digits, as a string."""
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def random_uuid(rng: random.Random) -> str:
    """A UUID4 string from 128 bits of the seeded RNG (as RULER does)."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def random_value(rng: random.Random, value_type: str) -> str:
    """A needle value of ``value_type``: ``numbers`` (7 digits), ``words`` (adjective-noun) or ``uuids``."""
    if value_type == "numbers":
        return random_number(rng)
    if value_type == "words":
        return random_word_key(rng)
    if value_type == "uuids":
        return random_uuid(rng)
    raise ValueError(f"value_type: expected one of ['numbers', 'words', 'uuids'], got {value_type!r}")


def random_var_name(rng: random.Random, length: int = 5) -> str:
    """An upper-case variable name such as ``QXKZA`` (variable tracking)."""
    return "".join(rng.choice(string.ascii_uppercase) for _ in range(length))
