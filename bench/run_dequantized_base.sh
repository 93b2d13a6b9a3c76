#!/bin/bash
# On one H200, from the repository root: the levers of the 4-bit base dequantized once and the fused AdamW default,
# each alone, and Unsloth's two fastest shapes, in two calls of one lease. Every package run is planned for
# PLANNED_STEPS optimizer steps (4,000 by default) and stopped after 16 (bench/planned_run_train.py).
# PART=package: default flags (the plan keeps the base dequantized at no limit), --no-dequantize-base, that with
# --optim adamw_torch (the previous default), and --max-memory 8. PART=baselines: Unsloth 16 x 1 padding-free
# without and with its checkpointing, twice each. Results: $OUT/results.jsonl.
set -uo pipefail
export OUT=${OUT:-/tmp/dequantized_base} TOTAL_S=${TOTAL_S:-540} RUN_TIMEOUT=${RUN_TIMEOUT:-150}
source bench/gpu_run_lists.sh
planned() { BENCH_PLANNED_STEPS=${PLANNED_STEPS:-4000} cli "$@"; }
if [ "${PART:-package}" = package ]; then
  planned w0 planned_none --load-in-4bit
  planned w0 planned_none_no_dequantize --load-in-4bit --no-dequantize-base
  planned w0 planned_none_adamw_torch --load-in-4bit --no-dequantize-base --optim adamw_torch
  planned w0 planned_8 --load-in-4bit --max-memory 8
else
  for repeat in 1 2; do
    base unsloth $M --bs 16 --ga 1 --padding-free --no-ckpt
    base unsloth $M --bs 16 --ga 1 --padding-free
  done
fi
summarize
echo "done in $(( $(date +%s) - START )) s"
