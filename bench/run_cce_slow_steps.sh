#!/bin/bash
# On a two-GPU machine, from the repository root, OUT set: the 8 and 12 GiB runs with Cut Cross-Entropy (the default)
# against the chunked loss, on both GPUs, and Unsloth 16 x 1 padding-free with and without its checkpointing.
set -u
TOTAL_S=450 RUN_TIMEOUT=120
source bench/gpu_run_lists.sh
(
  export CUDA_VISIBLE_DEVICES=0
  cli w0 max_memory_12 --load-in-4bit --max-memory 12
  cli w0 chunked_12 --load-in-4bit --max-memory 12 --loss-kernel chunked
  cli w0 max_memory_8 --load-in-4bit --max-memory 8
  cli w0 chunked_8 --load-in-4bit --max-memory 8 --loss-kernel chunked
) &
(
  export CUDA_VISIBLE_DEVICES=1
  base unsloth $M --bs 16 --ga 1 --padding-free
  base unsloth $M --bs 16 --ga 1 --padding-free --no-ckpt
  cli w1 chunked_12b --load-in-4bit --max-memory 12 --loss-kernel chunked
  cli w1 max_memory_12b --load-in-4bit --max-memory 12
) &
wait
summarize
rm -rf $OUT/w0 $OUT/w1
echo "done in $(( $(date +%s) - START )) s"
