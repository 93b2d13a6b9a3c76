#!/bin/bash
# On a machine with two GPUs, from the repository root: fused LoRA projections (the default on a GPU) against
# PEFT's forward (--no-fused-lora), through the CLI, taking turns three times on each GPU: GPU 0 with default
# flags, GPU 1 with --max-memory 8 (every layer checkpointed), then GPU 0 once more with a profiler window over
# steps 8-9 (bench/profiled_train.py summary $OUT/w0/profile_*). 16 steps a run. Results: $OUT/results.jsonl, each
# variant named with its GPU.
set -uo pipefail
export OUT=${OUT:-/tmp/fused_lora} TOTAL_S=${TOTAL_S:-500} RUN_TIMEOUT=${RUN_TIMEOUT:-90}
source bench/gpu_run_lists.sh
(
  export CUDA_VISIBLE_DEVICES=0
  for turn in 1 2 3; do
    cli w0 fused_none_gpu0 --load-in-4bit; cli w0 peft_none_gpu0 --load-in-4bit --no-fused-lora
  done
  BENCH_PROFILE_STEPS=8:9 cli w0 profiled_fused_none_gpu0 --load-in-4bit
) &
(
  export CUDA_VISIBLE_DEVICES=1
  for turn in 1 2 3; do
    cli w1 peft_8_gpu1 --load-in-4bit --max-memory 8 --no-fused-lora; cli w1 fused_8_gpu1 --load-in-4bit --max-memory 8
  done
)
wait
summarize
