#!/usr/bin/env bash
# The real-model accuracy study on a lent GPU, one device call per stage (each inside the 10-minute limit).
# The machine keeps $HOME between back-to-back calls only: stages after `setup` must follow within 30 s.
#
#   part calls, one per part (carry ".stash/q15/a00"):  bash benchmarks/run_accuracy_gpu.sh part q15/a00
#   bash benchmarks/run_accuracy_gpu.sh setup q15 q05   # reassemble + SHA-256 + HF folders (carry .stash/site)
#   bash benchmarks/run_accuracy_gpu.sh diagnose    # recall per layer/head vs the oracle at equal density
#   bash benchmarks/run_accuracy_gpu.sh calibrate   # per-layer/head thresholds at target recalls
#   bash benchmarks/run_accuracy_gpu.sh sweep       # variants on tuning prompts -> $SF/chosen.json
#   bash benchmarks/run_accuracy_gpu.sh grid        # the grid with the chosen setting (n >= 50), both models
# Results: $OUT/<stage>.tgz (copy into benchmarks/results/ and commit, naming the GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
SF="$HOME/sf"
mkdir -p "$SF"
export PYTHONUNBUFFERED=1 PYTHONPATH="$SF/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-$SF/out}"
M15="$SF/models/qwen2.5-coder-1.5b"
M05="$SF/models/qwen2.5-coder-0.5b"
SFCLI=(python3 -m sparseflash)
declare -A NAMES=([q15]=qwen2.5-coder-1.5b [q05]=qwen2.5-coder-0.5b)
declare -A SHAS=([q15]=cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046
                 [q05]=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32)
stage="$1"
shift
pack() { tar czf "$OUT/$1.tgz" -C "$SF/results" "$1" 2>/dev/null; ls -la "$OUT"; }
case "$stage" in
  part)
    # .stash/q15/aNN -> $SF/parts/qwen2.5-coder-1.5b/, .stash/q05/bNN -> $SF/parts/qwen2.5-coder-0.5b/
    dir="$SF/parts/${NAMES[${1%%/*}]}"
    mkdir -p "$dir" && cp ".stash/$1" "$dir/" && ls "$dir" | wc -l ;;
  setup)
    nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
    rm -rf "$SF/site" && cp -r .stash/site "$SF/site"
    files=()
    for key in "$@"; do files+=(--file "${NAMES[$key]}:${SHAS[$key]}"); done
    python3 benchmarks/real_models_setup.py --parts "$SF/parts" --dest "$SF/models" "${files[@]}" \
      && rm -rf "$SF/parts" "$SF"/models/*.gguf ;;
  diagnose)
    mkdir -p "$SF/results/diagnose"
    python3 benchmarks/diagnose_recall.py --model "$M15" --lengths 16384,32768 --out "$SF/results/diagnose" \
      2>&1 | tee "$SF/results/diagnose/log.txt"
    pack diagnose ;;
  calibrate)
    mkdir -p "$SF/results/calibrate"
    for r in "$@"; do
      "${SFCLI[@]}" calibrate --model "$M15" --method xattention --target-recall "$r" --length 16384 \
        --out "$SF/results/calibrate/xattention_r${r}.json" 2>&1 | tee -a "$SF/results/calibrate/log.txt"
    done
    pack calibrate ;;
  sweep)
    mkdir -p "$SF/results/sweep"
    python3 benchmarks/accuracy_sweep.py --model "$M15" --variants "$1" --lengths "${2:-32768}" \
      --samples "${3:-2}" --batch-size 8 --out "$SF/results/sweep" --choose "$SF/chosen.json" \
      2>&1 | tee -a "$SF/results/sweep/log.txt"
    cp "$SF/chosen.json" "$SF/results/sweep/" 2>/dev/null
    pack sweep ;;
  eval)
    # eval NAME MODEL ARGS...: `sparseflash eval` into $SF/results/NAME
    name="$1"; model="$2"; shift 2
    mkdir -p "$SF/results/$name"
    "${SFCLI[@]}" eval --model "$model" --out "$SF/results/$name" --no-progress "$@" \
      2>&1 | tee -a "$SF/results/$name/log.txt"
    pack "$name" ;;
  *) echo "unknown stage $stage (part, setup, diagnose, calibrate, sweep, eval)"; exit 2 ;;
esac
