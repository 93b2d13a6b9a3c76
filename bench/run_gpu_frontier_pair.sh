#!/bin/bash
# On a machine with two GPUs, from the repository root: the whole frontier of bench/gpu_frontier.py in one command
# of under 10 minutes. GPU 0 runs PART=package of bench/run_gpu_frontier.sh (the packed-vs-padded check, then the
# CLI with default flags and each --max-memory B); GPU 1 at the same time runs PART=baselines (Unsloth and
# transformers+peft at their best shapes), then PART=compiled (the CLI with --compile-layers at COMPILE_BUDGETS),
# then, unless EXTRAS=0, the loss kernels (bench/gpu_loss_kernels.py) and generate rows/s (bench/gpu_generate.py,
# with the adapter of GPU 0's default run). The two sides share the host, not a GPU. BENCH_STEPS=N: N steps per
# run in every stack (steps 6-N timed; 10 by default). GPU0_BASELINES="stack flags;...": baselines GPU 0 runs after
# the package's part, to even out the two sides. Results under $OUT: frontier.json (both parts, for
# `python bench/gpu_frontier.py table`), loss_kernels.jsonl, generate.jsonl, logs.tgz. COMPILED_FIRST=1: GPU 1 runs
# the compiled runs before its baselines (BASELINES_S seconds kept for those).
set -uo pipefail
START=$(date +%s); TOTAL_S=${TOTAL_S:-570}
source bench/gpu_env.sh
OUT=${OUT:-/tmp/frontier_pair}; M=${MODEL_DIR:-/tmp/llama3-8b-random}; DATA=/tmp/frontier_rows.jsonl
WORK=/tmp/frontier_pair_work; rm -rf $WORK; mkdir -p $OUT $WORK
left() { echo $(( TOTAL_S - ($(date +%s) - START) )); }
[ -f $M/config.json ] || PYTHONPATH=/tmp/site python3 bench/gpu_bench.py make $M 2>&1 | tail -1
[ -f $DATA ] || PYTHONPATH=/tmp/site:$PWD python3 bench/gpu_frontier.py data $DATA
export COMPILE_BUDGETS=${COMPILE_BUDGETS-"32 none"}
# the 8 GiB plan's settings given as flags, right after the planned run (the frontier before: 3,241 against 5,980)
export PACKAGE_DIAG=${PACKAGE_DIAG-"flags_8 --gradient-checkpointing --fused-loss --offload-embeddings --no-memory-plan \
--batch-size 16 --grad-accum 1"}
# Unsloth with and without its checkpointing, padded and padding-free, 16 x 1 and 4 x 4; transformers+peft padded
export BASELINES=${BASELINES:-"unsloth --bs 16 --ga 1 --padding-free --no-ckpt;unsloth --bs 16 --ga 1 --padding-free;\
unsloth --bs 4 --ga 4 --padding-free --no-ckpt;unsloth --bs 16 --ga 1;hf --bs 4 --ga 4"}
(
  export CUDA_VISIBLE_DEVICES=0
  PART=package COMPILE_BUDGETS= OUT=$WORK/package timeout $(left) bash bench/run_gpu_frontier.sh > $WORK/package.txt 2>&1
  [ -z "${GPU0_BASELINES:-}" ] || BASELINES=$GPU0_BASELINES PART=baselines PKG=/tmp/pkg_baselines0 SKIP_PROFILE=1 OUT=$WORK/baselines0 \
    timeout $(( $(left) - 10 )) bash bench/run_gpu_frontier.sh > $WORK/baselines0.txt 2>&1
) &
package=$!
(
  export CUDA_VISIBLE_DEVICES=1
  if [ -n "${COMPILED_FIRST:-}" ]; then  # the compiled runs, then the baselines with what time is left
    PART=compiled OUT=$WORK/compiled timeout $(( $(left) - ${BASELINES_S:-150} )) bash bench/run_gpu_frontier.sh \
      > $WORK/compiled.txt 2>&1
    PART=baselines SKIP_PROFILE=1 OUT=$WORK/baselines timeout $(( $(left) - 20 )) bash bench/run_gpu_frontier.sh \
      > $WORK/baselines.txt 2>&1
  else
    PART=baselines SKIP_PROFILE=1 OUT=$WORK/baselines timeout $(( $(left) - ${COMPILED_S:-230} )) bash bench/run_gpu_frontier.sh \
      > $WORK/baselines.txt 2>&1
    PART=compiled OUT=$WORK/compiled timeout $(( $(left) - 20 )) bash bench/run_gpu_frontier.sh > $WORK/compiled.txt 2>&1
  fi
  [ "${EXTRAS:-1}" = 1 ] || exit 0
  export PYTHONPATH=/tmp/site:/tmp/pkg_baselines
  [ -f bench/gpu_loss_kernels.py ] && timeout 100 python3 bench/gpu_loss_kernels.py > $WORK/loss_kernels.txt 2>&1
  grep "^RESULT" $WORK/loss_kernels.txt 2>/dev/null | sed 's/^RESULT //' > $OUT/loss_kernels.jsonl
  A=$WORK/package/adapter_default
  for _ in $(seq 60); do [ -f $A/hf_instruct_tune.json ] && break; sleep 2; done
  timeout $(( $(left) - 10 )) python3 bench/gpu_generate.py measure $A --rows 16 --max-new-tokens 48 --batch-size 8 \
    --texts $WORK/texts.json > $WORK/generate.txt 2>&1
  grep "^RESULT" $WORK/generate.txt | sed 's/^RESULT //' > $OUT/generate.jsonl
) &
wait $package; wait
cat $WORK/package/frontier_package.jsonl $WORK/compiled/frontier_compiled.jsonl \
  $WORK/baselines/frontier_baselines.jsonl $WORK/baselines0/frontier_baselines.jsonl 2>/dev/null \
  | python3 -c "import json,sys; print(json.dumps([json.loads(l) for l in sys.stdin if l.strip()], indent=1))" \
  > $OUT/frontier.json
PYTHONPATH=/tmp/site:/tmp/pkg_package python3 bench/gpu_frontier.py table $OUT/frontier.json
cat $OUT/loss_kernels.jsonl $OUT/generate.jsonl 2>/dev/null | cut -c1-300
tail -n 3 $WORK/package.txt $WORK/baselines.txt $WORK/compiled.txt
tar czf $OUT/logs.tgz -C $WORK --exclude='adapter_*' --exclude='*.safetensors' . 2>/dev/null
echo "done in $(( $(date +%s) - START )) s"
