"""Why do sparse methods lose accuracy on a real model? Attention recall per layer, head and query position.

One forward of a real model over ``--length`` tokens of real text (KJV), every layer's post-RoPE q/k captured
(:func:`sparseflash.eval.capture.capture_attention`). Per layer the exact block masses ``E[h, I, J]`` of the dense
causal softmax are computed once (:func:`sparseflash.ops.scores.block_scores.block_scores`, ``mode="mass"``); each
query row has mass 1, so for any block set the mean row recall is ``sum(E * kept) / sum(E)`` and the recall of
query block ``I`` is ``sum_J (E * kept)[I, J] / sum_J E[I, J]``. Per layer and head this gives, for every method
variant: density, recall, and the recall of the **true oracle at equal density** (the per-head global top-mass
set of the same number of blocks, the upper bound of any block selector), plus the recall of the query rows
by position (deciles, and the last query block: the question and answer prefix). Permuted (PBS) layouts index
permuted keys; their recall comes from :func:`sparseflash.attention_recall` instead.

    python benchmarks/diagnose_recall.py --model /path/to/hf-folder --lengths 32768 --out results/diag

Writes ``diagnose_<model>_<length>.json`` (per variant, layer and head) and prints a table per length.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

import sparseflash as sf
from sparseflash.eval.capture import capture_attention
from sparseflash.eval.model import load_model
from sparseflash.eval.text import load_corpus
from sparseflash.layouts import PermutedLayout, causal_block_mask
from sparseflash.ops.scores.block_scores import block_scores

BLOCK = 128
DEFAULT_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "xattention": ("xattention", {}),
    "xattention_t95": ("xattention", {"threshold": 0.95}),
    "xattention_t98": ("xattention", {"threshold": 0.98}),
    "xattention_kv": ("xattention", {"heads": "kv"}),
    "xattention_t95_kv": ("xattention", {"threshold": 0.95, "heads": "kv"}),
    "flexprefill": ("flexprefill", {}),
    "flexprefill_g95": ("flexprefill", {"gamma": 0.95}),
    "permuted": ("permuted", {}),
    "permuted_t95": ("permuted", {"threshold": 0.95}),
    "vertical_slash": ("vertical_slash", {}),
}


def text_ids(tokenizer: Any, length: int, seed: int) -> torch.Tensor:
    """(1, length) token ids of a seeded window of the real-text corpus."""
    corpus = load_corpus("auto")
    start = (seed * 7919) % max(1, len(corpus.sentences) // 2)
    chars = length * 6
    while True:
        ids = tokenizer(corpus.text(start, chars), return_tensors="pt")["input_ids"]
        if ids.shape[1] >= length:
            return ids[:, :length]
        chars *= 2


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _per_q_head(mask: torch.Tensor, num_heads: int) -> torch.Tensor:
    """A (1, H', Qb, Kb) block mask with H' in (1, Hkv, Hq) expanded to (Hq, Qb, Kb)."""
    m = mask[0]
    if m.shape[0] == num_heads:
        return m
    return m.repeat_interleave(num_heads // m.shape[0], dim=0)


def layer_stats(
    q: torch.Tensor, k: torch.Tensor, variants: dict[str, tuple[str, dict[str, Any]]]
) -> dict[str, dict[str, Any]]:
    """Density, recall, oracle recall at equal density and row-position recall of each variant on one layer."""
    num_heads = q.shape[1]
    seq = q.shape[2]
    mass = block_scores(q, k, block_size=(BLOCK, BLOCK), mode="mass")[0].float()  # (Hq, Qb, Kb)
    allowed = causal_block_mask(seq, seq, (BLOCK, BLOCK), device=q.device)
    total = mass.sum((1, 2))  # (Hq,) = valid rows
    row_total = mass.sum(2).clamp_min(1e-9)  # (Hq, Qb)
    sorted_mass = torch.sort(torch.where(allowed, mass, -1.0).flatten(1), dim=1, descending=True).values
    cum = torch.cumsum(sorted_mass.clamp_min(0), dim=1)
    n_allowed = int(allowed.sum())
    out: dict[str, dict[str, Any]] = {}
    for label, (method, options) in variants.items():
        _sync(q.device)
        t0 = time.perf_counter()
        layout = sf.patterns.select(method, q, k, **options)
        _sync(q.device)
        sel_ms = 1000 * (time.perf_counter() - t0)
        if isinstance(layout, PermutedLayout):
            recall = sf.attention_recall(q, k, layout, per_head=True).float()
            dens = torch.as_tensor(sf.density(layout, per_head=True), device=q.device).float()
            if dens.numel() != num_heads:
                dens = dens.repeat_interleave(num_heads // dens.numel())
            kept_n = (dens * n_allowed).round().long()
            row_rec = None
        else:
            kept = _per_q_head(layout.to_dense(), num_heads) & allowed
            kept_n = kept.sum((1, 2))
            dens = kept_n.float() / n_allowed
            kept_mass = torch.where(kept, mass, 0.0)
            recall = kept_mass.sum((1, 2)) / total
            row_rec = (kept_mass.sum(2) / row_total).mean(0)  # (Qb,) averaged over heads
        oracle = cum.gather(1, (kept_n.clamp(1, n_allowed) - 1)[:, None])[:, 0] / total
        entry: dict[str, Any] = {
            "density": dens.tolist(),
            "recall": recall.tolist(),
            "oracle_recall": oracle.tolist(),
            "select_ms": sel_ms,
        }
        if row_rec is not None:
            qb = row_rec.numel()
            deciles = [
                float(row_rec[int(qb * i / 10) : max(int(qb * (i + 1) / 10), int(qb * i / 10) + 1)].mean())
                for i in range(10)
            ]
            entry.update(
                row_recall_deciles=deciles,
                last_block_recall=float(row_rec[-1]),
                last2_blocks_recall=float(row_rec[-2:].mean()),
            )
        out[label] = entry
    return out


def run(
    model_spec: str,
    lengths: list[int],
    variants: dict[str, tuple[str, dict[str, Any]]],
    out: Path,
    seed: int,
    device: str = "cuda",
) -> dict[str, Any]:
    loaded = load_model(model_spec, device=device, dtype="bfloat16" if device == "cuda" else "float32")
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    results: dict[str, Any] = {
        "model": loaded.name,
        "gpu": gpu,
        "variants": {k: {"method": m, "options": o} for k, (m, o) in variants.items()},
        "lengths": {},
    }
    for length in lengths:
        ids = text_ids(loaded.tokenizer, length, seed).to(loaded.device)
        per_layer: dict[int, dict[str, Any]] = {}

        def on_layer(layer: int, q: torch.Tensor, k: torch.Tensor, per_layer: dict = per_layer) -> None:
            per_layer[layer] = layer_stats(q, k, variants)

        with torch.inference_mode(), capture_attention(loaded.model, on_layer):
            loaded.model(input_ids=ids, use_cache=False, logits_to_keep=1)
        results["lengths"][str(length)] = {str(layer): per_layer[layer] for layer in sorted(per_layer)}
        print(f"\n== {loaded.name} at {length} tokens (means over layers and heads) ==")
        print(f"{'variant':<22}{'density':>8}{'recall':>8}{'oracle':>8}{'min layer':>10}{'last blk':>9}{'sel ms':>8}")
        for label in variants:
            rows = [per_layer[layer][label] for layer in sorted(per_layer)]
            dens = sum(sum(r["density"]) / len(r["density"]) for r in rows) / len(rows)
            rec = [sum(r["recall"]) / len(r["recall"]) for r in rows]
            orc = sum(sum(r["oracle_recall"]) / len(r["oracle_recall"]) for r in rows) / len(rows)
            last = [r.get("last_block_recall") for r in rows if r.get("last_block_recall") is not None]
            last_s = f"{sum(last) / len(last):9.3f}" if last else f"{'-':>9}"
            sel = sum(r["select_ms"] for r in rows)
            print(f"{label:<22}{dens:8.3f}{sum(rec) / len(rec):8.3f}{orc:8.3f}{min(rec):10.3f}{last_s}{sel:8.1f}")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"diagnose_{loaded.name}_{'-'.join(map(str, lengths))}.json"
    path.write_text(json.dumps(results))
    print(f"wrote {path}")
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a model folder, .gguf file or catalogue name")
    p.add_argument("--lengths", default="32768", help="comma-separated token counts")
    p.add_argument("--variants", default=None, help="JSON {label: [method, {options}]} (default: a built-in set)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/diagnose")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: plumbing check at small sizes")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("diagnose_recall: --device cuda needs a CUDA GPU", file=sys.stderr)
        return 2
    variants = (
        DEFAULT_VARIANTS if args.variants is None else {k: (v[0], v[1]) for k, v in json.loads(args.variants).items()}
    )
    run(args.model, [int(x) for x in args.lengths.split(",")], variants, Path(args.out), args.seed, args.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
