"""End-to-end prefill (time to first token) of a transformers model: SDPA vs ``patch(model, m)``, per method.

One GPU call: loads the model (bf16), checks that ``patch(model, "dense")`` gives SDPA's last-token logits
(aborts if not), then, for each prompt length (default 16K, 32K, 64K, 128K; beyond the model's trained
context only speed means anything) and each method (``sdpa``: transformers as loaded; ``dense``: sparseflash's
exact kernels; every pattern at its defaults), times the prompt forward ``model(ids, use_cache=True,
logits_to_keep=1)``: median of ``--reps`` CUDA-event timings after the warm-up forwards (a call takes seconds;
``triton.testing.do_bench`` would run at least 8 of them). The extra forwards give

* ``attn_ms`` / ``attn_share``: time inside the attention function (pattern selection + kernel; CUDA events
  around every attention call, in one extra forward after the warm-up), so the rest (MLP, projections, norms,
  RoPE) is visible;
* ``density``: mean kept fraction of causal blocks over the layouts the pattern returned;
* ``logits_rel_err`` / ``top1_match``: the last-token logits against SDPA's at the same length.

Peak GPU memory (``peak_mem_gib``) is ``torch.cuda.max_memory_allocated`` over the case, weights included.

``--model`` takes a local Hugging Face folder, a ``.gguf`` file, a catalogue name of
:mod:`sparseflash.integrations.models` (default ``qwen2.5-coder-1.5b``; these three load through
:func:`sparseflash.eval.model.load_model`) or ``random:<name>``: the architecture
of a known model with random weights built on the GPU (``random:qwen2.5-coder-1.5b``; ``random:tiny`` for a
CPU plumbing run). Speed of dense attention, MLP and static patterns does not depend on the weights; the
density (hence speed) of dynamic patterns does, so random-weight rows say ``"weights": "random"``.

Writes ``e2e_prefill_<gpu>.json`` (shape of ``shared/reference/results.md``) and a ``.png``; prints a table.

    PYTHONUNBUFFERED=1 python benchmarks/bench_e2e_prefill.py --model PATH [--lengths 16384,32768] [--out DIR]
    python benchmarks/bench_e2e_prefill.py --model random:tiny --lengths 256,512 --device cpu   # plumbing
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import base_parser, gpu_tag, header, out_dir, print_table, rel_err  # noqa: E402

SDPA = "sdpa"  # transformers' own attention (the baseline)
DENSE = "dense"  # patch(model, "dense"): sparseflash's exact kernels
DEFAULT_LENGTHS = (16384, 32768, 65536, 131072)
TIMED_NAME = "sf_bench_timed"  # no "flash" in the name: transformers treats such names as flash-attn

# architectures for random:<name> (Qwen2.5-Coder-1.5B-Instruct: shared/reference/models.md; intermediate size
# from its parameter count, 1777.1 M with the untied head)
RANDOM_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen2.5-coder-1.5b": {
        "model_type": "qwen2",
        "vocab_size": 151936,
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
    },
    "tiny": {
        "model_type": "qwen2",
        "vocab_size": 1024,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    },
}


# ----------------------------------------------------------------------------------------- arguments
def parse_lengths(text: str) -> list[int]:
    """``"16384,32K,1M"`` -> ``[16384, 32768, 1048576]``; ``ValueError`` naming a bad item."""
    out = []
    for item in text.split(","):
        item = item.strip()
        mult = {"k": 1024, "m": 1024 * 1024}.get(item[-1:].lower(), 1)
        digits = item[:-1] if mult > 1 else item
        if not digits.isdigit() or int(digits) == 0:
            raise ValueError(f"--lengths: expected positive ints (16384 or 16K), got {item!r}")
        out.append(int(digits) * mult)
    return out


def default_methods() -> list[str]:
    """``sdpa``, ``dense`` and every registered pattern (the registry's own ``dense`` is ``dense`` here)."""
    from sparseflash.patterns import available

    return [SDPA, DENSE] + [m for m in available() if m != DENSE]


def check_methods(methods: list[str]) -> list[str]:
    known = default_methods()
    bad = [m for m in methods if m not in known]
    if bad:
        raise ValueError(f"--methods: expected names from {known}, got {bad}")
    return [SDPA] + [m for m in methods if m != SDPA]  # the baseline always runs (speedups need it)


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default="qwen2.5-coder-1.5b",
        help="HF folder, .gguf file, catalogue name or random:<name> "
        f"({', '.join('random:' + n for n in RANDOM_CONFIGS)})",
    )
    parser.add_argument(
        "--lengths",
        default=",".join(str(n) for n in DEFAULT_LENGTHS),
        help="prompt lengths, comma-separated (16384 or 16K)",
    )
    parser.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated; default: {SDPA}, {DENSE} and every pattern at its defaults",
    )
    parser.add_argument("--reps", type=int, default=3, help="timed forwards per case after the warm-up")
    parser.add_argument("--check-len", type=int, default=4096, help="length of the dense-vs-SDPA check")
    parser.add_argument("--min-sparse-len", type=int, default=None, help="patch option (default: the library default)")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=540.0,
        help="skip the remaining cases once this many seconds have passed",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL=FILE",
        help='also time patch(model, method, **options) from a JSON file {"method", "options"} (an accuracy '
        "sweep's chosen.json), as row LABEL; repeatable; a missing file is reported and skipped",
    )
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (plumbing only)")
    return parser


def load_variants(specs: list[str]) -> list[tuple[str, str, dict[str, Any]]]:
    """``LABEL=FILE`` specs as ``(label, method, options)``; files that do not exist are skipped with a line."""
    variants = []
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            raise SystemExit(f"--variant: expected LABEL=FILE, got {spec!r}")
        try:
            chosen = json.loads(Path(path).read_text())
        except FileNotFoundError:
            print(f"--variant {label}: {path} does not exist, skipped", flush=True)
            continue
        if not isinstance(chosen, dict) or not isinstance(chosen.get("method"), str):
            raise SystemExit(f"--variant {label}: expected a JSON object with a 'method', got {str(chosen)[:100]}")
        variants.append((label, chosen["method"], dict(chosen.get("options") or {})))
    return variants


# ----------------------------------------------------------------------------------------- model and prompt
def load_model(spec: str, device: torch.device) -> tuple[Any, Any | None, str, str]:
    """``(model, tokenizer or None, name, weights)``: bf16 on CUDA, fp32 on CPU, SDPA attention, eval mode.

    ``random:<name>`` builds :data:`RANDOM_CONFIGS` ``[name]`` with seeded random weights (``weights="random"``);
    any other ``spec`` (folder, ``.gguf`` file, catalogue name) is loaded by :func:`sparseflash.eval.model.load_model`
    (``weights="pretrained"``; its ``ModelSpecError``, a ``ValueError``, lists the names).
    """
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if spec.startswith("random:"):
        from transformers import AutoConfig, AutoModelForCausalLM

        name = spec.removeprefix("random:")
        if name not in RANDOM_CONFIGS:
            raise ValueError(f"--model: expected random:<one of {sorted(RANDOM_CONFIGS)}>, got {spec!r}")
        cfg = dict(RANDOM_CONFIGS[name])
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        with torch.device(device), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
        return model.eval(), None, name, "random"
    from sparseflash.eval.model import load_model as load_pretrained

    loaded = load_pretrained(spec, device=device, dtype=dtype)
    loaded.model.set_attn_implementation("sdpa")
    return loaded.model, loaded.tokenizer, loaded.name, "pretrained"


def prompt_ids(tokenizer: Any | None, length: int, vocab_size: int, device: torch.device) -> tuple[torch.Tensor, str]:
    """(1, length) token ids: KJV prose through the tokenizer when there is one, else random ids."""
    if tokenizer is not None:
        with contextlib.suppress(ImportError):
            from sparseflash.eval.text import load_corpus

            corpus = load_corpus()
            ids = tokenizer(corpus.text(0, 6 * length), return_tensors="pt").input_ids[:, :length]
            if ids.shape[1] == length:
                return ids.to(device), corpus.name
    gen = torch.Generator().manual_seed(length)
    return torch.randint(0, vocab_size, (1, length), generator=gen).to(device), "random token ids"


# ----------------------------------------------------------------------------------------- measuring
class _Clock:
    """CUDA events on CUDA, perf_counter on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start: Any, end: Any) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return float(start.elapsed_time(end))
        return 1000.0 * (end - start)


@contextlib.contextmanager
def attention_timer(model: Any, clock: _Clock) -> Iterator[list[tuple[Any, Any]]]:
    """Within the block, every attention call of ``model`` is bracketed by clock marks (yielded list)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    current = model.config._attn_implementation
    inner = ALL_ATTENTION_FUNCTIONS[current]
    marks: list[tuple[Any, Any]] = []

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = clock.mark()
        out = inner(*args, **kwargs)
        marks.append((start, clock.mark()))
        return out

    AttentionInterface.register(TIMED_NAME, timed)
    AttentionMaskInterface.register(TIMED_NAME, ALL_MASK_ATTENTION_FUNCTIONS[current])
    model.set_attn_implementation(TIMED_NAME)
    try:
        yield marks
    finally:
        model.set_attn_implementation(current)


@contextlib.contextmanager
def layout_recorder(model: Any) -> Iterator[list[float]]:
    """Within the block, the work density of every layer prefill of a patched ``model`` is appended (the patch's
    public ``on_prefill`` hook: 1.0 for layers routed dense, the computed fraction for sparse ones, the exact tail
    included); nothing on an unpatched model."""
    from sparseflash.integrations.hf import patch_state

    state = patch_state(model)
    densities: list[float] = []
    if state is None:
        yield densities
        return
    previous = state.on_prefill
    state.on_prefill = lambda layer, density: densities.append(float(density))
    try:
        yield densities
    finally:
        state.on_prefill = previous


@contextlib.contextmanager
def method_applied(
    model: Any, method: str, min_sparse_len: int | None, options: dict[str, Any] | None = None
) -> Iterator[None]:
    """``sdpa``: the model as loaded; else ``sparseflash.patch(model, method, **options)`` inside the block."""
    if method == SDPA:
        yield
        return
    from sparseflash.integrations.hf import patched

    options = dict(options or {})
    if min_sparse_len is not None:
        options["min_sparse_len"] = min_sparse_len
    with patched(model, method, **options):
        yield


def run_case(
    model: Any,
    ids: torch.Tensor,
    method: str,
    reps: int,
    clock: _Clock,
    min_sparse_len: int | None,
    options: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], torch.Tensor]:
    """One (method, length) on a warm model.

    Forwards: a warm-up (compilation; densities and logits recorded), then (``reps`` > 0) one with CUDA events
    around every attention call (``attn_ms`` over that forward's time), then ``reps`` plain timed ones.
    """
    device = ids.device
    forward: Callable[[], Any] = lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1)  # noqa: E731
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    attn_ms = attn_total_ms = None
    with torch.inference_mode(), method_applied(model, method, min_sparse_len, options):
        with layout_recorder(model) as densities:
            start = clock.mark()
            logits = forward().logits[0, -1].float()
            warm_ms = clock.ms(start, clock.mark())
        if reps > 0:
            with attention_timer(model, clock) as marks:
                start = clock.mark()
                forward()
                attn_total_ms = clock.ms(start, clock.mark())
            attn_ms = sum(clock.ms(s, e) for s, e in marks)
        times = []
        for _ in range(reps):
            start = clock.mark()
            forward()
            times.append(clock.ms(start, clock.mark()))
    times = times or [warm_ms]  # reps=0 (the check): the warm-up is the only timing
    if densities:
        density = statistics.fmean(densities)
    else:
        density = 1.0 if method in (SDPA, DENSE) else None
    row = {
        "ms": statistics.median(times),
        "ms_min": min(times),
        "ms_max": max(times),
        "warmup_ms": warm_ms,
        "attn_ms": attn_ms,
        "attn_share": attn_ms / attn_total_ms if attn_ms is not None and attn_total_ms else None,
        "density": density,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    return row, logits


def check_dense(model: Any, ids: torch.Tensor, clock: _Clock) -> dict[str, Any]:
    """``patch(model, "dense")`` vs SDPA on one prompt: last-token logits; raises if they disagree."""
    _, ref = run_case(model, ids, SDPA, 0, clock, None)
    _, out = run_case(model, ids, DENSE, 0, clock, None)
    err = rel_err(out, ref)
    tol = 2e-2 if ids.device.type == "cuda" else 1e-4
    result = {
        "check_len": int(ids.shape[1]),
        "logits_rel_err": err,
        "top1_match": bool(out.argmax() == ref.argmax()),
    }
    if not err < tol:
        raise SystemExit(f"correctness check failed: dense vs sdpa logits rel err {err:.3e} >= {tol:g}")
    return result


# ----------------------------------------------------------------------------------------- output
def add_speedups(rows: list[dict[str, Any]]) -> None:
    """``speedup_vs_sdpa`` on every timed row (SDPA ms / ms at the same length)."""
    base = {r["seqlen"]: r["ms"] for r in rows if r["method"] == SDPA and r.get("ms")}
    for r in rows:
        if r.get("ms") and r["seqlen"] in base:
            r["speedup_vs_sdpa"] = base[r["seqlen"]] / r["ms"]


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """TTFT and speedup vs SDPA per method over the lengths, and the attention share at the longest length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r.get("ms")]
    methods = list(dict.fromkeys(r["method"] for r in timed))
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.8))
    colors = plt.get_cmap("tab20").colors
    for i, m in enumerate(methods):
        pts = sorted((r["seqlen"], r["ms"], r.get("speedup_vs_sdpa")) for r in timed if r["method"] == m)
        xs = [p[0] for p in pts]
        style = {"linewidth": 2.5, "color": "black"} if m == SDPA else {"color": colors[i % len(colors)]}
        axes[0].plot(xs, [p[1] / 1000 for p in pts], marker="o", label=m, **style)
        axes[1].plot(xs, [p[2] for p in pts], marker="o", label=m, **style)
    for ax, ylabel in ((axes[0], "time to first token (s)"), (axes[1], "speedup vs transformers SDPA")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].axhline(1.0, color="gray", linewidth=1)
    axes[1].legend(fontsize=7, ncol=2)
    if timed:
        longest = max(r["seqlen"] for r in timed)
        last = [r for r in timed if r["seqlen"] == longest]
        names = [r["method"] for r in last]
        attn = [(r.get("attn_share") or 0) * r["ms"] / 1000 for r in last]
        rest = [r["ms"] / 1000 - a for r, a in zip(last, attn, strict=True)]
        axes[2].bar(names, attn, label="attention (selection + kernel)")
        axes[2].bar(names, rest, bottom=attn, label="rest (MLP, projections, ...)")
        axes[2].set_ylabel(f"seconds at {longest} tokens")
        axes[2].tick_params(axis="x", rotation=60, labelsize=7)
        axes[2].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


COLUMNS = [
    "seqlen",
    "method",
    "ms",
    "speedup_vs_sdpa",
    "attn_share",
    "density",
    "peak_mem_gib",
    "top1_match",
    "logits_rel_err",
]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.reps < 1:
        raise SystemExit(f"--reps: expected an int >= 1, got {args.reps}")
    lengths = parse_lengths(args.lengths)
    methods = check_methods(args.methods.split(",") if args.methods else default_methods())
    if args.quick:
        lengths, methods = [min(lengths)], methods[:4]
    runs = [(m, m, {}) for m in methods] + load_variants(args.variant)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu --model random:tiny for plumbing)")
    t0 = time.perf_counter()
    model, tok, name, weights = load_model(args.model, device)
    print(f"loaded {name} ({weights} weights) in {time.perf_counter() - t0:.1f} s", flush=True)
    clock = _Clock(device)
    trained = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    ids, text = prompt_ids(tok, args.check_len, model.config.vocab_size, device)
    check = check_dense(model, ids, clock)
    print(
        f"check at {args.check_len}: dense vs sdpa rel err {check['logits_rel_err']:.2e}, "
        f"top-1 match {check['top1_match']}",
        flush=True,
    )

    from sparseflash.integrations.hf import DEFAULT_MIN_SPARSE_LEN

    min_sparse = DEFAULT_MIN_SPARSE_LEN if args.min_sparse_len is None else args.min_sparse_len
    rows: list[dict[str, Any]] = []
    for seqlen in lengths:
        ids, text = prompt_ids(tok, seqlen, model.config.vocab_size, device)
        ref_logits = None
        for method, pattern, options in runs:
            row = {
                "model": name,
                "seqlen": seqlen,
                "method": method,
                **({"pattern": pattern, "options": options} if method != pattern else {}),
                "impl": "transformers_sdpa" if method == SDPA else "sparseflash",
                "weights": weights,
                "prompt": text,
                "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                "min_sparse_len": None if method == SDPA else min_sparse,
                "beyond_trained_context": bool(trained and seqlen > trained),
            }
            if time.perf_counter() - t0 > args.budget_s:
                rows.append({**row, "skipped": f"time budget {args.budget_s:.0f} s spent"})
                continue
            try:
                measured, logits = run_case(model, ids, pattern, args.reps, clock, args.min_sparse_len, options)
            except (torch.OutOfMemoryError, RuntimeError, ValueError, NotImplementedError) as err:
                rows.append({**row, "error": f"{type(err).__name__}: {str(err)[:300]}"})
                print(f"{seqlen} {method}: {rows[-1]['error']}", flush=True)
                continue
            if method == SDPA:
                ref_logits = logits
            if ref_logits is not None:
                measured["logits_rel_err"] = rel_err(logits, ref_logits)
                measured["top1_match"] = bool(logits.argmax() == ref_logits.argmax())
            rows.append({**row, **measured})
            print(
                f"{seqlen} {method}: {measured['ms']:.1f} ms, attention {measured['attn_share']:.0%}, "
                f"density {measured['density']}",
                flush=True,
            )
    add_speedups(rows)
    dest = out_dir(args.out)
    tag = gpu_tag() if device.type == "cuda" else "cpu"
    path = dest / f"e2e_prefill_{tag}.json"
    path.write_text(json.dumps({**header("e2e_prefill"), "check": check, "rows": rows}, indent=1))
    png = plot(rows, dest / f"e2e_prefill_{tag}.png", f"{name} ({weights} weights), batch 1, prefill")
    print(f"wrote {path} and {png}")
    print_table(rows, COLUMNS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
