"""CPU (PyTorch path) timings of flash_attention and block_sparse_attention: the fallback a user without a GPU gets.

Median of 5 calls after a warm-up, fp32, causal, B=1, Hq=4, Hkv=2, S=2048, d=64; block-sparse on a random 30 %
layout of 64x64 blocks (diagonal kept). Run it against another checkout with ``PYTHONPATH=<checkout>`` to compare.

    python benchmarks/cpu_paths.py
"""

from __future__ import annotations

import time

import torch

import sparseflash as sf


def median_ms(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return sorted(times)[len(times) // 2]


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 2048, 64, generator=gen)
    k = torch.randn(1, 2, 2048, 64, generator=gen)
    v = torch.randn(1, 2, 2048, 64, generator=gen)
    nb = 2048 // 64
    keep = (torch.rand(1, 4, nb, nb, generator=gen) < 0.3) | torch.eye(nb, dtype=torch.bool)
    layout = sf.BlockLayout.from_dense(
        keep & sf.causal_block_mask(2048, 2048, (64, 64)), seq_len_q=2048, seq_len_k=2048, block_size=(64, 64)
    )
    flash = median_ms(lambda: sf.flash_attention(q, k, v, causal=True))
    sparse = median_ms(lambda: sf.block_sparse_attention(q, k, v, layout, causal=True))
    print(f"sparseflash from {sf.__file__}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"flash_attention causal 1x4x2048x64 fp32: {flash:.1f} ms")
    print(f"block_sparse_attention density {layout.density():.2f}: {sparse:.1f} ms")


if __name__ == "__main__":
    main()
