#!/bin/bash
# On one GPU, from the repository root: bench/cce_recompile_check.py, each mode twice in processes of their own: first
# with an empty Triton cache, then with the cache the first left. Results: $OUT/cce_recompile.jsonl.
set -u
REPO=$PWD; OUT=${OUT:-/tmp/cce_recompile}; mkdir -p $OUT
source bench/gpu_env.sh
rm -rf /tmp/triton_raw /tmp/triton_package
for pass in empty warm; do
  for mode in raw package; do
    (cd /tmp && TRITON_CACHE_DIR=/tmp/triton_$mode timeout 100 python3 $REPO/bench/cce_recompile_check.py $mode 2>&1) \
      | grep "^RESULT" | sed "s/^RESULT {/{\"cache\": \"$pass\", /" | tee -a $OUT/cce_recompile.jsonl
  done
done
