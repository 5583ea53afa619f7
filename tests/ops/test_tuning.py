"""Kernel tuning: one documented object (sparseflash.ops.tuning), no environment variables."""

from __future__ import annotations

import pytest

from sparseflash.ops.decode.launcher import choose_num_splits
from sparseflash.ops.prefill.launcher import default_config
from sparseflash.ops.tuning import DecodeConfig, TileConfig, Tuning, get_tuning, set_tuning, tuned


def test_defaults_are_the_library_tables():
    tuning = get_tuning()
    assert tuning == Tuning() and tuning.prefill is None and tuning.decode is None
    assert tuning.sparse_prefetch and tuning.decode_ctas_per_sm == 2
    assert default_config(128) == TileConfig(128, 128, 8, 3)
    assert default_config(128, sparse=True) == TileConfig(128, 64, 8, 3)


def test_tuned_changes_fields_for_the_block_only():
    before = get_tuning()
    with tuned(decode=DecodeConfig(16, 4, 1), decode_ctas_per_sm=8) as inside:
        assert get_tuning() is inside and inside.decode == DecodeConfig(16, 4, 1)
        # more program slots per SM: the split heuristic splits a small batch further
        assert choose_num_splits(1, 8, 131072, 132) >= choose_num_splits(1, 8, 131072, 132, ctas_per_sm=2)
    assert get_tuning() is before
    with pytest.raises(RuntimeError), tuned(sparse_prefetch=True):
        raise RuntimeError("restored on errors too")
    assert get_tuning() is before


@pytest.mark.parametrize(
    "changes, error, match",
    [
        (dict(prefill=(128, 64, 8, 3)), TypeError, "prefill: expected a TileConfig or None"),
        (dict(decode="64,4,3"), TypeError, "decode: expected a DecodeConfig or None"),
        (dict(sparse_prefetch=1), TypeError, "sparse_prefetch: expected a bool"),
        (dict(decode_ctas_per_sm=0), ValueError, "decode_ctas_per_sm: expected an int >= 1"),
    ],
)
def test_bad_values_rejected(changes, error, match):
    with pytest.raises(error, match=match):
        Tuning(**changes)
    with pytest.raises(TypeError, match="tuning: expected a Tuning"):
        set_tuning(changes)


def test_no_environment_variable_is_read(monkeypatch):
    monkeypatch.setenv("SPARSEFLASH_PREFILL_CONFIG", "16,16,1,1")
    monkeypatch.setenv("SPARSEFLASH_DECODE_CTAS_PER_SM", "64")
    assert default_config(128) == TileConfig(128, 128, 8, 3)
    assert choose_num_splits(1, 8, 131072, 132) == choose_num_splits(1, 8, 131072, 132, ctas_per_sm=2)
