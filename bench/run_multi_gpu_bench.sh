#!/bin/bash
# On a machine with 2+ GPUs, from the repository root: the best hf_instruct_tune setting on 1 GPU, then the
# same per-GPU workload under DDP (`accelerate launch --num_processes N`), one 4-bit base per GPU.
# OUT: where logs and multi_gpu.json go. NPROC: processes (default 2).
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p /tmp/site && tar xzf ${SITE_TGZ:-.gpu-site/site.tgz} -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/multi-gpu-bench}; M=${MODEL_DIR:-/tmp/llama3-8b-random}; V=${VARIANT:-best}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
[ -f $M/config.json ] || python3 bench/gpu_bench.py make $M 2>&1 | tail -1
# ONE_GPU_LOG: a log of `gpu_bench.py train hit` with variant $V from this machine, instead of running it again
[ -n "$ONE_GPU_LOG" ] && cp "$ONE_GPU_LOG" $OUT/log_1gpu.txt || python3 bench/gpu_bench.py train hit $M --variants $V > $OUT/log_1gpu.txt 2>&1
accelerate launch --multi_gpu --num_processes ${NPROC:-2} --mixed_precision bf16 \
  bench/gpu_bench.py train hit $M --variants $V > $OUT/log_ddp.txt 2>&1
grep -h "^RESULT.*\"variant\": \"$V\"" $OUT/log_1gpu.txt $OUT/log_ddp.txt | sed 's/^RESULT //' | python3 -c 'import sys,json; print(json.dumps([json.loads(l) for l in sys.stdin], indent=1))' > $OUT/multi_gpu.json
python3 bench/gpu_bench.py multi-table $OUT/multi_gpu.json
grep -E "Error|error" $OUT/log_ddp.txt | tail -5
