#!/bin/bash
# On one GPU, from the repository root: the frontier of bench/gpu_frontier.py, in two parts of under 10 minutes
# that share /tmp on one machine. PART=package: check packing on the GPU (stops on failure), then the package
# through its CLI with default flags and each --max-memory B. PART=baselines: Unsloth and transformers+peft at
# their best shapes, and the profile of one step (bench/gpu_profile.py). Every stack gets the same allocator
# settings and the same token ids. BENCH_STEPS=N runs N optimizer steps instead of 10 (steps 6-N timed) in every
# stack. PART=compiled: only the COMPILE_BUDGETS runs of the package part (no check, no default run). Results: $OUT/frontier_<part>.json; merge and tabulate with
#   python bench/gpu_frontier.py table merged.json
set -uo pipefail
OUT=${OUT:-/tmp/frontier}; M=${MODEL_DIR:-/tmp/llama3-8b-random}; DATA=/tmp/frontier_rows.jsonl; PART=${PART:-package}
PKG=${PKG:-/tmp/pkg_$PART}  # one copy per part: the two parts may run at once on two GPUs
source bench/gpu_env.sh  # every stack gets the same allocator settings
mkdir -p $OUT
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
[ -f $M/config.json ] || python3 bench/gpu_bench.py make $M 2>&1 | tail -1
[ -f $DATA ] || python3 bench/gpu_frontier.py data $DATA
run() { timeout ${RUN_TIMEOUT:-170} "$@" 2>&1 | tee -a $OUT/log_$PART.txt | grep "^RESULT" | sed 's/^RESULT //' >> $OUT/frontier_$PART.jsonl; }
if [ "$PART" = package ]; then
  python3 bench/gpu_bench.py check > $OUT/check.txt 2>&1; rc=$?
  grep -E "CHECK|Error" $OUT/check.txt
  [ $rc = 0 ] || { echo "packed-vs-padded check failed: stopping"; exit 1; }
  run python3 bench/gpu_frontier.py cli default $M $DATA $OUT --load-in-4bit
  for B in ${BUDGETS:-8 12 32 64}; do
    run python3 bench/gpu_frontier.py cli max_memory_$B $M $DATA $OUT --load-in-4bit --max-memory $B
  done
  # CLI runs with explicit flags, to isolate one lever: PACKAGE_DIAG="name1 --flag ...;name2 --flag ..."
  IFS=';' read -ra diag <<< "${PACKAGE_DIAG:-}"
  for d in "${diag[@]}"; do
    set -- $d; name=$1; shift
    run python3 bench/gpu_frontier.py cli $name $M $DATA $OUT --load-in-4bit "$@"
  done
elif [ "$PART" = baselines ]; then
  # BASELINES="stack flags;stack flags;..." replaces the list
  IFS=';' read -ra configs <<< "${BASELINES:-unsloth --bs 16 --ga 1 --padding-free;unsloth --bs 16 --ga 1;\
unsloth --bs 16 --ga 1 --padding-free --no-ckpt;hf --bs 4 --ga 4}"
  for cfg in "${configs[@]}"; do
    set -- $cfg; stack=$1; shift
    run python3 bench/gpu_bench.py train $stack $M "$@"
  done
  # CLI runs with explicit flags, to isolate one lever: DIAG="name1 --flag ...;name2 --flag ..."
  IFS=';' read -ra diag <<< "${DIAG:-}"
  for d in "${diag[@]}"; do
    set -- $d; name=$1; shift
    run python3 bench/gpu_frontier.py cli $name $M $DATA $OUT --load-in-4bit "$@"
  done
  [ -n "${SKIP_PROFILE:-}" ] || timeout 200 python3 bench/gpu_profile.py $M $OUT/profile.json > $OUT/profile.md 2>$OUT/profile_err.txt || tail -5 $OUT/profile_err.txt
fi
if [ "$PART" = package ] || [ "$PART" = compiled ]; then
  # the same with compiled decoder layers: COMPILE_BUDGETS="32 none" (none: no --max-memory)
  for B in ${COMPILE_BUDGETS:-}; do
    limit=(); [ "$B" = none ] || limit=(--max-memory $B)
    RUN_TIMEOUT=${COMPILE_TIMEOUT:-240} run python3 bench/gpu_frontier.py cli compiled_$B $M $DATA $OUT --load-in-4bit \
      "${limit[@]}" --compile-layers
  done
fi
python3 -c "import json,sys; print(json.dumps([json.loads(l) for l in open(sys.argv[1])], indent=1))" \
  $OUT/frontier_$PART.jsonl > $OUT/frontier_$PART.json
cut -c1-400 $OUT/frontier_$PART.jsonl
