#!/bin/bash
# On the GPU machine, from the repository root: where the GPU sits idle in the package's steps (bench/trace_gaps.py),
# through the CLI with a profiler window over steps 8-9 (bench/profiled_train.py), for runs planned for 4,000 steps
# (stopped after 16, bench/planned_run_train.py): default flags, and --max-memory 8. Summaries under $OUT.
set -uo pipefail
export OUT=${OUT:-/tmp/gap_profile} TOTAL_S=${TOTAL_S:-400} RUN_TIMEOUT=${RUN_TIMEOUT:-200}
source bench/gpu_run_lists.sh
export BENCH_PROFILE_STEPS=${BENCH_PROFILE_STEPS:-8:9} BENCH_PLANNED_STEPS=${PLANNED_STEPS:-4000}
for run in ${RUNS:-none 8}; do
  if [ $run = none ]; then cli w0 gaps_none --load-in-4bit; else cli w0 gaps_$run --load-in-4bit --max-memory $run; fi
done
summarize
for d in $OUT/w0/profile_*; do echo "== $d"; python3 bench/profiled_train.py summary $d; done
echo "done in $(( $(date +%s) - START )) s"
