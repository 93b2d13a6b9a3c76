"""The card of a real (tiny) run states what happened: steps, passes, rows seen, losses, SHA-256, changed settings.

And the Python API publishes like the command line: ``save_model()`` writes the package's card, and
``push_to_hub()`` uploads adapter, tokenizer, template, metadata and card in one commit to a (local) Hub.
"""

from __future__ import annotations

import hashlib
import json
import logging

import pytest
from huggingface_hub import HfApi, ModelCard, hf_hub_download

from hf_instruct_tune.cli import main

ROWS = [{"instruction": f"classify sentence {i}", "input": "I like football" if i % 2 else "rain again",
         "output": "positive" if i % 2 else "negative"} for i in range(10)]


def _sha256_of_rows(rows) -> str:
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, ensure_ascii=False, sort_keys=True).encode("utf-8") + b"\n")
    return digest.hexdigest()


@pytest.fixture(scope="module")
def api_run(tmp_path_factory):
    """7 steps of 2 rows over 10 rows (1.4 passes, 14 rows seen), lr 1e-3, trained and saved from Python."""
    from datasets import Dataset
    from peft import LoraConfig

    from hf_instruct_tune import InstructConfig, InstructTrainer
    from hf_instruct_tune.testing.tiny import build_tiny_model, build_tiny_tokenizer

    root = tmp_path_factory.mktemp("api-run")
    tokenizer = build_tiny_tokenizer()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_HOME", str(root / "hf_home"))
        args = InstructConfig(output_dir=str(root / "out"), max_steps=7, per_device_train_batch_size=2,
                              learning_rate=1e-3, logging_steps=1, save_strategy="no", seed=0, max_length=128)
        trainer = InstructTrainer(build_tiny_model(tokenizer), args, train_dataset=Dataset.from_list(ROWS),
                                  processing_class=tokenizer, prefix_sharing=False,
                                  peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                         task_type="CAUSAL_LM"))
        trainer.train()
        trainer.save_model()
    yield trainer, root / "out"
    trainer.train_data.cleanup()


def test_save_model_writes_the_package_card_with_the_run_as_it_happened(api_run):
    trainer, out = api_run
    card = ModelCard.load(out / "README.md")
    text = card.text
    assert card.data.library_name == "peft" and "hf-instruct-tune" in card.data.tags
    assert "licence" not in str(card) and 'model="None"' not in str(card)  # not TRL's generic card
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    summary = trainer.state.log_history[-1]
    assert trainer.state.global_step == 7 and len(losses) == 7
    assert "Optimizer steps done: 7; passes over the data: 1.4; rows seen: 14" in text
    assert (f"Training loss: {round(losses[0], 4)} at the first logged step, {round(losses[-1], 4)} at the last "
            f"(7 logged); best {round(min(losses), 4)}") in text
    assert f"Mean training loss over the run: {round(summary['train_loss'], 4)}" in text
    assert f"SHA-256 of the data: `{_sha256_of_rows(ROWS)}`" in text  # the full 64 hex digits
    assert "`learning_rate` = 0.001" in text and "`max_steps` = 7" in text and "`seed` = 0" in text
    assert "| epochs |" not in text  # max_steps decided the length: no configured-but-unused epoch count
    assert "github.com" not in text and "pip install hf-instruct-tune" not in text  # no invented links


def test_create_model_card_writes_the_same_card(api_run):
    trainer, out = api_run
    (out / "README.md").unlink()
    trainer.create_model_card()
    assert "Optimizer steps done: 7" in (out / "README.md").read_text(encoding="utf-8")


def test_push_to_hub_publishes_like_upload_in_one_commit(api_run, hub_server, monkeypatch):
    trainer, out = api_run
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    trainer.args.hub_model_id = "tiny-api-adapter"
    commit = trainer.push_to_hub()
    assert commit.commit_url.startswith(f"{hub_server.url}/alice/tiny-api-adapter/commit/")
    api = HfApi(endpoint=hub_server.url)
    assert len(api.list_repo_commits("alice/tiny-api-adapter")) == 2  # the repo's creation, then one commit
    files = set(api.list_repo_files("alice/tiny-api-adapter"))
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer_config.json", "prompt_template.jinja",
            "hf_instruct_tune.json", "README.md"} <= files
    assert not any(name.startswith("checkpoint") or name.endswith(".bin") for name in files)
    card = ModelCard.load(hf_hub_download("alice/tiny-api-adapter", "README.md"))
    assert "PeftModel.from_pretrained(base, 'alice/tiny-api-adapter')" in card.text
    assert "Optimizer steps done: 7" in card.text
    assert trainer.push_to_hub() is None  # nothing changed: no second commit
    assert len(api.list_repo_commits("alice/tiny-api-adapter")) == 2


def test_cli_card_counts_the_run_and_names_changed_options(tmp_path, caplog, monkeypatch):
    from hf_instruct_tune import InstructTrainer
    from hf_instruct_tune.testing.tiny import save_tiny_checkpoint

    seen_args, train = [], InstructTrainer.train

    def recorded(self, *args, **kwargs):
        seen_args.append(self.args)
        return train(self, *args, **kwargs)

    monkeypatch.setattr(InstructTrainer, "train", recorded)

    model = save_tiny_checkpoint(tmp_path / "tiny")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS), encoding="utf-8")
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        assert main(["train", "--model", str(model), "--data", str(data), "--output-dir", str(out),
                     "--max-steps", "3", "--batch-size", "4", "--grad-accum", "1", "--lr", "1e-3",
                     "--lora-r", "2", "--target-modules", "q_proj", "--no-prefix-sharing"]) == 0
    text = (out / "README.md").read_text(encoding="utf-8")
    assert "Optimizer steps done: 3; passes over the data: 1.0; rows seen: 10" in text
    assert "`lr` = 0.001" in text and "`max_steps` = 3" in text and "`grad_accum` = 1" in text
    assert "`target_modules` = q_proj," in text and "`batch_size`" not in text  # 4 is the default
    assert "| learning rate | 0.001 |" in text
    assert "| warm-up steps | 0 |" in text  # 5 asked, capped at a tenth of 3 steps
    assert "| epochs |" not in text and "epochs 3.0" not in text
    assert f"SHA-256 of the data: `{hashlib.sha256(data.read_bytes()).hexdigest()}`" in text
    messages = [record.getMessage() for record in caplog.records]
    assert "Warm-up: 0 of 3 steps (5 asked; at most 1/10 of the run)" in messages, messages
    assert seen_args[0].logging_nan_inf_filter is False  # no loss read back in the middle of a step
    assert seen_args[0].optim == "adamw_torch_fused"  # transformers' default: fewer launches per optimizer step
    assert "`optim`" not in text  # the default is not a changed option
