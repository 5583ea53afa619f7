"""Kernel tuning in one documented object: tile shapes and experimental switches (no environment variables).

The launchers read :func:`get_tuning` at every launch; a field left at ``None`` means the library default
(the per-head-dim tables below, tuned on an H100 by ``benchmarks/bench_dense_vs_peers.py --sweep`` and
``benchmarks/bench_decode.py --sweep``). Benchmarks and sweeps change it for a block of code::

    from sparseflash.ops.tuning import TileConfig, tuned

    with tuned(prefill=TileConfig(128, 128, 8, 3), sparse_prefetch=False):
        sparseflash.block_sparse_attention(q, k, v, layout)

``prefill_forward(config=...)`` and ``decode_forward(config=...)`` take a config explicitly too and win over
this object. The settings are process-wide (not per thread): set them around benchmarks, not in a server.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class TileConfig:
    """Tile shape and pipelining of one prefill launch."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class DecodeConfig:
    """Tile shape and pipelining of the decode split kernel."""

    block_n: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class Tuning:
    """Kernel tuning; ``None`` fields take the library defaults.

    Attributes:
        prefill: tile config of every prefill launch (dense and block-sparse); None: by head dim
            (``ops.prefill.launcher.default_config``).
        sparse_prefetch: the block-sparse loop loads the next block id one step ahead (FlexAttention's scheme).
            On by default: on an H200 (64K, d = 128, ``benchmarks/results/prefetch_h200/``) it was faster in all
            five tile configs tried; with the d = 128 default tiles, 73.6 against 97.4 ms at density 1.0 and 8.5
            against 10.0 ms at density 0.1. ``False`` keeps the plain loop (for comparisons).
        tma: in the prefill kernel's unmasked key tiles, load K and V through device-side TMA tensor descriptors
            (``ops.prefill.tma``); masked tiles keep pointer loads. Used only where TMA applies (Hopper or newer,
            or the interpreter; head dim a power of two; 16-byte aligned strides and base); elsewhere ignored.
            Off by default: on an H200 (``benchmarks/results/prefill_explore_h200/``, 16K and 64K, causal and not)
            it was 0.5-4.5 % slower at d = 128 and within +-2 % at d = 64.
        lazy_rescale: in the prefill kernel's unmasked key tiles, rescale the running output only when some
            row's maximum grows by more than ``ops.prefill.tile.LAZY_THRESH`` (base 2; FlashAttention-4's trick);
            the result stays exact up to rounding. Ignored with block skipping (``skip_threshold``), whose
            decisions use the exact running maximum. Off by default: on the same H200 run it was 5-9 % slower at
            d = 128 and 0-8 % slower at d = 64 (its program-wide branch costs more than the multiply it saves).
        decode: tile config of the decode split kernel; None: by head dim (``ops.decode.launcher.default_config``).
        decode_ctas_per_sm: program slots per SM assumed by the decode split-count heuristic.
    """

    prefill: TileConfig | None = None
    sparse_prefetch: bool = True
    tma: bool = False
    lazy_rescale: bool = False
    decode: DecodeConfig | None = None
    decode_ctas_per_sm: int = 2

    def __post_init__(self) -> None:
        if self.prefill is not None and not isinstance(self.prefill, TileConfig):
            raise TypeError(f"prefill: expected a TileConfig or None, got {type(self.prefill).__name__}")
        if self.decode is not None and not isinstance(self.decode, DecodeConfig):
            raise TypeError(f"decode: expected a DecodeConfig or None, got {type(self.decode).__name__}")
        for name in ("sparse_prefetch", "tma", "lazy_rescale"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        ctas = self.decode_ctas_per_sm
        if isinstance(ctas, bool) or not isinstance(ctas, int) or ctas < 1:
            raise ValueError(f"decode_ctas_per_sm: expected an int >= 1, got {ctas!r}")


_TUNING = Tuning()


def get_tuning() -> Tuning:
    """The tuning the launchers use now."""
    return _TUNING


def set_tuning(tuning: Tuning) -> Tuning:
    """Make ``tuning`` current for the whole process; returns the previous one (to restore it)."""
    global _TUNING
    if not isinstance(tuning, Tuning):
        raise TypeError(f"tuning: expected a Tuning, got {type(tuning).__name__}")
    previous, _TUNING = _TUNING, tuning
    return previous


@contextlib.contextmanager
def tuned(**changes: object) -> Iterator[Tuning]:
    """Within the block, the current tuning with ``changes`` (fields of :class:`Tuning`); restored after."""
    previous = set_tuning(dataclasses.replace(get_tuning(), **changes))
    try:
        yield get_tuning()
    finally:
        set_tuning(previous)


__all__ = ["DecodeConfig", "TileConfig", "Tuning", "get_tuning", "set_tuning", "tuned"]
