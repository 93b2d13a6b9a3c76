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


def test_on_cpu_auto_leaves_the_layers_eager_and_records_why(tmp_path, caplog):
    import json

    from hf_instruct_tune.layer_compilation import is_compiled
    from hf_instruct_tune.memory_plan import _decoder_layers

    with caplog.at_level("INFO", logger="hf_instruct_tune.trainer"):
        trainer, _ = _train(tmp_path, "default", checkpointing=False)
    assert not any(is_compiled(layer) for layer in _decoder_layers(trainer.model.get_base_model()))
    assert trainer.compilation.asked is None and not trainer.compilation.compiled
    assert "Compiled layers: off (auto: not on cpu" in caplog.text
    trainer.save_run_files(tmp_path / "saved")
    recorded = json.loads((tmp_path / "saved" / "hf_instruct_tune.json").read_text())["training"]["compile_layers"]
    assert recorded["compiled"] is False and recorded["reason"].startswith("auto: not on cpu")


def test_the_trainer_judges_the_run_from_its_planned_tokens(tmp_path, monkeypatch):
    from trl import SFTConfig

    import hf_instruct_tune.trainer as trainer_module
    from hf_instruct_tune import InstructTrainer
    from hf_instruct_tune.layer_compilation import CompileDecision
    from hf_instruct_tune.testing.tiny import build_tiny_model, build_tiny_tokenizer

    asked = {}

    def decide(compile_layers, **kwargs):
        asked.update(kwargs, compile_layers=compile_layers)
        return CompileDecision(False, compile_layers, "recorded")

    monkeypatch.setattr(trainer_module, "decide_compilation", decide)
    model = build_tiny_model(build_tiny_tokenizer(), num_layers=2)
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=3,
                     max_steps=5, use_cpu=True, gradient_checkpointing=True, report_to=[], max_length=64)
    trainer = InstructTrainer(model=model, args=args, train_dataset=ROWS, processing_class=build_tiny_tokenizer(),
                              template="alpaca", memory_plan=False, prefix_sharing=False)
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    assert asked["planned_tokens"] == int(5 * 6 * sum(lengths) / len(lengths))  # steps x rows per step x mean
    assert asked["device"] == "cpu" and asked["checkpointed_fraction"] == 1.0 and asked["compile_layers"] is None
    assert not asked["unsloth"] and asked["blocker"] is None



@pytest.mark.parametrize("compiled_accum", [1, 2], ids=["same-split", "more-micro-batches"])
def test_auto_keeps_eager_layers_when_compiling_would_split_the_steps(tmp_path, monkeypatch, compiled_accum):
    """Auto compiles only when the plan for compiled layers keeps the eager plan's micro-batches: cut into more,
    smaller ones, the steps cost more than compiling saves. An explicit ``compile_layers=True`` compiles anyway."""
    import dataclasses

    import hf_instruct_tune.trainer as trainer_module
    from hf_instruct_tune.layer_compilation import CompileDecision

    real_plan = trainer_module.plan_for_trainer

    def plan(*args, compiled_layers=False, **kwargs):
        eager = real_plan(*args, compiled_layers=False, **kwargs)
        assert eager.grad_accum == 1
        if not compiled_layers:
            return eager
        return dataclasses.replace(eager, micro_batch=eager.micro_batch // compiled_accum, grad_accum=compiled_accum)

    monkeypatch.setattr(trainer_module, "plan_for_trainer", plan)
    monkeypatch.setattr(trainer_module, "decide_compilation",
                        lambda asked, **kwargs: CompileDecision(True, asked, "auto: a long run"))
    auto = tiny_lora_trainer(tmp_path / "auto", ROWS, num_layers=2, max_steps=1, max_memory=100.0)
    asked = tiny_lora_trainer(tmp_path / "asked", ROWS, num_layers=2, max_steps=1, max_memory=100.0,
                              compile_layers=True)
    assert asked.compilation.compiled and asked.args.gradient_accumulation_steps == compiled_accum
    if compiled_accum == 1:
        assert auto.compilation.compiled and auto.compilation.reason == "auto: a long run"
    else:
        assert not auto.compilation.compiled and auto.compilation.asked is None
        assert auto.compilation.reason == ("auto: compiled layers would need 2 micro-batches a step within this "
                                           "budget, eager layers 1")
        assert auto.args.gradient_accumulation_steps == 1 and auto.args.per_device_train_batch_size == 4

# -- the auto decision, without compiling anything ----------------------------------------------------

def _decide(asked=None, *, device="cuda", tokens=50_000_000, checkpointed=0.0, **kwargs):
    from hf_instruct_tune.layer_compilation import decide_compilation

    return decide_compilation(asked, device=device, planned_tokens=tokens, checkpointed_fraction=checkpointed,
                              **kwargs)


def test_auto_compiles_a_long_run_on_cuda_only():
    long_run, short_run = _decide(tokens=2_500_000), _decide(tokens=500_000)
    assert long_run.compiled and (long_run.planned_tokens, long_run.threshold_tokens) == (2_500_000, 1_724_014)
    assert "2.5M tokens per process planned >= 1.7M" in long_run.describe()
    assert not short_run.compiled and "500k tokens per process planned < 1.7M" in short_run.describe()
    assert not _decide(device="cpu").compiled
    assert not _decide(unsloth=True).compiled
    assert not _decide(fsdp=True).compiled


def test_checkpointed_layers_lower_the_threshold():
    from hf_instruct_tune.layer_compilation import payback_tokens

    # three times the measured break-even: ~0.57M tokens with no layer checkpointed, ~0.39M with all
    assert payback_tokens(0.0) == pytest.approx(1.72e6, rel=0.01)
    assert payback_tokens(1.0) == pytest.approx(1.18e6, rel=0.01)
    assert payback_tokens(0.0) > payback_tokens(0.5) > payback_tokens(1.0)
    assert _decide(tokens=1_500_000, checkpointed=1.0).compiled
    assert not _decide(tokens=1_500_000, checkpointed=0.0).compiled


def test_explicit_choices_win_but_not_over_layers_that_cannot_compile():
    assert _decide(True, device="cpu", tokens=1).compiled
    assert _decide(True, unsloth=True, fsdp=True).compiled
    assert not _decide(False, tokens=10**12).compiled
    refused = _decide(True, blocker="no transformers decoder layers found in Linear")
    assert not refused.compiled and refused.describe() == (
        "Compiled layers: off (compile_layers=True, but no transformers decoder layers found in Linear)")


def test_planned_tokens_from_steps_or_epochs():
    from hf_instruct_tune.layer_compilation import planned_tokens

    assert planned_tokens(200.0, 1_000, rows_per_step=16, max_steps=100, epochs=3, processes=2) == 320_000
    assert planned_tokens(200.0, 1_000, rows_per_step=16, max_steps=-1, epochs=3, processes=2) == 300_000


def test_a_model_without_decoder_layers_cannot_compile_them():
    import torch

    from hf_instruct_tune.layer_compilation import compilation_blocker
    from hf_instruct_tune.testing.tiny import build_tiny_model, build_tiny_tokenizer

    assert "no transformers decoder layers found in Linear" in compilation_blocker(torch.nn.Linear(2, 2), "cpu")
    assert compilation_blocker(build_tiny_model(build_tiny_tokenizer(), num_layers=2), "cpu") is None


def test_compile_layers_is_a_train_option():
    from hf_instruct_tune.config import TrainConfig

    assert TrainConfig(model="m", data="d.jsonl", compile_layers=True).compile_layers is True
    assert TrainConfig(model="m", data="d.jsonl", compile_layers=False).compile_layers is False
    assert TrainConfig(model="m", data="d.jsonl").compile_layers is None  # auto


def test_float_attributes_compile_as_constants_not_host_scalars():
    """Norm epsilons, LoRA and attention scalings and dropout rates are constants of the layers' graph: promoted to
    inputs (torch's default) they are 0-dim CPU tensors, for which Inductor builds C++ kernels on the host (on an
    H200 host that was most of the compilation's minute, BENCHMARKS.md "GPU")."""
    import torch

    from hf_instruct_tune.layer_compilation import compile_decoder_layers
    from hf_instruct_tune.testing.tiny import build_tiny_model, build_tiny_tokenizer
    from peft import LoraConfig, get_peft_model

    inputs_seen = []

    def recording_backend(graph_module, example_inputs):
        inputs_seen.extend(example_inputs)
        return graph_module.forward

    torch._dynamo.reset()
    model = get_peft_model(build_tiny_model(build_tiny_tokenizer(), num_layers=2),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    model.train()
    with torch._dynamo.config.patch(specialize_float=False):  # torch's default, whatever ran before; restored
        assert compile_decoder_layers(model, backend=recording_backend) == 2
        ids = torch.tensor([[5, 17, 42, 8, 99, 3]])
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    assert inputs_seen
    host_scalars = [x for x in inputs_seen if isinstance(x, torch.Tensor) and x.dim() == 0 and x.is_floating_point()]
    assert host_scalars == []
