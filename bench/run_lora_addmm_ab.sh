#!/bin/bash
# On a machine with two GPUs, from the repository root: LoRA's output added in the matmul (hf_instruct_tune/
# lora_addmm.py, HF_INSTRUCT_TUNE_LORA_ADDMM=1) against PEFT's forward (=0), through the CLI with default flags and
# with --max-memory 32, the two taking turns on each GPU in opposite orders, 16 steps a run. Results:
# $OUT/results.jsonl.
set -uo pipefail
export OUT=${OUT:-/tmp/lora_addmm} TOTAL_S=${TOTAL_S:-275} RUN_TIMEOUT=${RUN_TIMEOUT:-75}
source bench/gpu_run_lists.sh
on() { HF_INSTRUCT_TUNE_LORA_ADDMM=1 cli "$@"; }
off() { HF_INSTRUCT_TUNE_LORA_ADDMM=0 cli "$@"; }
(
  export CUDA_VISIBLE_DEVICES=0
  on w0 addmm_none --load-in-4bit; off w0 peft_none --load-in-4bit
  on w0 addmm_32 --load-in-4bit --max-memory 32; off w0 peft_32 --load-in-4bit --max-memory 32
) &
(
  export CUDA_VISIBLE_DEVICES=1
  off w1 peft_none --load-in-4bit; on w1 addmm_none --load-in-4bit
  off w1 peft_32 --load-in-4bit --max-memory 32; on w1 addmm_32 --load-in-4bit --max-memory 32
)
wait
summarize
