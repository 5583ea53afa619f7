"""The runner on the tiny random model: agreement with the baseline, batched generation, per-case writes, progress."""

from __future__ import annotations

import io
import json
import logging
import re
import warnings

import pytest
import torch
from test_eval_results import TEST_METHOD  # registers the test pattern

from sparseflash.eval.engine import Engine
from sparseflash.eval.grid import batches
from sparseflash.eval.methods import check_method, use_method
from sparseflash.eval.progress import progress
from sparseflash.eval.results import ResultsStore, read_cases
from sparseflash.eval.runner import EvalConfig, Runner
from sparseflash.eval.text import load_corpus


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


# ---------------------------------------------------------------------------- agreement
def test_agreement_of_the_baseline_with_itself(tiny_random):
    engine = Engine(tiny_random)
    ids = engine.encode(load_corpus("fallback").text(3, 3000), max_tokens=400)
    base, ref = engine.agreement(ids, 128, None, keep=True, chunk=50)
    assert ref.shape == (128, 257) and ref.dtype == torch.float32 and ref.device == ids.device
    assert torch.allclose(ref.logsumexp(-1), torch.zeros(128), atol=1e-5)
    assert base["kl"] == 0.0 and base["top1"] == 1.0 and base["positions"] == 128 and base["prefill_ms"] > 0
    same, kept = engine.agreement(ids, 128, ref)  # chunks of 256: one chunk
    assert kept is None and abs(same["kl"]) < 1e-6 and same["top1"] == 1.0
    assert same["ppl_window"] == pytest.approx(base["ppl_window"], rel=1e-6)
    # the same positions as the last 128 predicted tokens of the perplexity
    assert base["ppl_window"] == pytest.approx(engine.perplexity(ids, 128)["ppl_last"], rel=1e-5)
    with pytest.raises(ValueError, match=r"reference: expected log-probabilities of shape \(64, 257\)"):
        engine.agreement(ids, 64, ref)
    with pytest.raises(ValueError, match="chunk: expected"):
        engine.agreement(ids, 64, chunk=512)


def test_agreement_task_pairs_every_method_with_the_baseline(tmp_path, tiny_random):
    config = EvalConfig(
        tasks=["agreement"],
        methods=["dense", TEST_METHOD],
        lengths=[512],
        samples=2,
        method_options={TEST_METHOD: {"window": 2, "dense_last_queries": 0}},
    )
    first = Runner(tiny_random, ResultsStore(tmp_path), config).run()
    assert [c["method"] for c in first] == ["sdpa", "dense", TEST_METHOD] * 2
    by = {(c["seed"], c["method"]): c for c in first}
    for c in first:
        assert {"kl", "top1", "ppl_window", "positions", "prefill_ms", "density"} <= set(c)
        assert c["positions"] == 128 and c["prompt_tokens"] == 512 and c["score"] is None
    for seed in {c["seed"] for c in first}:
        base, dense, sparse = (by[(seed, m)] for m in ("sdpa", "dense", TEST_METHOD))
        assert base["kl"] == 0.0 and base["top1"] == 1.0 and base["density"] == 1.0
        assert 0 <= dense["kl"] < 1e-5 and dense["top1"] == 1.0  # our exact kernels: the noise floor
        assert 0 < sparse["kl"] < float("inf") and 0 <= sparse["top1"] <= 1 and 0 < sparse["density"] < 1
    # resume with the baseline stored and one method not: the baseline's log-probs are recomputed, not stored
    path = tmp_path / "cases.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(line for line in lines if json.loads(line)["method"] != TEST_METHOD))
    again = Runner(tiny_random, ResultsStore(tmp_path), config).run()
    assert [c["method"] for c in again] == [TEST_METHOD, TEST_METHOD]
    for c in again:
        assert c["kl"] == pytest.approx(by[(c["seed"], TEST_METHOD)]["kl"], rel=1e-5)
    assert len(read_cases(tmp_path)) == 6
    # summary rows, table and figure
    from rich.console import Console

    from sparseflash.eval.plots import plot_all
    from sparseflash.eval.summary import render_table, summarize

    rows = summarize(read_cases(tmp_path))
    assert [r["method"] for r in rows] == ["sdpa", "dense", TEST_METHOD]
    assert rows[2]["kl"] > rows[1]["kl"] >= rows[0]["kl"] == 0.0 and rows[2]["kl_ci95"] is not None
    console = Console(file=io.StringIO(), width=200)
    console.print(render_table(rows))
    assert "KL 0 [0, 0], top1 100.0%" in console.file.getvalue()
    assert "agreement.png" in {p.name for p in plot_all(read_cases(tmp_path), tmp_path)}


# ---------------------------------------------------------------------------- batching
def test_a_batch_of_three_decodes_like_three_batches_of_one(tiny_random):
    engine = Engine(tiny_random)
    text = load_corpus("fallback").text(0, 2000)
    prompts = [engine.encode(text[:n]) for n in (97, 260, 181)]  # different lengths and last tokens
    log = _Collect()
    logging.getLogger("transformers").addHandler(log)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the cache goes by the name the model takes: no deprecation
            together = engine.generate_batch(prompts, 6)
            alone = [engine.generate(p, 6) for p in prompts]
    finally:
        logging.getLogger("transformers").removeHandler(log)
    assert not [m for m in log.messages if "deprecated" in m]
    assert [g.tokens for g in together] == [g.tokens for g in alone]
    assert [g.text for g in together] == [g.text for g in alone]
    assert all(g.batch_size == 3 and g.new_tokens == 6 and g.prefill_ms > 0 for g in together)
    # the left-padded prefill gives each sequence the logits it gets alone
    batch = engine.batch(prompts)
    assert batch.input_ids.shape == (3, 260) and batch.attention_mask.sum(-1).tolist() == [97, 260, 181]
    with torch.inference_mode():
        padded = tiny_random.model(**batch.forward_kwargs(), logits_to_keep=1).logits[:, -1]
        single = torch.cat([tiny_random.model(input_ids=p, logits_to_keep=1).logits[:, -1] for p in prompts])
    torch.testing.assert_close(padded, single, atol=1e-4, rtol=1e-4)
    # per-sequence stops: EOS-free budgets differ, `done` stops one early
    mixed = engine.generate_batch(prompts, [2, 5, 3], [None, lambda t: len(t) >= 1, None])
    assert [g.new_tokens for g in mixed] == [2, 1, 3]
    with pytest.raises(ValueError, match=r"max_new_tokens, done: expected 3 entries"):
        engine.generate_batch(prompts, [1, 2])


def test_runner_batches_match_batch_size_one_and_are_paired(tmp_path, tiny_random):
    grid = dict(tasks=["passkey"], lengths=[512], depths=[0.0, 50.0, 100.0], samples=1, seed=3)
    one = Runner(tiny_random, ResultsStore(tmp_path / "one"), EvalConfig(methods=[], batch_size=1, **grid)).run()
    three = Runner(tiny_random, ResultsStore(tmp_path / "three"), EvalConfig(methods=[], batch_size=3, **grid)).run()
    assert len({c["prompt_tokens"] for c in three}) > 1  # prompts of different lengths share the batch
    assert [(c["seed"], c["answer_tokens"], c["answer"]) for c in three] == [
        (c["seed"], c["answer_tokens"], c["answer"]) for c in one
    ]
    assert {c["batch_size"] for c in three} == {3} and {c["batch_size"] for c in one} == {1}
    assert all(c["prefill_ms"] > 0 for c in three)
    # the method's groups are the baseline's batches; resuming keeps the batch whole but writes only what is missing
    config = EvalConfig(methods=[TEST_METHOD], batch_size=2, **grid)
    assert [len(b) for b in batches(config)] == [2, 1]
    store = ResultsStore(tmp_path / "three")
    runner = Runner(tiny_random, store, EvalConfig(methods=[TEST_METHOD], batch_size=3, **grid))
    units = runner.plan()
    assert [u.methods for u in units] == [(TEST_METHOD,)] and len(units[0].prompts) == 3
    store.append({**runner._case(units[0].prompts[1], TEST_METHOD), "score": 0.0})
    written = runner.run()
    assert [c["seed"] for c in written] == [units[0].prompts[i].seed for i in (0, 2)]
    assert all(c["batch_size"] == 3 for c in written)


def test_batch_size_must_be_positive():
    with pytest.raises(ValueError, match="batch_size: expected an int >= 1, got 0"):
        EvalConfig(tasks=["passkey"], methods=[], lengths=[512], batch_size=0)


# ---------------------------------------------------------------------------- writes and progress
def test_each_case_is_written_as_it_finishes_and_progress_lines(tmp_path, tiny_random):
    config = EvalConfig(
        tasks=["passkey", "perplexity"], methods=["dense"], lengths=[512], depths=[0.0, 100.0], batch_size=2
    )
    seen: list[int] = []

    def on_case(case):
        seen.append(len((tmp_path / "cases.jsonl").read_text().splitlines()))

    runner = Runner(tiny_random, ResultsStore(tmp_path), config, on_case=on_case)
    total = len(runner.plan())
    out = io.StringIO()
    with progress(total, style="lines", stream=out) as on_group:
        runner.on_group = on_group
        written = runner.run()
    assert len(written) == 6 and seen == list(range(1, 7))  # on disk before the next case starts
    assert len(ResultsStore(tmp_path)) == 6
    lines = out.getvalue().splitlines()
    assert len(lines) == total == 4
    assert re.fullmatch(r"\[1/4\] passkey 512 sdpa: \d\.\d\d \(\d+\.\d s\)", lines[0]), lines[0]
    assert re.fullmatch(r"\[4/4\] perplexity 512 dense: ppl [\d.]+ \(\d+\.\d s\)", lines[-1]), lines[-1]
    with (
        pytest.raises(ValueError, match=r"style: expected one of \['bar', 'lines', 'none'\], got 'fancy'"),
        progress(1, style="fancy"),
    ):
        pass


# ---------------------------------------------------------------------------- methods
def test_sdpa_is_the_model_as_loaded_and_dense_our_kernels(tiny_random):
    from sparseflash.integrations import hf

    with use_method(tiny_random.model, "sdpa") as run:
        assert not hf.is_patched(tiny_random.model) and run.density() == 1.0
    with use_method(tiny_random.model, "dense", {"backend": "torch"}) as run:
        state = hf.patch_state(tiny_random.model)
        assert state is not None and state.method == "dense" and run.density() == 1.0
    assert not hf.is_patched(tiny_random.model)
    with pytest.raises(ValueError, match=r"sdpa: takes no options .*got \['backend'\]"):
        check_method("sdpa", {"backend": "torch"})
    with pytest.raises(ValueError, match=r"dense: takes no pattern options.*got \['threshold'\]"):
        check_method("dense", {"threshold": 0.9})
