#!/bin/bash
# On one GPU, from the repository root: kernel levers of a training step and generate rows/s, in one command of
# under 10 minutes (about 5 with the model already in /tmp). Parts, in this order (PARTS picks some):
#   lever    `train --load-in-4bit` with default flags (bench/gpu_frontier.py cli); the same with --compile-layers
#            runs last, since its compilation time is the unknown
#   generate generate rows/s: the package beside plain transformers loops, the paths taking turns
#            (bench/gpu_generate.py), with the adapter the default lever run saved
#   profile  one step profiled with and without checkpointing, and checkpointed with compiled layers
#            (bench/gpu_profile.py)
# Each part runs under its own timeout, cut to what is left of TOTAL_S; a failed part is logged and the next runs.
# $OUT: results.jsonl (every RESULT line), profile.json, profile.md, log.txt (the tail of every run's log).
set -uo pipefail
START=$(date +%s); TOTAL_S=${TOTAL_S:-570}
# CPU dry run: USE_INSTALLED=1 MODEL_DIR=<BENCH_TINY model> DATA=<rows> FLAGS= BENCH_STEPS=6 bash bench/run_gpu_levers.sh
source bench/gpu_env.sh
OUT=${OUT:-/tmp/levers}; WORK=/tmp/levers_work; M=${MODEL_DIR:-/tmp/llama3-8b-random}; DATA=${DATA:-/tmp/frontier_rows.jsonl}
FLAGS=${FLAGS---load-in-4bit}
PARTS=${PARTS:-lever generate profile}
rm -rf $WORK; mkdir -p $OUT $WORK
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
[ -f $M/config.json ] || python3 bench/gpu_bench.py make $M 2>&1 | tail -1
[ -f $DATA ] || python3 bench/gpu_frontier.py data $DATA
# run NAME CAP_S COMMAND...: under min(CAP_S, what is left), RESULT lines to results.jsonl, the log's tail to log.txt
run() {
  local name=$1 cap=$2; shift 2
  local left=$(( TOTAL_S - ($(date +%s) - START) ))
  local limit=$(( cap < left ? cap : left ))
  if [ $limit -lt 20 ]; then
    echo "{\"part\": \"$name\", \"error\": \"skipped: $left s left of TOTAL_S\"}" | tee -a $OUT/results.jsonl; return
  fi
  local t0=$(date +%s)
  timeout $limit "$@" > $WORK/$name.txt 2>&1; local rc=$?
  grep "^RESULT" $WORK/$name.txt | sed 's/^RESULT //' >> $OUT/results.jsonl
  grep "^RESULT" $WORK/$name.txt | cut -c1-300
  { echo "=== $name: exit $rc after $(( $(date +%s) - t0 )) s (limit $limit s): $*"; tail -25 $WORK/$name.txt; } >> $OUT/log.txt
  [ $rc = 0 ] || echo "$name: exit $rc after $(( $(date +%s) - t0 )) s (see log.txt)"
}
cli_log() { [ -f $WORK/log_cli_$1.txt ] && { echo "=== CLI log of $1"; grep -iE "plan|compil|recompil|error|Throughput|Trained" $WORK/log_cli_$1.txt | cut -c1-400 | tail -30; } >> $OUT/log.txt; }
if [[ " $PARTS " == *" lever "* ]]; then
  run lever_default 120 python3 bench/gpu_frontier.py cli default $M $DATA $WORK $FLAGS; cli_log default
fi
if [[ " $PARTS " == *" generate "* ]]; then
  A=$WORK/adapter_default
  [ -f $A/hf_instruct_tune.json ] || { run gen_adapter 120 python3 bench/gpu_frontier.py cli default $M $DATA $WORK $FLAGS; cli_log default; }
  run generate 150 python3 bench/gpu_generate.py measure $A --rows ${GEN_ROWS:-16} --max-new-tokens ${GEN_TOKENS:-48} --batch-size 8 --texts $WORK/texts.json
fi
if [[ " $PARTS " == *" profile "* ]]; then
  run profile 200 python3 bench/gpu_profile.py $M $OUT/profile.json
  [ -f $OUT/profile.json ] && python3 bench/gpu_profile.py markdown $OUT/profile.json > $OUT/profile.md
fi
if [[ " $PARTS " == *" lever "* ]]; then  # last: the compilation time is the unknown
  TORCH_LOGS=recompiles run lever_compile 240 python3 bench/gpu_frontier.py cli compile_layers $M $DATA $WORK $FLAGS --compile-layers
  cli_log compile_layers
fi
echo "done in $(( $(date +%s) - START )) s"
