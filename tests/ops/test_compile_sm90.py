"""The Triton kernels compile for an H100/H200 (sm_90) on a machine without a GPU.

The interpreter runs the kernels' Python on the CPU, so an error only the GPU compiler sees (a type mismatch
between constexpr branches, a layout it cannot lower, too much shared memory) would otherwise first show on a
lent GPU. ``sm90_compile.py`` compiles each kernel variant the launchers use through Triton's own compiler and
``ptxas`` for ``GPUTarget("cuda", 90, 32)`` (nothing runs), in a subprocess without ``TRITON_INTERPRET`` (this
suite sets it, and interpreted kernels cannot be compiled). Skipped where Triton's CUDA toolchain is missing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("sm90_compile.py")


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    lines = run.stdout.splitlines()
    if lines and lines[0].startswith("SKIP"):
        pytest.skip(lines[0])
    failures = [line for line in lines if line.startswith("FAIL")]
    assert run.returncode == 0 and not failures, "\n".join(failures) or run.stderr[-3000:]
    assert sum(line.startswith("OK ") for line in lines) == 33, run.stdout
