"""The labels rules and the train → generate loop on the real default model (SmolLM2-135M-Instruct, embedded GGUF).

SmolLM2's pad token is its EOS (``<|im_end|>``) and its BOS is ``<|im_start|>``: the cases the rules exist for.
"""

import json

import pytest

from hf_instruct_tune.models import DEFAULT_MODEL, load_tokenizer
from hf_instruct_tune.templating import get_template
from hf_instruct_tune.tokenization import IGNORE_INDEX, ExampleEncoder

pytestmark = pytest.mark.slow

ROW = {"messages": [{"role": "user", "content": "分类以下文本的情感。", "input": "我今天很开心，阳光明媚。"},
                    {"role": "assistant", "content": "积极"}]}


@pytest.fixture(scope="module")
def spec(embedded_model_spec):
    return embedded_model_spec


@pytest.fixture(scope="module")
def tokenizer(spec):
    return load_tokenizer(spec)


def test_pad_is_eos_and_the_stop_token_is_trained_once(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    encoder = ExampleEncoder(tokenizer, get_template("alpaca-zh"))
    for response in ("积极", "积极<|im_end|>", "积极<|im_end|><|im_end|>"):
        example = encoder.encode({"messages": [ROW["messages"][0], {"role": "assistant", "content": response}]})
        trained = [label for label in example.labels if label != IGNORE_INDEX]
        assert trained[-1] == tokenizer.eos_token_id
        assert trained.count(tokenizer.eos_token_id) == 1
        assert example.input_ids.count(tokenizer.eos_token_id) == 1
        assert tokenizer.decode(trained[:-1]) == "积极"


def test_chatml_prompt_keeps_one_bos_and_matches_inference(tokenizer):
    encoder = ExampleEncoder(tokenizer, get_template("chatml"))
    example = encoder.encode(ROW)
    prompt = encoder.encode_prompt(ROW["messages"][:1])
    assert example.input_ids[: len(prompt)] == prompt
    assert example.input_ids[0] == tokenizer.bos_token_id  # SmolLM2's BOS is <|im_start|>
    assert example.labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)


def test_train_then_generate_on_the_embedded_model(tmp_path, spec):
    from hf_instruct_tune.cli import main

    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": "分类以下文本的情感。", "input": "我很开心。", "output": "积极"},
                                {"instruction": "分类以下文本的情感。", "input": "我很难过。", "output": "消极"}],
                               ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "adapter"
    assert main(["train", "--data", str(data), "--template", "alpaca-zh", "--output-dir", str(out),
                 "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1"]) == 0
    metadata = json.loads((out / "hf_instruct_tune.json").read_text(encoding="utf-8"))
    assert metadata["base_model"] == DEFAULT_MODEL
    assert metadata["base_model_source"] == "embedded-gguf"
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == DEFAULT_MODEL
    card = (out / "README.md").read_text(encoding="utf-8")
    assert f"base_model: {DEFAULT_MODEL}" in card and "library_name: peft" in card
    predictions = tmp_path / "predictions.jsonl"
    assert main(["generate", "--adapter", str(out), "--data", str(data), "--output", str(predictions),
                 "--max-new-tokens", "4"]) == 0
    rows = [json.loads(line) for line in predictions.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 2 and all(row["finish_reason"] in {"eos", "length"} for row in rows)


def test_fused_lora_projections_train_the_embedded_model_as_peft_does(tmp_path, spec):
    import torch
    from safetensors.torch import load_file

    from hf_instruct_tune.cli import main

    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": "分类以下文本的情感。", "input": "我很开心。", "output": "积极"},
                                {"instruction": "分类以下文本的情感。", "input": "我很难过。", "output": "消极"}],
                               ensure_ascii=False), encoding="utf-8")
    runs = {}
    for fused in ("--fused-lora", "--no-fused-lora"):
        out = tmp_path / fused
        assert main(["train", "--data", str(data), "--template", "alpaca-zh", "--output-dir", str(out),
                     "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1", fused]) == 0
        metadata = json.loads((out / "hf_instruct_tune.json").read_text(encoding="utf-8"))
        runs[fused] = (metadata, load_file(out / "adapter_model.safetensors"))
    (fused_meta, fused_weights), (peft_meta, peft_weights) = runs["--fused-lora"], runs["--no-fused-lora"]
    assert fused_meta["training"]["fused_lora"]["used"] and not peft_meta["training"]["fused_lora"]["used"]
    fused_losses = [entry["loss"] for entry in fused_meta["results"]["loss_history"]]
    assert fused_losses == pytest.approx([entry["loss"] for entry in peft_meta["results"]["loss_history"]],
                                         rel=1e-5)
    assert fused_weights.keys() == peft_weights.keys()
    for name, weight in fused_weights.items():
        torch.testing.assert_close(weight, peft_weights[name], rtol=1e-4, atol=1e-6, msg=name)
