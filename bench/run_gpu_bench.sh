#!/bin/bash
# On the GPU machine, from the repository root: unpack the package bundle (made here by
# /work/shared/device/make_gpu_site.sh -> .gpu-site/site.tgz), check packing on the GPU, run every stack.
# OUT: where logs and gpu_bench.json go (default /tmp/gpu-bench). STACKS, VARIANTS: see bench/gpu_bench.py.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p /tmp/site && tar xzf ${SITE_TGZ:-.gpu-site/site.tgz} -C /tmp/site
# the installed layout (setup.cfg maps templates/ and cards/ into the package): InstructTrainer needs both
rm -rf /tmp/pkg && mkdir -p /tmp/pkg && cp -r hf_instruct_tune /tmp/pkg/ && cp -r templates cards /tmp/pkg/hf_instruct_tune/
export PYTHONPATH=/tmp/site:/tmp/pkg
OUT=${OUT:-/tmp/gpu-bench}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, trl, peft, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__, 'bnb', bitsandbytes.__version__)"
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # every stack alike, not only the package's runs
python3 bench/gpu_bench.py check > "$OUT/check.txt" 2>&1; rc=$?
grep -E "CHECK|Error" "$OUT/check.txt"
[ $rc = 0 ] || { echo "packed-vs-padded check failed: stopping"; exit 1; }
python3 bench/gpu_bench.py all ${MODEL_DIR:-/tmp/llama3-8b-random} "$OUT"
