"""Which layers' sparse prefill moves the output? KL to the unpatched model with one group of layers sparse at a time.

One window of real text (KJV) through a model; the reference is the model as loaded (SDPA). Then, for all layers
and for each group of ``--group`` consecutive layers, the model is patched with ``--method`` sparse in that group
only (the others dense through ``dense_layers``) and the mean KL(reference || patched) of the next-token
distributions over the last ``--window`` positions is printed with the mean work density of the sparse layers.

    python benchmarks/kl_by_layer_group.py --model qwen2.5-coder-0.5b --length 8192 --device cpu
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from diagnose_recall import text_ids  # noqa: E402

import sparseflash as sf  # noqa: E402
from sparseflash.eval.engine import kl_per_row  # noqa: E402
from sparseflash.eval.model import load_model  # noqa: E402
from sparseflash.integrations.hf.patching import patch_state  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--method", default="xattention")
    p.add_argument(
        "--options", default='{"threshold": 0.95, "local_blocks": 1, "stride": 16}', help="JSON pattern options"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=2)
    args = p.parse_args(argv)
    loaded = load_model(args.model, device=args.device, dtype="bfloat16" if args.device == "cuda" else "float32")
    model = loaded.model
    n_layers = model.config.num_hidden_layers
    ids = text_ids(loaded.tokenizer, args.length, args.seed).to(loaded.device)

    def log_probs() -> torch.Tensor:
        with torch.inference_mode():
            logits = model(input_ids=ids, use_cache=False, logits_to_keep=args.window).logits[0]
        return torch.log_softmax(logits.float(), -1)

    ref = log_probs()
    groups = [("all", list(range(n_layers)))] + [
        (f"L{i}-{min(i + args.group, n_layers) - 1}", list(range(i, min(i + args.group, n_layers))))
        for i in range(0, n_layers, args.group)
    ]
    options = json.loads(args.options)
    print(f"# {loaded.name} {args.device} length {args.length} window {args.window} {args.method} {options}")
    for name, sparse_layers in groups:
        densities: list[tuple[int, float]] = []
        sf.patch(
            model,
            args.method,
            dense_layers=[i for i in range(n_layers) if i not in sparse_layers],
            min_sparse_len=1024,
            **options,
        )
        patch_state(model).on_prefill = lambda layer, d, acc=densities: acc.append((layer, d))
        t0 = time.perf_counter()
        try:
            lp = log_probs()
        finally:
            sf.unpatch(model)
        kl = float(kl_per_row(ref, lp).mean())
        sparse = [float(d) for layer, d in densities if layer in sparse_layers]
        print(
            f"{name:<8} KL {kl:.5f}  density of the sparse layers {sum(sparse) / max(len(sparse), 1):.3f}"
            f"  ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
