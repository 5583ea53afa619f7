"""XAttention's antidiagonal scoring kernel against dense attention, per tile config, one GPU call.

For each length (bf16, ``B = 1``, Qwen2.5-Coder-1.5B's attention shape by default: 12 query heads, 2 KV heads,
d = 128, causal): the scoring kernel (``xattention_scores_triton``) at its default tile config and at each
``--configs`` entry (``,flat``: the flattened key-tile loop), ``--baseline FILE`` (an earlier ``antidiagonal.py``,
for a before/after in the same run), the whole ``select("xattention", ...)`` with ``patch()``'s options,
sparseflash's dense ``flash_attention`` and SDPA's flash backend. Every variant's estimate is compared with the
default's (max abs difference; the estimate sums to ``block / stride`` per row). Scoring does not depend on the
data, so random q/k time it as real q/k do.

    python benchmarks/bench_scoring.py [--lengths 16384,32768,65536,131072] [--baseline old.py] [--out DIR]
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import base_parser, bench_ms, gpu_tag, out_dir, print_table, write_result  # noqa: E402

import sparseflash as sf  # noqa: E402
from sparseflash.integrations.hf.plan import SAFE_OPTIONS  # noqa: E402
from sparseflash.ops.scores.antidiagonal import xattention_scores_reference, xattention_scores_triton  # noqa: E402
from sparseflash.patterns import select  # noqa: E402

CONFIGS = ["64,128,8,3", "128,128,8,3", "64,64,4,3", "64,128,8,3,flat", "128,128,8,3,flat", "64,64,4,3,flat"]


def one_length(
    n: int, hq: int, hkv: int, d: int, stride: int, configs: list[tuple], baseline: object, options: dict
) -> list[dict]:
    """Rows of one length: every scoring variant, the whole selection, dense ours and SDPA flash."""
    gen = torch.Generator(device="cuda").manual_seed(n)
    q = torch.randn(1, hq, n, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, hkv, n, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(1, hkv, n, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    dense = bench_ms(lambda: sf.flash_attention(q, k, v, causal=True))["ms"]
    kr, vr = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        sdpa = bench_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, kr, vr, is_causal=True))["ms"]
    ref = xattention_scores_triton(q, k, stride=stride)
    rows = []
    if n <= 16384:  # the kernel against the PyTorch reference (float32 from the same bf16 inputs)
        exact = xattention_scores_reference(q, k, stride=stride)
        rows.append({"seqlen": n, "variant": "reference_check", "max_abs_diff": float((ref - exact).abs().max())})
        print(f"{n}: kernel vs PyTorch reference, max abs diff {rows[-1]['max_abs_diff']:.2e} (row sums 16)")
        del exact
    variants = {"default": lambda: xattention_scores_triton(q, k, stride=stride)}
    for cfg, flat in configs:
        name = ",".join(map(str, cfg)) + (",flat" if flat else "")
        variants[name] = lambda cfg=cfg, flat=flat: xattention_scores_triton(
            q, k, stride=stride, config=cfg, flatten=flat
        )
    if baseline is not None:
        variants["baseline"] = lambda: baseline.xattention_scores_triton(q, k, stride=stride)
    variants["select"] = lambda: select("xattention", q, k, **options)
    for name, fn in variants.items():
        try:
            out = fn()
            diff = None if name == "select" else float((out - ref).abs().max())
            ms = bench_ms(fn)["ms"]
        except Exception as err:  # a config the compiler rejects (shared memory) is reported, not fatal
            rows.append({"seqlen": n, "variant": name, "error": str(err).splitlines()[0][:120]})
            continue
        row = {"seqlen": n, "variant": name, "ms": ms, "frac_of_dense": ms / dense, "frac_of_sdpa": ms / sdpa}
        rows.append({**row, "dense_ms": dense, "sdpa_flash_ms": sdpa, "max_abs_diff": diff})
    return rows


def main() -> None:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="16384,32768,65536,131072")
    p.add_argument("--heads", default="12,2,128", help="Hq,Hkv,d")
    p.add_argument("--stride", type=int, default=8)
    p.add_argument(
        "--configs", default=";".join(CONFIGS), help="BLOCK_T,BLOCK_U,warps,stages[,flat];... (flat: flattened loop)"
    )
    p.add_argument("--baseline", default=None, help="an earlier antidiagonal.py to time beside this one")
    args = p.parse_args()
    hq, hkv, d = (int(x) for x in args.heads.split(","))
    baseline = None
    if args.baseline:
        spec = importlib.util.spec_from_file_location("antidiagonal_baseline", args.baseline)
        baseline = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(baseline)
    options = dict(SAFE_OPTIONS["xattention"], stride=args.stride)
    configs = []
    for c in args.configs.split(";"):
        fields = c.split(",")
        configs.append((tuple(int(x) for x in fields[:4]), fields[4:] == ["flat"]))
    rows = []
    for n in (int(x) for x in args.lengths.split(",")):
        found = one_length(n, hq, hkv, d, args.stride, configs, baseline, options)
        columns = ["seqlen", "variant", "ms", "frac_of_dense", "frac_of_sdpa", "dense_ms", "max_abs_diff"]
        print_table([r for r in found if "ms" in r], columns)
        for r in found:
            if "error" in r:
                print(r["variant"], r["error"])
        rows += found
        torch.cuda.empty_cache()
    dest = out_dir(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    path = write_result(dest / f"scoring_{gpu_tag()}.json", "xattention_scoring", rows)
    print("wrote", path, json.dumps({"options": options}))


if __name__ == "__main__":
    main()
