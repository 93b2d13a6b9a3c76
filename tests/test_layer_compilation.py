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


@pytest.mark.slow  # trains with compiled layers: about 25 s on CPU
def test_layers_compile_to_one_graph_for_the_whole_run(tmp_path, monkeypatch):
    """Every layer and every step reuse the first step's graph: the first layer's input requires grad like the
    others' (a frozen input would compile a second graph), and rows of any length fit the dynamic shapes."""
    import functools

    import torch
    from torch._dynamo.utils import counters
    from transformers import TrainerCallback

    import hf_instruct_tune.trainer as trainer_module
    from hf_instruct_tune.layer_compilation import compile_decoder_layers

    # dynamo's guards decide recompilation whatever the backend; aot_eager traces forward and backward as
    # inductor does, without generating code (seconds instead of a minute on CPU)
    monkeypatch.setattr(trainer_module, "compile_decoder_layers",
                        functools.partial(compile_decoder_layers, backend="aot_eager"))
    torch._dynamo.reset()
    counters.clear()
    graphs_after_step = []

    class CountGraphs(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            graphs_after_step.append(counters["stats"]["unique_graphs"])

    trainer = tiny_lora_trainer(tmp_path, ROWS, num_layers=2, max_steps=4,
                                memory_plan=False, compile_layers=True, callbacks=[CountGraphs()])
    lengths = {len(ids) for ids in trainer.train_dataset["input_ids"]}
    trainer.train()
    assert len(lengths) > 1
    assert graphs_after_step == [1, 1, 1, 1]


def test_compile_layers_is_off_by_default(tmp_path):
    from hf_instruct_tune.layer_compilation import is_compiled
    from hf_instruct_tune.memory_plan import _decoder_layers

    trainer, _ = _train(tmp_path, "default", checkpointing=False)
    assert not any(is_compiled(layer) for layer in _decoder_layers(trainer.model.get_base_model()))


def test_compile_layers_is_a_train_option():
    from hf_instruct_tune.config import TrainConfig

    assert TrainConfig(model="m", data="d.jsonl", compile_layers=True).compile_layers is True
    assert TrainConfig(model="m", data="d.jsonl").compile_layers is False
