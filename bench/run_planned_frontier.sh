#!/bin/bash
# On a machine with two GPUs, from the repository root: the frontier of a long run, in two calls of one lease.
# PART=package: the CLI with default flags and each --max-memory B, every run planned for PLANNED_STEPS optimizer
# steps (4,000 by default: ~17M tokens of the bench rows, past what compiling the layers pays back at every budget)
# and stopped after 16 (bench/planned_run_train.py), so that each run makes the decisions of a run that long;
# GPU 0: no limit, 12 GiB, 8 GiB; GPU 1: 32, 64 GiB. PART=baselines: Unsloth's two fastest shapes (16 x 1
# padding-free with and without its checkpointing) three times over the two GPUs each, and the CLI's default flags
# on a 16-step run (no limit and 8 GiB) for the short run's decisions. Results: $OUT/results.jsonl; the package's
# logs (with torch.compile's seconds by phase) under $OUT/w0 and $OUT/w1.
set -uo pipefail
export OUT=${OUT:-/tmp/planned_frontier} TOTAL_S=${TOTAL_S:-560} RUN_TIMEOUT=${RUN_TIMEOUT:-200}
source bench/gpu_run_lists.sh
planned() { BENCH_PLANNED_STEPS=${PLANNED_STEPS:-4000} cli "$@"; }
if [ "${PART:-package}" = package ]; then
  ( export CUDA_VISIBLE_DEVICES=0
    planned w0 planned_none --load-in-4bit
    planned w0 planned_12 --load-in-4bit --max-memory 12
    planned w0 planned_8 --load-in-4bit --max-memory 8 ) &
  ( export CUDA_VISIBLE_DEVICES=1
    planned w1 planned_32 --load-in-4bit --max-memory 32
    planned w1 planned_64 --load-in-4bit --max-memory 64 ) &
else
  ( export CUDA_VISIBLE_DEVICES=0
    base unsloth $M --bs 16 --ga 1 --padding-free --no-ckpt
    base unsloth $M --bs 16 --ga 1 --padding-free
    base unsloth $M --bs 16 --ga 1 --padding-free --no-ckpt
    cli w0 default --load-in-4bit ) &
  ( export CUDA_VISIBLE_DEVICES=1
    base unsloth $M --bs 16 --ga 1 --padding-free
    base unsloth $M --bs 16 --ga 1 --padding-free --no-ckpt
    base unsloth $M --bs 16 --ga 1 --padding-free
    cli w1 max_memory_8 --load-in-4bit --max-memory 8 ) &
fi
wait
summarize
echo "done in $(( $(date +%s) - START )) s"
