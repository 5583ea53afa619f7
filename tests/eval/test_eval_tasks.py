"""Task generators (determinism, needle depth, token budget), RULER scoring, haystack text, recall metric."""

from __future__ import annotations

import math
import re

import pytest
import torch

from sparseflash.eval import scoring
from sparseflash.eval.tasks import available_tasks, get_task
from sparseflash.eval.tasks.base import count_tokens, insert_at_depths
from sparseflash.eval.text import load_corpus, split_sentences
from sparseflash.eval.tiny import byte_tokenizer

TOK = byte_tokenizer()  # one token per byte: token budgets are byte budgets
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
NEEDLE_TASKS = ["passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery"]


def test_registry_lists_every_task():
    assert set(available_tasks()) >= {*NEEDLE_TASKS, "variable_tracking", "perplexity", "agreement", "recall"}
    with pytest.raises(ValueError, match=r"task: expected one of .*passkey.*, got 'nope'"):
        get_task("nope")


@pytest.mark.parametrize("name", sorted(set(NEEDLE_TASKS) | {"variable_tracking", "perplexity", "agreement", "recall"}))
def test_same_seed_same_prompt_other_seed_other_prompt(name):
    task = get_task(name)
    depth = 30.0 if task.uses_depth else None
    a = task.build(TOK, 2000, depth, 7)
    b = task.build(TOK, 2000, depth, 7)
    c = task.build(TOK, 2000, depth, 8)
    assert a.prompt == b.prompt and a.references == b.references
    assert c.prompt != a.prompt


@pytest.mark.parametrize("name", sorted(set(NEEDLE_TASKS) | {"variable_tracking"}))
@pytest.mark.parametrize("length", [1100, 3001])
def test_prompt_fills_the_budget_without_overflowing(name, length):
    # the shipped text, so every machine tests the same haystack whatever KJV package it has installed
    options = {"text_source": "fallback"} if name in NEEDLE_TASKS else {}
    s = get_task(name).build(TOK, length, 50.0, 3, **options)
    budget = length - s.max_new_tokens - 1
    assert s.num_tokens == count_tokens(TOK, s.prompt) <= budget
    # the haystack grows by whole sentences/lines: the gap to the budget is under the longest one (+ a separator)
    longest = max(300, *(len(x.encode()) + 1 for x in load_corpus("fallback").sentences))
    assert budget - s.num_tokens < longest
    for ref in s.references:
        assert ref in s.prompt


@pytest.mark.parametrize("name", ["passkey", "niah_single"])
@pytest.mark.parametrize("depth", [0.0, 10.0, 33.0, 50.0, 75.0, 100.0])
def test_needle_sits_at_the_asked_depth(name, depth):
    s = get_task(name).build(TOK, 6000, depth, 11, haystack="essay")
    needle = s.meta["needles"][0]
    # inserted between sentences: within one sentence (KJV verses are < ~550 characters) of the asked depth
    tolerance = 100 * 600 / 5800
    assert abs(needle["actual_depth"] - depth) <= tolerance
    assert needle["needle"] in s.prompt
    # the needle starts a sentence: preceded by the end of one (or the task preamble)
    pos = s.prompt.index(needle["needle"])
    assert s.prompt[pos - 1] in " \n"


def test_depth_zero_and_hundred_are_the_haystack_ends():
    first = get_task("passkey").build(TOK, 3000, 0.0, 1)
    last = get_task("passkey").build(TOK, 3000, 100.0, 1)
    needle0 = first.meta["needles"][0]["needle"]
    needle1 = last.meta["needles"][0]["needle"]
    assert first.prompt.index(needle0) == first.prompt.index("\n") + 1  # right after the task line
    assert last.prompt[: last.prompt.index("\nWhat is the pass key?")].endswith(needle1)


def test_multi_needle_variants():
    mk = get_task("niah_multikey").build(TOK, 4000, 20.0, 5)
    assert len(mk.meta["keys"]) == 4 and len(mk.references) == 1 and len(mk.meta["needles"]) == 4
    assert mk.meta["queried"][0] in mk.prompt.split("\n")[-1]  # the question names the queried key
    mv = get_task("niah_multivalue").build(TOK, 4000, 20.0, 5)
    assert len(mv.references) == 4 and len(set(mv.references)) == 4
    depths = [n["depth"] for n in mv.meta["needles"]]
    assert depths[0] == 20.0 and depths == sorted(depths) and depths[-1] < 100  # spread after the first
    mq = get_task("niah_multiquery").build(TOK, 4000, 20.0, 5)
    assert len(mq.references) == 4 and ", and " in mq.prompt


@pytest.mark.parametrize(
    "value_type,pattern", [("numbers", r"^\d{7}$"), ("words", r"^[a-z]+-[a-z]+$"), ("uuids", UUID.pattern)]
)
def test_needle_value_types(value_type, pattern):
    s = get_task("niah_single").build(TOK, 2000, 40.0, 2, value_type=value_type)
    assert re.match(pattern, s.references[0])


def test_variable_tracking_chain_in_order():
    s = get_task("variable_tracking").build(TOK, 3000, None, 9)
    chain = s.meta["chain"]
    assert len(chain) == 5 and len(s.references) == 5
    main = s.prompt.split("\n\n" + "Memorize")[-1]
    positions = [main.index(line) for line in chain]
    assert positions == sorted(positions)
    value = chain[0].split(" = ")[1]
    assert s.prompt.endswith(f"assigned the value {value}, they are:")


def test_perplexity_window_has_enough_tokens():
    s = get_task("perplexity").build(TOK, 2048, None, 4)
    assert count_tokens(TOK, s.prompt) >= 2048 and s.meta["last_tokens"] == 512


def test_agreement_window():
    task = get_task("agreement")
    assert task.kind == "agreement" and not task.uses_depth
    s = task.build(TOK, 2048, None, 4)
    assert count_tokens(TOK, s.prompt) >= 2048 and s.meta["last_tokens"] == 512 and s.metric == "agreement"
    assert task.build(TOK, 16384, None, 4, text_source="fallback").meta["last_tokens"] == 1024  # capped
    assert task.build(TOK, 2048, None, 4, last_tokens=100).meta["last_tokens"] == 100
    with pytest.raises(ValueError, match=r"last_tokens: expected >= 0"):
        task.build(TOK, 2048, None, 4, last_tokens=-1)


def test_bad_arguments_name_the_argument():
    task = get_task("niah_single")
    with pytest.raises(ValueError, match=r"depth: expected a percentage in \[0, 100\], got 120"):
        task.build(TOK, 2000, 120, 1)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['colour'\]"):
        task.build(TOK, 2000, 10, 1, colour="red")
    with pytest.raises(ValueError, match=r"value_type: expected one of .*, got 'emoji'"):
        task.build(TOK, 2000, 10, 1, value_type="emoji")
    with pytest.raises(ValueError, match=r"length: expected room for the task's own text"):
        task.build(TOK, 200, 10, 1)


def test_insert_at_depths():
    hay = ["a.", "b.", "c.", "d."]
    assert insert_at_depths(hay, [(0, "N")]) == ["N", "a.", "b.", "c.", "d."]
    assert insert_at_depths(hay, [(50, "N")]) == ["a.", "b.", "N", "c.", "d."]
    assert insert_at_depths(hay, [(100, "N")]) == ["a.", "b.", "c.", "d.", "N"]
    assert insert_at_depths(hay, [(60, "X"), (20, "Y")]) == ["Y", "a.", "b.", "X", "c.", "d."]


# ---------------------------------------------------------------------------- scoring (RULER)
def test_string_match_all_and_part():
    refs = ["1234567", "7654321"]
    assert scoring.string_match_all("The numbers are 1234567 and 7654321.", refs) == 1.0
    assert scoring.string_match_all(" 1234567 only", refs) == 0.5
    assert scoring.string_match_all("nothing", refs) == 0.0
    assert scoring.string_match_all("QUIET-LANTERN", ["quiet-lantern"]) == 1.0  # case-insensitive
    assert scoring.string_match_part("... 7654321", refs) == 1.0
    assert scoring.string_match_part("none", refs) == 0.0


def test_postprocess_and_passkey():
    assert scoring.postprocess("  a\x00b\tc \n") == "a\nb\nc"
    assert scoring.passkey_match(" 48213. Remember", ["48213"]) == 1.0
    assert scoring.passkey_match(" 4821 then 48213", ["48213"]) == 0.0  # first integer only
    assert scoring.passkey_match("482130", ["48213"]) == 0.0
    assert scoring.passkey_match("no digits", ["48213"]) == 0.0
    with pytest.raises(ValueError, match=r"metric: expected one of \['all', 'part', 'passkey'\], got 'f1'"):
        scoring.score("f1", "x", ["x"])


def test_task_score_uses_its_metric():
    s = get_task("niah_multivalue").build(TOK, 2000, 0.0, 1)
    answer = " " + ", ".join(s.references[:3])
    assert get_task("niah_multivalue").score(answer, s) == 0.75


# ---------------------------------------------------------------------------- haystack text
def test_corpus_sources():
    fb = load_corpus("fallback")
    assert "fallback" in fb.name and len(fb.sentences) > 50
    assert fb.take(len(fb.sentences) - 1, 2) == [fb.sentences[-1], fb.sentences[0]]  # cyclic
    auto = load_corpus("auto")
    assert auto.num_chars > 10_000
    with pytest.raises(ValueError, match="text source: expected one of"):
        load_corpus("gutenberg")
    assert split_sentences("One. Two!  Three? four.") == ["One.", "Two!", "Three? four."]


# ---------------------------------------------------------------------------- recall metric (torch fallback)
def _brute_recall(q, k, keep, bq, bk):
    s, d = q.shape[2], q.shape[3]
    g = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(g, dim=1).double()
    scores = torch.einsum("bhsd,bhtd->bhst", q.double(), kk) / math.sqrt(d)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    rows = torch.arange(s)
    token_keep = keep[:, :, rows // bq][:, :, :, rows // bk]
    return float((probs * token_keep).sum() / (q.shape[1] * s))


@pytest.mark.parametrize("seq,heads", [(37, (4, 2)), (70, (6, 3))])
def test_attention_recall_matches_brute_force(gen, seq, heads):
    """The recall the eval reports per layer (sparseflash.metrics) against the definition."""
    from sparseflash.layouts import BlockLayout, causal_block_mask
    from sparseflash.metrics import attention_recall

    hq, hkv = heads
    q = torch.randn(1, hq, seq, 16, generator=gen)
    k = torch.randn(1, hkv, seq, 16, generator=gen)
    allowed = causal_block_mask(seq, seq, (16, 16), causal=True)
    keep = (torch.rand(1, hkv, *allowed.shape[-2:], generator=gen) < 0.5) & allowed
    keep[..., 0] = True
    layout = BlockLayout.from_dense(keep, seq_len_q=seq, seq_len_k=seq, block_size=(16, 16))
    got = attention_recall(q, k, layout)
    ref = _brute_recall(q, k, keep.repeat_interleave(hq // hkv, dim=1), 16, 16)
    assert abs(got - ref) < 1e-5
    full = BlockLayout.from_dense(
        allowed.expand(1, 1, *allowed.shape[-2:]).clone(), seq_len_q=seq, seq_len_k=seq, block_size=(16, 16)
    )
    assert abs(attention_recall(q, k, full) - 1.0) < 1e-5
