"""Option validation: unknown method or option, thresholds outside (0, 1], stride < 1, block size mismatch."""

from __future__ import annotations

import pytest
import torch

from sparseflash import patterns
from sparseflash.patterns import selection as sel
from sparseflash.patterns.block_max import calibrate_block_max

Q = torch.zeros(1, 2, 64, 16)
K = torch.zeros(1, 1, 64, 16)


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"method: expected one of \[.*'xattention'.*\], got 'xatention'"):
        patterns.select("xatention", Q, K)


@pytest.mark.parametrize("name", patterns.available())
def test_unknown_option_lists_the_accepted_ones(name):
    with pytest.raises(
        ValueError,
        match=rf"{name}: unknown option\(s\) \['bogus'\]; expected some of \[.*"
        r"'block_size'.*\]",
    ):
        patterns.select(name, Q, K, bogus=1)


@pytest.mark.parametrize(
    "name,option",
    [("xattention", "threshold"), ("xattention", "target_recall"), ("oracle", "density"), ("oracle", "target_recall")],
)
@pytest.mark.parametrize("value", [0, 0.0, -0.1, 1.5, True, "0.9"])
def test_fractions_outside_zero_one(name, option, value):
    with pytest.raises(ValueError, match=rf"{option}: expected a float in \(0, 1\], got {value!r}"):
        patterns.select(name, Q, K, block_size=(16, 16), **{option: value})


def test_threshold_and_target_recall_are_exclusive():
    with pytest.raises(ValueError, match="expected threshold or target_recall, not both"):
        patterns.select("xattention", Q, K, block_size=(16, 16), stride=4, threshold=0.9, target_recall=0.9)
    with pytest.raises(ValueError, match="expected density or target_recall, not both"):
        patterns.select("oracle", Q, K, block_size=(16, 16), density=0.5, target_recall=0.9)


def test_per_head_thresholds():
    with pytest.raises(ValueError, match=r"expected 2 per-head values \(one per layout head\), got 3"):
        patterns.select("xattention", Q, K, block_size=(16, 16), stride=4, threshold=[0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match=r"expected per-head values in \[0, 1\], got \[0.5, 1.2\]"):
        patterns.select("xattention", Q, K, block_size=(16, 16), stride=4, threshold=[0.5, 1.2])


def test_per_head_values_are_made_once_per_list_and_device():
    """The per-head tensor is built once per distinct list (a GPU copy from host memory waits for the stream: made
    at every layer call it stalled the host), and a list, a tuple and a CPU tensor of the same values share it."""
    from sparseflash._options import check_fractions

    first = check_fractions("threshold", [0.5, 0.25], 2, "cpu")
    assert first.dtype == torch.float32 and first.tolist() == [0.5, 0.25]
    assert check_fractions("threshold", (0.5, 0.25), 2, torch.device("cpu")) is first
    assert check_fractions("threshold", torch.tensor([0.5, 0.25]), 2, "cpu") is first
    assert check_fractions("threshold", [0.5, 0.3], 2, "cpu").tolist() == pytest.approx([0.5, 0.3])
    one = patterns.select("xattention", Q, K, block_size=(16, 16), stride=4, threshold=[0.5, 0.25])
    two = patterns.select("xattention", Q, K, block_size=(16, 16), stride=4, threshold=[0.5, 0.25])
    assert torch.equal(one.to_dense(), two.to_dense())
    assert first.tolist() == [0.5, 0.25]  # selection never modifies the shared tensor


@pytest.mark.parametrize("name,option", [("xattention", "stride"), ("strided", "stride")])
@pytest.mark.parametrize("value", [0, -2, 1.5, "4"])
def test_stride_below_one(name, option, value):
    with pytest.raises(ValueError, match=rf"stride: expected an int >= 1, got {value!r}"):
        patterns.select(name, Q, K, block_size=(16, 16), **{option: value})


def test_xattention_stride_choices_and_block_match():
    with pytest.raises(ValueError, match=r"stride: expected one of \(1, 2, 4, 8, 16, 32, 64\), got 3"):
        patterns.select("xattention", Q, K, block_size=(16, 16), stride=3)
    with pytest.raises(ValueError, match=r"block_size: expected multiples of 32 \(the stride\), got \(16, 16\)"):
        patterns.select("xattention", Q, K, block_size=(16, 16), stride=32)
    with pytest.raises(ValueError, match=r"block_size: expected block_q == block_k \(square blocks\), got \(32, 16\)"):
        patterns.select("xattention", Q, K, block_size=(32, 16), stride=4)


@pytest.mark.parametrize("name", ["dense", "streaming", "power", "oracle", "xattention", "block_max"])
def test_unsupported_block_size(name):
    with pytest.raises(ValueError, match=r"block_size: expected \(block_q, block_k\) with each in \(16, 32, 64"):
        patterns.select(name, Q, K, block_size=(48, 48))


def test_block_max_options():
    cal = calibrate_block_max([(Q, K)], top_k=1, block_size=(16, 16))
    with pytest.raises(ValueError, match=r"block_size: expected \(16, 16\) \(from the calibration\), got \(32, 16\)"):
        patterns.select("block_max", Q, K, block_size=(32, 16), calibration=cal)
    with pytest.raises(ValueError, match=r"one of calibration, threshold, top_k; got \['calibration', 'top_k'\]"):
        patterns.select("block_max", Q, K, block_size=(16, 16), calibration=cal, top_k=3)
    with pytest.raises(ValueError, match=r"top_k: expected an int >= 1, got 0"):
        patterns.select("block_max", Q, K, block_size=(16, 16), top_k=0)
    with pytest.raises(ValueError, match=r"threshold: expected a float logit or a float tensor \(2,\)"):
        patterns.select("block_max", Q, K, block_size=(16, 16), threshold=torch.zeros(3))
    with pytest.raises(ValueError, match=r"samples: expected a non-empty list of \(q, k\) pairs"):
        calibrate_block_max([])


@pytest.mark.parametrize(
    "name,option,value,msg",
    [
        ("streaming", "local_tokens", 0, r"local_tokens: expected an int >= 1, got 0"),
        ("streaming", "sink_tokens", -1, r"sink_tokens: expected an int >= 0, got -1"),
        ("sliding_window", "window", 0, r"window: expected an int >= 1, got 0"),
        ("power", "max_power", -1, r"max_power: expected an int >= 0, got -1"),
        ("oracle", "heads", "group", r"heads: expected one of \('q', 'kv'\), got 'group'"),
        ("xattention", "heads", "all", r"heads: expected one of \('q', 'kv'\), got 'all'"),
        ("streaming", "causal", False, r"streaming: only causal prefill is supported"),
        ("dense", "causal", "yes", r"causal: expected True or False, got 'yes'"),
    ],
)
def test_other_options(name, option, value, msg):
    err = NotImplementedError if "only causal" in msg else ValueError
    with pytest.raises(err, match=msg):
        patterns.select(name, Q, K, block_size=(16, 16), **{option: value})


def test_bad_tensors():
    with pytest.raises(TypeError, match=r"q: expected a torch.Tensor, got list"):
        patterns.select("dense", [1], K)
    with pytest.raises(ValueError, match=r"k: expected shape \(1, num_kv_heads, seq_len_k, 16\)"):
        patterns.select("xattention", Q, torch.zeros(1, 1, 64, 8), block_size=(16, 16), stride=4)
    with pytest.raises(ValueError, match=r"q: expected num_heads a multiple of k's num_kv_heads=2, got 3"):
        patterns.select("oracle", torch.zeros(1, 3, 64, 16), torch.zeros(1, 2, 64, 16))


def test_common_helpers_reject_bad_values():
    with pytest.raises(ValueError, match=r"num_kv_heads: expected a divisor of 4 \(query heads\), got 3"):
        sel.group_heads(torch.zeros(1, 4, 2, 2, dtype=torch.bool), 3)
    with pytest.raises(ValueError, match=r"reduce: expected one of \('union', 'vote'\), got 'max'"):
        sel.group_heads(torch.zeros(1, 4, 2, 2, dtype=torch.bool), 2, reduce="max")


SCALED = [n for n in patterns.available() if "scale" in patterns.options_of(n)]
WITH_BACKEND = [n for n in patterns.available() if "backend" in patterns.options_of(n)]


def test_the_scaled_and_backend_patterns_are_found():
    assert {"xattention", "flexprefill", "vertical_slash", "oracle", "permuted", "block_max"} <= set(SCALED)
    assert "flexprefill" in WITH_BACKEND


@pytest.mark.parametrize("name", SCALED)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 0, 0.0, -0.125])
def test_scale_must_be_finite_and_positive(name, value):
    with pytest.raises(ValueError, match=rf"{name}: scale: expected a finite float > 0 or None, got {value!r}"):
        patterns.select(name, Q, K, block_size=(16, 16), scale=value)


@pytest.mark.parametrize("name", SCALED)
def test_scale_of_the_wrong_type(name):
    with pytest.raises(TypeError, match=rf"{name}: scale: expected a finite float > 0 or None, got str '0.1'"):
        patterns.select(name, Q, K, block_size=(16, 16), scale="0.1")


@pytest.mark.parametrize("name", SCALED)
def test_a_valid_scale_is_taken(name):
    patterns.select(name, Q, K, block_size=(16, 16), scale=0.25)


@pytest.mark.parametrize("name", WITH_BACKEND)
@pytest.mark.parametrize("value", ["cuda", "", None, 1])
def test_backend_must_be_a_known_one(name, value):
    with pytest.raises(
        ValueError,
        match=rf"{name}: backend: expected one of \('auto', 'triton', 'torch'\), "
        rf"got {value!r}",
    ):
        patterns.select(name, Q, K, block_size=(16, 16), backend=value)
