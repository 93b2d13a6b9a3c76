"""Regional compilation (`compile_layers`): every decoder layer compiled, the same loss as the eager layers."""

from __future__ import annotations

import pytest
from torch.testing import assert_close

from helpers import logged_losses, sentiment_rows, tiny_lora_trainer

ROWS = sentiment_rows(8)


def _train(tmp_path, name, *, checkpointing: bool, **trainer_kwargs):
    trainer = tiny_lora_trainer(tmp_path / name, ROWS, num_layers=2, max_steps=3,
                                config={"gradient_checkpointing": checkpointing}, memory_plan=False, **trainer_kwargs)
    trainer.train()
    return trainer, logged_losses(trainer)


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
