# Sourced by bench/run_*_slow_steps.sh on the GPU machine, from the repository root, OUT set: the frontier's model
# and rows (bench/gpu_frontier.py), 16 steps a run, and two ways to run one: `cli GPU_DIR NAME FLAGS...` (the
# package through its CLI, bench/gpu_frontier.py cli) and `base STACK MODEL FLAGS...` (a baseline,
# bench/gpu_bench.py train), each appending its RESULT to $OUT/results.jsonl, with at most RUN_TIMEOUT seconds and
# none started after TOTAL_S seconds from here; `summarize` prints every result with its steps' seconds.
START=$(date +%s); REPO=$PWD
source bench/gpu_env.sh
M=/tmp/llama3-8b-random; DATA=/tmp/frontier_rows.jsonl; export BENCH_STEPS=16
[ -f $M/config.json ] || python3 bench/gpu_bench.py make $M 2>&1 | tail -1
[ -f $DATA ] || python3 bench/gpu_frontier.py data $DATA
mkdir -p $OUT/w0 $OUT/w1
left() { echo $(( ${TOTAL_S:-450} - ($(date +%s) - START) )); }
limit() { local l=$(left); echo $(( l > ${RUN_TIMEOUT:-120} ? ${RUN_TIMEOUT:-120} : l )); }
cli() {
  local w=$1; shift; [ $(left) -gt 40 ] || return
  timeout $(limit) python3 bench/gpu_frontier.py cli "$1" $M $DATA $OUT/$w "${@:2}" 2>&1 | grep "^RESULT" \
    | sed 's/^RESULT //' >> $OUT/results.jsonl
}
base() {
  [ $(left) -gt 40 ] || return
  timeout $(limit) python3 bench/gpu_bench.py train "$@" 2>&1 | grep "^RESULT" | sed 's/^RESULT //' >> $OUT/results.jsonl
}
summarize() {
  python3 -c "
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line); steps = r.get('step_s') or []
    print(r.get('variant'), round(r.get('real_tokens_per_s') or 0), r.get('peak_alloc_gib'), (r.get('plan') or '')[60:200],
          r.get('error', '')[:150], [round(s, 2) for s in steps])
" $OUT/results.jsonl
}
