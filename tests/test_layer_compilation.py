"""Regional compilation (`compile_layers`): every decoder layer compiled, the same loss as the eager layers."""

from __future__ import annotations

import pytest
from torch.testing import assert_close

ROWS = [{"instruction": f"classify the sentiment of text {i}" + " hello" * (i % 5), "output": ["yes", "no"][i % 2]}
        for i in range(8)]


def _train(tmp_path, name, *, checkpointing: bool, **trainer_kwargs):
    from peft import LoraConfig
    from trl import SFTConfig

    from hf_instruct_tune import InstructTrainer
    from hf_instruct_tune.testing.tiny import build_tiny_model, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, num_layers=2)
    args = SFTConfig(output_dir=str(tmp_path / name), per_device_train_batch_size=4, gradient_accumulation_steps=1,
                     max_steps=3, learning_rate=1e-2, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1,
                     save_strategy="no", report_to=[], use_cpu=True, bf16=False, seed=0, data_seed=0,
                     dataloader_num_workers=0, max_length=64, gradient_checkpointing=checkpointing)
    trainer = InstructTrainer(model=model, args=args, train_dataset=ROWS, processing_class=tok, template="alpaca",
                              peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                     task_type="CAUSAL_LM"),
                              prefix_sharing=False, memory_plan=False, **trainer_kwargs)
    trainer.train()
    return trainer, [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.slow  # torch.compile on CPU: about a minute per setting
@pytest.mark.parametrize("checkpointing", [False, True], ids=["eager-activations", "checkpointed"])
def test_compiled_layers_train_to_the_same_loss(tmp_path, checkpointing):
    from hf_instruct_tune.layer_compilation import is_compiled
    from hf_instruct_tune.memory_plan import _decoder_layers

    _, reference = _train(tmp_path, "eager", checkpointing=checkpointing)
    trainer, losses = _train(tmp_path, "compiled", checkpointing=checkpointing, compile_layers=True)
    layers = _decoder_layers(trainer.model.get_base_model())
    assert len(layers) == 2 and all(is_compiled(layer) for layer in layers)
    assert len(losses) == len(reference) == 3
    assert_close(losses, reference, rtol=1e-4, atol=1e-4)


def test_compile_layers_is_off_by_default(tmp_path):
    from hf_instruct_tune.layer_compilation import is_compiled
    from hf_instruct_tune.memory_plan import _decoder_layers

    trainer, _ = _train(tmp_path, "default", checkpointing=False)
    assert not any(is_compiled(layer) for layer in _decoder_layers(trainer.model.get_base_model()))


def test_compile_layers_is_a_train_option():
    from hf_instruct_tune.config import TrainConfig

    assert TrainConfig(model="m", data="d.jsonl", compile_layers=True).compile_layers is True
    assert TrainConfig(model="m", data="d.jsonl").compile_layers is False
