#!/bin/bash
# On the GPU machine, from the repository root: unpack the package bundle (made here by
# /work/shared/device/make_gpu_site.sh -> .gpu-site/site.tgz), check packing on the GPU, run every stack.
# OUT: where logs and gpu_bench.json go (default /tmp/gpu-bench). STACKS, VARIANTS: see bench/gpu_bench.py.
source bench/gpu_env.sh  # every stack gets the same allocator settings
OUT=${OUT:-/tmp/gpu-bench}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, trl, peft, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__, 'bnb', bitsandbytes.__version__)"
python3 bench/gpu_bench.py check > "$OUT/check.txt" 2>&1; rc=$?
grep -E "CHECK|Error" "$OUT/check.txt"
[ $rc = 0 ] || { echo "packed-vs-padded check failed: stopping"; exit 1; }
python3 bench/gpu_bench.py all ${MODEL_DIR:-/tmp/llama3-8b-random} "$OUT"
