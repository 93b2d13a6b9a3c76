"""InstructTrainer: trains a tiny LoRA, saves its run files, and feeds the model labels that keep EOS."""

from __future__ import annotations

import inspect
import json

import pytest
from helpers import write_jsonl

from hf_instruct_tune.errors import InputError
from hf_instruct_tune.metadata import METADATA_FILE_NAME, TrainingMetadata
from hf_instruct_tune.templating import TEMPLATE_FILE_NAME, get_template
from hf_instruct_tune.tokenization import IGNORE_INDEX

ROWS = [{"instruction": "hello", "output": "yes"}, {"instruction": "classify the sentiment", "output": "positive"},
        {"instruction": "Paris is the capital of", "output": "France"}, {"instruction": "hello world", "output": "no"}]


def _config(output_dir, **overrides):
    from trl import SFTConfig

    values = dict(output_dir=str(output_dir), max_steps=2, per_device_train_batch_size=2, use_cpu=True, report_to=[],
                  logging_steps=1, save_strategy="no", learning_rate=1e-3, max_length=128, seed=0,
                  dataloader_num_workers=0)
    values.update(overrides)
    return SFTConfig(**values)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from peft import LoraConfig

    from hf_instruct_tune.testing.tiny import build_tiny_model, build_tiny_tokenizer
    from hf_instruct_tune.trainer import InstructTrainer

    root = tmp_path_factory.mktemp("trainer")
    data = write_jsonl(root / "train.jsonl", ROWS)
    tok = build_tiny_tokenizer(pad_is_eos=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_HOME", str(root / "hf_home"))
        trainer = InstructTrainer(build_tiny_model(tok), _config(root / "out"), train_dataset=str(data),
                                  processing_class=tok, prefix_sharing=False, peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                               task_type="CAUSAL_LM"))
        batches = []
        collate = trainer.data_collator

        def capturing(features):
            batch = collate(features)
            batches.append({key: value.clone() for key, value in batch.items()})
            return batch

        trainer.data_collator = capturing
        trainer.train()
        trainer.save_model()
    yield trainer, root / "out", batches, tok, data
    trainer.train_data.cleanup()


def test_trains_and_saves_run_files(trained):
    trainer, out, _, _, _ = trained
    assert trainer.state.global_step == 2
    assert (out / "adapter_config.json").is_file()
    assert (out / TEMPLATE_FILE_NAME).read_text(encoding="utf-8") == get_template("alpaca").source
    raw = json.loads((out / METADATA_FILE_NAME).read_text(encoding="utf-8"))
    assert raw["schema_version"] == 1


def test_metadata(trained):
    import hashlib

    trainer, out, _, _, data = trained
    metadata = TrainingMetadata.load(out)
    assert metadata.dataset["rows"] == 4 and metadata.dataset["trained_rows"] == 4
    assert metadata.dataset["dropped_overlong"] == 0
    assert metadata.dataset["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert metadata.dataset["name"] == "train.jsonl" and metadata.dataset["is_hub_dataset"] is False
    assert metadata.template["name"] == "alpaca" and metadata.template["stop_token"] == "</s>"
    assert metadata.formatter == "alpaca"
    assert metadata.lora["r"] == 4 and metadata.lora["alpha"] == 8
    assert metadata.lora["target_modules"] == ["q_proj", "v_proj"]
    history = metadata.results["loss_history"]
    assert [entry["step"] for entry in history] == [1, 2]
    assert all(isinstance(entry["loss"], float) for entry in history)
    assert metadata.results["final_loss"] == history[-1]["loss"]
    assert metadata.training["max_steps"] == 2 and metadata.training["overlong"] == "drop"
    assert metadata.example["instruction"] == "hello"
    assert metadata.example["rendered_prompt"].endswith("### Instruction:\nhello\n\n### Response:\n")
    assert str(out.parent) not in (out / METADATA_FILE_NAME).read_text(encoding="utf-8")  # no local paths


def test_batches_keep_eos_in_labels_when_pad_is_eos(trained):
    _, _, batches, tok, _ = trained
    assert tok.pad_token_id == tok.eos_token_id
    assert len(batches) >= 2
    for batch in batches:
        for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
            n = int(mask.sum())
            assert bool((mask[:n] == 1).all()) and bool((mask[n:] == 0).all())
            assert labels[n - 1].item() == tok.eos_token_id == ids[n - 1].item()
            assert int((labels == tok.eos_token_id).sum()) == 1
            assert bool((labels[n:] == IGNORE_INDEX).all())
            trained_positions = labels[:n] != IGNORE_INDEX
            assert bool((labels[:n][trained_positions] == ids[:n][trained_positions]).all())


def test_signature_matches_sft_trainer():
    from trl import SFTTrainer

    from hf_instruct_tune.trainer import InstructTrainer

    ours = inspect.signature(InstructTrainer.__init__).parameters
    theirs = inspect.signature(SFTTrainer.__init__).parameters
    positional = ["self", "model", "args", "data_collator", "train_dataset", "eval_dataset", "processing_class"]
    assert list(ours)[:7] == positional == list(theirs)[:7]
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in ours.values())
    # every other SFTTrainer argument goes through **kwargs untouched: none is shadowed by one of ours
    assert not (set(ours) - set(positional) - {"kwargs"}) & set(theirs)


def test_positional_arguments_like_sft_trainer(tmp_path):
    from hf_instruct_tune.testing.tiny import build_tiny_model, build_tiny_tokenizer
    from hf_instruct_tune.trainer import InstructTrainer

    tok = build_tiny_tokenizer()
    data = str(write_jsonl(tmp_path / "d.jsonl", ROWS))
    trainer = InstructTrainer(build_tiny_model(tok), _config(tmp_path / "out", max_steps=1), None, data, data, tok)
    try:
        assert len(trainer.train_dataset) == 4 and len(trainer.eval_dataset) == 4
        assert trainer.processing_class is tok
    finally:
        trainer.train_data.cleanup()
        trainer.eval_data.cleanup()


def test_needs_a_train_dataset(tmp_path):
    from hf_instruct_tune.trainer import InstructTrainer

    with pytest.raises(InputError, match="needs a `train_dataset`"):
        InstructTrainer("unused", _config(tmp_path))


def test_load_best_model_at_end_loads_the_best_checkpoint_and_rotation_keeps_it(tmp_path):
    """Checkpoints are written in a staging folder and renamed: the best one is recorded under its final name."""
    import torch
    from peft import LoraConfig, get_peft_model_state_dict
    from safetensors.torch import load_file

    from hf_instruct_tune.testing.tiny import build_tiny_model, build_tiny_tokenizer
    from hf_instruct_tune.trainer import InstructTrainer

    tok = build_tiny_tokenizer()
    contrary = [{**row, "output": "no"} for row in ROWS]  # the loss on it rises once training learns ROWS' answers
    args = _config(tmp_path / "run", max_steps=4, learning_rate=2e-1, save_strategy="steps", save_steps=1,
                   eval_strategy="steps", eval_steps=1, save_total_limit=1, load_best_model_at_end=True,
                   metric_for_best_model="eval_loss")
    torch.manual_seed(0)
    trainer = InstructTrainer(build_tiny_model(tok), args, train_dataset=ROWS, eval_dataset=contrary,
                              processing_class=tok, template="alpaca",
                              peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                     task_type="CAUSAL_LM"))
    trainer.train()
    evals = {entry["step"]: entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry}
    best = min(evals, key=evals.get)
    assert best < 4  # the last checkpoint is not the best: loading has something to do
    best_dir = tmp_path / "run" / f"checkpoint-{best}"
    assert trainer.state.best_model_checkpoint == str(best_dir)
    assert json.loads((best_dir / "trainer_state.json").read_text())["best_model_checkpoint"] == str(best_dir)
    saved = load_file(best_dir / "adapter_model.safetensors")
    adapter = get_peft_model_state_dict(trainer.model)
    for name, tensor in saved.items():
        assert torch.equal(adapter[name], tensor), name
