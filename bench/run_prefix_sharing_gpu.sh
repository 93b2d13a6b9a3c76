#!/bin/bash
# On one GPU, from the repository root (about 5 minutes; carry .gpu-site): prefix sharing on the 8B QLoRA workload
# with a 1,000-token system prompt in front of every row (bench/prefix_sharing_gpu.py). First the tiny-model check
# of the compiled flex-attention path against padded sdpa, then the CLI with default flags and --load-in-4bit,
# --prefix-sharing and --no-prefix-sharing, on the same rows. Each part has its own timeout; a failure is logged
# and the next part runs. Results: $OUT/prefix_sharing_gpu.json; the BENCHMARKS.md rows:
#   python bench/prefix_sharing_gpu.py table prefix_sharing_gpu.json --write BENCHMARKS.md --date YYYY-MM-DD
set -uo pipefail
source bench/gpu_env.sh
OUT=${OUT:-/tmp/prefix-sharing-gpu}; M=${MODEL_DIR:-/tmp/llama3-8b-random}; DATA=/tmp/prefix_sharing_rows.jsonl
WORK=/tmp/prefix-sharing-work  # the adapters (large) stay here; logs and results go to $OUT
mkdir -p $OUT $WORK; : > $OUT/results.jsonl
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, trl, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__)"
[ -f $M/config.json ] || { start=$SECONDS; timeout 180 python3 bench/gpu_bench.py make $M 2>&1 | tail -1; echo "model made in $((SECONDS - start)) s"; }
python3 bench/prefix_sharing_gpu.py data $DATA
run() {  # LIMIT COMMAND...: one part under its own timeout; RESULT lines collected, the rest logged
  local limit=$1; shift; local start=$SECONDS
  timeout $limit "$@" > $OUT/part.log 2>&1; local rc=$?
  cat $OUT/part.log >> $OUT/log.txt
  grep "^RESULT" $OUT/part.log | sed 's/^RESULT //' >> $OUT/results.jsonl
  [ $rc = 0 ] || { echo "FAILED (exit $rc): $*"; grep -v "^RESULT" $OUT/part.log | tail -15; }
  echo "part done in $((SECONDS - start)) s: $*"
}
run ${CHECK_TIMEOUT:-120} python3 bench/prefix_sharing_gpu.py check
run ${RUN_TIMEOUT:-180} python3 bench/prefix_sharing_gpu.py cli shared $M $DATA $WORK --load-in-4bit --prefix-sharing
run ${RUN_TIMEOUT:-180} python3 bench/prefix_sharing_gpu.py cli no_sharing $M $DATA $WORK --load-in-4bit --no-prefix-sharing
cp $WORK/log_*.txt $OUT/ 2>/dev/null
python3 -c "import json,sys; print(json.dumps([json.loads(l) for l in open(sys.argv[1])], indent=1))" \
  $OUT/results.jsonl > $OUT/prefix_sharing_gpu.json
cut -c1-600 $OUT/results.jsonl
python3 bench/prefix_sharing_gpu.py table $OUT/prefix_sharing_gpu.json
