#!/bin/bash
# On a machine with 2+ GPUs, from the repository root: `train --fsdp --resume` end to end. The 8B random model of
# bench/gpu_bench.py (bf16 LoRA, FSDP2 over NPROC GPUs) trains 6 steps straight with --save-steps 3; a second output
# folder gets that run's checkpoint-3 (what a run stopped after step 3 leaves) and `--resume` trains it to step 6
# in a new launch; a second straight run measures how far two identical runs drift apart on the GPU. One RESULT line
# compares the final adapters (L2 distances: resumed vs straight, straight vs straight again, and how far steps 4-6
# moved the adapter) and the losses of steps 4-6. Three launches, about 3 minutes.
# EXTRA="--no-balance-ranks ..." adds flags to both runs.
set -uo pipefail
source bench/gpu_env.sh
OUT=${OUT:-/tmp/fsdp-resume-check}; M=${MODEL_DIR:-/tmp/llama3-8b-random}; N=${NPROC:-2}
rm -rf $OUT && mkdir -p $OUT
[ -f $M/config.json ] || timeout 200 python3 bench/gpu_bench.py make $M 2>&1 | tail -1
PYTHONPATH=$PYTHONPATH:bench python3 -c "import json, gpu_bench
for row in gpu_bench.rows(64): print(json.dumps({'text': row['text']}))" > $OUT/rows.jsonl
train() {  # from /tmp: the checkout's package lacks the installed layout (templates/ and cards/ inside it)
  local out=$1; shift; local start=$SECONDS
  (cd /tmp && timeout ${RUN_TIMEOUT:-200} python3 -m hf_instruct_tune train --model $M --data $OUT/rows.jsonl \
    --formatter text --template raw --output-dir $out --fsdp --num-processes $N --max-steps 6 --save-steps 3 \
    --logging-steps 1 --batch-size 2 --grad-accum 1 --max-length 1024 --seed 0 --lr 1e-3 --warmup-steps 0 \
    ${EXTRA:-} "$@") > $out.log 2>&1
  echo "$(basename $out): exit $?, $((SECONDS - start)) s"; tail -3 $out.log | grep -iE "error|Traceback" ; }
train $OUT/straight
train $OUT/straight2  # the same run again: how far two straight runs differ (nondeterministic bf16 kernels)
mkdir -p $OUT/resumed/checkpoints && cp -r $OUT/straight/checkpoints/checkpoint-3 $OUT/resumed/checkpoints/
train $OUT/resumed --resume
python3 - $OUT <<'EOF'
import json, sys
from pathlib import Path
from safetensors.torch import load_file

out = Path(sys.argv[1])
checkpoint = out / "straight" / "checkpoints" / "checkpoint-3"
result = {"check": "fsdp_resume", "checkpoint_files": sorted(p.name for p in checkpoint.iterdir()),
          "resumed_log_says_resuming": "Resuming from" in (out / "resumed.log").read_text(errors="replace")}
try:
    straight, straight2, resumed, at3 = (load_file(folder / "adapter_model.safetensors")
                                         for folder in (out / "straight", out / "straight2", out / "resumed", checkpoint))
    def dist(a, b):  # the L2 distance between two adapters, over every tensor
        return sum(float((a[k].float() - b[k].float()).pow(2).sum()) for k in b) ** 0.5
    def rel(a, b):  # per tensor max |a - b| / max |b|, the largest over tensors
        return max(float((a[k].float() - b[k].float()).abs().max() / b[k].float().abs().max().clamp_min(1e-12)) for k in b)
    losses = [{e["step"]: e["loss"] for e in json.load(open(out / run / "hf_instruct_tune.json"))["results"]["loss_history"]}
              for run in ("straight", "resumed")]
    result.update(l2_resumed_vs_straight=dist(resumed, straight), l2_straight2_vs_straight=dist(straight2, straight),
                  l2_moved_steps_4_6=dist(at3, straight))
    result.update(tensors=len(straight), same_names=set(straight) == set(resumed),
                  rel_diff_resumed_vs_straight=rel(resumed, straight), rel_moved_steps_4_6=rel(at3, straight),
                  losses_4_6_straight=[losses[0].get(s) for s in (4, 5, 6)],
                  losses_4_6_resumed=[losses[1].get(s) for s in (4, 5, 6)])
    result["loss_max_abs_diff_4_6"] = max(abs(a - b) for a, b in zip(result["losses_4_6_straight"], result["losses_4_6_resumed"]))
    # resumed as close to the straight run as a second straight run is (within 2x, or 5% of what steps 4-6 moved)
    noise = max(2 * result["l2_straight2_vs_straight"], 0.05 * result["l2_moved_steps_4_6"])
    result["ok"] = bool(result["same_names"] and result["l2_resumed_vs_straight"] <= noise
                        and "optimizer.pt" in result["checkpoint_files"] and result["resumed_log_says_resuming"])
except Exception as error:  # a run that failed: its log's tail is above
    result.update(ok=False, error=f"{type(error).__name__}: {error}"[:300])
print("RESULT " + json.dumps(result))
EOF
