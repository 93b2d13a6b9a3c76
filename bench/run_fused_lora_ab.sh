#!/bin/bash
# On a machine with two GPUs, from the repository root: fused LoRA projections (the default on a GPU) against
# PEFT's forward (--no-fused-lora), through the CLI, taking turns on each GPU: GPU 0 with default flags, GPU 1
# with --max-memory 8 (every layer checkpointed). TURNS pairs a GPU (3). PIN=1 gives each side half the host's CPU
# cores (taskset), so that one side's CPU work does not slow the other's launches. PROFILE=1: then GPU 0 once more
# with a profiler window over steps 8-9 (bench/profiled_train.py summary $OUT/w0/profile_*). 16 steps a run.
# Results: $OUT/results.jsonl, each variant named with its GPU.
set -uo pipefail
export OUT=${OUT:-/tmp/fused_lora} TOTAL_S=${TOTAL_S:-500} RUN_TIMEOUT=${RUN_TIMEOUT:-90}
source bench/gpu_run_lists.sh
half=$(( $(nproc) / 2 ))
pin() { [ "${PIN:-0}" = 1 ] && taskset -cp "$1" $BASHPID > /dev/null; true; }
(
  export CUDA_VISIBLE_DEVICES=0; pin 0-$(( half - 1 ))
  for turn in $(seq ${TURNS:-3}); do
    cli w0 fused_none_gpu0 --load-in-4bit; cli w0 peft_none_gpu0 --load-in-4bit --no-fused-lora
  done
  [ "${PROFILE:-0}" = 1 ] && BENCH_PROFILE_STEPS=8:9 cli w0 profiled_fused_none_gpu0 --load-in-4bit
) &
(
  export CUDA_VISIBLE_DEVICES=1; pin $half-$(( 2 * half - 1 ))
  for turn in $(seq ${TURNS:-3}); do
    cli w1 peft_8_gpu1 --load-in-4bit --max-memory 8 --no-fused-lora; cli w1 fused_8_gpu1 --load-in-4bit --max-memory 8
  done
)
wait
summarize
