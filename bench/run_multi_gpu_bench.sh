#!/bin/bash
# On a machine with 2+ GPUs, from the repository root: one GPU (CUDA_VISIBLE_DEVICES=0) against DDP and FSDP on
# NPROC GPUs, bf16 LoRA and QLoRA, the same per-GPU workload (16 rows per process per step), each run through
# `hf-instruct-tune train` (bench/gpu_frontier.py cli). Then every adapter is loaded with
# PeftModel.from_pretrained and checked whole (bench/multi_gpu.py adapters), and each FSDP adapter's logits on one
# GPU are compared with the same weights sharded as in training (bench/multi_gpu.py sharded-logits). Results:
# $OUT/multi_gpu.json, $OUT/adapters.json, $OUT/sharded.jsonl.
set -uo pipefail
# each step under its own timeout, cut to what is left of BUDGET_S for the whole script (default 540 s), less
# RESERVE seconds (2nd argument) kept for the adapter check at the end
DEADLINE=$((SECONDS + ${BUDGET_S:-540}))
limit() { local left=$((DEADLINE - SECONDS - ${2:-0})); echo $(( left < $1 ? (left > 1 ? left : 1) : $1 )); }
source bench/gpu_env.sh
OUT=${OUT:-/tmp/multi-gpu-bench}; M=${MODEL_DIR:-/tmp/llama3-8b-random}; N=${NPROC:-2}; DATA=/tmp/frontier_rows.jsonl
mkdir -p $OUT
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nvidia-smi topo -m | head -4
for p in torch transformers accelerate peft trl bitsandbytes; do python3 -c "import importlib.metadata as m; print('$p', m.version('$p'))" 2>/dev/null || echo "$p missing"; done | paste -sd' ' 
[ -f $M/config.json ] || timeout $(limit 200 90) python3 bench/gpu_bench.py make $M 2>&1 | tail -1
[ -f $DATA ] || python3 bench/gpu_frontier.py data $DATA
ROWS="--batch-size 16 --grad-accum 1"
run() { name=$1; shift; timeout $(limit ${RUN_TIMEOUT:-200} 90) python3 bench/gpu_frontier.py cli $name $M $DATA $OUT $ROWS "$@" \
  2>&1 | grep "^RESULT" | sed 's/^RESULT //' >> $OUT/multi_gpu.jsonl; tail -c 600 $OUT/log_cli_$name.txt | grep -iE "error|memory plan" ; }
# SETTINGS="name flags;name flags;..." replaces the list; ONLY=REGEX keeps the settings whose name matches
# (ONLY='qlora|bf16': one GPU and FSDP, bf16 LoRA and QLoRA; ONLY=ddp: the DDP runs)
SETTINGS=${SETTINGS:-"qlora_1gpu --load-in-4bit;\
ddp_1gpu --load-in-4bit --max-steps 30;ddp_balanced --load-in-4bit --num-processes $N --max-steps 30;\
ddp_inorder --load-in-4bit --num-processes $N --max-steps 30 --no-balance-ranks;\
qlora_fsdp --load-in-4bit --fsdp --num-processes $N;bf16_1gpu;bf16_fsdp --fsdp --num-processes $N"}
IFS=';' read -ra settings <<< "$SETTINGS"
# a setting's words of the form env:NAME=VALUE set NAME for that run only
for setting in "${settings[@]}"; do
  set -- $setting; name=$1; shift
  [[ $name =~ ${ONLY:-.} ]] || continue
  envs=(); flags=()
  for word in "$@"; do case "$word" in env:*) envs+=("${word#env:}");; *) flags+=("$word");; esac; done
  case "$name" in *_1gpu*) envs+=(CUDA_VISIBLE_DEVICES=0);; esac  # one GPU: any name with _1gpu in it
  ( [ ${#envs[@]} = 0 ] || export "${envs[@]}"; run $name "${flags[@]}" )
done
# each FSDP adapter: its logits on one GPU against the same weights sharded over N GPUs as in training
for adapter in $OUT/adapter_*fsdp*; do
  [ -f $adapter/adapter_model.safetensors ] || continue
  [[ ${adapter##*adapter_} =~ ${SKIP_SHARDED:-^$} ]] && continue
  timeout $(limit ${CHECK_TIMEOUT:-150} 90) python3 -m accelerate.commands.launch --config_file examples/accelerate_fsdp.yaml \
    --num_processes $N bench/multi_gpu.py sharded-logits $M $adapter > $OUT/sharded_${adapter##*adapter_}.txt 2>&1
  grep "^RESULT" $OUT/sharded_${adapter##*adapter_}.txt | sed 's/^RESULT //' >> $OUT/sharded.jsonl \
    || tail -5 $OUT/sharded_${adapter##*adapter_}.txt
done
python3 -c "import json,sys; print(json.dumps([json.loads(l) for l in open(sys.argv[1])], indent=1))" \
  $OUT/multi_gpu.jsonl > $OUT/multi_gpu.json
[ -n "${SKIP_ADAPTERS:-}" ] || timeout $(limit 240) python3 bench/multi_gpu.py adapters $M $OUT > $OUT/adapters.json 2>$OUT/adapters_err.txt || tail -5 $OUT/adapters_err.txt
python3 bench/multi_gpu.py table $OUT/multi_gpu.json $OUT/adapters.json
[ -f $OUT/sharded.jsonl ] && cat $OUT/sharded.jsonl
# optional, on GPU 0 afterwards: DIAG="name flags;..." single-GPU CLI runs, PROFILE=1 the step profile
IFS=';' read -ra diag <<< "${DIAG:-}"
for d in "${diag[@]}"; do set -- $d; name=$1; shift; ROWS="" CUDA_VISIBLE_DEVICES=0 run $name "$@"; done
[ -z "${PROFILE:-}" ] || CUDA_VISIBLE_DEVICES=0 timeout 150 python3 bench/gpu_profile.py $M $OUT/profile.json > $OUT/profile.md 2>$OUT/profile_err.txt
