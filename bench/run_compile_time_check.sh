#!/bin/bash
# On one GPU, from the repository root: how long compiling the decoder layers takes through the CLI
# (`--compile-layers`, 4 steps; Llama-3-8B's layer on a 2-layer model of its architecture), the layers' float
# attributes compiled as constants (the package) against promoted to graph inputs (torch's default: the package
# without its `specialize_float` line), each with cold caches (fresh TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR),
# then the package's again with its caches warm. FULL=1: then the 32-layer model with default flags, a run planned
# for 4,000 steps. Results: $OUT/results.jsonl; logs with torch.compile's seconds by phase under $OUT/w0.
set -uo pipefail
export OUT=${OUT:-/tmp/compile_time}; START=$(date +%s); TOTAL_S=${TOTAL_S:-500}
source bench/gpu_env.sh
OLD=/tmp/pkg_floats_promoted; rm -rf $OLD && cp -r $PKG $OLD
sed -i '/^    dynamo.specialize_float = True$/d' $OLD/hf_instruct_tune/layer_compilation.py
grep -q "^    dynamo.specialize_float" $OLD/hf_instruct_tune/layer_compilation.py && { echo "old package not made"; exit 1; }
python3 -m py_compile $OLD/hf_instruct_tune/layer_compilation.py || exit 1
M2=/tmp/llama3-8b-2layers; DATA=/tmp/frontier_rows.jsonl; mkdir -p $OUT/w0
[ -f $M2/config.json ] || BENCH_LAYERS=2 python3 bench/gpu_bench.py make $M2 2>&1 | tail -1
[ -f $DATA ] || python3 bench/gpu_frontier.py data $DATA
run() {  # NAME PACKAGE CACHE MODEL FLAGS...
  local name=$1 pkg=$2 cache=$3 model=$4; shift 4
  [ $(( TOTAL_S - ($(date +%s) - START) )) -gt 60 ] || return
  TORCHINDUCTOR_CACHE_DIR=/tmp/cache_$cache/inductor TRITON_CACHE_DIR=/tmp/cache_$cache/triton \
    PYTHONPATH=/tmp/site:$pkg timeout 240 python3 bench/gpu_frontier.py cli $name $model $DATA $OUT/w0 "$@" 2>&1 \
    | grep "^RESULT" | sed 's/^RESULT //' >> $OUT/results.jsonl
}
export BENCH_STEPS=4 BENCH_PLANNED_STEPS=4
run floats_promoted_cold $OLD a $M2 --load-in-4bit --compile-layers
run float_constants_cold $PKG b $M2 --load-in-4bit --compile-layers
run float_constants_warm $PKG b $M2 --load-in-4bit --compile-layers
if [ "${FULL:-0}" = 1 ]; then
  M=/tmp/llama3-8b-random; [ -f $M/config.json ] || python3 bench/gpu_bench.py make $M 2>&1 | tail -1
  BENCH_STEPS=16 BENCH_PLANNED_STEPS=4000 run planned_none $PKG c $M --load-in-4bit
fi
for f in $OUT/w0/log_cli_*.txt; do
  echo "== $(basename $f): $(grep -E '^Throughput|Compiled layers' $f | tr '\n' ' ' | cut -c1-200)"
  grep -E "^(compile_fx.<locals>.fw_compiler_base|compile_fx.<locals>.bw_compiler|_compile.compile_inner|Scheduler.codegen|async_compile.wait|cpp_pybinding|CppScheduling.*|cpu_vec_isa.*) " $f
done
python3 -c "
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(r['variant'], 'wall', r['wall_s'], 'tok/s', r.get('real_tokens_per_s'), 'steps', [round(s, 2) for s in r.get('step_s') or []], r.get('error', '')[:200])
" $OUT/results.jsonl
echo "done in $(( $(date +%s) - START )) s"
