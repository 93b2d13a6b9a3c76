#!/bin/bash
# On one GPU, from the repository root: the 8 GiB memory plan against the same settings given as flags
# (BENCHMARKS.md "GPU", the frontier: 3,241 against 5,980 tok/s), taking turns, twice each, so that the machine's
# state is the same for both. Then the plan path with every choice given, embeddings on CPU and on the device: says
# whether the gap follows the path or the embeddings' move to CPU memory. Every run: `train --load-in-4bit` through bench/gpu_frontier.py
# cli (the frontier's 512 rows, 10 steps, steps 6-10 timed), one RESULT line each. About 5-6 minutes with the model
# already in /tmp (each run ~40 s). $OUT: results.jsonl, log.txt (the tail of every run's log).
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
[ -d /tmp/site/trl ] || { mkdir -p /tmp/site && tar xzf ${SITE_TGZ:-.gpu-site/site.tgz} -C /tmp/site; }
rm -rf /tmp/pkg && mkdir -p /tmp/pkg && cp -r hf_instruct_tune /tmp/pkg/ && cp -r templates cards /tmp/pkg/hf_instruct_tune/
export PYTHONPATH=/tmp/site:/tmp/pkg
OUT=${OUT:-/tmp/plan_vs_flags}; WORK=/tmp/plan_vs_flags_work; M=${MODEL_DIR:-/tmp/llama3-8b-random}
DATA=${DATA:-/tmp/frontier_rows.jsonl}
rm -rf $WORK; mkdir -p $OUT $WORK
python3 -c "import transformers, torch; print('transformers', transformers.__version__, 'torch', torch.__version__)"
[ -f $M/config.json ] || python3 bench/gpu_bench.py make $M 2>&1 | tail -1
[ -f $DATA ] || python3 bench/gpu_frontier.py data $DATA
run() {
  local name=$1; shift
  timeout 150 python3 bench/gpu_frontier.py cli $name $M $DATA $WORK --load-in-4bit "$@" > $WORK/$name.out 2>&1
  grep "^RESULT" $WORK/$name.out | sed 's/^RESULT //' | cut -c1-600 | tee -a $OUT/results.jsonl
  { echo "== $name"; grep -E "Memory plan|Throughput|Error" $WORK/log_cli_$name.txt | tail -4; } >> $OUT/log.txt
}
FLAGS8="--gradient-checkpointing --fused-loss --offload-embeddings --no-memory-plan --batch-size 16 --grad-accum 1"
for turn in 1 2; do
  run plan8_$turn --max-memory 8
  run flags8_$turn $FLAGS8
done
# the plan path with every choice given (so only the path differs from flags8), embeddings on CPU, then on the device
run plan_fixed_cpu --max-memory 12 --gradient-checkpointing --fused-loss --offload-embeddings
run plan_fixed_device --max-memory 12 --gradient-checkpointing --fused-loss --no-offload-embeddings
