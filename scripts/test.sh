#!/usr/bin/env bash
# Set up a fresh virtual environment, lint with ruff, then run the test suite (the README's test command; .ci/run
# runs it).
# torch 2.13.0 goes in first and alone, so pip takes the CPU build and nothing pulls a CUDA one;
# triton 3.6.0 is the GPU machine's version, so the interpreter runs the Triton the GPU runs.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q triton==3.6.0 -e ".[test,eval]"
"$VENV/bin/ruff" check .   # lint (seconds; ruff comes with the test extra)
"$VENV/bin/ruff" format --check .   # formatting (the tree is ruff-formatted; `ruff format .` fixes it)
"$VENV/bin/python" -m pytest -q "$@"
