"""The pattern benchmark's non-GPU parts: argument checks, rows, JSON and plot on a CPU smoke run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_patterns  # noqa: E402


def test_cpu_smoke_writes_rows_json_and_plot(tmp_path, capsys):
    rows = bench_patterns.main(
        ["--cpu-smoke", "--seqlens", "256", "--methods", "streaming", "oracle", "--out", str(tmp_path)]
    )
    doc = json.loads((tmp_path / "patterns_cpu_smoke.json").read_text())
    assert doc["benchmark"] == "patterns" and doc["rows"] == json.loads(json.dumps(rows))
    main_rows = {r["method"]: r for r in rows if r["method"] != "oracle_sweep"}
    for field in ("select_ms", "attn_ms", "dense_ms", "density", "recall", "seqlen", "source", "impl"):
        assert field in main_rows["streaming"]
    assert main_rows["streaming"]["oracle_recall"] >= main_rows["streaming"]["recall"] - 1e-6
    sweep = [r for r in rows if r["method"] == "oracle_sweep"]
    assert len(sweep) == len(bench_patterns.ORACLE_SWEEP) and sweep[-1]["recall"] == pytest.approx(1.0)
    assert (tmp_path / "patterns_cpu_smoke.png").stat().st_size > 0
    assert "total_vs_dense" in capsys.readouterr().out.splitlines()[-3]


def test_unknown_method_is_refused():
    with pytest.raises(SystemExit):
        bench_patterns.parse_args(["--methods", "nope"])


def test_captured_qk_and_method_options_reach_the_selection(tmp_path):
    import capture_qk
    import torch

    files = capture_qk.main(["--model", "tiny-random", "--length", "300", "--layers", "-1", "--out", str(tmp_path)])
    assert [f.name for f in files] == ["qk_tiny-random_L1.pt"]
    saved = torch.load(files[0], weights_only=True)
    assert saved["q"].shape == (1, 4, 300, 16) and saved["k"].shape == (1, 2, 300, 16) and "layer 1" in saved["source"]
    argv = ["--cpu-smoke", "--seqlens", "256", "--qk", str(files[0]), "--methods", "streaming", "--out", str(tmp_path)]
    rows = bench_patterns.main([*argv, "--options", '{"streaming": {"sink_tokens": 32, "local_tokens": 32}}'])
    assert rows[0]["options"] == {"sink_tokens": 32, "local_tokens": 32} and "layer 1" in rows[0]["source"]
    assert rows[0]["sdpa_flash_ms"] is None  # CPU: no SDPA flash timing
    with pytest.raises(SystemExit):
        bench_patterns.parse_args(["--options", '["not", "an", "object"]'])
