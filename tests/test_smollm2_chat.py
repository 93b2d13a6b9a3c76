"""The embedded SmolLM2 in its own chat template, end to end: train on the seed rows as conversations with no
--template, then generate every training answer exactly, each ended by the template's stop token."""

import json
from pathlib import Path

import pytest


pytestmark = pytest.mark.slow

SEED_ROWS = Path(__file__).resolve().parents[1] / "examples" / "dataset.json"
STEPS = "12"  # the loss is below 0.01 from step 9; 20 steps also reproduced 10/10 (final loss 0.0004)


@pytest.fixture(scope="module")
def spec(embedded_model_spec):
    return embedded_model_spec


def test_train_and_generate_in_the_models_own_chat_template(spec, tmp_path):
    from transformers import AutoTokenizer

    from hf_instruct_tune.cli import main

    rows = json.loads(SEED_ROWS.read_text(encoding="utf-8"))
    conversations = [{"messages": [{"role": "user", "content": f"{row['instruction']}\n{row['input']}"},
                                   {"role": "assistant", "content": row["output"]}]} for row in rows]
    data = tmp_path / "conversations.json"
    data.write_text(json.dumps(conversations, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "adapter"
    assert main(["train", "--data", str(data), "--output-dir", str(out), "--max-steps", STEPS, "--batch-size", "10",
                 "--grad-accum", "1", "--lr", "1e-3"]) == 0
    metadata = json.loads((out / "hf_instruct_tune.json").read_text(encoding="utf-8"))
    assert metadata["template"]["name"] == "model" and metadata["template"]["stop_token"] == "<|im_end|>"
    saved = AutoTokenizer.from_pretrained(out)
    prompt = saved.apply_chat_template(conversations[0]["messages"][:1], add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")

    predictions = tmp_path / "predictions.jsonl"
    assert main(["generate", "--adapter", str(out), "--data", str(data), "--output", str(predictions),
                 "--max-new-tokens", "8"]) == 0
    answers = [json.loads(line) for line in predictions.read_text(encoding="utf-8").splitlines()]
    assert [answer["generated"] for answer in answers] == [row["output"] for row in rows]
    assert [answer["finish_reason"] for answer in answers] == ["eos"] * len(rows)
