"""Decode over a KV cache: sparseflash.decode_attention, contiguous vs paged (two kernel paths), vs SDPA and Flex.

Grid: batch in {1, 8, 64}, cache length in {32K, 128K} (``--lengths`` adds 8K; every sequence full), Hq=32,
Hkv=8, d=128, bf16, one new token. Per point, in this order: sparseflash dense over the contiguous cache; the
same cache paged (page sizes 16, 64 and 256, a shuffled page table) through the kernel's two paged paths,
``new`` (pages looked up one tile ahead, the default) and ``old`` (each tile looks up its own pages: the
launcher's ``prefetch=False``), each checked against the contiguous output first (``rel_err``; above 1e-3 the
row is flagged); SDPA flash with ``enable_gqa``; sparseflash sparse reading 10 % of the 128-token blocks
(random distinct blocks per (sequence, KV head), plus the current block), new and old block-list loop; compiled
FlexAttention (its decoding kernel; skipped once the run is past ``--budget-s``). ``vs_contig`` is a row's time
over the contiguous dense time of its point (the issue-13 target: paged within 1.05).

Timing: each call is captured once in a CUDA graph and replayed with the L2 flushed before every replay
(CUDA events around the replay only): ``ms`` is the median GPU time, as in a graph-captured decode loop;
``ms_eager`` (contiguous, SDPA, Flex, sparse rows) is ``triton.testing.do_bench`` on the plain Python call (adds
host launch overhead where the GPU outruns it). ``tb_s`` = K+V bytes read / ``ms`` (sparse: the bytes of the
blocks read); ``pct_copy`` = ``tb_s`` / device copy bandwidth (read + write bytes / time of a 1 GiB copy)
measured in the same run. Writes ``decode_<gpu>.json`` (results.md shape) and ``decode_<gpu>.png``; prints the
full table, then the paged-vs-contiguous table, last.

    PYTHONUNBUFFERED=1 python benchmarks/bench_decode.py [--quick] [--sweep] [--sweep-paged] [--no-grid] [--no-flex]
        [--page-sizes 16 64 256] [--lengths 32768 131072] [--batches 1 8 64] [--budget-s 170] [--out DIR]

``--sweep`` also times split counts and kernel configs (BLOCK_N, warps, stages) at B=1 128K and B=8 32K
(rows with impl ``sparseflash_sweep``), to tune ``sparseflash/ops/decode/launcher.py``'s defaults.
``--sweep-paged`` times kernel configs of the contiguous and new paged paths, and of the old paged path with and
without two more pipeline stages, at page sizes 16 and 64 (impl ``sparseflash_sweep_paged``; about 3 minutes, a
call of its own with ``--no-grid``), to see whether the paged cache wants its own config.
"""

from __future__ import annotations

import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import base_parser, bench_ms, gpu_tag, measure_ceilings, out_dir, print_table, rel_err, write_result

from sparseflash.ops.decode.api import decode_attention  # noqa: E402
from sparseflash.ops.decode.checks import check_decode_inputs  # noqa: E402
from sparseflash.ops.decode.launcher import choose_num_splits, decode_forward  # noqa: E402
from sparseflash.ops.tuning import DecodeConfig, Tuning, get_tuning, set_tuning  # noqa: E402

HQ, HKV, D, BLOCK = 32, 8, 128, 128
BATCHES = (1, 8, 64)
LENGTHS = (32768, 131072)
PAGE_SIZES = (16, 64, 256)
SPARSE_FRACTION = 0.10
MISMATCH = 1e-3  # paged and contiguous add the same products in the same order: far below this
SWEEP_POINTS = ((1, 131072), (8, 32768))
SWEEP_SPLITS = (8, 16, 24, 32, 48, 64, 96, 128)
SWEEP_CONFIGS = ("64,4,3", "64,4,4", "64,2,3", "128,4,2", "128,8,3", "32,4,4")
PAGED_SWEEP_POINTS = ((1, 131072), (8, 32768), (64, 32768))
PAGED_SWEEP_CONFIGS = ("64,4,3", "64,4,4", "64,8,3", "128,8,3", "32,4,4")  # contiguous and the new paged path
PAGED_SWEEP_OLD = ("64,4,3", "64,4,5")  # the old paged path: the default, and two more stages (K/V double-buffered)
TABLE_COLUMNS = [
    "batch",
    "kv_len",
    "impl",
    "page_size",
    "path",
    "kv_fraction",
    "ms",
    "tb_s",
    "pct_copy",
    "vs_contig",
    "vs_sdpa",
    "ms_eager",
    "num_splits",
    "rel_err",
]
PAGED_COLUMNS = [
    "batch",
    "kv_len",
    "page_size",
    "contig_ms",
    "old_ms",
    "new_ms",
    "old_ratio",
    "new_ratio",
    "new_pct_copy",
]


def parse_args(argv: list[str] | None = None):
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", action="store_true", help="also time split counts and kernel configs")
    parser.add_argument("--sweep-paged", action="store_true", help="also time kernel configs of the paged paths")
    parser.add_argument("--page-sizes", type=int, nargs="+", default=list(PAGE_SIZES), help="paged copies to time")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS), help="cache lengths")
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES), help="batch sizes")
    parser.add_argument("--no-grid", action="store_true", help="only the sweeps asked for")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (saves its compile time)")
    parser.add_argument("--budget-s", type=float, default=170.0, help="no new FlexAttention point past this")
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


def kernel_call(q, k, v, lengths, *, page_table=None, lists=None, prefetch=True, config=None) -> Callable:
    """The launcher on checked inputs: ``prefetch`` picks the kernel path (decode_attention has no switch)."""
    ids, counts = lists if lists is not None else (None, None)
    dims = check_decode_inputs(q, k, v, lengths, page_table, ids, counts, BLOCK if ids is not None else None, None)
    kw = dict(page_table=page_table, kv_block_indices=ids, kv_block_counts=counts, prefetch=prefetch, config=config)
    return lambda: decode_forward(q, k, v, lengths, dims, scale=D**-0.5, **kw)[0]


def sdpa_flash(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    return run


def timed(fn: Callable[[], object], row: dict, *, eager: bool = True) -> dict:
    """Fill ``row`` with graph (and eager) timings of ``fn`` (an error string instead if it fails)."""
    try:
        row.update(bench_graph_ms(fn))
    except Exception as e:  # a peer that cannot be captured still gets its eager time
        row["graph_error"] = f"{type(e).__name__}: {str(e)[:160]}"
    if eager or "ms" not in row:
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


def paged_rows(q, k, v, lengths, out, case: dict, splits: int, page_sizes, gen) -> list[dict]:
    """Both paged paths per page size over shuffled pages of (k, v), checked against the contiguous ``out``."""
    batch, _, kv_len, _ = k.shape
    rows = []
    for page_size in page_sizes:
        base = {**case, "impl": "sparseflash", "paged": True, "page_size": page_size, "kv_fraction": 1.0}
        if torch.cuda.mem_get_info()[0] < kv_bytes(batch, kv_len) + 2**30:
            rows.append({**base, "error": "skipped: not enough memory for the paged copy"})
            continue
        perm = torch.randperm(batch * kv_len // page_size, generator=gen, device="cuda")
        table = perm.reshape(batch, -1).to(torch.int32)
        k_pages, v_pages = to_paged(k, perm, page_size), to_paged(v, perm, page_size)
        for path, prefetch in (("new", True), ("old", False)):
            fn = kernel_call(q, k_pages, v_pages, lengths, page_table=table, prefetch=prefetch)
            row = {**base, "path": path, "num_splits": splits, "rel_err": rel_err(fn(), out)}
            if not row["rel_err"] <= MISMATCH:
                row["error"] = f"paged output differs from contiguous: rel_err {row['rel_err']:.3g}"
                print(f"MISMATCH {row}", flush=True)
            rows.append(timed(fn, row, eager=False))
        del k_pages, v_pages, table, perm
        torch.cuda.empty_cache()
    return rows


def run_point(batch: int, kv_len: int, args, flex, copy_tb_s: float, started: float) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(batch * 1000 + kv_len)
    q = torch.randn(batch, HQ, 1, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(batch, HKV, kv_len, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(batch, HKV, kv_len, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    lengths = torch.full((batch,), kv_len, dtype=torch.int32, device="cuda")
    case = {"batch": batch, "kv_len": kv_len, "heads_q": HQ, "heads_kv": HKV, "head_dim": D, "dtype": "bf16"}
    splits = choose_num_splits(batch, HKV, kv_len, torch.cuda.get_device_properties(0).multi_processor_count)
    dense = {**case, "paged": False, "kv_fraction": 1.0}

    ours = lambda: decode_attention(q, k, v, lengths, check_values=False)
    sdpa = sdpa_flash(q, k, v)
    ref = sdpa()
    out = ours()
    rows = [timed(ours, {**dense, "impl": "sparseflash", "num_splits": splits, "rel_err": rel_err(out, ref)})]
    rows += paged_rows(q, k, v, lengths, out, case, splits, args.page_sizes, gen)
    rows.append(timed(sdpa, {**dense, "impl": "sdpa_flash", "rel_err": 0.0}))
    ids, counts, fraction = sparse_lists(batch, kv_len, gen)
    sparse_ref = gathered_reference(q, k, v, ids, counts, kv_len)
    for path, prefetch in (("new", True), ("old", False)):
        fn = kernel_call(q, k, v, lengths, lists=(ids, counts), prefetch=prefetch)
        row = {**case, "impl": "sparseflash", "paged": False, "path": path, "kv_fraction": round(fraction, 4)}
        row.update(block_size=BLOCK, rel_err=rel_err(fn()[:1], sparse_ref))
        rows.append(timed(fn, row, eager=path == "new"))
    if flex is not None:
        row = {**dense, "impl": "flex"}
        if time.monotonic() - started > args.budget_s:
            row["error"] = f"skipped: past --budget-s {args.budget_s:g}"
        else:
            fx = lambda: flex(q, k, v, enable_gqa=True)
            try:
                row["rel_err"] = rel_err(fx(), ref)
                timed(fx, row)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
        rows.append(row)

    contig_ms = rows[0].get("ms")
    sdpa_ms = next((r["ms"] for r in rows if r["impl"] == "sdpa_flash" and "ms" in r), None)
    for r in rows:
        add_bandwidth(r, copy_tb_s)
        if "ms" in r and contig_ms:
            r["vs_contig"] = r["ms"] / contig_ms
        if sdpa_ms and "ms" in r and r["kv_fraction"] == 1.0:
            r["vs_sdpa"] = sdpa_ms / r["ms"]
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


def sweep_paged(copy_tb_s: float) -> list[dict]:
    """Kernel configs x both paged paths at page sizes 16 and 64 (default split counts), with the contiguous time."""
    rows = []
    for batch, kv_len in PAGED_SWEEP_POINTS:
        q = torch.randn(batch, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(batch, HKV, kv_len, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        lengths = torch.full((batch,), kv_len, dtype=torch.int32, device="cuda")
        case = {"batch": batch, "kv_len": kv_len, "impl": "sparseflash_sweep_paged", "kv_fraction": 1.0}
        out = decode_attention(q, k, v, lengths, check_values=False)
        runs = [(0, "contig", config) for config in PAGED_SWEEP_CONFIGS]
        for p in (16, 64):
            runs += [(p, "new", c) for c in PAGED_SWEEP_CONFIGS] + [(p, "old", c) for c in PAGED_SWEEP_OLD]
        pages = {}
        for page_size, path, config in runs:
            if page_size and page_size not in pages:
                pages.clear()
                perm = torch.randperm(batch * kv_len // page_size, device="cuda")
                table = perm.view(batch, -1).to(torch.int32)
                pages[page_size] = (to_paged(k, perm, page_size), to_paged(v, perm, page_size), table)
            cfg = DecodeConfig(*(int(x) for x in config.split(",")))
            if page_size:
                kp, vp, table = pages[page_size]
                fn = kernel_call(q, kp, vp, lengths, page_table=table, prefetch=path == "new", config=cfg)
            else:
                fn = kernel_call(q, k, v, lengths, config=cfg)
            row = {**case, "paged": bool(page_size), "page_size": page_size, "path": path, "config": config}
            try:
                row["rel_err"] = rel_err(fn(), out)
                row.update(bench_graph_ms(fn, budget_ms=100.0))
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
            rows.append(add_bandwidth(row, copy_tb_s))
            print(
                {c: row.get(c) for c in ("batch", "kv_len", "page_size", "path", "config", "ms", "rel_err")}, flush=True
            )
        del pages, k, v
        torch.cuda.empty_cache()
    return rows


def paged_table(rows: list[dict]) -> list[dict]:
    """One line per (point, page size): contiguous, old and new paged ms and their ratios to contiguous."""
    out = []
    for r in rows:
        if r["impl"] != "sparseflash" or not r.get("paged") or r.get("path") != "new":
            continue
        point = (r["batch"], r["kv_len"])
        same = [x for x in rows if (x["batch"], x["kv_len"]) == point and x["impl"] == "sparseflash"]
        contig = next(x for x in same if not x.get("paged") and "path" not in x)
        old = next((x for x in same if x.get("page_size") == r["page_size"] and x.get("path") == "old"), {})
        line = {"batch": r["batch"], "kv_len": r["kv_len"], "page_size": r["page_size"], "contig_ms": contig.get("ms")}
        line.update(old_ms=old.get("ms"), new_ms=r.get("ms"), new_pct_copy=r.get("pct_copy"))
        if line["contig_ms"]:
            line["old_ratio"] = old["ms"] / line["contig_ms"] if "ms" in old else None
            line["new_ratio"] = r["ms"] / line["contig_ms"] if "ms" in r else None
        out.append(line)
    return out


def plot(rows: list[dict], path: Path, copy_tb_s: float, title: str) -> None:
    """TB/s vs cache length per batch, one line per implementation, the copy bandwidth dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    # (label, marker, row filter)
    series = [("sparseflash dense", "o", lambda r: r["impl"] == "sparseflash" and not r["paged"] and "path" not in r)]
    for size in sorted({r["page_size"] for r in rows if r.get("paged")}):
        series.append((f"paged {size}", "s", lambda r, s=size: r.get("page_size") == s and r.get("path") == "new"))
        series.append(
            (f"paged {size}, old path", "x", lambda r, s=size: r.get("page_size") == s and r.get("path") == "old")
        )
    series += [
        ("SDPA flash", "x", lambda r: r["impl"] == "sdpa_flash"),
        ("FlexAttention", "+", lambda r: r["impl"] == "flex"),
        (
            f"sparseflash sparse {SPARSE_FRACTION:.0%} (bytes read)",
            "^",
            lambda r: r["impl"] == "sparseflash" and r["kv_fraction"] < 1.0 and r.get("path") == "new",
        ),
    ]
    for ax, batch in zip(axes[0], batches, strict=True):
        for label, marker, keep in series:
            pts = sorted((r["kv_len"], r["tb_s"]) for r in rows if r["batch"] == batch and "tb_s" in r and keep(r))
            if pts:
                ls = ":" if "old path" in label else "-"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, ls=ls, label=label)
        ax.axhline(copy_tb_s, color="k", ls="--", lw=1, label="device copy")
        ax.axhline(0.85 * copy_tb_s, color="gray", ls=":", lw=1, label="85 % of copy")
        ax.set_xscale("log", base=2)
        ax.set_title(f"batch {batch}")
        ax.set_xlabel("cache length (tokens)")
        ax.set_ylabel("K+V TB/s")
    axes[0][0].legend(fontsize=6)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.monotonic()
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
    points = [(1, 8192), (8, 32768)] if args.quick else [(b, n) for b in args.batches for n in args.lengths]
    if args.no_grid:
        points, flex = [], None
    rows = []
    tag = gpu_tag()
    for batch, kv_len in points:
        point_rows = run_point(batch, kv_len, args, flex, copy_tb_s, started)
        torch.cuda.empty_cache()  # the point's caches are gone: B=64 x 128K is 34 GB
        rows += point_rows
        for r in point_rows:
            print({c: r.get(c) for c in TABLE_COLUMNS + ["error", "graph_error"] if c in r}, flush=True)
        print(f"[{time.monotonic() - started:.0f} s]", flush=True)
        write_result(dest / f"decode_{tag}.json", "decode", rows, ceilings)  # so far, in case the call is cut
    if args.sweep:
        rows += sweep(copy_tb_s)
    if args.sweep_paged:
        rows += sweep_paged(copy_tb_s)
    write_result(dest / f"decode_{tag}.json", "decode", rows, ceilings)
    main_rows = [r for r in rows if not r["impl"].startswith("sparseflash_sweep")]
    if main_rows:
        title = f"Decode, Hq={HQ}, Hkv={HKV}, d={D}, bf16, 1 new token ({torch.cuda.get_device_name()})"
        plot(main_rows, dest / f"decode_{tag}.png", copy_tb_s, title)
        print_table(main_rows, TABLE_COLUMNS)
        print()
        print_table(paged_table(main_rows), PAGED_COLUMNS)
    swept = [r for r in rows if r["impl"] == "sparseflash_sweep_paged"]
    if swept:
        print()
        print_table(swept, ["batch", "kv_len", "page_size", "path", "config", "ms", "pct_copy", "rel_err", "error"])
    print(f"[{time.monotonic() - started:.0f} s total]", flush=True)


if __name__ == "__main__":
    main()
