"""Bad command-line input: exit code 2 and a one-line message naming the flag, before any model loads."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from sparseflash.cli import main


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading a model (the eval loader or the offline catalogue's) fails the test."""
    import sparseflash.eval.model as model_mod
    import sparseflash.eval.tiny as tiny_mod

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(model_mod, "load_model", refuse)
    monkeypatch.setattr(tiny_mod, "tiny_random_model", refuse)
    models = pytest.importorskip("sparseflash.integrations.models")
    for name in ("load", "load_model"):
        if hasattr(models, name):
            monkeypatch.setattr(models, name, refuse)


def _expect_usage_error(argv, flag, capsys, expected=None, *, loaded=False):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    cmd = argv[0]
    # usage first, then exactly one error line, the last one, starting with the flag
    assert lines[0].startswith(f"usage: sparseflash {cmd}")
    assert lines[-1].startswith(f"sparseflash {cmd}: error: {flag}"), lines[-1]
    assert sum("error:" in line for line in lines) == 1
    if expected:
        assert expected in lines[-1]
    assert loaded or "sparseflash eval: model" not in captured.out  # the run never started
    return lines[-1]


MODEL = ["--model", "tiny-random"]
GOOD_CASE = {
    "model": "m",
    "task": "passkey",
    "method": "sdpa",
    "length": 1024,
    "seed": 1,
    "depth": 50.0,
    "score": 1.0,
    "baseline": "sdpa",
}


@pytest.mark.parametrize(
    "argv,flag,expected",
    [
        (["eval", "--device", "bogus"], "--device", "expected 'auto', 'cpu' or 'cuda[:i]', got 'bogus'"),
        (
            ["eval", "-O", "xattention.threshold=abc"],
            "--method-option",
            "threshold: expected a float in (0, 1], got 'abc'",
        ),
        (
            ["eval", "-O", "xattention.threshold=1.5"],
            "--method-option",
            "threshold: expected a float in (0, 1], got 1.5",
        ),
        (
            ["eval", "-O", "xattention.min_sparse_len=-5"],
            "--method-option",
            "min_sparse_len: expected an int >= 0, got -5",
        ),
        (
            ["eval", "-O", "xattention.dense_layers=7"],
            "--method-option",
            "dense_layers: expected an iterable of layer indices, got 7",
        ),
        (["eval", "-O", "xattention.block_size=48"], "--method-option", "block_size: expected"),
        (
            ["eval", "-O", "xattention.dense_last_queries=-1"],
            "--method-option",
            "dense_last_queries: expected an int >= 0, got -1",
        ),
        (
            ["eval", "-O", "xattention.approximate_dropped=3"],
            "--method-option",
            "approximate_dropped: expected True, False or a power of two >= 1 (keys per pooled token), got 3",
        ),
        (["eval", "-O", "xattention.scale=NaN"], "--method-option", "scale: expected a finite float > 0"),
        (
            ["eval", "-O", 'flexprefill.backend="cuda"', "--methods", "flexprefill"],
            "--method-option",
            "backend: expected one of",
        ),
        (
            ["eval", "-O", "xattention.calibration=/no/such/calibration.json"],
            "--method-option",
            "calibration: expected a readable file written by `sparseflash calibrate`",
        ),
        (["eval", "--lengths", "64"], "--lengths", "expected lengths >= "),
        (["eval", "--lengths", "300", "--tasks", "passkey,niah_single"], "--lengths", "task niah_single"),
        (["eval", "--methods", ","], "--methods", "expected one or more comma-separated method names, got ','"),
        (["bench", "--methods", ","], "--methods", "expected one or more"),
        (["bench", "--repeats", "0"], "--repeats", "expected an int >= 1, got 0"),
        (["bench", "--heads-q", "3", "--heads-kv", "2"], "--heads-q", "expected a multiple of --heads-kv=2"),
        (["bench", "--head-dim", "7"], "--head-dim", "expected a multiple of 8 in [16, 256], got 7"),
        (["bench", "--device", "tpu"], "--device", "got 'tpu'"),
    ],
)
def test_bad_input_exits_2_before_loading(argv, flag, expected, capsys, no_model_load, tmp_path):
    _expect_usage_error(argv + MODEL + ["--out", str(tmp_path / "out")], flag, capsys, expected)


def test_lengths_minimum_is_the_real_one(capsys, no_model_load, tmp_path):
    """The minimum in the message is the shortest length that builds: just below it fails, at it the checks
    pass (and the run would start: here the refused loader ends it)."""
    msg = _expect_usage_error(["eval", "--lengths", "64", "--tasks", "passkey", *MODEL], "--lengths", capsys)
    need = int(msg.split(">= ")[1].split(" ")[0])
    assert 64 < need < 1024
    _expect_usage_error(["eval", "--lengths", str(need - 1), "--tasks", "passkey", *MODEL], "--lengths", capsys)
    with pytest.raises(AssertionError, match="a model was loaded"):
        main(["eval", "--lengths", str(need), "--tasks", "passkey", "--out", str(tmp_path / "o"), *MODEL])


def test_cuda_on_a_cpu_only_torch(monkeypatch, capsys, no_model_load):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for cmd in ("eval", "bench", "calibrate"):
        _expect_usage_error([cmd, "--device", "cuda", *MODEL], "--device", capsys, "sees no CUDA device")


def test_out_is_an_existing_file_or_unwritable(tmp_path, capsys, no_model_load):
    afile = tmp_path / "afile"
    afile.write_text("x")
    _expect_usage_error(["eval", "--out", str(afile), *MODEL], "--out", capsys, "got the existing file")
    _expect_usage_error(["eval", "--out", str(afile / "sub"), *MODEL], "--out", capsys, "expected a writable folder")
    _expect_usage_error(["bench", "--out", str(afile), *MODEL], "--out", capsys, "got the existing file")
    results = tmp_path / "res"
    results.mkdir()
    (results / "cases.jsonl").write_text(json.dumps(GOOD_CASE) + "\n")
    _expect_usage_error(["plot", str(results), "--out", str(afile)], "--out", capsys, "got the existing file")
    # a results folder whose cases.jsonl does not read back
    (results / "cases.jsonl").write_text("{broken\n{}\n")
    _expect_usage_error(["eval", "--out", str(results), *MODEL], "--out", capsys, "not valid JSON")


def test_plot_cases_with_missing_keys(tmp_path, capsys):
    bad = {k: v for k, v in GOOD_CASE.items() if k != "length"}
    path = tmp_path / "cases.jsonl"
    path.write_text(json.dumps(GOOD_CASE) + "\n" + json.dumps(bad) + "\n")
    line = _expect_usage_error(["plot", str(path)], "results", capsys, "case 2")
    assert "missing ['length']" in line


def test_layer_range_is_checked_after_loading_and_says_so(tmp_path, capsys):
    """Layer indices can only be checked against the model: after the load, still before any case runs."""
    out = tmp_path / "out"
    line = _expect_usage_error(
        [
            "eval",
            *MODEL,
            "--methods",
            "xattention",
            "-O",
            "xattention.dense_layers=[7]",
            "--lengths",
            "512",
            "--depths",
            "50",
            "--out",
            str(out),
        ],
        "--method-option",
        capsys,
        loaded=True,
    )
    assert "expected layer indices in [-2, 2), got 7" in line and "checked after loading the model" in line
    assert not out.exists()


def test_real_exit_code_through_python_dash_m(tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "sparseflash",
            "eval",
            "--model",
            "tiny-random",
            "-O",
            "xattention.threshold=1.5",
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("sparseflash eval: error: --method-option: xattention: threshold: expected a float")
    assert "sparseflash eval: model" not in res.stdout and not (tmp_path / "o").exists()
