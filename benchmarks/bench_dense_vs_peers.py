"""Dense prefill: sparseflash.flash_attention vs SDPA (flash, cuDNN) and FlexAttention, one GPU call.

B=1, Hq=32, Hkv=8, bf16, d in {128, 64}, causal and not, Sq=Sk in {4K, 16K, 64K, 128K}, random inputs,
do_bench medians. Checks each implementation against a float32 reference on a slice first. Writes
``prefill_dense_<gpu>.json`` (results.md shape) and ``prefill_dense_<gpu>.png``; prints a table last.

    PYTHONUNBUFFERED=1 python benchmarks/bench_dense_vs_peers.py [--quick] [--sweep] [--out DIR]

``--sweep`` also times tile configs of the kernel (BLOCK_M, BLOCK_N, warps, stages) at 16K to tune
``sparseflash/ops/prefill/launcher.py``'s defaults (rows with impl ``sparseflash_cfg<...>``).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch
import torch._dynamo
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import base_parser, bench_ms, gpu_tag, measure_ceilings, out_dir, print_table, rel_err, write_result

import sparseflash as sf  # noqa: E402
from sparseflash.ops.prefill.launcher import TileConfig, prefill_forward  # noqa: E402
from sparseflash.ops.prefill.reference import masked_attention, token_mask  # noqa: E402

HQ, HKV = 32, 8
SWEEP = {
    64: [
        TileConfig(128, 64, 4, 3),
        TileConfig(128, 128, 8, 3),
        TileConfig(128, 64, 8, 3),
        TileConfig(64, 64, 4, 3),
        TileConfig(128, 128, 4, 3),
        TileConfig(128, 64, 4, 4),
    ],
    128: [
        TileConfig(128, 64, 8, 3),
        TileConfig(128, 128, 8, 2),
        TileConfig(128, 64, 4, 3),
        TileConfig(64, 64, 4, 3),
        TileConfig(128, 32, 4, 3),
        TileConfig(128, 64, 8, 4),
        TileConfig(128, 128, 8, 3),
    ],
}


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def peers(q, k, v, causal):
    """name -> zero-argument callable for each peer (None where the backend refuses the shape)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask

    def sdpa(backend, repeat):
        kk = k.repeat_interleave(HQ // HKV, 1) if repeat else k
        vv = v.repeat_interleave(HQ // HKV, 1) if repeat else v

        def run():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, kk, vv, is_causal=causal, enable_gqa=not repeat)

        return run

    seq = q.shape[2]
    flex = _compiled_flex()
    mask = create_block_mask(
        lambda b, h, qi, ki: qi >= ki if causal else qi >= 0, None, None, seq, seq, device="cuda", _compile=True
    )
    fns = {
        "sparseflash": lambda: sf.flash_attention(q, k, v, causal=causal),
        "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION, False),
        "sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION, True),  # cuDNN needs K/V repeated (copy not timed)
        "flex": lambda: flex(q, k, v, block_mask=mask, enable_gqa=True),
    }
    return fns


def _run_config(q, k, v, causal, config):
    return prefill_forward(q, k, v, causal=causal, scale=q.shape[-1] ** -0.5, config=config)[0]


def check(fn, q, k, v, causal, rows=256):
    """Relative error of the last ``rows`` query rows of two heads vs a float32 reference."""
    out = fn()
    seq = q.shape[2]
    picked = range(seq - rows, seq)
    mask = token_mask(picked, seq, seq, num_heads=2, causal=causal, device=q.device)
    ref, _ = masked_attention(
        q[:, :2, seq - rows :].float(), k[:, :1].float(), v[:, :1].float(), mask, q.shape[-1] ** -0.5
    )
    return rel_err(out[:, :2, seq - rows :], ref)


def main() -> None:
    # one compiled flex per process: every shape compiles once; a recompile limit would fall back to eager
    torch._dynamo.config.cache_size_limit = 64
    parser = base_parser(__doc__)
    parser.add_argument("--sweep", action="store_true", help="also time tile configs at 16K")
    args = parser.parse_args()
    dest = out_dir(args.out)
    ceilings = measure_ceilings()
    print("ceilings", ceilings, flush=True)
    lengths = [4096, 16384] if args.quick else [4096, 16384, 65536, 131072]
    rows = []
    for head_dim in (128, 64):
        for causal in (True, False):
            for seq in lengths:
                gen = torch.Generator(device="cuda").manual_seed(seq + head_dim)
                q = torch.randn(1, HQ, seq, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
                k = torch.randn(1, HKV, seq, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
                v = torch.randn(1, HKV, seq, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
                flops = 4 * HQ * seq * seq * head_dim * (0.5 if causal else 1.0)
                case = {
                    "seqlen": seq,
                    "head_dim": head_dim,
                    "causal": causal,
                    "batch": 1,
                    "heads_q": HQ,
                    "heads_kv": HKV,
                    "dtype": "bf16",
                }
                fns = peers(q, k, v, causal)
                if args.sweep and seq == 16384 and head_dim in SWEEP:
                    for cfg in SWEEP[head_dim]:
                        name = f"sparseflash_cfg{cfg.block_m}x{cfg.block_n}w{cfg.num_warps}s{cfg.num_stages}"
                        fns[name] = functools.partial(_run_config, q, k, v, causal, cfg)
                for impl, fn in fns.items():
                    row = {**case, "impl": impl}
                    try:
                        row["rel_err"] = check(fn, q, k, v, causal) if seq <= 16384 else None
                        row.update(bench_ms(fn))
                        row["tflops"] = flops / row["ms"] / 1e9
                    except Exception as e:  # a peer refusing a shape is a result, not a crash
                        row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
                    rows.append(row)
                    # partial results on disk after every point, in case the call is killed
                    write_result(dest / f"prefill_dense_{gpu_tag()}.json", "prefill_dense", rows, ceilings)
                    print(
                        {
                            k2: row.get(k2)
                            for k2 in ("impl", "seqlen", "head_dim", "causal", "ms", "tflops", "rel_err", "error")
                        },
                        flush=True,
                    )
    _add_ratios(rows)
    tag = gpu_tag()
    write_result(dest / f"prefill_dense_{tag}.json", "prefill_dense", rows, ceilings)
    plot(rows, dest / f"prefill_dense_{tag}.png")
    table = [r for r in rows if "tflops" in r and not r["impl"].startswith("sparseflash_cfg")]
    print_table(
        table, ["head_dim", "causal", "seqlen", "impl", "ms", "tflops", "vs_sdpa_flash", "vs_sdpa_cudnn", "vs_flex"]
    )
    sweep = [r for r in rows if r["impl"].startswith("sparseflash_cfg") and "tflops" in r]
    if sweep:
        print_table(sweep, ["head_dim", "causal", "impl", "ms", "tflops", "rel_err"])


def _add_ratios(rows: list[dict]) -> None:
    """sparseflash TFLOP/s over each peer's at the same point (>1: sparseflash faster)."""
    key = lambda r: (r["seqlen"], r["head_dim"], r["causal"])  # noqa: E731
    by_point: dict = {}
    for r in rows:
        by_point.setdefault(key(r), {})[r["impl"]] = r
    for point in by_point.values():
        ours = point.get("sparseflash", {}).get("tflops")
        for peer in ("sdpa_flash", "sdpa_cudnn", "flex"):
            theirs = point.get(peer, {}).get("tflops")
            if ours and theirs:
                point["sparseflash"][f"vs_{peer}"] = ours / theirs


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4), sharey=True)
    for ax, (head_dim, causal) in zip(axes, [(128, True), (128, False), (64, True), (64, False)], strict=True):
        for impl in ("sparseflash", "sdpa_cudnn", "sdpa_flash", "flex"):
            pts = sorted(
                (r["seqlen"], r["tflops"])
                for r in rows
                if r["impl"] == impl and r["head_dim"] == head_dim and r["causal"] == causal and "tflops" in r
            )
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_title(f"d={head_dim}, {'causal' if causal else 'non-causal'}")
        ax.set_xlabel("sequence length")
    axes[0].set_ylabel("TFLOP/s (causal FLOPs halved)")
    axes[0].legend()
    fig.suptitle(f"Dense prefill, B=1, Hq={HQ}, Hkv={HKV}, bf16 ({torch.cuda.get_device_name()})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
