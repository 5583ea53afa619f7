"""Block-sparse prefill: sparseflash.block_sparse_attention vs FlexAttention on identical layouts, one GPU call.

B=1, Hq=32, Hkv=8, d=128, bf16, causal, lengths 16K/64K/128K; layouts: random causal block masks with the
diagonal kept at densities 5/10/30/100 %, per query head ("random") and per KV head ("random_kv", the GQA
packed path), plus a structured one (sink + local window + vertical stripes). Flex gets the same blocks via
``BlockLayout.to_flex`` (split into partial and full blocks). Also times our dense kernel for the ideal line
``density x dense time``. Writes ``prefill_sparse_<gpu>.json`` + ``.png``; prints a table last.

    PYTHONUNBUFFERED=1 python benchmarks/bench_sparse_vs_flex.py [--quick] [--out DIR]
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch
import torch._dynamo

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import base_parser, bench_ms, gpu_tag, out_dir, print_table, rel_err, write_result

import sparseflash as sf  # noqa: E402
from sparseflash.layouts import causal_block_mask  # noqa: E402

HQ, HKV, D, BLOCK = 32, 8, 128, 128


def random_layout(seq: int, heads: int, density: float, gen: torch.Generator) -> sf.BlockLayout:
    """Random causal blocks at ``density`` of the causal blocks, the diagonal always kept."""
    nb = -(-seq // BLOCK)
    allowed = causal_block_mask(seq, seq, (BLOCK, BLOCK), device="cuda")
    diag = torch.eye(nb, dtype=torch.bool, device="cuda")
    # off-diagonal keep probability so the expected density (diagonal included) hits the target
    off = allowed.sum() - nb
    p = max(0.0, (density * allowed.sum().item() - nb) / off.item())
    keep = (torch.rand(1, heads, nb, nb, device="cuda", generator=gen) < p) | diag
    return sf.BlockLayout.from_dense(keep & allowed, seq_len_q=seq, seq_len_k=seq, block_size=BLOCK)


def structured_layout(seq: int) -> sf.BlockLayout:
    """Sink block + 8-block local window + 16 vertical stripes (every 64th block), shared by all heads."""
    nb = -(-seq // BLOCK)
    i = torch.arange(nb, device="cuda")[:, None]
    j = torch.arange(nb, device="cuda")[None, :]
    keep = (j == 0) | ((i - j) < 8) | (j % max(1, nb // 16) == 0)
    keep &= causal_block_mask(seq, seq, (BLOCK, BLOCK), device="cuda")
    return sf.BlockLayout.from_dense(keep[None, None], seq_len_q=seq, seq_len_k=seq, block_size=BLOCK)


def main() -> None:
    # one compiled flex per process: every shape compiles once; a recompile limit would fall back to eager
    torch._dynamo.config.cache_size_limit = 64
    args = base_parser(__doc__).parse_args()
    dest = out_dir(args.out)
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    lengths = [16384] if args.quick else [16384, 65536, 131072]
    densities = [0.05, 0.10, 0.30, 1.0]
    rows = []
    for seq in lengths:
        gen = torch.Generator(device="cuda").manual_seed(seq)
        q = torch.randn(1, HQ, seq, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        k = torch.randn(1, HKV, seq, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        v = torch.randn(1, HKV, seq, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        dense = bench_ms(functools.partial(sf.flash_attention, q, k, v))["ms"]
        rows.append(
            {
                "seqlen": seq,
                "layout": "dense",
                "density": 1.0,
                "head_dim": D,
                "impl": "sparseflash_dense",
                "ms": dense,
                "speedup_vs_dense": 1.0,
            }
        )
        layouts = [
            (f"random{'_kv' if heads == HKV else ''}", random_layout(seq, heads, rho, gen))
            for rho in densities
            for heads in (HQ, HKV)
        ]
        layouts.append(("structured", structured_layout(seq)))
        for name, layout in layouts:
            density = layout.density()
            case = {"seqlen": seq, "layout": name, "density": round(density, 4), "head_dim": D}
            block_mask = layout.to_flex(num_heads=HQ, block_lookup=False)
            fns = {
                "sparseflash": functools.partial(sf.block_sparse_attention, q, k, v, layout, check_indices=False),
                "flex": functools.partial(flex, q, k, v, block_mask=block_mask, enable_gqa=True),
            }
            outs = {}
            for impl, fn in fns.items():
                row = {**case, "impl": impl}
                try:
                    outs[impl] = fn()
                    row.update(bench_ms(fn))
                    row["speedup_vs_dense"] = dense / row["ms"]
                    row["ideal_ms"] = density * dense
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
                rows.append(row)
            if len(outs) == 2:  # same layout, same function: the two outputs must agree
                err = rel_err(outs["sparseflash"], outs["flex"])
                for r in rows[-2:]:
                    r["rel_err_vs_flex"] = err
            write_result(dest / f"prefill_sparse_{gpu_tag()}.json", "prefill_sparse", rows)  # partial
            ours, theirs = rows[-2], rows[-1]
            if "ms" in ours and "ms" in theirs:
                ours["vs_flex"] = theirs["ms"] / ours["ms"]
            print(
                {
                    c: ours.get(c)
                    for c in ("seqlen", "layout", "density", "ms", "vs_flex", "speedup_vs_dense", "rel_err_vs_flex")
                },
                flush=True,
            )
    tag = gpu_tag()
    write_result(dest / f"prefill_sparse_{tag}.json", "prefill_sparse", rows)
    plot(rows, dest / f"prefill_sparse_{tag}.png")
    print_table(
        [r for r in rows if r["impl"] != "flex"],
        ["seqlen", "layout", "density", "impl", "ms", "ideal_ms", "vs_flex", "speedup_vs_dense", "rel_err_vs_flex"],
    )


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["seqlen"] for r in rows})
    fig, axes = plt.subplots(1, len(lengths), figsize=(6 * len(lengths), 4), squeeze=False)
    for ax, seq in zip(axes[0], lengths, strict=True):
        dense = next(r["ms"] for r in rows if r["seqlen"] == seq and r["impl"] == "sparseflash_dense")
        ax.plot([0, 1], [0, dense], "k--", label="ideal: density x dense")
        for impl, layout, marker in [
            ("sparseflash", "random", "o"),
            ("sparseflash", "random_kv", "s"),
            ("flex", "random", "x"),
            ("flex", "random_kv", "+"),
            ("sparseflash", "structured", "*"),
            ("flex", "structured", "^"),
        ]:
            pts = sorted(
                (r["density"], r["ms"])
                for r in rows
                if r["seqlen"] == seq and r["impl"] == impl and r["layout"] == layout and "ms" in r
            )
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=f"{impl} {layout}")
        ax.set_title(f"{seq // 1024}K tokens")
        ax.set_xlabel("density (causal blocks kept)")
        ax.set_ylabel("ms")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Block-sparse prefill, Hq={HQ}, Hkv={HKV}, d={D}, bf16 ({torch.cuda.get_device_name()})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
