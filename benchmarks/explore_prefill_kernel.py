"""Issue 13: which prefill-kernel paths to make default? TMA K/V loads, lazy rescaling, tile configs vs cuDNN.

One GPU call (3 to 5 minutes expected on an H200; ``--budget-s`` bounds it). B=1, bf16, random inputs,
``do_bench`` medians.
Phases, most important first (phase 1 always runs; later points past the budget are skipped and recorded so):

1. ``core``: d in (128, 64), causal and not, N in (16K, 64K), Hq=32 / Hkv=8: SDPA's cuDNN backend (K/V repeated
   for GQA, the copy not timed, as ``bench_dense_vs_peers.py``) and ``sparseflash.flash_attention`` with the
   library's tile config under ``default``, ``tma``, ``lazy``, ``tma+lazy`` (``Tuning.tma`` / ``lazy_rescale``).
2. ``sparse``: 64K, d=128, causal, random block layouts of density 0.1 and 1.0 (blocks of 128, per query head):
   the same four variants; ratio against the dense cuDNN time at that point.
3. ``configs``: tile configs (BLOCK_M, BLOCK_N, warps, stages) at every core point, each with the switch combo
   fastest there in phase 1 (summed over N); a config that does not compile (OutOfResources) is recorded.
4. ``heads14``: d=64, Hq=14 / Hkv=2 (a 7-way group), cuDNN and the four variants.

Every output is checked against cuDNN's before timing (``max_abs``: max |ours - cuDNN|; ``ok``: below 2e-2, or
within 2e-2 + 1e-2 |cuDNN| elementwise; block-sparse at density < 1: against the ``default`` variant's output). A
failing variant is recorded and timed, never fatal. TFLOP/s count causal FLOPs halved (block-sparse: times the
layout's causal density); ``vs_cudnn`` is cuDNN's time over ours (> 1: faster). Writes ``explore_prefill_<gpu>.json``
after every point; prints one short line per measurement while running, then (the last 12 KB of output) one
table of every measurement and a summary of mean ratios.

    PYTHONUNBUFFERED=1 python benchmarks/explore_prefill_kernel.py [--out DIR] [--budget-s 330] [--quick]

``--quick``: 4K and 16K only. On a machine without a GPU, ``TRITON_INTERPRET=1 ... --cpu-smoke`` runs the whole
script on tiny shapes (SDPA's math backend as the reference, one call as the "time") to check it end to end.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import base_parser, bench_ms, gpu_tag, out_dir, print_table, sdpa_repeated_kv, write_result

import sparseflash as sf  # noqa: E402
from sparseflash.layouts import causal_block_mask  # noqa: E402
from sparseflash.ops.prefill.launcher import default_config  # noqa: E402
from sparseflash.ops.prefill.tma import tma_usable  # noqa: E402
from sparseflash.ops.tuning import TileConfig, Tuning, set_tuning  # noqa: E402

SWITCHES = {
    "default": dict(tma=False, lazy_rescale=False),
    "tma": dict(tma=True, lazy_rescale=False),
    "lazy": dict(tma=False, lazy_rescale=True),
    "tma+lazy": dict(tma=True, lazy_rescale=True),
}
CONFIGS = [
    TileConfig(128, 128, 8, 2),
    TileConfig(128, 128, 8, 3),
    TileConfig(128, 64, 8, 3),
    TileConfig(128, 64, 4, 3),
    TileConfig(128, 64, 4, 4),
    TileConfig(64, 64, 4, 3),
]
MAX_ABS = 2e-2
RTOL = 1e-2
COLUMNS = ["phase", "d", "causal", "N", "variant", "ms", "tflops", "vs_cudnn", "max_abs", "ok"]


@dataclasses.dataclass
class Env:
    """Where and how to run: GPU (cuDNN, do_bench) or the CPU smoke run (math SDPA, one timed call)."""

    device: str
    lengths: tuple[int, ...]
    sparse_len: int
    block: int
    heads: tuple[int, int]
    heads14: tuple[int, int]
    dims: tuple[int, ...] = (128, 64)
    configs: tuple[TileConfig, ...] = tuple(CONFIGS)

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _cfg_name(c: TileConfig) -> str:
    return f"{c.block_m}x{c.block_n}w{c.num_warps}s{c.num_stages}"


def _time(env: Env, fn) -> dict:
    if env.cuda:
        return bench_ms(fn)
    start = time.perf_counter()
    fn()
    return {"ms": (time.perf_counter() - start) * 1e3}


def _compare(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """``max_abs`` = max |out - ref| and ``ok``: below ``MAX_ABS``, or within ``MAX_ABS + RTOL |ref|`` everywhere
    (one bf16 rounding step of an output above 2 in magnitude is 2**-6; early causal rows average few values, so
    two correct kernels can differ by a rounding step there). fp32, a few heads at a time (64K outputs: 0.5 GB)."""
    worst, close = 0.0, True
    for h in range(0, out.shape[1], 4):
        o, r = out[:, h : h + 4].float(), ref[:, h : h + 4].float()
        diff = (o - r).abs()
        top = diff.max().item()
        if top != top:  # NaN
            return {"max_abs": float("inf"), "ok": False}
        worst = max(worst, top)
        close = close and bool((diff <= MAX_ABS + RTOL * r.abs()).all())
    return {"max_abs": worst, "ok": worst < MAX_ABS or close}


def _cudnn(env: Env, q, k, v, causal):
    """SDPA cuDNN with K/V repeated to Hq; the math backend for the CPU smoke run."""
    from torch.nn.attention import SDPBackend

    return sdpa_repeated_kv(q, k, v, causal, None if env.cuda else SDPBackend.MATH)


def _ours(q, k, v, causal, tuning: Tuning, layout=None):
    def run():
        previous = set_tuning(tuning)
        try:
            if layout is None:
                return sf.flash_attention(q, k, v, causal=causal, backend="triton")
            return sf.block_sparse_attention(q, k, v, layout, causal=causal, check_indices=False, backend="triton")
        finally:
            set_tuning(previous)

    return run


def _random_layout(seq: int, heads: int, density: float, block: int, gen, device) -> sf.BlockLayout:
    """Random causal blocks at ``density`` of the causal blocks, the diagonal kept (as bench_sparse_vs_flex)."""
    nb = -(-seq // block)
    allowed = causal_block_mask(seq, seq, (block, block), device=device)
    diag = torch.eye(nb, dtype=torch.bool, device=device)
    off = allowed.sum().item() - nb
    p = max(0.0, (density * allowed.sum().item() - nb) / max(off, 1))
    keep = (torch.rand(1, heads, nb, nb, device=device, generator=gen) < p) | diag
    return sf.BlockLayout.from_dense(keep & allowed, seq_len_q=seq, seq_len_k=seq, block_size=block)


class Runner:
    def __init__(self, env: Env, dest: Path, budget_s: float):
        self.env, self.dest, self.budget_s = env, dest, budget_s
        self.start = time.perf_counter()
        self.rows: list[dict] = []
        self.cudnn_ms: dict[tuple, float] = {}
        probe = torch.zeros(1, 8, 64, 128, device=env.device, dtype=torch.bfloat16)
        self.tma_here = tma_usable(probe, probe, 128)

    def left_s(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    def save(self) -> None:
        info = {
            "tma_usable_bf16_d128": self.tma_here,
            "budget_s": self.budget_s,
            "elapsed_s": time.perf_counter() - self.start,
        }
        write_result(self.dest / f"explore_prefill_{gpu_tag()}.json", "explore_prefill_kernel", self.rows, info)

    def inputs(self, seq: int, d: int, heads: tuple[int, int]):
        gen = torch.Generator(device=self.env.device).manual_seed(seq + d + heads[0])
        shape = lambda h: (1, h, seq, d)  # noqa: E731
        q = torch.randn(shape(heads[0]), device=self.env.device, dtype=torch.bfloat16, generator=gen)
        k = torch.randn(shape(heads[1]), device=self.env.device, dtype=torch.bfloat16, generator=gen)
        v = torch.randn(shape(heads[1]), device=self.env.device, dtype=torch.bfloat16, generator=gen)
        return q, k, v, gen

    def measure(self, case: dict, variant: str, fn, ref: torch.Tensor | None, flops: float) -> dict:
        """One row: check against ``ref`` (first call: compiles), then time. Errors are recorded."""
        row = {**case, "variant": variant}
        try:
            t0 = time.perf_counter()
            out = fn()
            if self.env.cuda:
                torch.cuda.synchronize()
            row["first_call_s"] = round(time.perf_counter() - t0, 2)
            if ref is not None:
                row.update(_compare(out, ref))
            del out
            row.update(_time(self.env, fn))
            row["tflops"] = flops / row["ms"] / 1e9
            base = self.cudnn_ms.get((case["d"], case["causal"], case["N"], case["heads"]))
            if base:
                row["vs_cudnn"] = base / row["ms"]  # > 1: faster than cuDNN
        except Exception as err:  # OutOfResources, a refused shape, a wrong result: recorded, not fatal
            row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
            row["ok"] = False
        self.rows.append(row)
        self.save()
        line = " ".join(
            f"{key}={_short(row[key])}" for key in [*COLUMNS, "heads", "first_call_s", "error"] if key in row
        )
        print(line, flush=True)
        return row

    def dense_point(self, phase: str, d: int, causal: bool, seq: int, heads, variants: dict[str, Tuning]):
        q, k, v, _ = self.inputs(seq, d, heads)
        case = {"phase": phase, "d": d, "causal": causal, "N": seq, "heads": f"{heads[0]}/{heads[1]}"}
        flops = 4 * heads[0] * seq * seq * d * (0.5 if causal else 1.0)
        cudnn, ref = _cudnn(self.env, q, k, v, causal), None
        try:
            ref = cudnn()
        except Exception as err:  # checked against nothing then; the cuDNN row records the error
            print(f"no cuDNN reference at {case}: {err}", flush=True)
        key = (d, causal, seq, case["heads"])
        if key not in self.cudnn_ms:
            row = self.measure(case, "cudnn", cudnn, None, flops)
            if "ms" in row:
                self.cudnn_ms[key] = row["ms"]
        for name, tuning in variants.items():
            self.measure(case, name, _ours(q, k, v, causal, tuning), ref, flops)
        del q, k, v, ref, cudnn
        if self.env.cuda:
            torch.cuda.empty_cache()


def _variants(config: TileConfig | None) -> dict[str, Tuning]:
    return {name: Tuning(prefill=config, **sw) for name, sw in SWITCHES.items()}


def _best_switch(rows: list[dict], d: int, causal: bool) -> str:
    """The switch combo with the least summed time over the core points of (d, causal) that all variants passed."""
    totals: dict[str, float] = {}
    for name in SWITCHES:
        picked = [r for r in rows if r["phase"] == "core" and r["d"] == d and r["causal"] == causal]
        mine = [r for r in picked if r["variant"] == name]
        if mine and all(r.get("ok") and "ms" in r for r in mine):
            totals[name] = sum(r["ms"] for r in mine)
    return min(totals, key=totals.get) if totals else "default"


def run(env: Env, runner: Runner) -> None:
    for d in env.dims:  # phase 1: the four variants with the library's tile config
        for causal in (True, False):
            for seq in env.lengths:
                runner.dense_point("core", d, causal, seq, env.heads, _variants(None))

    if runner.left_s() > 0:  # phase 2: one block-sparse point
        seq, d = env.sparse_len, env.dims[0]
        q, k, v, gen = runner.inputs(seq, d, env.heads)
        dense_flops = 4 * env.heads[0] * seq * seq * d * 0.5
        for density in (0.1, 1.0):
            layout = _random_layout(seq, env.heads[0], density, env.block, gen, env.device)
            case = {"phase": "sparse", "d": d, "causal": True, "N": seq, "heads": f"{env.heads[0]}/{env.heads[1]}"}
            case["density"] = round(layout.density(), 4)
            ref = _cudnn(env, q, k, v, True)() if density == 1.0 else None
            for name, tuning in _variants(None).items():
                row = runner.measure(
                    case, name, _ours(q, k, v, True, tuning, layout), ref, dense_flops * case["density"]
                )
                if ref is None and name == "default" and "ms" in row:  # density < 1: later variants vs this one
                    ref = _ours(q, k, v, True, tuning, layout)()
        del q, k, v
    else:
        runner.rows.append({"phase": "sparse", "skipped": "budget"})

    for d in env.dims:  # phase 3: tile configs, each with the best switch combo of (d, causal)
        for causal in (True, False):
            best = _best_switch(runner.rows, d, causal)
            library = default_config(d)
            for seq in env.lengths:
                if runner.left_s() <= 0:
                    runner.rows.append({"phase": "configs", "d": d, "causal": causal, "N": seq, "skipped": "budget"})
                    continue
                variants = {
                    f"{_cfg_name(c)}+{best}": Tuning(prefill=c, **SWITCHES[best])
                    for c in env.configs
                    if c != library  # the library config with this combo is a phase-1 row
                }
                runner.dense_point("configs", d, causal, seq, env.heads, variants)

    d64 = 64 if 64 in env.dims else env.dims[-1]
    for causal in (True, False):  # phase 4: a 7-way GQA group at d = 64
        for seq in env.lengths:
            if runner.left_s() <= 0:
                runner.rows.append({"phase": "heads14", "causal": causal, "N": seq, "skipped": "budget"})
                continue
            runner.dense_point("heads14", d64, causal, seq, env.heads14, _variants(None))


def summary(rows: list[dict]) -> None:
    """Per (d, causal, heads): each variant's time over cuDNN's, mean over N (> 1: faster than cuDNN)."""
    out = []
    groups: dict[tuple, dict[str, list[float]]] = {}
    for r in rows:
        if "vs_cudnn" in r:  # block-sparse: per density, against dense cuDNN
            heads = r["heads"] + (f" rho={r['density']}" if r["phase"] == "sparse" else "")
            groups.setdefault((r["d"], r["causal"], heads), {}).setdefault(r["variant"], []).append(r["vs_cudnn"])
    for (d, causal, heads), variants in groups.items():
        for name, ratios in sorted(variants.items(), key=lambda kv: -sum(kv[1]) / len(kv[1])):
            mean = sum(ratios) / len(ratios)
            out.append(
                {
                    "d": d,
                    "causal": causal,
                    "heads": heads,
                    "variant": name,
                    "vs_cudnn_mean": mean,
                    "points": len(ratios),
                }
            )
    bad = [r for r in rows if r.get("ok") is False]
    skipped = [r for r in rows if "skipped" in r]
    print("\nALL MEASUREMENTS (heads 32/8 except phase heads14: 14/2; sparse: density in the JSON)")
    print_table(
        [r for r in rows if "variant" in r], ["phase", "d", "causal", "N", "variant", "ms", "tflops", "vs_cudnn", "ok"]
    )
    print(f"{len(skipped)} points skipped for the time budget")
    print("\nSUMMARY (vs_cudnn: cuDNN ms / ours, mean over N; > 1 is faster)")
    print_table(out, ["d", "causal", "heads", "variant", "vs_cudnn_mean", "points"])
    print(f"{len(bad)} rows failed the check or errored")
    for r in bad[:20]:
        print(" ", {key: r.get(key) for key in ("phase", "d", "causal", "N", "variant", "max_abs", "error")})


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--budget-s", type=float, default=330.0, help="skip later phases past this (default 330)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1)")
    args = parser.parse_args()
    if args.cpu_smoke:
        from sparseflash.ops._interpreter_fix import patch_interpreter_bf16_dot

        patch_interpreter_bf16_dot()  # the interpreter's bf16 tl.dot is wrong without it (as in the tests)
        small = (TileConfig(32, 16, 4, 1), TileConfig(16, 16, 4, 1))
        env = Env("cpu", (64, 96), 128, 32, (4, 2), (7, 1), dims=(32, 16), configs=small)
    else:
        env = Env("cuda", (4096, 16384) if args.quick else (16384, 65536), 65536, 128, (32, 8), (14, 2))
    dest = out_dir(args.out)
    runner = Runner(env, dest, args.budget_s)
    print(f"TMA applies to bf16 d=128 inputs here: {runner.tma_here}", flush=True)
    try:
        run(env, runner)
    finally:
        runner.save()
        summary(runner.rows)
        print(f"elapsed {time.perf_counter() - runner.start:.0f} s; JSON in {dest}", flush=True)


if __name__ == "__main__":
    main()
