"""The ``sparseflash`` command: help for every option, clear errors with exit code 2, a CPU smoke run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_eval_results import TEST_METHOD  # registers the test pattern

from sparseflash.cli import build_parser, main, parse_lengths, parse_method_options

SUBCOMMANDS = ["eval", "bench", "plot", "models"]


def _sub(name):
    parser = build_parser()
    return {a.dest: a for a in parser._subparsers._group_actions}["cmd"].choices[name]


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_help_explains_every_option(name, capsys):
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for action in _sub(name)._actions:
        if action.help == "==SUPPRESS==":
            continue
        assert action.help, f"{name}: option {action.option_strings or action.dest} has no help"
        for opt in action.option_strings:
            assert opt in text


def test_top_level_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert all(s in out for s in SUBCOMMANDS)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["eval", "--tasks", "passkey,bogus"], "unknown task 'bogus'"),
        (["eval", "--methods", "nonexistent_method"], "unknown method 'nonexistent_method'"),
        (["eval", "--model", "/no/such/model/folder"], "path '/no/such/model/folder' does not exist"),
        (["eval", "--model", "missing.gguf"], "does not exist"),
        (["eval", "--model", "not-a-known-model"], "expected a local folder, a .gguf file or one of"),
        (["eval", "--lengths", "4k,abc"], "--lengths: expected integers"),
        (["eval", "--depths", "50,150"], "--depths: expected percentages in [0, 100]"),
        (["eval", "--methods", TEST_METHOD, "-O", "eval_test_local.colour=1"], "unknown option(s) ['colour']"),
        (["eval", "--methods", TEST_METHOD, "-O", "threshold=1"], "expected METHOD.KEY=VALUE"),
        (["eval", "--task-option", "colour=red"], "not taken by any of"),
        (["plot", "/no/such/results"], "expected a cases.jsonl file"),
        (["eval", "--samples", "0", "--model", "tiny-random"], "--samples: expected >= 1"),
        (["eval", "--batch-size", "0", "--model", "tiny-random"], "--batch-size: expected an integer >= 1, got 0"),
        (["eval", "--methods", TEST_METHOD, "-O", "sdpa.backend=torch"], "sdpa: takes no options"),
        (["eval", "--methods", "dense", "-O", "dense.threshold=0.9"], "dense: takes no pattern options"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv + ([] if "--model" in argv or argv[0] != "eval" else ["--model", "tiny-random"]))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "usage: sparseflash" in err


def test_unknown_subcommand_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["evaluate"])
    assert exc.value.code == 2


def test_option_parsers():
    assert parse_lengths("2k,1024,512,2048") == [512, 1024, 2048]
    assert parse_method_options(["a.x=0.9", "a.y=[1,2]", "b.z=text"]) == {
        "a": {"x": 0.9, "y": [1, 2]},
        "b": {"z": "text"},
    }


def test_eval_smoke_on_a_tiny_random_model(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "eval",
        "--model",
        "tiny-random",
        "--device",
        "cpu",
        "--methods",
        TEST_METHOD,
        "--tasks",
        "passkey,niah_single",
        "--lengths",
        "512",
        "--depths",
        "0,100",
        "--samples",
        "1",
        "--out",
        str(out),
        "--no-progress",
        "-O",
        f"{TEST_METHOD}.window=3",
        "--batch-size",
        "2",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "sparseflash eval" in printed and "summary.json" in printed and "batch size 2" in printed
    assert "[1/4] passkey 512 sdpa: " in printed and "[4/4] niah_single 512 eval_test_local: " in printed
    cases = [json.loads(x) for x in (out / "cases.jsonl").read_text().splitlines()]
    assert len(cases) == 8 and {c["method"] for c in cases} == {"sdpa", TEST_METHOD}
    assert all(c["options"] == {"window": 3} for c in cases if c["method"] == TEST_METHOD)
    assert {c["batch_size"] for c in cases} == {2}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "tiny-random" and len(summary["rows"]) == 4 and summary["baseline"] == "sdpa"
    assert summary["config"]["batch_size"] == 2
    assert {"heatmap_passkey.png", "heatmap_niah_single.png", "accuracy_vs_density.png", "speed_vs_length.png"} <= {
        p.name for p in out.iterdir()
    }
    # the same command again resumes: nothing new to run
    assert main(argv) == 0
    assert "0 to run" in capsys.readouterr().out
    assert len((out / "cases.jsonl").read_text().splitlines()) == 8
    # plot reads the folder alone
    for p in out.glob("*.png"):
        p.unlink()
    assert main(["plot", str(out)]) == 0
    assert (out / "heatmap_passkey.png").exists()


def test_models_lists_tiny(capsys):
    assert main(["models"]) == 0
    assert "tiny-random" in capsys.readouterr().out


def test_bench_kernel_on_cpu(tmp_path, capsys):
    argv = [
        "bench",
        "--part",
        "kernel",
        "--device",
        "cpu",
        "--methods",
        TEST_METHOD,
        "--lengths",
        "128",
        "--heads-q",
        "4",
        "--heads-kv",
        "2",
        "--head-dim",
        "16",
        "--repeats",
        "1",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    [path] = tmp_path.glob("patterns_*.json")
    data = json.loads(path.read_text())
    assert data["benchmark"] == "patterns" and {"gpu", "torch", "triton", "date", "command"} <= set(data)
    impls = {(r["method"], r["impl"]) for r in data["rows"]}
    assert impls == {("dense", "sdpa"), ("dense", "sparseflash"), (TEST_METHOD, "sparseflash")}
    row = next(r for r in data["rows"] if r["method"] == TEST_METHOD)
    assert 0 < row["density"] < 1 and row["select_ms"] >= 0 and row["attn_ms"] > 0
    assert (tmp_path / "kernel_speed.png").exists()


def test_python_dash_m_entry_point():
    res = subprocess.run(
        [sys.executable, "-m", "sparseflash", "eval", "--tasks", "nope"], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 2 and "unknown task 'nope'" in res.stderr


def test_ctrl_c_during_eval_reports_and_resumes(tmp_path, capsys, monkeypatch):
    """Ctrl-C after 2 cases: no traceback, the count of saved cases and the command that resumes, exit 130."""
    from sparseflash.eval.runner import Runner

    out = tmp_path / "run"
    argv = [
        "eval",
        "--model",
        "tiny-random",
        "--device",
        "cpu",
        "--methods",
        TEST_METHOD,
        "--tasks",
        "passkey",
        "--lengths",
        "512",
        "--depths",
        "0,100",
        "--out",
        str(out),
        "--no-progress",
        "--no-plots",
    ]
    original = Runner._run_unit
    done = []

    def interrupted_after_two(self, unit):
        if len(done) == 2:
            raise KeyboardInterrupt
        cases = original(self, unit)
        done.extend(cases)
        return cases

    monkeypatch.setattr(Runner, "_run_unit", interrupted_after_two)
    assert main(argv) == 130
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    assert f"interrupted: 2 cases saved in {out / 'cases.jsonl'}" in captured.err
    resume = captured.err.strip().splitlines()[-1].strip()
    assert resume == "sparseflash " + " ".join(argv)
    assert len((out / "cases.jsonl").read_text().splitlines()) == 2
    monkeypatch.setattr(Runner, "_run_unit", original)
    assert main(resume.split()[1:]) == 0  # the printed command resumes
    assert "(2 cases stored, 2 to run" in capsys.readouterr().out
    assert len((out / "cases.jsonl").read_text().splitlines()) == 4


@pytest.mark.slow
@pytest.mark.xfail(
    reason="known bug, open: on an idle machine the SIGINT sent after 'results:' is sometimes lost and the grid runs "
    "to its end (exit 0); the in-process Ctrl-C test above covers the handler",
    strict=False,
)
def test_ctrl_c_exit_code_through_python_dash_m(tmp_path):
    """The real process, sent SIGINT once the grid starts, exits 130 without a traceback."""
    import os
    import signal

    out = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sparseflash",
            "eval",
            "--model",
            "tiny-random",
            "--device",
            "cpu",
            "--methods",
            "dense",
            "--tasks",
            "passkey",
            "--lengths",
            "1024",
            "--depths",
            "0,50,100",
            "--samples",
            "40",  # 10x a grid that finished before the signal landed on an idle machine (exit 0)
            "--out",
            str(out),
            "--no-progress",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    for line in proc.stdout:  # wait until the grid starts
        if line.startswith("results:"):
            break
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted:" in stderr
    assert stderr.strip().splitlines()[-1].strip().startswith("sparseflash eval --model tiny-random")
