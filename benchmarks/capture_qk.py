"""Capture real post-RoPE q/k of some layers of a model on long real text, for ``bench_patterns.py --qk``.

One forward over a seeded KJV window (the corpus of :mod:`sparseflash.eval.text`); for each layer in ``--layers``
a file ``qk_<model>_L<layer>.pt`` holding ``{"q": (1, Hq, S, D), "k": (1, Hkv, S, D), "source": str}`` in the
model's dtype, on the CPU (v is not captured: the benchmark then times attention with k as v).

    python benchmarks/capture_qk.py --model ~/sf/models/qwen2.5-coder-1.5b --length 32768 --layers 2,14,26 --out DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from diagnose_recall import text_ids  # noqa: E402

from sparseflash.eval.capture import capture_attention  # noqa: E402
from sparseflash.eval.model import load_model  # noqa: E402


def main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a catalogue name, a local model folder or a .gguf file")
    p.add_argument("--length", type=int, default=32768)
    p.add_argument("--layers", default="0", help="comma-separated layer indices (negative: from the end)")
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    loaded = load_model(args.model, device=args.device, dtype="bfloat16" if args.device != "cpu" else "float32")
    n_layers = loaded.model.config.num_hidden_layers
    try:
        wanted = {int(x) % n_layers for x in args.layers.split(",")}
    except ValueError:
        p.error(f"--layers: expected comma-separated integers, got {args.layers!r}")
    ids = text_ids(loaded.tokenizer, args.length, args.seed).to(loaded.device)
    args.out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def on_qk(idx: int, q: torch.Tensor, k: torch.Tensor) -> None:
        if idx in wanted:
            path = args.out / f"qk_{loaded.name}_L{idx}.pt"
            source = f"{loaded.name} layer {idx}, KJV {args.length} tokens (seed {args.seed})"
            torch.save({"q": q.detach().cpu(), "k": k.detach().cpu(), "source": source}, path)
            written.append(path)

    with torch.inference_mode(), capture_attention(loaded.model, on_qk):
        loaded.model(input_ids=ids, use_cache=False, logits_to_keep=1)
    for path in written:
        print(path, flush=True)
    return written


if __name__ == "__main__":
    main()
