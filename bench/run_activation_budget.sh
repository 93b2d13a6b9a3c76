#!/bin/bash
# On one H200, from the repository root: what torch's activation memory budget buys compiled layers without
# checkpointing (the peak and tokens/s at budgets 1, 0.5 and 0.3), on runs planned for 4,000 steps with Cut
# Cross-Entropy and the base not dequantized, so that the layers' kept activations are most of the peak.
set -uo pipefail
export OUT=${OUT:-/tmp/activation_budget} TOTAL_S=${TOTAL_S:-330} RUN_TIMEOUT=${RUN_TIMEOUT:-120}
source bench/gpu_run_lists.sh
for budget in ${BUDGETS:-1.0 0.5 0.3}; do
  BENCH_ACTIVATION_MEMORY_BUDGET=$budget BENCH_PLANNED_STEPS=4000 cli w0 activation_budget_$budget --load-in-4bit \
    --no-dequantize-base --loss-kernel cce --no-gradient-checkpointing
done
summarize
echo "done in $(( $(date +%s) - START )) s"
