"""Does a patched model cost more than the unpatched one below ``min_sparse_len``? (CPU, real model)

Times one prompt forward (median of 3 after a warm-up) of the embedded Qwen2.5-Coder-0.5B in fp32 on the CPU,
unpatched and under ``sparseflash.patch(model)`` with a prompt shorter than ``min_sparse_len`` (so every layer takes
the dense route: :func:`sparseflash.flash_attention`, which on the CPU runs torch's SDPA).

    python benchmarks/cpu_patch_overhead.py [--model qwen2.5-coder-0.5b] [--tokens 1024]
"""

from __future__ import annotations

import argparse
import time

import torch

import sparseflash as sf
from sparseflash.eval.model import load_model


def median_ms(model: torch.nn.Module, ids: torch.Tensor, repeats: int = 3) -> float:
    with torch.inference_mode():
        model(input_ids=ids, logits_to_keep=1)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(input_ids=ids, logits_to_keep=1)
            times.append(1000 * (time.perf_counter() - t0))
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    p.add_argument("--tokens", type=int, default=1024)
    args = p.parse_args()
    model = load_model(args.model, device="cpu", dtype="float32").model
    ids = torch.randint(0, 1000, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    base = median_ms(model, ids)
    with sf.patched(model):
        patched = median_ms(model, ids)
    print(
        f"{args.tokens}-token prompt, {args.model} fp32, {torch.get_num_threads()} CPU threads: unpatched "
        f"{base:.0f} ms, patched (below min_sparse_len) {patched:.0f} ms ({patched / base:.2f}x)"
    )


if __name__ == "__main__":
    main()
