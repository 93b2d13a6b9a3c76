#!/bin/bash
# On one GPU, from the repository root: where the memory plan's checkpointing loses time against
# --gradient-checkpointing (issue 10). bench/plan_path_diag.py runs the 8B NF4 model on the frontier's rows with
# the same choices each time (16 x 1, 32/32 layers checkpointed, fused loss, embeddings in CPU memory) and only the
# set-up path changed: flags, plan, plan, flags (taking turns), then flags_late and plan_early. One RESULT line per
# run (per-step times, layer forwards, syncs, allocator calls, CPU time, a profile of step 7). About 5 minutes with
# the model already in /tmp (each run ~45 s). $OUT: plan_path_diag.jsonl, log.txt (each run's last lines).
set -uo pipefail
source bench/gpu_env.sh
OUT=${OUT:-/tmp/plan_path_diag}; WORK=/tmp/plan_path_diag_work; M=${MODEL_DIR:-/tmp/llama3-8b-random}
DATA=${DATA:-/tmp/frontier_rows.jsonl}
rm -rf $WORK; mkdir -p $OUT $WORK
python3 -c "import transformers, trl, torch; print('transformers', transformers.__version__, 'trl', trl.__version__, 'torch', torch.__version__)"
[ -f $M/config.json ] || python3 bench/gpu_bench.py make $M 2>&1 | tail -1
[ -f $DATA ] || python3 bench/gpu_frontier.py data $DATA
for mode in ${MODES:-flags plan plan flags flags_late plan_early}; do
  (cd /tmp && timeout ${RUN_TIMEOUT:-150} python3 $OLDPWD/bench/plan_path_diag.py $mode $M $DATA $WORK) \
    > $WORK/$mode.out 2>&1
  grep "^RESULT" $WORK/$mode.out | sed 's/^RESULT //' | tee -a $OUT/plan_path_diag.jsonl | cut -c1-400
  { echo "== $mode"; grep -vE "^RESULT|it/s\]|s/it\]" $WORK/$mode.out | tail -6; } >> $OUT/log.txt
done
