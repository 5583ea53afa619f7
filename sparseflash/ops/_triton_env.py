"""Where Triton kernels can run: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``."""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True when Triton runs kernels in its NumPy interpreter (set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_runs_on(device: torch.device) -> bool:
    """Whether a Triton kernel can take tensors on ``device``."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreting()


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a nominal 132, an H100's, off the GPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132
