"""The sparse prefill's device-side steps make no host round trip, checked on the CPU by the ops they dispatch.

On CUDA a host sync per layer stalls the launches of the next one (the GPU test in test_hf_no_sync_gpu.py checks
the whole patched forward there). Here a dispatch mode records the aten ops of the selection, the coarse attention
over dropped blocks and the work density: none may read a value back (``_local_scalar_dense``: ``.item()``,
``bool()``, ``float()``, ``nonzero``) or lift a Python number into a tensor (``lift_fresh``: on CUDA a copy from
pageable host memory, which synchronises).
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sparseflash import BlockLayout, causal_block_mask, patterns
from sparseflash.integrations.hf.forward import _work_density
from sparseflash.layouts.exact_rows import with_exact_rows
from sparseflash.ops.prefill.dropped_blocks import dropped_block_attention

FORBIDDEN = ("_local_scalar_dense", "lift_fresh", "nonzero", "is_nonzero")


class _OpLog(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _forbidden(run) -> list[str]:
    with _OpLog() as log:
        run()
    assert log.names, "nothing was dispatched: the check would pass vacuously"
    return [name for name in log.names if any(bad in name for bad in FORBIDDEN)]


def test_xattention_selection_and_dropped_blocks_read_nothing_back(gen):
    q = torch.randn(1, 4, 1000, 64, generator=gen)
    k, v = (torch.randn(1, 2, 1000, 64, generator=gen) for _ in range(2))
    options = {"threshold": 0.9, "local_blocks": 1, "stride": 8, "block_size": 128}
    layout = patterns.select("xattention", q, k, **options)  # warm the geometry caches outside the log
    assert _forbidden(lambda: patterns.select("xattention", q, k, **options)) == []
    assert _forbidden(lambda: dropped_block_attention(q, k, v, layout, backend="torch")) == []
    assert _forbidden(lambda: dropped_block_attention(q, k, v, layout, pool_size=16, backend="torch")) == []
    assert _forbidden(lambda: _work_density(layout, 64, 16)) == []
    with_cols = patterns.select("xattention", q, k, columns=32, **options)
    assert _forbidden(lambda: patterns.select("xattention", q, k, columns=32, **options)) == []
    assert _forbidden(lambda: _work_density(with_cols, 64)) == []
    folded = with_exact_rows(layout, 256)  # the exact tail as fully kept rows (warms its cache)
    assert _forbidden(lambda: with_exact_rows(layout, 256)) == []
    assert _forbidden(lambda: _work_density(folded, 0)) == []


def test_fused_selection_kernel_reads_nothing_back(gen):
    """The Triton path of the selection (interpreter here): per-head thresholds, extra blocks."""
    q = torch.randn(1, 4, 1000, 64, generator=gen)
    k = torch.randn(1, 2, 1000, 64, generator=gen)
    options = {"threshold": [0.8, 0.9, 0.95, 0.5], "local_blocks": 1, "stride": 8, "block_size": 128}
    patterns.select("xattention", q, k, extra_blocks=1, backend="triton", **options)
    run = lambda: patterns.select("xattention", q, k, extra_blocks=1, backend="triton", **options)  # noqa: E731
    assert _forbidden(run) == []


def test_the_check_catches_a_python_scalar_written_into_a_tensor():
    mask = causal_block_mask(256, 256, (128, 128))[None, None]
    layout = BlockLayout.from_dense(mask, seq_len_q=256, seq_len_k=256, block_size=(128, 128))

    def assign() -> None:
        counts = torch.zeros(layout.num_k_blocks)
        counts[-1] = 7  # the pattern block_means used to have

    assert _forbidden(assign) != []
