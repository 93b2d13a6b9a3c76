"""The Python API's entry points: load_model() gives a trainable model, InstructConfig works on a CPU."""

from __future__ import annotations

import warnings

import pytest


def test_instruct_config_runs_on_a_cpu_without_warnings(tmp_path):
    import torch

    from hf_instruct_tune import InstructConfig

    if torch.cuda.is_available():
        pytest.skip("checks the CPU defaults")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even transformers' deprecation warning about gradient checkpointing
        args = InstructConfig(output_dir=str(tmp_path), max_steps=2)
    assert args.bf16 is False and args.gradient_checkpointing is False and args.dataloader_pin_memory is False
    assert InstructConfig(output_dir=str(tmp_path), bf16=False, gradient_checkpointing=True).gradient_checkpointing


def test_load_model_gives_a_trainable_model_and_a_tokenizer_with_a_pad_token(tmp_path):
    from hf_instruct_tune import load_model
    from hf_instruct_tune.testing.tiny import save_tiny_checkpoint

    folder = save_tiny_checkpoint(tmp_path / "tiny")
    model, tokenizer = load_model(str(folder), base_model_id="org/tiny")
    assert tokenizer.pad_token is not None
    assert model.config._name_or_path == "org/tiny"  # the adapter and card will name the Hub id
    assert not getattr(model, "is_quantized", False)


def test_instruct_trainer_without_args_uses_the_cpu_ready_config(tmp_path, monkeypatch):
    from peft import LoraConfig

    from hf_instruct_tune import InstructConfig, InstructTrainer
    from hf_instruct_tune.testing.tiny import build_tiny_model, build_tiny_tokenizer

    monkeypatch.chdir(tmp_path)
    tokenizer = build_tiny_tokenizer()
    trainer = InstructTrainer(build_tiny_model(tokenizer), train_dataset=[{"instruction": "hi", "output": "yes"}],
                              processing_class=tokenizer, prefix_sharing=False,
                              peft_config=LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    assert isinstance(trainer.args, InstructConfig) and trainer.args.output_dir == "outputs"
    trainer.train_data.cleanup()
