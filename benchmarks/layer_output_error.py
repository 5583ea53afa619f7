"""Per-layer attention output error of sparse layouts on a real model's q/k/v (a cheap proxy of next-token KL).

One forward over a seeded KJV window captures the post-RoPE q, k and v of some layers. For each layer and each
variant ``{label, method, options}`` (``options`` may hold ``approximate_dropped``: True or keys per pooled
token, as for ``patch``), the layout is selected on those q/k, the sparse attention computed (PyTorch paths,
float32) and compared with exact causal attention:

* ``err``: ``||o - o_ref|| / ||o_ref||`` over all rows, ``err_end`` over the last 1024 rows;
* ``density``: the work density of the prefill (blocks, token columns and pooled tokens, as ``patch`` reports it;
  no exact tail).

It runs on the CPU (about 4 minutes for the capture of Qwen2.5-Coder-1.5B at 8K, then seconds per layer and
variant), so levers can be ranked before they get GPU time; the GPU sweeps measure the model's KL itself.

    PYTHONPATH=.stash/site python benchmarks/layer_output_error.py --model /path/q15.gguf --length 8192 \\
        --layers 0,3,6,9,12,15,18,21,24,27 --variants benchmarks/variants/layer_error_columns.json --out DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy_sweep import load_variants  # noqa: E402
from diagnose_recall import text_ids  # noqa: E402

from sparseflash import block_sparse_attention, patterns  # noqa: E402
from sparseflash.calibration_file import load_calibration  # noqa: E402
from sparseflash.eval.model import load_model  # noqa: E402
from sparseflash.integrations.hf.forward import _work_density  # noqa: E402
from sparseflash.ops.merge import merge_attention_states  # noqa: E402
from sparseflash.ops.prefill.dropped_blocks import dropped_block_attention  # noqa: E402

END_ROWS = 1024
CAPTURE_NAME = "sf_layer_error_capture"


def capture_qkv(model: Any, ids: torch.Tensor, layers: set[int]) -> dict[int, tuple[torch.Tensor, ...]]:
    """``{layer: (q, k, v)}`` float32 on the CPU, from one forward of ``model`` over ``ids`` (then SDPA)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    captured: dict[int, tuple[torch.Tensor, ...]] = {}

    def attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any, **kw: Any):
        idx = int(getattr(module, "layer_idx", -1))
        if idx in layers and query.shape[2] == key.shape[2]:
            captured[idx] = tuple(t.detach().float().cpu().clone() for t in (query, key, value))
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, mask, **kw)

    AttentionInterface.register(CAPTURE_NAME, attention)
    AttentionMaskInterface.register(CAPTURE_NAME, sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(CAPTURE_NAME)
    try:
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
    finally:
        model.set_attn_implementation(previous)
    return captured


def file_ids(tokenizer: Any, path: Path, length: int, seed: int) -> torch.Tensor:
    """(1, length) token ids of ``path`` from a seeded start (ValueError when the file is too short)."""
    text = path.read_text(encoding="utf-8", errors="replace")
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    if ids.shape[1] < length:
        raise ValueError(f"--text-file: expected at least {length} tokens, got {ids.shape[1]} in {path}")
    start = (seed * 7919) % (ids.shape[1] - length + 1)
    return ids[:, start : start + length]


def exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    group = q.shape[1] // k.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), is_causal=True
    )


def sparse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, method: str, options: dict[str, Any], layer: int):
    """(output, work density) of one variant on ``layer`` (PyTorch paths); ``options["calibration"]`` (a
    calibration file) gives the layer's calibrated value over the file's own options, as ``patch`` does."""
    options = dict(options)
    path = options.pop("calibration", None)
    if path is not None:
        cal = load_calibration(path)
        if layer in cal.dense_layers:
            return exact(q, k, v), 1.0
        entry = {e.layer: e for e in cal.layers}[layer]
        options = {**cal.options, **options, cal.option: entry.value}
    pool = options.pop("approximate_dropped", False)
    rows = int(options.pop("merge_query_blocks", 1))
    layout = patterns.select(method, q, k, backend="torch", **options)
    if rows > 1:
        layout = merge_query_blocks(layout, rows)
    if pool:
        out, lse = block_sparse_attention(q, k, v, layout, causal=True, return_lse=True, backend="torch")
        pool_size = None if pool is True else int(pool)
        extra = dropped_block_attention(q, k, v, layout, pool_size=pool_size, backend="torch")
        out, _ = merge_attention_states(out, lse, *extra)
        density = _work_density(layout, 0, layout.block_size[1] if pool is True else int(pool))
    else:
        out = block_sparse_attention(q, k, v, layout, causal=True, backend="torch")
        density = _work_density(layout, 0)
    return out, float(density)


def merge_query_blocks(layout: Any, rows: int) -> Any:
    """The layout with ``rows`` consecutive query blocks merged into one (the union of their key blocks): the
    block size ``(rows * block_q, block_k)`` a kernel with taller query tiles runs; no token columns."""
    from sparseflash.layouts import BlockLayout

    mask = layout.to_dense()
    batch, heads, qb, kb = mask.shape
    pad = -qb % rows
    if pad:
        mask = torch.cat([mask, mask.new_zeros(batch, heads, pad, kb)], dim=2)
    merged = mask.view(batch, heads, -1, rows, kb).any(dim=3)
    bq, bk = layout.block_size
    return BlockLayout.from_dense(
        merged, seq_len_q=layout.seq_len_q, seq_len_k=layout.seq_len_k, block_size=(bq * rows, bk)
    )


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a catalogue name, a local model folder or a .gguf file")
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--layers", default="0,3,6,9,12,15,18,21,24,27")
    p.add_argument("--variants", required=True, help="JSON file or string, as accuracy_sweep.py")
    p.add_argument("--seed", type=int, default=11)
    p.add_argument(
        "--text-file",
        type=Path,
        default=None,
        help="a UTF-8 text file to read the window from (default: the KJV corpus); the seed picks the start",
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="a .pt file of the captured q/k/v: read when it holds this model, length, seed and layers, else written",
    )
    args = p.parse_args(argv)
    variants = load_variants(args.variants)
    t0 = time.perf_counter()
    key = {
        "model": str(args.model),
        "length": args.length,
        "seed": args.seed,
        "layers": args.layers,
        "text": str(args.text_file or "kjv"),
    }
    cached = torch.load(args.cache) if args.cache is not None and args.cache.exists() else None
    if cached is not None and cached["key"] == key:
        name, qkv, n_layers = cached["name"], cached["qkv"], cached["num_layers"]
    else:
        loaded = load_model(args.model, device="cpu", dtype="float32")
        name, n_layers = loaded.name, loaded.model.config.num_hidden_layers
        wanted = {int(x) % n_layers for x in args.layers.split(",")}
        if args.text_file is None:
            ids = text_ids(loaded.tokenizer, args.length, args.seed)
        else:
            ids = file_ids(loaded.tokenizer, args.text_file, args.length, args.seed)
        qkv = capture_qkv(loaded.model, ids, wanted)
        del loaded
        if args.cache is not None:
            torch.save({"key": key, "name": name, "qkv": qkv, "num_layers": n_layers}, args.cache)
    layers = sorted({int(x) % n_layers for x in args.layers.split(",")})
    print(f"# {name}, {args.length} tokens, layers {layers}: q/k/v ready in {time.perf_counter() - t0:.0f} s")
    rows = []
    for layer in layers:
        q, k, v = qkv[layer]
        ref = exact(q, k, v)
        for var in variants:
            out, density = sparse(q, k, v, var["method"], var["options"], layer)
            rows.append(
                {
                    "layer": layer,
                    "label": var["label"],
                    "density": density,
                    "err": rel_err(out, ref),
                    "err_end": rel_err(out[:, :, -END_ROWS:], ref[:, :, -END_ROWS:]),
                }
            )
        print(f"layer {layer} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    summary = []
    for var in variants:
        mine = [r for r in rows if r["label"] == var["label"]]
        summary.append(
            {
                "label": var["label"],
                "method": var["method"],
                "options": var["options"],
                "density": statistics.fmean(r["density"] for r in mine),
                "err": statistics.fmean(r["err"] for r in mine),
                "err_end": statistics.fmean(r["err_end"] for r in mine),
                "worst_layer_err": max(r["err"] for r in mine),
            }
        )
    args.out.mkdir(parents=True, exist_ok=True)
    head = {"model": name, "length": args.length, "layers": layers, "seed": args.seed, "text": key["text"]}
    head["device"] = "cpu"
    (args.out / "layer_output_error.json").write_text(json.dumps({**head, "summary": summary, "rows": rows}, indent=1))
    print(f"{'variant':<34} {'density':>8} {'err':>8} {'err_end':>8} {'worst':>8}")
    for s in sorted(summary, key=lambda s: s["density"]):
        print(f"{s['label']:<34} {s['density']:8.3f} {s['err']:8.4f} {s['err_end']:8.4f} {s['worst_layer_err']:8.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
