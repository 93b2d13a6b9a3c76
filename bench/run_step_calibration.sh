#!/bin/bash
# On one GPU, from the repository root: each optimizer step's seconds, real tokens and peak memory (the run's
# hf_instruct_tune.json, results.step_*) for the memory plan at 8, 12 and 32 GiB and without a limit, the 8 GiB
# plan's settings given as flags, and Unsloth's fastest small-budget run; 16 steps each, one after the other
# (~6 minutes with the model already in /tmp). These per-step pairs calibrate memory_plan.estimate_bytes
# (tests/test_memory_plan.py). $OUT/runs.jsonl: one line per run.
set -uo pipefail
START=$(date +%s)
source bench/gpu_env.sh
export OUT=${OUT:-/tmp/step_calibration}; M=${MODEL_DIR:-/tmp/llama3-8b-random}; DATA=/tmp/frontier_rows.jsonl
W=/tmp/step_calibration_work; mkdir -p $W $OUT
[ -f $M/config.json ] || python3 bench/gpu_bench.py make $M 2>&1 | tail -1
[ -f $DATA ] || python3 bench/gpu_frontier.py data $DATA
cli() { timeout 150 python3 bench/gpu_frontier.py cli "$@" 2>&1 | grep "^RESULT" | sed 's/^RESULT //' >> $OUT/runs.jsonl; }
export BENCH_STEPS=${BENCH_STEPS:-16}
cli plan_8 $M $DATA $W --load-in-4bit --max-memory 8
cli flags_8 $M $DATA $W --load-in-4bit --gradient-checkpointing --fused-loss --offload-embeddings --no-memory-plan \
  --batch-size 16 --grad-accum 1
cli plan_12 $M $DATA $W --load-in-4bit --max-memory 12
cli plan_32 $M $DATA $W --load-in-4bit --max-memory 32
cli default $M $DATA $W --load-in-4bit
left=$(( 570 - ($(date +%s) - START) ))
[ $left -gt 70 ] && timeout $left python3 bench/gpu_bench.py train unsloth $M --bs 16 --ga 1 --padding-free 2>&1 \
  | grep "^RESULT" | sed 's/^RESULT //' >> $OUT/runs.jsonl
python3 - <<'PY'
import json, os
for line in open(os.environ.get("OUT", "/tmp/step_calibration") + "/runs.jsonl"):
    r = json.loads(line)
    print(r.get("variant"), round(r.get("real_tokens_per_s") or 0), r.get("peak_alloc_gib"), r.get("error", "")[:300])
    print("   s", r.get("step_s")); print("   tokens", r.get("step_tokens")); print("   peak", r.get("step_peak_gib"))
PY
echo "done in $(( $(date +%s) - START )) s"
