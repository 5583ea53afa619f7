"""One sparse attention layer of a patched model, piece by piece, on a real model's q/k (issue 14), one GPU call.

Loads a ``capture_qk.py`` file (q and k after RoPE of one layer on real text; v is random: no kernel's time depends
on its values) and, for each ``--lengths`` prefix, times with ``do_bench`` (CUDA events, warm, medians):

* ``scoring``: XAttention's antidiagonal estimate (Triton);
* ``select_sort``: the PyTorch selection from that estimate (``select_by_cumulative_mass`` + ``from_dense``: sort,
  cumulative sums, scatter, the bool mask and its compression), as ``xattention`` ran it before the fused kernel;
* ``select_fused``: the same from the fused kernel (``mass_select_kernel``), and how many rows' lists differ;
* ``selection``: the whole ``select("xattention", q, k, **options)`` (scoring + geometry + fused selection);
* ``sparse_attn``: ``block_sparse_attention`` with that layout (per ``--tiles`` config as well);
* ``exact_tail``: the last ``dense_last_queries`` rows over all keys as a separate call (``flash_attention``);
* ``layer``: what the ``sparse`` route of a patched model does: selection, the exact tail as fully kept rows of the
  layout (``with_exact_rows``), the sparse kernel; ``layer_separate_tail``: the same with the tail as a separate call
  (the route before the fold);
* ``dense_ours``, ``sdpa_flash``, ``sdpa_cudnn``: exact causal attention, our kernel and SDPA's (GQA as
  transformers runs it: ``enable_gqa`` for flash, K/V repeated for cuDNN, the repeat not timed).

    python benchmarks/bench_sparse_layer.py --qk qk_L14.pt [--lengths 16384,32768,65536] [--out DIR]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import base_parser, bench_ms, gpu_tag, out_dir, print_table, write_result  # noqa: E402

import sparseflash as sf  # noqa: E402
from sparseflash.integrations.hf.plan import DEFAULT_DENSE_LAST_QUERIES, SAFE_OPTIONS  # noqa: E402
from sparseflash.layouts.exact_rows import with_exact_rows  # noqa: E402
from sparseflash.ops.scores.antidiagonal import xattention_scores_triton  # noqa: E402
from sparseflash.ops.tuning import TileConfig, tuned  # noqa: E402
from sparseflash.patterns import select  # noqa: E402
from sparseflash.patterns import selection as sel  # noqa: E402
from sparseflash.patterns.mass_select_kernel import (  # noqa: E402
    mass_select_layout_reference,
    mass_select_layout_triton,
)

TILES = ["128,64,8,3", "128,128,8,3", "64,128,4,3", "128,128,8,2"]


def one_length(q: torch.Tensor, k: torch.Tensor, n: int, options: dict, tiles: list[str], tail: int) -> list[dict]:
    q, k = q[:, :, :n].contiguous(), k[:, :, :n].contiguous()
    v = torch.randn_like(k)
    stride, block = options.get("stride", 16), 128
    tau = options.get("threshold", 0.9)
    est = xattention_scores_triton(q, k, stride=stride, block_size=block)
    allowed, forced = sel.selection_geometry(
        n, n, (block, block), sink_blocks=1, local_blocks=options.get("local_blocks", 0), device=q.device
    )
    geo = dict(extra=options.get("extra_blocks", 0), seq_len_q=n, seq_len_k=n, block_size=(block, block))
    sorted_layout = mass_select_layout_reference(est, tau, allowed, forced, **geo)
    fused_layout = mass_select_layout_triton(est, tau, allowed, forced, **geo)
    rows_differ = (sorted_layout.kv_num_blocks != fused_layout.kv_num_blocks).float().mean().item()
    layout = select("xattention", q, k, **options)
    kk, vv = k.repeat_interleave(q.shape[1] // k.shape[1], 1), v.repeat_interleave(q.shape[1] // k.shape[1], 1)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(backend, repeat):
        def run():
            with sdpa_kernel(backend):
                if repeat:
                    return F.scaled_dot_product_attention(q, kk, vv, is_causal=True)
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        return run

    def sparse_route():
        lay = with_exact_rows(select("xattention", q, k, **options), tail)
        return sf.block_sparse_attention(q, k, v, lay, causal=True, check_indices=False)

    def separate_tail_route():
        lay = select("xattention", q, k, **options)
        out = sf.block_sparse_attention(q, k, v, lay, causal=True, check_indices=False)
        out[:, :, -tail:] = sf.flash_attention(q[:, :, -tail:], k, v, causal=True)
        return out

    fns = {
        "scoring": lambda: xattention_scores_triton(q, k, stride=stride, block_size=block),
        "select_sort": lambda: mass_select_layout_reference(est, tau, allowed, forced, **geo),
        "select_fused": lambda: mass_select_layout_triton(est, tau, allowed, forced, **geo),
        "selection": lambda: select("xattention", q, k, **options),
        "sparse_attn": lambda: sf.block_sparse_attention(q, k, v, layout, causal=True, check_indices=False),
        "exact_tail": lambda: sf.flash_attention(q[:, :, -tail:], k, v, causal=True),
        "layer": sparse_route,
        "layer_separate_tail": separate_tail_route,
        "dense_ours": lambda: sf.flash_attention(q, k, v, causal=True),
        "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION, False),
        "sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION, True),
    }
    rows = []
    for name, fn in fns.items():
        rows.append({"seqlen": n, "part": name, **bench_ms(fn)})
    for spec in tiles:
        cfg = TileConfig(*(int(x) for x in spec.split(",")))
        try:
            with tuned(prefill=cfg):
                timing = bench_ms(lambda: sf.block_sparse_attention(q, k, v, layout, causal=True, check_indices=False))
        except Exception as err:  # a config this kernel or GPU does not take: report it, time the others
            print(f"tiles {spec}: {type(err).__name__}: {str(err)[:120]}")
            continue
        rows.append({"seqlen": n, "part": f"sparse_attn[{spec}]", **timing})
    ref = {r["part"]: r["ms"] for r in rows}["sdpa_cudnn"]
    density = float(layout.density(causal=True)) if hasattr(layout, "density") else None
    for r in rows:
        r["vs_sdpa_cudnn"] = r["ms"] / ref
        r["density"] = density
        r["rows_differ_fused_vs_sort"] = rows_differ
    return rows


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--qk", required=True, help="a capture_qk.py file")
    p.add_argument("--lengths", default="16384,32768,65536")
    p.add_argument("--options", default=json.dumps(SAFE_OPTIONS["xattention"]), help="xattention options, JSON")
    p.add_argument("--tiles", default=";".join(TILES), help="';'-separated BLOCK_M,BLOCK_N,warps,stages configs")
    p.add_argument("--tail", type=int, default=DEFAULT_DENSE_LAST_QUERIES)
    args = p.parse_args(argv)
    saved = torch.load(args.qk, map_location="cpu", weights_only=True)
    q = saved["q"].cuda().to(torch.bfloat16)
    k = saved["k"].cuda().to(torch.bfloat16)
    options = json.loads(args.options)
    tiles = [t for t in args.tiles.split(";") if t]
    rows = []
    for n in (int(x) for x in args.lengths.split(",")):
        if n > q.shape[2]:
            print(f"skip {n}: the capture has {q.shape[2]} tokens")
            continue
        rows += one_length(q, k, n, options, tiles, args.tail)
        torch.cuda.empty_cache()
    print_table(rows, ["seqlen", "part", "ms", "vs_sdpa_cudnn", "density", "rows_differ_fused_vs_sort"])
    tag = Path(args.qk).stem
    path = out_dir(args.out) / f"sparse_layer_{gpu_tag()}_{tag}.json"
    write_result(path, "bench_sparse_layer", rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
