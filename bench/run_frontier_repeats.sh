#!/bin/bash
# On a machine with two GPUs, from the repository root, right after bench/run_gpu_frontier_pair.sh in the same
# lease (its model, rows and Triton caches are in /tmp): the frontier's runs again, each stack on both GPUs, 16 steps
# a run. GPU 0: Unsloth 16 x 1 padding-free without, then with its checkpointing; the CLI at 8 and 32 GiB and with
# default flags; Unsloth without checkpointing again. GPU 1: Unsloth 16 x 1 padded; transformers+peft 4 x 4; Unsloth
# padding-free with its checkpointing again; the CLI at 12 and 64 GiB. Results: $OUT/results.jsonl; merge with the
# pair's with `python bench/gpu_frontier.py merge PAIR/frontier.json $OUT/results.jsonl > merged.json`.
set -uo pipefail
export OUT=${OUT:-/tmp/frontier_repeats} TOTAL_S=${TOTAL_S:-560} RUN_TIMEOUT=${RUN_TIMEOUT:-150}
source bench/gpu_run_lists.sh
(
  export CUDA_VISIBLE_DEVICES=0
  base unsloth $M --bs 16 --ga 1 --padding-free --no-ckpt
  base unsloth $M --bs 16 --ga 1 --padding-free
  cli w0 max_memory_8 --load-in-4bit --max-memory 8
  cli w0 max_memory_32 --load-in-4bit --max-memory 32
  cli w0 default --load-in-4bit
  base unsloth $M --bs 16 --ga 1 --padding-free --no-ckpt
) &
(
  export CUDA_VISIBLE_DEVICES=1
  base unsloth $M --bs 16 --ga 1
  base hf $M --bs 4 --ga 4
  base unsloth $M --bs 16 --ga 1 --padding-free
  cli w1 max_memory_12 --load-in-4bit --max-memory 12
  cli w1 max_memory_64 --load-in-4bit --max-memory 64
)
wait
summarize
echo "done in $(( $(date +%s) - START )) s"
