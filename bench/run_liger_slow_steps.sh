#!/bin/bash
# On a two-GPU machine, from the repository root, OUT set: the GPU tests of Liger kernels; a 12 GiB run profiled over
# its slow steps (5-6) and one without expandable segments; Liger kernels against none at 32 GiB, taking turns; the
# baselines the frontier (run_gpu_frontier_pair.sh) had no time for; compiled layers at 32 GiB and without a limit.
set -u
TOTAL_S=580 RUN_TIMEOUT=150
source bench/gpu_run_lists.sh
(cd /tmp && CUDA_VISIBLE_DEVICES=0 timeout 150 python3 -m pytest -q -p no:cacheprovider --rootdir=$REPO \
  $REPO/tests/test_liger_kernels.py "$REPO/tests/test_backends.py::test_embeddings_in_cpu_memory_reuse_one_pinned_buffer_on_a_gpu" \
  > $OUT/pytest_gpu.txt 2>&1); tail -3 $OUT/pytest_gpu.txt
echo "setup+tests $(( $(date +%s) - START )) s"
(
  export CUDA_VISIBLE_DEVICES=0
  BENCH_PROFILE_STEPS=5:6 cli w0 profiled_12 --load-in-4bit --max-memory 12
  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False cli w0 no_expandable_12 --load-in-4bit --max-memory 12
  cli w0 noliger_32b --load-in-4bit --max-memory 32 --no-liger-kernels
  cli w0 liger_32b --load-in-4bit --max-memory 32
  cli w0 noliger_32c --load-in-4bit --max-memory 32 --no-liger-kernels
  cli w0 liger_32c --load-in-4bit --max-memory 32
  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False cli w0 no_expandable_8 --load-in-4bit --max-memory 8
) &
(
  export CUDA_VISIBLE_DEVICES=1
  base unsloth $M --bs 4 --ga 4
  base hf $M --bs 4 --ga 4
  base unsloth $M --bs 16 --ga 1 --padding-free --no-ckpt
  cli w1 compiled_none --load-in-4bit --compile-layers
  cli w1 compiled_32 --load-in-4bit --max-memory 32 --compile-layers
) &
wait
summarize
for d in $OUT/w0/profile_*; do python3 bench/profiled_train.py summary $d; done 2>&1 | head -60
rm -rf $OUT/w0/adapter_* $OUT/w1/adapter_*
echo "done in $(( $(date +%s) - START )) s"
