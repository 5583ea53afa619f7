"""The results store (resume, no duplicates, a half-written last line), the runner's resume, summary, plots."""

from __future__ import annotations

import json

import pytest
import torch

from sparseflash.eval.results import ResultsStore, case_key, read_cases
from sparseflash.eval.summary import summarize, t_interval, t_quantile95, wilson_interval, write_summary
from sparseflash.layouts import BlockLayout, causal_block_mask
from sparseflash.patterns.registry import available, register

TEST_METHOD = "eval_test_local"

if TEST_METHOD not in available():

    @register(TEST_METHOD, kind="static", heads="shared")
    def eval_test_local(q, k, *, block_size=(16, 16), causal=True, window=2):
        """Test pattern: first key block + the last ``window`` causal blocks of each query block."""
        sq, sk = q.shape[2], k.shape[2]
        allowed = causal_block_mask(sq, sk, block_size, causal=True, device=q.device)
        qb, kb = allowed.shape[-2:]
        i = torch.arange(qb, device=q.device)[:, None]
        j = torch.arange(kb, device=q.device)[None, :]
        keep = allowed & ((j == 0) | (i + (kb - qb) - j < window))
        return BlockLayout.from_dense(keep.reshape(1, 1, qb, kb), seq_len_q=sq, seq_len_k=sk, block_size=block_size)


def _case(method="sdpa", seed=1, score=1.0, **kw):
    return {
        "model": "m",
        "task": "passkey",
        "task_options": {},
        "method": method,
        "options": {},
        "length": 1024,
        "depth": 50.0,
        "seed": seed,
        "score": score,
        "density": 1.0 if method == "sdpa" else 0.25,
        "prefill_ms": 10.0 if method == "sdpa" else 4.0,
        "baseline": "sdpa",
        **kw,
    }


def test_store_appends_and_resumes(tmp_path):
    store = ResultsStore(tmp_path)
    store.append(_case(seed=1))
    store.append(_case(seed=2))
    again = ResultsStore(tmp_path)
    assert len(again) == 2 and again.done(_case(seed=1)) and not again.done(_case(seed=3))
    assert again.done(_case(seed=1, score=0.0))  # the key ignores the outcome fields
    with pytest.raises(ValueError, match="results: case already stored"):
        again.append(_case(seed=2))
    lines = (tmp_path / "cases.jsonl").read_text().splitlines()
    assert len(lines) == 2 and len({case_key(json.loads(x)) for x in lines}) == 2


def test_half_written_last_line_is_dropped_and_rerun(tmp_path):
    store = ResultsStore(tmp_path)
    store.append(_case(seed=1))
    line = json.dumps(_case(seed=2))
    with open(tmp_path / "cases.jsonl", "a") as f:
        f.write(line[: len(line) // 2])  # the crash: no newline, truncated JSON
    assert [c["seed"] for c in read_cases(tmp_path)] == [1]  # readers skip it
    store = ResultsStore(tmp_path)  # opening cuts it off
    assert len(store) == 1 and not store.done(_case(seed=2))
    store.append(_case(seed=2))
    assert [c["seed"] for c in read_cases(tmp_path / "cases.jsonl")] == [1, 2]
    assert (tmp_path / "cases.jsonl").read_text().count("\n") == 2


def test_corrupt_middle_line_is_an_error(tmp_path):
    (tmp_path / "cases.jsonl").write_text(json.dumps(_case(seed=1)) + "\n{oops\n" + json.dumps(_case(seed=2)) + "\n")
    with pytest.raises(ValueError, match="line 2 .* is not valid JSON"):
        read_cases(tmp_path)
    with pytest.raises(FileNotFoundError, match="expected a cases.jsonl file"):
        read_cases(tmp_path / "missing")


def test_wilson_interval():
    lo, hi = wilson_interval(0.5, 10)
    assert abs(lo - 0.2366) < 1e-3 and abs(hi - 0.7634) < 1e-3
    assert wilson_interval(1.0, 4)[1] == 1.0 and wilson_interval(1.0, 4)[0] == pytest.approx(0.5101, abs=1e-3)
    assert wilson_interval(0.0, 0) == (0.0, 1.0)


def test_summary_pairs_methods_with_the_baseline_on_the_same_prompts(tmp_path):
    cases = [
        _case("sdpa", 1, 1.0),
        _case("sdpa", 2, 0.0),
        _case("sdpa", 3, 1.0),
        _case("x", 1, 0.0),
        _case("x", 2, 1.0),
        _case("x", 3, 1.0),
        _case("x", 4, 1.0),
    ]  # seed 4: unpaired
    rows = {r["method"]: r for r in summarize(cases)}
    assert rows["sdpa"]["n"] == 3 and rows["sdpa"]["accuracy"] == pytest.approx(2 / 3)
    assert "wins" not in rows["sdpa"] and "speedup_vs_baseline" not in rows["sdpa"]
    x = rows["x"]
    assert x["n"] == 4 and x["accuracy"] == 0.75 and (x["wins"], x["losses"], x["ties"]) == (1, 1, 1)
    assert x["n_paired"] == 3 and x["speedup_vs_baseline"] == pytest.approx(2.5) and x["density"] == 0.25
    summary = write_summary(tmp_path, cases, "sparseflash eval --test")
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["benchmark"] == "eval" and on_disk["command"] == "sparseflash eval --test"
    for key in ("gpu", "torch", "triton", "date"):
        assert key in on_disk
    for row in on_disk["rows"]:
        assert {"model", "task", "seqlen", "method", "accuracy", "density", "n", "prefill_ms"} <= set(row)
    assert summary["rows"][0]["method"] == "sdpa" and on_disk["baseline"] == "sdpa"


def test_perplexity_rows_carry_ppl_and_the_paired_ratio():
    cases = [
        _case("sdpa", 1, None, ppl=10.0, ppl_last=9.0),
        _case("x", 1, None, ppl=12.0, ppl_last=9.9),
        _case("sdpa", 2, None, ppl=20.0, ppl_last=10.0),
        _case("x", 2, None, ppl=22.0, ppl_last=10.0),
    ]
    for c in cases:
        c["task"] = "perplexity"
    rows = summarize(cases)
    assert [r["method"] for r in rows] == ["sdpa", "x"] and "accuracy" not in rows[0]
    assert rows[0]["ppl"] == 15.0 and "ppl_ratio" not in rows[0]
    x = rows[1]
    assert x["ppl"] == 17.0 and x["ppl_ratio"] == pytest.approx((1.2 + 1.1) / 2)
    assert x["ppl_last_ratio"] == pytest.approx((1.1 + 1.0) / 2)
    lo, hi = x["ppl_ratio_ci95"]
    assert lo < x["ppl_ratio"] < hi


def test_summary_fields_for_agreement_and_wins():
    cases = []
    for seed, (kl, top1) in enumerate([(0.01, 0.9), (0.03, 0.8), (0.02, 1.0)]):
        cases.append(
            _case("sdpa", seed, None, task="agreement", depth=None, kl=0.0, top1=1.0, ppl_window=5.0, positions=256)
        )
        cases.append(
            _case("y", seed, None, task="agreement", depth=None, kl=kl, top1=top1, ppl_window=5.5, positions=256)
        )
    rows = {r["method"]: r for r in summarize(cases)}
    assert rows["sdpa"]["kl"] == 0.0 and rows["sdpa"]["top1"] == 1.0 and rows["sdpa"]["kl_ci95"] == [0.0, 0.0]
    y = rows["y"]
    assert y["n"] == 3 and y["kl"] == pytest.approx(0.02) and y["top1"] == pytest.approx(0.9)
    lo, hi = y["kl_ci95"]  # t interval, 2 degrees of freedom: mean +- 4.303 * sd / sqrt(3)
    assert hi - y["kl"] == pytest.approx(4.303 * 0.01 / 3**0.5, rel=1e-3) and lo < 0.02 < hi
    assert y["ppl_window_ratio"] == pytest.approx(1.1) and y["positions"] == 256
    assert "accuracy" not in y and y["speedup_vs_baseline"] == pytest.approx(2.5)
    # a win is the method fully right where the baseline was not; fractional scores count as wrong
    gen = [
        _case("sdpa", 1, 1.0),
        _case("z", 1, 0.5),
        _case("sdpa", 2, 0.5),
        _case("z", 2, 1.0),
        _case("sdpa", 3, 0.25),
        _case("z", 3, 0.75),
    ]
    z = next(r for r in summarize(gen) if r["method"] == "z")
    assert (z["wins"], z["losses"], z["ties"]) == (1, 1, 1)
    assert t_interval([1.0]) is None and t_quantile95(1) == 12.706 and abs(t_quantile95(10**6) - 1.96) < 1e-3


def test_old_result_files_are_refused(tmp_path):
    old = _case("dense")
    del old["baseline"]
    (tmp_path / "cases.jsonl").write_text(json.dumps(old) + "\n")
    with pytest.raises(ValueError, match="no 'baseline' field.*renamed 'sdpa'"):
        read_cases(tmp_path)
    with pytest.raises(ValueError, match="no 'baseline' field"):
        ResultsStore(tmp_path)


# ---------------------------------------------------------------------------- the runner on a tiny random model
def test_runner_resumes_after_an_interruption(tmp_path, tiny_random):
    from sparseflash.eval.runner import EvalConfig, Runner

    config = EvalConfig(
        tasks=["passkey", "niah_single"],
        methods=[TEST_METHOD],
        lengths=[512],
        depths=[0, 100],
        samples=1,
        seed=5,
        method_options={TEST_METHOD: {"dense_last_queries": 0}},
    )
    runner = Runner(tiny_random, ResultsStore(tmp_path), config)
    assert runner.pending() == 8
    first = runner.run()
    assert len(first) == 8 and runner.pending() == 0
    for c in first:
        assert c["method"] in ("sdpa", TEST_METHOD) and c["prompt_tokens"] <= 512
        assert c["density"] == (1.0 if c["method"] == "sdpa" else pytest.approx(c["density"]))
        assert c["batch_size"] == 1 and c["baseline"] == "sdpa"
        assert c["prefill_ms"] > 0 and isinstance(c["answer"], str) and c["score"] in (0.0, 1.0)
    sparse = [c for c in first if c["method"] == TEST_METHOD]
    assert all(0 < c["density"] < 1 for c in sparse)
    # simulate a crash in the middle of writing the last case
    path = tmp_path / "cases.jsonl"
    text = path.read_text()
    last_start = text.rstrip("\n").rfind("\n") + 1
    path.write_text(text[: last_start + 25])
    runner = Runner(tiny_random, ResultsStore(tmp_path), config)
    assert runner.pending() == 1
    again = runner.run()
    assert len(again) == 1 and again[0]["seed"] == first[-1]["seed"] and again[0]["method"] == first[-1]["method"]
    # same seed, same prompt, same greedy answer
    assert again[0]["answer"] == first[-1]["answer"]
    cases = read_cases(tmp_path)
    assert len(cases) == 8 and len({case_key(c) for c in cases}) == 8
    assert Runner(tiny_random, ResultsStore(tmp_path), config).run() == []


def test_runner_perplexity_and_recall(tmp_path, tiny_random):
    from sparseflash.eval.plots import plot_all
    from sparseflash.eval.runner import EvalConfig, Runner

    config = EvalConfig(tasks=["perplexity", "recall"], methods=[TEST_METHOD], lengths=[1024], samples=1)
    cases = Runner(tiny_random, ResultsStore(tmp_path), config).run()
    ppl = {c["method"]: c for c in cases if c["task"] == "perplexity"}
    assert ppl["sdpa"]["ppl"] > 1 and ppl[TEST_METHOD]["ppl"] > 1 and ppl["sdpa"]["score"] is None
    rec = {c["method"]: c for c in cases if c["task"] == "recall"}
    assert rec["sdpa"]["recall_per_layer"] == [1.0, 1.0] and rec["sdpa"]["layers"] == [0, 1]
    r = rec[TEST_METHOD]
    assert len(r["recall_per_layer"]) == 2 and all(0 < x < 1 for x in r["recall_per_layer"])
    assert 0 < r["density"] < 1
    paths = plot_all(cases, tmp_path)
    assert {p.name for p in paths} >= {"recall_per_layer.png", "speed_vs_length.png"}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_plots_from_cases(tmp_path):
    from sparseflash.eval.plots import plot_all

    cases = [
        _case(m, s, float((s + i) % 2), depth=d, length=n)
        for i, m in enumerate(["sdpa", "x"])
        for s in (1, 2)
        for d in (0.0, 50.0)
        for n in (1024, 2048)
    ]
    for c in cases:
        c["seed"] = hash((c["seed"], c["depth"], c["length"])) % 1000
    names = {p.name for p in plot_all(cases, tmp_path)}
    assert names == {"heatmap_passkey.png", "accuracy_vs_density.png", "speed_vs_length.png"}
