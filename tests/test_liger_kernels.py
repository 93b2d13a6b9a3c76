"""Liger Kernel's layers (`liger_kernels`): when auto takes them, what the plan counts for them, and on a GPU the
same losses as the eager layers."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from torch.testing import assert_close

from helpers import logged_losses, sentiment_rows, tiny_lora_trainer

ROWS = sentiment_rows(8)
LIGER_ON_GPU = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None,
    reason="Liger's Triton kernels need a CUDA GPU and liger-kernel")


def _llama(model_type="llama", hidden_act="silu"):
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_act=hidden_act)
    config.model_type = model_type
    return type("Model", (), {"config": config})()


def _decide(asked=None, *, model=None, device="cuda", **kwargs):
    from hf_instruct_tune.liger_kernels import decide_liger

    return decide_liger(asked, model=model if model is not None else _llama(), device=device, **kwargs)


def test_auto_takes_liger_for_llama_like_models_on_cuda_only():
    assert _decide().used and "fused RMSNorm, SwiGLU and rotary kernels for llama" in _decide().describe()
    assert _decide(model=_llama("qwen2")).used
    assert not _decide(unsloth=True).used
    assert not _decide(compiled_layers=True).used
    assert not _decide(fsdp=True).used
    gemma = _decide(model=_llama("gemma"))
    assert not gemma.used and "'gemma' is not one the memory plan's estimate covers" in gemma.reason
    gelu = _decide(model=_llama(hidden_act="gelu"))
    assert not gelu.used and "activation is 'gelu'" in gelu.reason


def test_explicit_choices_win_but_not_over_what_cannot_run():
    from hf_instruct_tune.liger_kernels import liger_blocker

    assert not _decide(False).used and _decide(False).reason == "liger_kernels=False"
    assert _decide(True, unsloth=False).used
    blocked = _decide(True, device="cpu", blocker=liger_blocker("a-model", "cpu"))
    assert not blocked.used and blocked.describe() == (
        "Liger kernels: off (liger_kernels=True, but its Triton kernels need a CUDA GPU, not cpu)")


def test_a_liger_that_cannot_be_imported_blocks_instead_of_failing(monkeypatch):
    import sys

    import hf_instruct_tune.liger_kernels as liger_kernels

    monkeypatch.setattr(liger_kernels, "liger_installed", lambda: True)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", None)  # import raises ImportError
    reason = liger_kernels.liger_blocker(_llama(), "cuda")
    assert reason is not None and reason.startswith("it could not be imported")


def test_liger_layers_keep_two_hidden_and_one_mlp_sized_values_less_per_token():
    from hf_instruct_tune.memory_plan import estimate_bytes
    from test_memory_plan import LLAMA3_8B_NF4 as shape

    def estimate(liger, checkpointed=0):
        return estimate_bytes(shape, tokens=4_000, checkpointed_layers=checkpointed, fused_loss=True,
                              embeddings_on_cpu=False, liger_layers=liger, loss_kernel="cce")

    per_layer_less = 4_000 * 2 * (2 * shape.hidden + shape.intermediate)
    assert estimate(False) - estimate(True) == pytest.approx(shape.layers * per_layer_less)
    # a checkpointed layer keeps its input alone, whichever kernels it runs; the one recomputed at a time differs
    assert estimate(False, 32) - estimate(True, 32) == pytest.approx(per_layer_less)


# (tokens, peak GiB) of each step of the 8B bench run with Liger kernels, no layer recomputed and plain logits
# (BENCHMARKS.md "GPU", lease 1 of "Liger kernels by default"; `results.step_tokens`, `results.step_peak_memory_gib`)
LIGER_STEPS_8B = [(3608, 22.117), (3377, 21.206), (3706, 22.726), (3948, 23.844), (4007, 24.117), (5216, 29.634),
                  (4021, 24.181), (3659, 22.509), (4808, 27.774), (3316, 20.925), (3774, 23.04), (4455, 26.165),
                  (3407, 21.345), (6102, 33.673), (4886, 28.13), (4302, 25.468)]


def test_the_estimate_for_liger_layers_holds_each_measured_step():
    from hf_instruct_tune.memory_plan import GIB, estimate_bytes
    from test_memory_plan import LLAMA3_8B_NF4 as shape

    for tokens, peak in LIGER_STEPS_8B:
        estimate = estimate_bytes(shape, tokens=tokens, checkpointed_layers=0, fused_loss=False,
                                  embeddings_on_cpu=False, liger_layers=True, loss_kernel="plain") / GIB
        assert peak < estimate < 1.06 * peak, (tokens, peak, estimate)  # 4.7-5.5% above each


def test_on_cpu_auto_leaves_the_layers_eager_and_records_why(tmp_path, caplog):
    with caplog.at_level("INFO", logger="hf_instruct_tune.trainer"):
        trainer = tiny_lora_trainer(tmp_path / "run", ROWS, num_layers=2, max_steps=1, memory_plan=False)
    assert not trainer.liger.used and trainer.liger.asked is None
    assert "Liger kernels: off (its Triton kernels need a CUDA GPU, not cpu)" in caplog.text
    trainer.save_run_files(tmp_path / "saved")
    recorded = json.loads((tmp_path / "saved" / "hf_instruct_tune.json").read_text())["training"]["liger_kernels"]
    assert recorded == {"used": False, "asked": None, "reason": "its Triton kernels need a CUDA GPU, not cpu"}


def test_compiled_layers_and_liger_kernels_together_are_refused(tmp_path):
    from hf_instruct_tune.errors import InputError

    with pytest.raises(InputError, match="choose one"):
        tiny_lora_trainer(tmp_path, ROWS, num_layers=2, max_steps=1, compile_layers=True, liger_kernels=True)


def _planning_trainer(tmp_path, monkeypatch, *, compiled: bool, liger_kernels=None):
    """A trainer that plans for 6 GiB as if on a GPU with Liger installed, its layers' patching recorded."""
    import hf_instruct_tune.trainer as trainer_module
    from hf_instruct_tune.layer_compilation import CompileDecision
    from hf_instruct_tune.liger_kernels import decide_liger

    patched = []
    monkeypatch.setattr(trainer_module, "liger_blocker", lambda model, device: None)
    monkeypatch.setattr(trainer_module, "decide_liger",
                        lambda asked, **kwargs: decide_liger(asked, **{**kwargs, "device": "cuda"}))
    monkeypatch.setattr(trainer_module, "decide_compilation",
                        lambda asked, **kwargs: CompileDecision(compiled, asked, "recorded"))
    monkeypatch.setattr(trainer_module, "apply_liger_kernels", patched.append)
    monkeypatch.setattr(trainer_module, "compile_decoder_layers", lambda model: None)
    trainer = tiny_lora_trainer(tmp_path, ROWS, num_layers=2, max_steps=2, max_memory=6.0,
                                liger_kernels=liger_kernels)
    return trainer, patched


def test_the_plan_is_made_for_liger_layers_and_they_are_patched(tmp_path, monkeypatch):
    trainer, patched = _planning_trainer(tmp_path, monkeypatch, compiled=False)
    assert trainer.liger.used and patched == [trainer.model]
    assert trainer.memory_plan.liger_layers and not trainer.memory_plan.compiled_layers
    assert "(Liger kernels)" in trainer.memory_plan.describe()


def test_auto_leaves_liger_out_of_compiled_layers(tmp_path, monkeypatch):
    trainer, patched = _planning_trainer(tmp_path, monkeypatch, compiled=True)
    assert not trainer.liger.used and trainer.liger.reason == "auto: the compiled layers fuse the same work"
    assert patched == [] and trainer.memory_plan.compiled_layers and not trainer.memory_plan.liger_layers


def test_liger_asked_keeps_auto_from_compiling(tmp_path, monkeypatch):
    trainer, patched = _planning_trainer(tmp_path, monkeypatch, compiled=True, liger_kernels=True)
    assert trainer.liger.used and patched == [trainer.model]
    assert not trainer.compilation.compiled and "liger_kernels=True" in trainer.compilation.reason


# -- on a GPU ------------------------------------------------------------------------------------------

def _gpu_trainer(output_dir, *, liger_kernels: bool):
    from peft import LoraConfig
    from trl import SFTConfig

    from hf_instruct_tune import InstructTrainer
    from hf_instruct_tune.testing.tiny import build_tiny_model, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    model = build_tiny_model(tok, num_layers=2).cuda()
    args = SFTConfig(output_dir=str(output_dir), per_device_train_batch_size=4, gradient_accumulation_steps=1,
                     max_steps=4, learning_rate=1e-2, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1,
                     save_strategy="no", report_to=[], seed=0, data_seed=0, dataloader_num_workers=0, max_length=64,
                     gradient_checkpointing=False, bf16=False)
    return InstructTrainer(model=model, args=args, train_dataset=list(ROWS), processing_class=tok, template="alpaca",
                           peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                  task_type="CAUSAL_LM"),
                           prefix_sharing=False, memory_plan=False, liger_kernels=liger_kernels)


@pytest.mark.gpu
@LIGER_ON_GPU
def test_liger_layers_train_to_the_same_loss_on_a_gpu(tmp_path):
    from hf_instruct_tune.liger_kernels import _liger_modules

    eager = _gpu_trainer(tmp_path / "eager", liger_kernels=False)
    eager.train()
    liger = _gpu_trainer(tmp_path / "liger", liger_kernels=True)
    assert liger.liger.used and _liger_modules(liger.model) == 2 * 3 + 1  # two norms and the MLP a layer, the last norm
    liger.train()
    assert_close(logged_losses(liger), logged_losses(eager), rtol=1e-4, atol=1e-4)
