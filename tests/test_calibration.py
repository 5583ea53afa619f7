"""Threshold calibration: the bisection reaches the target (and no lower value does), files round-trip and are
checked against the model, ``patch(calibration=...)`` applies them, ``sparseflash calibrate`` rejects bad input."""

from __future__ import annotations

import json

import pytest
import torch

import sparseflash
from sparseflash import calibration as C
from sparseflash.cli import main
from sparseflash.integrations.hf import patch_state
from sparseflash.metrics import attention_recall

TARGET = 0.9
BLOCK = 32
ITER = 6
NOTCH = 2.0**-ITER


@pytest.fixture(scope="module")
def cal(tiny_random):
    model, tok = tiny_random.model, tiny_random.tokenizer
    return C.calibrate(model, tok, "xattention", target_recall=TARGET, length=512, block_size=BLOCK, iterations=ITER)


@pytest.fixture
def cal_file(cal, tmp_path):
    return cal.save(tmp_path / "sub" / "cal.json")


def _qk(seed=0, seq=512):
    """q (1, 4, seq, 16) with one temperature per head (sharper attention on later heads), k (1, 2, seq, 16)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 4, seq, 16, generator=g) * torch.tensor([0.5, 1.5, 3.0, 6.0])[None, :, None, None]
    return q, torch.randn(1, 2, seq, 16, generator=g)


# ---------------------------------------------------------------------------------------- the bisection
def test_xattention_per_head_bisection_reaches_target_and_is_tight():
    q, k = _qk()
    scale = 16**-0.5
    entry = C.calibrate_layer(
        q, k, "xattention", target_recall=TARGET, scale=scale, block_size=(BLOCK, BLOCK), iterations=ITER
    )
    assert len(entry.value) == 4 and len(set(entry.value)) > 1  # the heads differ
    opts = dict(block_size=(BLOCK, BLOCK), scale=scale)
    layout = sparseflash.patterns.select("xattention", q, k, threshold=entry.value, **opts)
    exact = attention_recall(q, k, layout, per_head=True, scale=scale)
    torch.testing.assert_close(torch.tensor(entry.recall, dtype=torch.float64), exact.cpu(), atol=1e-9, rtol=0)
    for h, (v, r, ok) in enumerate(zip(entry.value, entry.recall, entry.reached, strict=True)):
        assert (ok and r >= TARGET) or (not ok and v == 1.0), (h, v, r, ok)
    # one notch lower: every head that could go lower misses the target
    lower = [max(v - NOTCH, 0.0) for v in entry.value]
    below = attention_recall(
        q, k, sparseflash.patterns.select("xattention", q, k, threshold=lower, **opts), per_head=True, scale=scale
    )
    movable = [h for h, v in enumerate(entry.value) if v > NOTCH and entry.reached[h]]
    assert movable and all(below[h] < TARGET for h in movable)


def test_per_layer_bisection_on_the_mean_over_heads():
    q, k = _qk(1)
    opts = dict(block_size=(BLOCK, BLOCK), scale=16**-0.5, min_budget=BLOCK)
    entry = C.calibrate_layer(
        q,
        k,
        "flexprefill",
        target_recall=TARGET,
        scale=opts["scale"],
        block_size=(BLOCK, BLOCK),
        options={"min_budget": BLOCK},
        iterations=ITER,
    )
    assert isinstance(entry.value, float) and entry.reached and entry.recall >= TARGET
    recall = attention_recall(
        q, k, sparseflash.patterns.select("flexprefill", q, k, gamma=entry.value, **opts), scale=opts["scale"]
    )
    assert recall == pytest.approx(entry.recall, abs=1e-9)
    lower = attention_recall(
        q, k, sparseflash.patterns.select("flexprefill", q, k, gamma=entry.value - NOTCH, **opts), scale=opts["scale"]
    )
    assert lower < TARGET


def test_unreachable_target_records_one_and_flags_it():
    q, k = _qk(2)
    capped = {"min_budget": BLOCK, "max_budget": BLOCK, "tau": 0.0}  # one vertical + one slash block at most
    entry = C.calibrate_layer(
        q, k, "flexprefill", target_recall=0.99, scale=0.25, block_size=(BLOCK, BLOCK), options=capped, iterations=2
    )
    assert entry.value == 1.0 and entry.reached is False and entry.recall < 0.99
    entry = C.calibrate_layer(
        q,
        k,
        "permuted",
        target_recall=0.8,
        scale=0.25,
        block_size=(BLOCK, BLOCK),
        options={"segment_size": 64},
        iterations=2,
    )
    assert entry.reached is True and entry.recall >= 0.8 and entry.value in (0.25, 0.5, 0.75, 1.0)


# ---------------------------------------------------------------------------------------- files
def test_round_trip_and_patch_applies_per_head_thresholds(tiny_random, cal, cal_file):
    model, tok = tiny_random.model, tiny_random.tokenizer
    assert cal.method == "xattention" and cal.per_head and [e.layer for e in cal.layers] == [0, 1]
    assert cal.calibration_text["tokens"] == 512 and cal.model["num_heads"] == 4
    loaded = sparseflash.load_calibration(cal_file)
    assert loaded.to_dict() == json.loads(json.dumps(cal.to_dict()))
    ids = tok("Ruth said, Intreat me not to leave thee. " * 8, return_tensors="pt")["input_ids"]
    with sparseflash.patched(
        model,
        "xattention",
        calibration=str(cal_file),
        block_size=(BLOCK, BLOCK),
        min_sparse_len=0,
        dense_last_queries=0,
    ):
        plans = patch_state(model).plans
        for e in cal.layers:
            assert plans[e.layer].options["threshold"] == e.value
            assert plans[e.layer].options["block_size"] == (BLOCK, BLOCK)
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        assert torch.isfinite(logits).all() and patch_state(model).calls["sparse"] == 2


def test_patch_keeps_dense_layers_and_other_methods(tiny_random, cal):
    model = tiny_random.model
    with sparseflash.patched(model, "xattention", calibration=cal, dense_layers=(i for i in [0])):
        assert patch_state(model).plans[0].method == "dense"
        assert patch_state(model).plans[1].options["threshold"] == cal.layers[1].value
    with sparseflash.patched(model, "xattention", calibration=cal, layer_options={-1: "dense", 0: {"stride": 8}}):
        plans = patch_state(model).plans
        assert plans[1].method == "dense" and plans[0].options["stride"] == 8
        assert plans[0].options["threshold"] == cal.layers[0].value


def test_eval_method_option_passes_calibration(tiny_random, cal_file):
    from sparseflash.eval.methods import check_method, use_method

    model = tiny_random.model
    check_method("xattention", {"calibration": str(cal_file)})
    with use_method(model, "xattention", {"calibration": str(cal_file)}):
        assert isinstance(patch_state(model).plans[0].options["threshold"], list)


@pytest.mark.parametrize(
    "layer_options,message",
    [
        ({0: {"threshold": 0.5}}, r"layer_options\[0\]: sets \['threshold'\], which the calibration also sets"),
        ({-1: {"target_recall": 0.5}}, r"layer_options\[-1\]: sets \['target_recall'\]"),
    ],
)
def test_explicit_layer_options_conflict(tiny_random, cal, layer_options, message):
    with pytest.raises(ValueError, match=message):
        sparseflash.patch(tiny_random.model, "xattention", calibration=cal, layer_options=layer_options)
    assert not sparseflash.is_patched(tiny_random.model)


def test_global_target_recall_conflicts(tiny_random, cal):
    with pytest.raises(ValueError, match="target_recall: conflicts with calibration"):
        sparseflash.patch(tiny_random.model, "xattention", calibration=cal, target_recall=0.9)


def _edit(data, path, value):
    *keys, last = path
    for key in keys:
        data = data[key]
    data[last] = value


@pytest.mark.parametrize(
    "path,value,message",
    [
        (("version",), 3, r"calibration: version: expected one of \[1, 2\], got 3"),
        (("format",), "other", r"calibration: format: expected 'sparseflash-calibration'"),
        (("method",), "bogus", r"calibration: method: expected one of"),
        (("option",), "gamma", r"calibration: option/per_head: expected 'threshold'/True for method 'xattention'"),
        (("model", "num_layers"), "two", r"calibration: model.num_layers: expected a positive int"),
        (("layers", 0, "value"), [0.5], r"calibration: layers\[0\].value: expected a list of 4 values"),
        (("layers", 1, "layer"), 0, r"calibration: layers\[1\].layer: expected a new layer index in \[0, 2\)"),
        (("layers", 0, "recall"), [2.0, 1, 1, 1], r"calibration: layers\[0\].recall\[0\]: expected a number"),
        (("target_recall",), None, r"calibration: target_recall: expected a number"),
    ],
)
def test_malformed_file_names_the_field(cal, tmp_path, path, value, message):
    data = cal.to_dict()
    _edit(data, path, value)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        sparseflash.load_calibration(bad)


def test_not_json(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        sparseflash.load_calibration(bad)
    with pytest.raises(TypeError, match="calibration: expected a path or a sparseflash.calibration.Calibration"):
        C.as_calibration(3)


@pytest.mark.parametrize(
    "key,value,message",
    [
        (
            "num_layers",
            24,
            r"made for 24 layers / 4 heads / 2 KV heads / head_dim 16 / method 'xattention', "
            r"model has 2 layers / 4 heads",
        ),
        ("num_heads", 14, r"made for 2 layers / 14 heads .* model has 2 layers / 4 heads"),
        ("num_kv_heads", 1, r"1 KV heads .* model has .* 2 KV heads"),
    ],
)
def test_file_for_another_model_is_refused(tiny_random, cal, tmp_path, key, value, message):
    data = cal.to_dict()
    data["model"][key] = value
    if key == "num_heads":
        for entry in data["layers"]:
            for field in ("value", "recall", "density", "reached"):
                entry[field] = entry[field][:1] * value
    path = tmp_path / "other.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        sparseflash.patch(tiny_random.model, "xattention", calibration=path)


def test_file_for_another_method_is_refused(tiny_random, cal_file):
    with pytest.raises(ValueError, match="calibration: made for method 'xattention', got method 'flexprefill'"):
        sparseflash.patch(tiny_random.model, "flexprefill", calibration=cal_file)
    with pytest.raises(ValueError, match="got method 'dense'"):
        sparseflash.patch(tiny_random.model, "dense", calibration=cal_file)


def test_block_max_keeps_its_own_calibration_option():
    own = object()
    options = {"calibration": own}
    assert C.pop_calibration("block_max", options) is None and options == {"calibration": own}


# ---------------------------------------------------------------------------------------- the command
def _no_model(*args, **kwargs):
    raise AssertionError("the model must not load before the arguments are checked")


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--target-recall", "1.5"], "--target-recall: expected a float in (0, 1), got 1.5"),
        (["--target-recall", "0"], "--target-recall: expected a float in (0, 1)"),
        (["--target-recall", "abc"], "argument --target-recall: invalid float value"),
        (["--method", "vertical_slash"], "--method: expected one of ['flexprefill', 'permuted', 'xattention']"),
        (["--length", "128"], "--length: expected >= 256 tokens, got 128"),
        (["--length", "lots"], "--length: expected an integer"),
        (["--out", "."], "--out: expected a JSON file path, got the folder '.'"),
        (["--model", "/no/such/model"], "--model: model: path '/no/such/model' does not exist"),
    ],
)
def test_calibrate_bad_input_exits_2_before_loading(monkeypatch, capsys, argv, message):
    monkeypatch.setattr("sparseflash.eval.model.load_model", _no_model)
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", "--model", "tiny-random", "--device", "cpu", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "usage: sparseflash calibrate" in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1


def test_calibrate_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["calibrate", "--help"])
    text = capsys.readouterr().out
    for opt in (
        "--model",
        "--method",
        "--target-recall",
        "--length",
        "--seed",
        "--text-source",
        "--block-size",
        "--iterations",
        "--out",
        "--device",
        "--dtype",
    ):
        assert opt in text


def test_calibrate_command_writes_a_file_patch_accepts(tiny_random, tmp_path, capsys):
    out = tmp_path / "c.json"
    argv = [
        "calibrate",
        "--model",
        "tiny-random",
        "--device",
        "cpu",
        "--method",
        "permuted",
        "--length",
        "256",
        "--block-size",
        "32",
        "--iterations",
        "3",
        "--target-recall",
        "0.8",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    assert "layer   1" in capsys.readouterr().out
    loaded = sparseflash.load_calibration(out)
    assert loaded.method == "permuted" and loaded.option == "threshold" and not loaded.per_head
    assert loaded.model["name"] == "tiny-random" and loaded.calibration_text["tokens"] == 256
    with sparseflash.patched(tiny_random.model, "permuted", calibration=out, block_size=(32, 32), segment_size=64):
        assert patch_state(tiny_random.model).plans[1].options["threshold"] == loaded.layers[1].value
