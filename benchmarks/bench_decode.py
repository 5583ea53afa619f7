"""Decode over a KV cache: sparseflash.decode_attention vs SDPA flash (enable_gqa) and FlexAttention, one GPU call.

Grid: batch in {1, 8, 64}, cache length in {8K, 32K, 128K} (every sequence full), Hq=32, Hkv=8, d=128, bf16,
one new token. Per point: sparseflash dense (contiguous cache and a paged copy with a shuffled page table),
SDPA flash with ``enable_gqa``, compiled FlexAttention (its decoding kernel), and sparseflash sparse reading
10 % of the 128-token blocks (random distinct blocks per (sequence, KV head), plus the current block).
Outputs are checked first: sparseflash dense vs SDPA, paged vs contiguous, sparse vs SDPA over the gathered
blocks of sequence 0, flex vs SDPA.

Timing: each call is captured once in a CUDA graph and replayed with the L2 flushed before every replay
(CUDA events around the replay only): ``ms`` is the median GPU time, as in a graph-captured decode loop;
``ms_eager`` is ``triton.testing.do_bench`` on the plain Python call (adds host launch overhead where the
GPU outruns it). ``tb_s`` = K+V bytes read / ``ms`` (sparse: the bytes of the blocks read); ``pct_copy`` =
``tb_s`` / device copy bandwidth (read + write bytes / time of a 1 GiB copy) measured in the same run.
Writes ``decode_<gpu>.json`` (results.md shape) and ``decode_<gpu>.png``; prints a table last.

    PYTHONUNBUFFERED=1 python benchmarks/bench_decode.py [--quick] [--sweep] [--page-size 16] [--out DIR]

``--sweep`` also times split counts and kernel configs (BLOCK_N, warps, stages) at B=1 128K and B=8 32K
(rows with impl ``sparseflash_sweep``), to tune ``sparseflash/ops/decode/launcher.py``'s defaults.
"""

from __future__ import annotations

import functools
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import base_parser, bench_ms, gpu_tag, measure_ceilings, out_dir, print_table, rel_err, write_result

from sparseflash.ops.decode.api import decode_attention  # noqa: E402
from sparseflash.ops.decode.launcher import choose_num_splits  # noqa: E402
from sparseflash.ops.tuning import DecodeConfig, Tuning, get_tuning, set_tuning  # noqa: E402

HQ, HKV, D, BLOCK = 32, 8, 128, 128
BATCHES = (1, 8, 64)
LENGTHS = (8192, 32768, 131072)
SPARSE_FRACTION = 0.10
SWEEP_POINTS = ((1, 131072), (8, 32768))
SWEEP_SPLITS = (8, 16, 24, 32, 48, 64, 96, 128)
SWEEP_CONFIGS = ("64,4,3", "64,4,4", "64,2,3", "128,4,2", "128,8,3", "32,4,4")
TABLE_COLUMNS = [
    "batch",
    "kv_len",
    "impl",
    "paged",
    "kv_fraction",
    "ms",
    "tb_s",
    "pct_copy",
    "vs_sdpa",
    "ms_eager",
    "num_splits",
    "rel_err",
]


def parse_args(argv: list[str] | None = None):
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", action="store_true", help="also time split counts and kernel configs")
    parser.add_argument("--page-size", type=int, default=16, help="page size of the paged cache (default 16)")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (saves its compile time)")
    return parser.parse_args(argv)


def kv_bytes(batch: int, kv_len: int, fraction: float = 1.0) -> float:
    """K + V bytes a decode step reads (bf16)."""
    return 2 * batch * HKV * kv_len * D * 2 * fraction


def bench_graph_ms(fn: Callable[[], object], *, budget_ms: float = 300.0) -> dict[str, float]:
    """Median / p20 / p80 GPU ms of one CUDA-graph replay of ``fn``, L2 flushed before each replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    events = []
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    reps = int(min(1000, max(20, budget_ms / max(start.elapsed_time(end), 1e-3))))
    for _ in range(reps):
        flush.zero_()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        graph.replay()
        e.record()
        events.append((s, e))
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in events)
    q = statistics.quantiles(times, n=10)
    return {"ms": statistics.median(times), "ms_p20": q[1], "ms_p80": q[7]}


def sparse_lists(batch: int, kv_len: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Random distinct blocks below the current one, so that listed + current = 10 % of the blocks."""
    num_blocks = kv_len // BLOCK
    keep = max(0, round(SPARSE_FRACTION * num_blocks) - 1)
    scores = torch.rand(batch, HKV, num_blocks - 1, generator=gen, device="cuda")
    ids = scores.argsort(dim=-1)[..., :keep].sort(dim=-1).values.to(torch.int32)
    counts = torch.full((batch, HKV), keep, dtype=torch.int32, device="cuda")
    return ids, counts, (keep + 1) / num_blocks


def to_paged(cache: torch.Tensor, perm: torch.Tensor, page_size: int) -> torch.Tensor:
    """(B, Hkv, S, D) -> pages (B * S / page_size, Hkv, page_size, D) placed at ``perm``, one sequence at a time."""
    batch, hkv, seq, d = cache.shape
    per_seq = seq // page_size
    pages = torch.empty(batch * per_seq, hkv, page_size, d, dtype=cache.dtype, device=cache.device)
    for b in range(batch):
        pages[perm[b * per_seq : (b + 1) * per_seq]] = cache[b].reshape(hkv, per_seq, page_size, d).transpose(0, 1)
    return pages


def sdpa_flash(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    return run


def timed(fn: Callable[[], object], row: dict) -> dict:
    """Fill ``row`` with graph and eager timings of ``fn`` (an error string instead if it fails)."""
    try:
        row.update(bench_graph_ms(fn))
    except Exception as e:  # a peer that cannot be captured still gets its eager time
        row["graph_error"] = f"{type(e).__name__}: {str(e)[:160]}"
    try:
        row["ms_eager"] = bench_ms(fn)["ms"]
        row.setdefault("ms", row["ms_eager"])
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
    return row


def add_bandwidth(row: dict, copy_tb_s: float) -> dict:
    if "ms" in row:
        row["tb_s"] = kv_bytes(row["batch"], row["kv_len"], row["kv_fraction"]) / (row["ms"] * 1e-3) / 1e12
        row["pct_copy"] = 100 * row["tb_s"] / copy_tb_s
    return row


def gathered_reference(q, k, v, ids, counts, kv_len):
    """SDPA over the listed blocks + the current block of sequence 0 (every head lists the same count)."""
    keep = int(counts[0, 0])
    blocks = torch.cat(
        [ids[0, :, :keep].long(), torch.full((HKV, 1), kv_len // BLOCK - 1, device="cuda", dtype=torch.long)], dim=1
    )
    tokens = (blocks[..., None] * BLOCK + torch.arange(BLOCK, device="cuda")).reshape(HKV, -1)  # (Hkv, n)
    idx = tokens[..., None].expand(-1, -1, D)
    k_sel, v_sel = torch.gather(k[0], 1, idx)[None], torch.gather(v[0], 1, idx)[None]
    return sdpa_flash(q[:1], k_sel, v_sel)()


def run_point(batch: int, kv_len: int, args, flex, copy_tb_s: float) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(batch * 1000 + kv_len)
    q = torch.randn(batch, HQ, 1, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(batch, HKV, kv_len, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(batch, HKV, kv_len, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    lengths = torch.full((batch,), kv_len, dtype=torch.int32, device="cuda")
    case = {"batch": batch, "kv_len": kv_len, "heads_q": HQ, "heads_kv": HKV, "head_dim": D, "dtype": "bf16"}
    splits = choose_num_splits(batch, HKV, kv_len, torch.cuda.get_device_properties(0).multi_processor_count)
    rows = []

    ours = lambda: decode_attention(q, k, v, lengths, check_values=False)
    sdpa = sdpa_flash(q, k, v)
    ref = sdpa()
    out = ours()
    rows.append(
        timed(
            ours,
            {
                **case,
                "impl": "sparseflash",
                "paged": False,
                "kv_fraction": 1.0,
                "num_splits": splits,
                "rel_err": rel_err(out, ref),
            },
        )
    )
    rows.append(timed(sdpa, {**case, "impl": "sdpa_flash", "paged": False, "kv_fraction": 1.0, "rel_err": 0.0}))
    if flex is not None:
        fx = lambda: flex(q, k, v, enable_gqa=True)
        try:
            err = rel_err(fx(), ref)
            rows.append(timed(fx, {**case, "impl": "flex", "paged": False, "kv_fraction": 1.0, "rel_err": err}))
        except Exception as e:
            rows.append(
                {
                    **case,
                    "impl": "flex",
                    "paged": False,
                    "kv_fraction": 1.0,
                    "error": f"{type(e).__name__}: {str(e)[:160]}",
                }
            )
    ids, counts, fraction = sparse_lists(batch, kv_len, gen)
    sparse = lambda: decode_attention(
        q, k, v, lengths, kv_block_indices=ids, kv_block_counts=counts, block_size=BLOCK, check_values=False
    )
    err = rel_err(sparse()[:1], gathered_reference(q, k, v, ids, counts, kv_len))
    rows.append(
        timed(
            sparse,
            {
                **case,
                "impl": "sparseflash",
                "paged": False,
                "kv_fraction": round(fraction, 4),
                "block_size": BLOCK,
                "rel_err": err,
            },
        )
    )

    # paged copy: built one cache at a time, freeing the contiguous one (B=64 x 128K is 34 GB per pair)
    page_size = args.page_size
    need = kv_bytes(batch, kv_len) / 2  # one cache's pages at a time
    if torch.cuda.mem_get_info()[0] < need + 2**30:
        rows.append(
            {
                **case,
                "impl": "sparseflash",
                "paged": True,
                "page_size": page_size,
                "kv_fraction": 1.0,
                "error": "skipped: not enough memory for the paged copy",
            }
        )
    else:
        del sparse, ours, sdpa
        perm = torch.randperm(batch * kv_len // page_size, generator=gen, device="cuda")
        table = perm.reshape(batch, -1).to(torch.int32)
        k_pages = to_paged(k, perm, page_size)
        del k
        v_pages = to_paged(v, perm, page_size)
        del v
        paged = lambda: decode_attention(q, k_pages, v_pages, lengths, page_table=table, check_values=False)
        rows.append(
            timed(
                paged,
                {
                    **case,
                    "impl": "sparseflash",
                    "paged": True,
                    "page_size": page_size,
                    "kv_fraction": 1.0,
                    "num_splits": splits,
                    "rel_err": rel_err(paged(), out),
                },
            )
        )
        del k_pages, v_pages
    sdpa_ms = next((r["ms"] for r in rows if r["impl"] == "sdpa_flash" and "ms" in r), None)
    for r in rows:
        add_bandwidth(r, copy_tb_s)
        if sdpa_ms and "ms" in r and r["kv_fraction"] == 1.0:
            r["vs_sdpa"] = sdpa_ms / r["ms"]
    dense_ms = rows[0].get("ms")
    for r in rows:
        if r["impl"] == "sparseflash" and r["kv_fraction"] < 1.0 and dense_ms and "ms" in r:
            r["speedup_vs_dense"] = dense_ms / r["ms"]
    torch.cuda.empty_cache()
    return rows


def sweep(copy_tb_s: float) -> list[dict]:
    """Split counts x kernel configs at the points where the split heuristic matters most."""
    rows = []
    old = get_tuning()
    for batch, kv_len in SWEEP_POINTS:
        q = torch.randn(batch, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(batch, HKV, kv_len, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        lengths = torch.full((batch,), kv_len, dtype=torch.int32, device="cuda")
        for config in SWEEP_CONFIGS:
            set_tuning(Tuning(decode=DecodeConfig(*(int(x) for x in config.split(",")))))
            for splits in SWEEP_SPLITS:
                fn = functools.partial(decode_attention, q, k, v, lengths, num_splits=splits, check_values=False)
                row = {
                    "batch": batch,
                    "kv_len": kv_len,
                    "impl": "sparseflash_sweep",
                    "paged": False,
                    "kv_fraction": 1.0,
                    "config": config,
                    "num_splits": splits,
                }
                try:
                    row.update(bench_graph_ms(fn, budget_ms=100.0))
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
                rows.append(add_bandwidth(row, copy_tb_s))
                print({c: row.get(c) for c in ("batch", "kv_len", "config", "num_splits", "ms", "tb_s")}, flush=True)
    set_tuning(old)
    return rows


def plot(rows: list[dict], path: Path, copy_tb_s: float, title: str) -> None:
    """TB/s vs cache length per batch, one line per implementation, the copy bandwidth dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    series = [
        ("sparseflash", False, True, "o", "sparseflash dense"),
        ("sparseflash", True, True, "s", "sparseflash dense, paged"),
        ("sdpa_flash", False, True, "x", "SDPA flash"),
        ("flex", False, True, "+", "FlexAttention"),
        ("sparseflash", False, False, "^", f"sparseflash sparse {SPARSE_FRACTION:.0%} (bytes read)"),
    ]
    for ax, batch in zip(axes[0], batches, strict=True):
        for impl, paged, dense, marker, label in series:
            pts = sorted(
                (r["kv_len"], r["tb_s"])
                for r in rows
                if r["batch"] == batch
                and r["impl"] == impl
                and r.get("paged") == paged
                and (r["kv_fraction"] == 1.0) == dense
                and "tb_s" in r
            )
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=label)
        ax.axhline(copy_tb_s, color="k", ls="--", lw=1, label="device copy")
        ax.axhline(0.85 * copy_tb_s, color="gray", ls=":", lw=1, label="85 % of copy")
        ax.set_xscale("log", base=2)
        ax.set_title(f"batch {batch}")
        ax.set_xlabel("cache length (tokens)")
        ax.set_ylabel("K+V TB/s")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    dest = out_dir(args.out)
    if not torch.cuda.is_available():
        raise SystemExit("bench_decode.py needs a CUDA GPU")
    ceilings = measure_ceilings()
    copy_tb_s = ceilings["copy_tb_s"]
    print({"ceilings": ceilings}, flush=True)
    flex = None
    if not args.no_flex:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
    points = [(1, 8192), (8, 32768)] if args.quick else [(b, n) for b in BATCHES for n in LENGTHS]
    rows = []
    for batch, kv_len in points:
        point_rows = run_point(batch, kv_len, args, flex, copy_tb_s)
        rows += point_rows
        for r in point_rows:
            print({c: r.get(c) for c in TABLE_COLUMNS + ["error", "graph_error"] if c in r}, flush=True)
    if args.sweep:
        rows += sweep(copy_tb_s)
    tag = gpu_tag()
    write_result(dest / f"decode_{tag}.json", "decode", rows, ceilings)
    title = f"Decode, Hq={HQ}, Hkv={HKV}, d={D}, bf16, 1 new token ({torch.cuda.get_device_name()})"
    plot([r for r in rows if r["impl"] != "sparseflash_sweep"], dest / f"decode_{tag}.png", copy_tb_s, title)
    print_table([r for r in rows if r["impl"] != "sparseflash_sweep"], TABLE_COLUMNS)


if __name__ == "__main__":
    main()
