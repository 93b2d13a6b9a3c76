#!/bin/bash
# On one H200, from the repository root: three open questions of the frontier, each against the default in the
# same call (runs planned for 4,000 steps, stopped after 16): at 32 GiB, plain logits with more layers recomputed
# (--loss-kernel plain) against the plan's Cut Cross-Entropy with fewer; at no limit and at 8 GiB, the loss logged
# every 10 steps (one read-back of the loss every 10 steps instead of every step) against every step.
# Results: $OUT/results.jsonl.
set -uo pipefail
export OUT=${OUT:-/tmp/loss_and_logging} TOTAL_S=${TOTAL_S:-540} RUN_TIMEOUT=${RUN_TIMEOUT:-120}
source bench/gpu_run_lists.sh
planned() { BENCH_PLANNED_STEPS=${PLANNED_STEPS:-4000} cli "$@"; }
planned w0 planned_32 --load-in-4bit --max-memory 32
planned w0 planned_32_plain --load-in-4bit --max-memory 32 --loss-kernel plain
planned w0 planned_none --load-in-4bit
planned w0 planned_none_log10 --load-in-4bit --logging-steps 10
planned w0 planned_8 --load-in-4bit --max-memory 8
planned w0 planned_8_log10 --load-in-4bit --max-memory 8 --logging-steps 10
summarize
echo "done in $(( $(date +%s) - START )) s"
