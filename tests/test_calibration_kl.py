"""KL calibration: the allocation is the exact optimum of its table, files of the KL objective round-trip and
patch as they say (per-layer values, dense layers, the options they were measured with), the stored table
re-allocates, ``sparseflash calibrate --target-kl`` checks its input before loading anything."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

import sparseflash
from sparseflash.calibration_file import Calibration
from sparseflash.calibration_kl import Sensitivity, allocate, calibrate_kl, reallocate
from sparseflash.cli import main
from sparseflash.eval.engine import kl_per_row
from sparseflash.integrations.hf import patch_state

BLOCK = 32
OPTIONS = {"block_size": BLOCK, "local_blocks": 1, "stride": 4, "dense_last_queries": 16}


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 250, (1, 512), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def cal(tiny_random, ids):
    model = tiny_random.model
    # 1.0 keeps every block (work density 1: a layer left there is made dense by the allocation)
    return calibrate_kl(model, ids, "xattention", target_kl=1.0, values=[0.3, 1.0], options=OPTIONS, window=64)


def _log_probs(model, ids):
    """float32 (64, vocab) next-token log-probabilities of the last 64 positions."""
    with torch.inference_mode():
        return torch.log_softmax(model(input_ids=ids, use_cache=False, logits_to_keep=64).logits[0].float(), -1)


def _brute(table: Sensitivity, target: float) -> float:
    best = float("inf")
    excess = table.excess()
    for pick in itertools.product(range(len(table.values) + 1), repeat=len(table.layers)):
        kl = sum(0.0 if j == 0 else excess[i][j - 1] for i, j in enumerate(pick))
        if kl <= target:
            best = min(best, sum(1.0 if j == 0 else table.density[i][j - 1] for i, j in enumerate(pick)))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_allocation_is_the_optimum_of_its_table(seed):
    rng = random.Random(seed)
    layers, values = rng.randint(1, 4), [0.5, 0.8, 0.95]
    kl = [sorted((rng.uniform(0, 0.01) for _ in values), reverse=True) for _ in range(layers)]
    dens = [sorted(rng.uniform(0.05, 0.9) for _ in values) for _ in range(layers)]
    table = Sensitivity(list(range(layers)), values, kl, dens, 64)
    target = rng.uniform(0.001, 0.02)
    choice = allocate(table, target)
    excess = table.excess()
    assert all(row[-1] == 0.0 and min(row) >= 0.0 for row in excess)  # the largest value is the floor
    spent = sum(0.0 if v is None else excess[i][values.index(v)] for i, v in enumerate(choice))
    mean = sum(1.0 if v is None else dens[i][values.index(v)] for i, v in enumerate(choice))
    assert spent <= target
    # the KL is rounded up to target/2000 units: the optimum may only be missed by what that rounding excludes
    assert mean <= _brute(table, target * (1 - layers / 2000)) + 1e-12
    assert mean >= _brute(table, target) - 1e-12


def test_allocation_extremes_and_bad_target():
    # floors (KL at the largest value): 0.1 and 0.05; excess at 0.5: 0.1 and 0.25; at 0.9 and 1.0: 0 or less
    table = Sensitivity(
        [3, 5], [0.5, 0.9, 1.0], [[0.2, 0.09, 0.1], [0.3, 0.05, 0.05]], [[0.2, 0.4, 1.0], [0.1, 0.3, 1.0]], 64
    )
    assert [x for row in table.excess() for x in row] == pytest.approx([0.1, 0.0, 0.0, 0.25, 0.0, 0.0])
    assert allocate(table, 1e-6) == [0.9, 0.9]  # at the floor: free
    assert allocate(table, 10.0) == [0.5, 0.5]
    assert allocate(table, 0.11) == [0.5, 0.9]
    assert allocate(table, 0.26) == [0.9, 0.5]
    no_floor = Sensitivity([0], [0.5, 1.0], [[0.2, 0.0]], [[0.2, 1.0]], 64)
    assert allocate(no_floor, 0.1) == [None]  # 1.0 and dense cost the same KL: dense (density 1 either way)
    for bad in (0, -1.0, float("inf"), True, "0.1"):
        with pytest.raises(ValueError, match="target_kl: expected a positive number"):
            allocate(table, bad)


def test_measured_kl_is_that_of_the_layer_alone(tiny_random, ids, cal):
    model = tiny_random.model
    table = Sensitivity.from_dict(cal.objective)
    assert table.layers == [0, 1] and table.values == [0.3, 1.0] and table.dense_kl == 0.0
    assert all(0 < d <= 1 for row in table.density for d in row)

    with sparseflash.patched(model, "dense"):
        ref = _log_probs(model, ids)
    with sparseflash.patched(model, "xattention", dense_layers=[0], min_sparse_len=0, threshold=0.3, **OPTIONS):
        kl = float(kl_per_row(ref, _log_probs(model, ids)).mean())
    assert kl == pytest.approx(table.kl[1][0], rel=1e-5, abs=1e-9)


def test_file_round_trip_and_patch_applies_values_dense_layers_and_options(tiny_random, cal, tmp_path):
    model = tiny_random.model
    assert cal.target_recall is None and cal.objective["kind"] == "kl"
    assert cal.objective["patch_options"] == {"dense_last_queries": 16}
    assert cal.options == {"block_size": BLOCK, "local_blocks": 1, "stride": 4} and cal.block_size == (BLOCK, BLOCK)
    assert all(e.recall is None and e.kl is not None for e in cal.layers)
    path = cal.save(tmp_path / "kl.json")
    loaded = sparseflash.load_calibration(path)
    assert loaded.to_dict() == json.loads(json.dumps(cal.to_dict()))
    one = reallocate(loaded, min(r[0] for r in loaded.objective["kl"]) * 1.0001)  # one layer at 0.3
    assert len(one.layers) == 1 and len(one.dense_layers) == 1
    with sparseflash.patched(model, "xattention", calibration=one, min_sparse_len=0):
        plans = patch_state(model).plans
        layer = one.layers[0].layer
        assert plans[one.dense_layers[0]].method == "dense"
        assert plans[layer].options["threshold"] == one.layers[0].value
        assert plans[layer].options["stride"] == 4 and plans[layer].options["block_size"] == BLOCK
    with sparseflash.patched(model, "xattention", calibration=one, layer_options={one.dense_layers[0]: {}}):
        assert patch_state(model).plans[one.dense_layers[0]].method == "xattention"


def test_recall_calibrations_do_not_reallocate_and_fields_are_checked(cal, tmp_path):
    data = cal.to_dict()
    bad = {**data, "target_recall": 0.9}
    with pytest.raises(ValueError, match="target_recall: expected null in a file of the KL objective"):
        Calibration.from_dict(json.loads(json.dumps(bad)))
    bad = json.loads(json.dumps({**data, "dense_layers": [cal.layers[0].layer]}))
    with pytest.raises(ValueError, match="dense_layers: expected a list of uncalibrated layer indices"):
        Calibration.from_dict(bad)
    bad = json.loads(json.dumps({**data, "objective": {**data["objective"], "kl": [[0.1]]}}))
    with pytest.raises(ValueError, match="objective.kl: expected 2 rows of 2 values"):
        reallocate(Calibration.from_dict(bad), 0.1)
    recall = json.loads(json.dumps({**data, "objective": {}, "target_recall": 0.9}))
    for layer in recall["layers"]:
        layer["recall"], layer["kl"] = layer["density"], None
    parsed = Calibration.from_dict(recall)
    with pytest.raises(ValueError, match="expected a file of the KL objective"):
        reallocate(parsed, 0.1)
    recall["layers"][0]["kl"] = 0.1
    with pytest.raises(ValueError, match=r"layers\[0\].kl: expected null"):
        Calibration.from_dict(recall)
    recall["layers"][0]["kl"] = None
    assert Calibration.from_dict({**recall, "version": 1}).target_recall == 0.9


def _no_model(*args, **kwargs):
    raise AssertionError("the model must not load before the arguments are checked")


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--target-kl", "0"], "--target-kl: expected a positive number, got 0.0"),
        (["--target-kl", "0.1", "--kl-values", "0.5,x"], "--kl-values: expected comma-separated numbers"),
        (["--target-kl", "0.1", "--kl-values", "0.5,1.5"], "--kl-values: expected distinct numbers in (0, 1]"),
        (["--target-kl", "0.1", "--kl-window", "0", "--length", "512"], "--kl-window: expected an int in [1, "),
        (["--target-kl", "0.1", "--reallocate", "/no/such.json"], "--reallocate: "),
        (["--reallocate", "x.json"], "--reallocate: expected --target-kl with it"),
        (
            ["--target-kl", "0.1", "--kl-per-head", "--method", "permuted"],
            "--kl-per-head: expected --method xattention",
        ),
        (["--target-kl", "0.1", "-O", "stride"], "--option: expected KEY=VALUE, got 'stride'"),
        (["--target-kl", "0.1", "-O", "threshold=0.9"], "--option: threshold: not allowed here"),
        (["--target-kl", "0.1", "-O", "block_size=64"], "--option: block_size: not allowed here (use --block-size)"),
        (["--target-kl", "0.1", "-O", "stride=5"], "--option: xattention: stride: expected one of"),
        (
            ["--target-kl", "0.1", "-O", "approximate_dropped=3"],
            "--option: xattention: approximate_dropped: expected True, False or a power of two",
        ),
        (["--target-kl", "0.1", "-O", "bogus=1"], "--option: xattention: unknown option(s) ['bogus']"),
        (["-O", "stride=4"], "--option: expected --target-kl with it"),
        (["--target-kl", "0.1", "--reallocate", "x.json", "-O", "stride=4"], "--option: expected none with"),
    ],
)
def test_calibrate_kl_bad_input_exits_2_before_loading(monkeypatch, capsys, argv, message):
    monkeypatch.setattr("sparseflash.eval.model.load_model", _no_model)
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", "--model", "tiny-random", "--device", "cpu", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_calibrate_kl_command_and_reallocation(tmp_path, capsys, monkeypatch):
    out = tmp_path / "kl.json"
    argv = ["calibrate", "--model", "tiny-random", "--device", "cpu", "--length", "256", "--block-size", "32"]
    argv += ["--target-kl", "1.0", "--kl-values", "0.5,0.9", "--kl-window", "32", "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "layer   1: 0.5: KL" in text and "mean density" in text
    cal = sparseflash.load_calibration(out)
    assert cal.calibration_text["tokens"] == 256 and cal.objective["window"] == 32
    monkeypatch.setattr("sparseflash.eval.model.load_model", _no_model)
    again = tmp_path / "tight.json"
    assert main(["calibrate", "--target-kl", "1e-12", "--reallocate", str(out), "--out", str(again)]) == 0
    tight = sparseflash.load_calibration(again)
    assert tight.layers == [] and tight.dense_layers == [0, 1] and tight.objective["target_kl"] == 1e-12


def test_calibrate_kl_command_options_are_measured_and_stored(tmp_path, tiny_random):
    """-O options reach every measured run: pattern options go into the file (patch applies them with it), patch
    options into its objective."""
    out = tmp_path / "kl.json"
    argv = ["calibrate", "--model", "tiny-random", "--device", "cpu", "--length", "256", "--block-size", "32"]
    argv += ["--target-kl", "1.0", "--kl-values", "0.5,0.9", "--kl-window", "32", "--out", str(out)]
    argv += ["-O", "stride=4", "-O", "extra_blocks=1", "-O", "approximate_dropped=true", "-O", "dense_last_queries=0"]
    assert main(argv) == 0
    cal = sparseflash.load_calibration(out)
    assert cal.options == {"local_blocks": 1, "stride": 4, "block_size": 32, "extra_blocks": 1}
    assert cal.objective["patch_options"] == {"approximate_dropped": True, "dense_last_queries": 0}
    assert cal.layers and all(max(e.density) < 1 for e in cal.layers)  # measured sparse: the options took effect
    model = tiny_random.model
    sparseflash.patch(model, "xattention", calibration=out, approximate_dropped=True, min_sparse_len=0)
    try:
        plans = patch_state(model).plans
        assert {p.options["stride"] for p in plans.values() if p.method == "xattention"} == {4}
        assert {p.options["extra_blocks"] for p in plans.values() if p.method == "xattention"} == {1}
    finally:
        sparseflash.unpatch(model)


def test_per_head_table_measures_each_head_alone_and_allocates_per_head(tiny_random, ids):
    model = tiny_random.model
    values = [0.2, 1.0]
    cal = calibrate_kl(
        model, ids, "xattention", target_kl=1.0, values=values, options=OPTIONS, window=64, per_head=True
    )
    table = Sensitivity.from_dict(cal.objective)
    heads = model.config.num_attention_heads
    assert table.heads == list(range(heads)) * 2 and table.layers == [0] * heads + [1] * heads
    # a head at 1.0 is the layer's floor run (all heads at 1.0): one KL per layer, shared by its heads
    assert len({row[1] for row in table.kl[:heads]}) == 1
    # head 1 of layer 1 alone at 0.2 (the others at 1.0): the KL stored for that row
    with sparseflash.patched(model, "dense"):
        ref = _log_probs(model, ids)
    threshold = [1.0] * heads
    threshold[1] = 0.2
    with sparseflash.patched(model, "xattention", dense_layers=[0], min_sparse_len=0, threshold=threshold, **OPTIONS):
        lp = _log_probs(model, ids)
    assert float(kl_per_row(ref, lp).mean()) == pytest.approx(table.kl[heads + 1][0], rel=1e-5, abs=1e-9)
    # densities are the layouts' per head: lower at 0.2 than at 1.0 somewhere, never above 1
    assert all(0 < d <= 1 for row in table.density for d in row)
    assert any(row[0] < row[1] for row in table.density)
    # a generous budget takes 0.2 everywhere; a tiny one keeps every head at the floor value; no dense layers
    assert all(e.value == [0.2] * heads for e in cal.layers) and cal.dense_layers == []
    tight = reallocate(cal, 1e-12)
    assert [e.value for e in tight.layers] == [[1.0] * heads] * 2 and tight.dense_layers == []
    with sparseflash.patched(model, "xattention", calibration=cal, min_sparse_len=0):
        assert patch_state(model).plans[1].options["threshold"] == [0.2] * heads


def test_per_head_needs_a_per_head_method(tiny_random, ids):
    with pytest.raises(ValueError, match="per_head: expected False for method 'permuted'"):
        calibrate_kl(tiny_random.model, ids, "permuted", target_kl=1.0, values=[0.5], window=64, per_head=True)


def test_calibrate_kl_command_per_head_reports_the_mean_over_heads(tmp_path, capsys):
    out = tmp_path / "heads.json"
    argv = ["calibrate", "--model", "tiny-random", "--device", "cpu", "--length", "256", "--block-size", "32"]
    argv += ["--target-kl", "1.0", "--kl-values", "0.2,1.0", "--kl-window", "32", "--kl-per-head", "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    cal = sparseflash.load_calibration(out)
    assert "layer 1.3: 0.2: KL" in text and len(Sensitivity.from_dict(cal.objective).heads) == 8
    mean = sum(sum(e.density) / len(e.density) for e in cal.layers) / len(cal.layers)
    assert f"mean density {mean:.3f}" in text
