#!/bin/bash
# On a two-GPU machine, from the repository root, OUT set: the 8 and 12 GiB runs with Cut Cross-Entropy (the default)
# against the chunked loss, on both GPUs, and Unsloth 16 x 1 padding-free with and without its checkpointing.
set -u
START=$(date +%s); REPO=$PWD
export SITE_TGZ=$PWD/.gpu-site/site.tgz
source bench/gpu_env.sh
M=/tmp/llama3-8b-random; DATA=/tmp/frontier_rows.jsonl; export BENCH_STEPS=16
[ -f $M/config.json ] || python3 bench/gpu_bench.py make $M 2>&1 | tail -1
[ -f $DATA ] || python3 bench/gpu_frontier.py data $DATA
mkdir -p $OUT/w0 $OUT/w1
left() { echo $(( 450 - ($(date +%s) - START) )); }
cli() { local w=$1; shift; [ $(left) -gt 40 ] || return; timeout $(( $(left) > 120 ? 120 : $(left) )) python3 bench/gpu_frontier.py cli "$1" $M $DATA $OUT/$w "${@:2}" 2>&1 | grep "^RESULT" | sed 's/^RESULT //' >> $OUT/results.jsonl; }
base() { [ $(left) -gt 40 ] || return; timeout $(( $(left) > 120 ? 120 : $(left) )) python3 bench/gpu_bench.py train "$@" 2>&1 | grep "^RESULT" | sed 's/^RESULT //' >> $OUT/results.jsonl; }
(
  export CUDA_VISIBLE_DEVICES=0
  cli w0 max_memory_12 --load-in-4bit --max-memory 12
  cli w0 chunked_12 --load-in-4bit --max-memory 12 --loss-kernel chunked
  cli w0 max_memory_8 --load-in-4bit --max-memory 8
  cli w0 chunked_8 --load-in-4bit --max-memory 8 --loss-kernel chunked
) &
(
  export CUDA_VISIBLE_DEVICES=1
  base unsloth $M --bs 16 --ga 1 --padding-free
  base unsloth $M --bs 16 --ga 1 --padding-free --no-ckpt
  cli w1 chunked_12b --load-in-4bit --max-memory 12 --loss-kernel chunked
  cli w1 max_memory_12b --load-in-4bit --max-memory 12
) &
wait
python3 -c "
import json
for l in open('$OUT/results.jsonl'):
    r = json.loads(l); s = r.get('step_s') or []
    print(r.get('variant') or r.get('config'), round(r.get('real_tokens_per_s') or 0), r.get('peak_alloc_gib'), (r.get('plan') or '')[60:200], r.get('error', '')[:150], [round(x, 2) for x in s])
"
rm -rf $OUT/w0 $OUT/w1
echo "done in $(( $(date +%s) - START )) s"
