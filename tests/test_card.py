"""The model card: header fields, prompt format, stop token, no local paths or secrets."""

from __future__ import annotations

import json

import pytest
from huggingface_hub import ModelCard

from hf_instruct_tune.cli import main
from hf_instruct_tune.errors import InputError
from hf_instruct_tune.hub.card import render_card
from hf_instruct_tune.metadata import TrainingMetadata

CHATML = "<|im_start|>user\n{{ instruction }}<|im_end|>\n<|im_start|>assistant\n"


def make_adapter_dir(path, **overrides):
    """A folder with the files 'train' writes, minus real weights (enough for cards and uploads)."""
    path.mkdir(parents=True, exist_ok=True)
    fields = dict(
        base_model="HuggingFaceTB/SmolLM2-135M-Instruct", base_model_source="hub",
        dataset={"name": str(path.parent / "secret-dir" / "train.jsonl"), "path_name": "train.jsonl", "rows": 12,
                 "sha256": "ab" * 32, "is_hub_dataset": False},
        template={"name": "chatml", "text": CHATML, "stop_token": "<|im_end|>"},
        formatter="alpaca",
        lora={"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]},
        training={"lr": 2e-4, "epochs": 1, "max_steps": 4, "batch_size": 2, "grad_accum": 1, "max_length": 128,
                  "seed": 0, "backend": "transformers", "load_in_4bit": False, "packing": False, "train_on_prompt": False},
        results={"loss_history": [{"step": s, "loss": 3.0 - 0.2 * s} for s in range(1, 5)], "final_loss": 2.2,
                 "best_loss": 2.2, "eval": None, "train_runtime_s": 1.5},
        language=None, license=None, versions={"transformers": "5.0", "peft": "0.17"},
        example={"instruction": "Say hi", "input": "", "rendered_prompt": "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n"},
    )
    fields.update(overrides)
    TrainingMetadata(**fields).save(path)
    (path / "prompt_template.jinja").write_text(CHATML)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (path / "adapter_model.safetensors").write_bytes(b"\0" * 2048)
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return path


def test_card_header_and_body(tmp_path):
    folder = make_adapter_dir(tmp_path / "out")
    card = render_card(folder, repo_id="alice/demo")
    data = card.data.to_dict()
    assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert data["base_model_relation"] == "adapter"
    assert data["library_name"] == "peft"
    assert data["pipeline_tag"] == "text-generation"
    assert set(data["tags"]) == {"lora", "sft", "hf-instruct-tune"}
    assert "license" not in data and "datasets" not in data  # never invented; local data is not a Hub dataset
    body = card.text
    assert CHATML.rstrip("\n") in body  # template verbatim
    assert "prompt = '<|im_start|>user\\nSay hi<|im_end|>\\n<|im_start|>assistant\\n'" in body  # usage in its own format
    assert "convert_tokens_to_ids('<|im_end|>')" in body and "**`<|im_end|>`**" in body  # the stop token
    assert "PeftModel.from_pretrained(base, 'alice/demo')" in body
    assert "hf-instruct-tune generate --adapter alice/demo" in body
    assert "train.jsonl" in body and "ab" * 32 in body and "12" in body
    assert str(tmp_path) not in str(card) and "secret-dir" not in str(card)
    assert ModelCard(str(card)).data.library_name == "peft"  # parses back


def test_card_eos_stop_unsloth_hub_dataset_and_language(tmp_path):
    folder = make_adapter_dir(
        tmp_path / "out", template={"name": "alpaca", "text": "### Instruction:\n{{ instruction }}\n", "stop_token": "eos_token"},
        training={"backend": "unsloth"}, dataset={"name": "tatsu-lab/alpaca", "rows": 5, "sha256": "cd" * 32, "is_hub_dataset": True},
        language=["en", "zh"], license="apache-2.0",
    )
    card = render_card(folder)
    data = card.data.to_dict()
    assert "unsloth" in data["tags"]
    assert data["datasets"] == ["tatsu-lab/alpaca"]
    assert data["language"] == ["en", "zh"] and data["license"] == "apache-2.0"
    assert "tokenizer's EOS token (`</s>`)" in card.text
    assert "stop_id = tokenizer.eos_token_id" in card.text


def test_local_base_model_is_never_a_path(tmp_path):
    folder = make_adapter_dir(tmp_path / "out", base_model=None, base_model_source="local")
    card = render_card(folder)
    assert "base_model" not in card.data.to_dict()
    assert "path/to/the/base-model" in card.text
    with pytest.raises(InputError, match="Hub id"):
        render_card(folder, base_model=str(tmp_path))
    assert render_card(folder, base_model="org/base").data.base_model == "org/base"


def test_card_command_writes_readme_and_plot_and_keeps_license(tmp_path, capsys):
    folder = make_adapter_dir(tmp_path / "out")
    assert main(["card", str(folder), "--license", "mit", "--language", "en"]) == 0
    assert (folder / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert "![Training loss](loss_curve.png)" in (folder / "README.md").read_text()
    assert main(["card", str(folder)]) == 0  # refresh keeps what the user set
    data = ModelCard.load(folder / "README.md").data
    assert data.license == "mit" and data.language == ["en"]


def test_card_command_without_metadata_says_what_to_run(tmp_path, capsys):
    assert main(["card", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "hf_instruct_tune.json" in err and "hf-instruct-tune train" in err
