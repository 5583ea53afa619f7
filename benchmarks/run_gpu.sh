#!/usr/bin/env bash
# One device call per stage (each fits the 10-minute limit); results land in $OUT (the device tool's folder).
#   bash benchmarks/run_gpu.sh tests     # GPU test files (large shapes, int32 overflow, poisoned outputs)
#   bash benchmarks/run_gpu.sh dense     # prefill_dense_<gpu>.json/.png, with the tile sweep
#   bash benchmarks/run_gpu.sh sparse    # prefill_sparse_<gpu>.json/.png
#   bash benchmarks/run_gpu.sh decode    # decode_<gpu>.json/.png
#   bash benchmarks/run_gpu.sh patterns  # patterns_<gpu>.json/.png
# Then copy the files from the tool's files_at folder into benchmarks/results/ and commit them.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-benchmarks/results}"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
for stage in "$@"; do
  case "$stage" in
    tests) python3 -m pytest -q -m gpu tests/ 2>&1 | tee "$OUT/gpu_tests.log" ;;
    dense) python3 benchmarks/bench_dense_vs_peers.py --sweep --out "$OUT" ;;
    sparse) python3 benchmarks/bench_sparse_vs_flex.py --out "$OUT" ;;
    decode) python3 benchmarks/bench_decode.py --out "$OUT" ;;
    patterns) python3 benchmarks/bench_patterns.py --out "$OUT" ;;
    *) echo "unknown stage $stage (tests, dense, sparse, decode, patterns)"; exit 2 ;;
  esac
done
