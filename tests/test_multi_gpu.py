"""Multi-GPU safeguards: 4-bit weights left whole under FSDP, the loss under FSDP, and no empty adapter saved."""

from __future__ import annotations

import pytest
import torch


def test_4bit_weights_stay_unsharded_under_fsdp(monkeypatch):
    """uint8 storage under FSDP too: accelerate then keeps the 4-bit weights whole on every GPU, since sharded
    bitsandbytes weights lose their quantization state and compute wrong outputs."""
    from hf_instruct_tune.backends import nf4_config

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert nf4_config().bnb_4bit_quant_storage == torch.uint8
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets for an FSDP config
    assert nf4_config().bnb_4bit_quant_storage == torch.uint8


def test_loss_goes_through_the_sharded_head_under_fsdp(monkeypatch):
    from hf_instruct_tune.config import TrainConfig
    from hf_instruct_tune.training import _fused_loss

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert _fused_loss(TrainConfig(), "transformers") is False
    assert _fused_loss(TrainConfig(fused_loss=True), "transformers") is True  # asked for: kept
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    assert _fused_loss(TrainConfig(), "transformers") in (None, True)  # the plan's choice, or on without a plan


@pytest.fixture
def trainer(tmp_path):
    from peft import LoraConfig
    from trl import SFTConfig

    from hf_instruct_tune import InstructTrainer
    from hf_instruct_tune.testing.tiny import build_tiny_model, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    args = SFTConfig(output_dir=str(tmp_path / "checkpoints"), use_cpu=True, bf16=False, report_to=[],
                     gradient_checkpointing=False, max_steps=1)
    return InstructTrainer(model=build_tiny_model(tok), args=args, processing_class=tok, template="alpaca",
                           train_dataset=[{"instruction": "hello", "output": "yes"}] * 4,
                           peft_config=LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))


def test_an_adapter_without_weights_is_refused(trainer, tmp_path, monkeypatch):
    """What FSDP gave on two H200s (BENCHMARKS.md, "Multi-GPU"): PEFT saving from a state dict without the
    adapter's weights writes an empty file that loads silently as the base model."""
    from hf_instruct_tune.training import EmptyAdapterError, _save_final

    output = tmp_path / "adapter"
    original = trainer.model.save_pretrained
    monkeypatch.setattr(trainer.model, "save_pretrained",
                        lambda folder, **kwargs: original(folder, **{**kwargs, "state_dict": {}}))
    with pytest.raises(EmptyAdapterError, match="0 tensors"):
        _save_final(trainer, output)
    assert not output.exists() and not (tmp_path / ".adapter.staged").exists()


def test_a_whole_adapter_is_saved(trainer, tmp_path):
    from safetensors import safe_open

    from hf_instruct_tune.training import _save_final

    _save_final(trainer, tmp_path / "adapter")
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), framework="pt") as weights:
        assert len(list(weights.keys())) == 2 * 2  # lora_A and lora_B of q_proj in both layers
