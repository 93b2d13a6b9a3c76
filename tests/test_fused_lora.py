"""Fused LoRA projections (`fused_lora`): PEFT's numbers in one autograd node, PEFT's forward where they would
differ, fewer ops, and when auto takes them."""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import logged_losses, sentiment_rows, tiny_lora_trainer

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
needs_bitsandbytes = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                                        reason="needs bitsandbytes")


def _lora_model(*, dtype=torch.float32, dropout=0.0, base=None, seed=0):
    """A tiny random Llama with LoRA on every linear layer and nonzero ``lora_B`` (a fresh adapter's zeros would
    hide the low-rank path)."""
    from peft import LoraConfig, get_peft_model

    from hf_instruct_tune.testing.tiny import build_tiny_model, build_tiny_tokenizer

    model = base if base is not None else build_tiny_model(build_tiny_tokenizer(), num_layers=2).to(dtype)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=ALL_LINEAR))
    model.train()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


def _loss_and_grads(model, *, autocast=False):
    ids = torch.tensor([[5, 17, 42, 8, 99, 3, 61, 7], [11, 4, 23, 57, 2, 90, 31, 6]])
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {name: p.grad.float().clone() for name, p in model.named_parameters() if p.requires_grad}
    return loss.detach().float(), grads


def _fused_copy(model):
    from hf_instruct_tune.fused_lora import apply_fused_lora

    fused = copy.deepcopy(model)
    assert apply_fused_lora(fused) == 2 * len(ALL_LINEAR)
    return fused


def test_fused_projections_give_peft_loss_and_gradients():
    model = _lora_model()
    loss, grads = _loss_and_grads(model)
    fused_loss, fused_grads = _loss_and_grads(_fused_copy(model))
    assert_close(fused_loss, loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == fused_grads.keys() and len(grads) == 4 * len(ALL_LINEAR)
    for name in grads:
        assert_close(fused_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fused_projections_under_bf16_autocast_with_fp32_adapters():
    model = _lora_model(dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for name, p in model.named_parameters() if "lora_" in name)
    loss, grads = _loss_and_grads(model, autocast=True)
    fused_loss, fused_grads = _loss_and_grads(_fused_copy(model), autocast=True)
    assert_close(fused_loss, loss, rtol=2e-2, atol=1e-2)
    for name in grads:
        assert fused_grads[name].dtype == grads[name].dtype
        assert_close(fused_grads[name], grads[name], rtol=5e-2, atol=5e-3, msg=name)


@needs_bitsandbytes
def test_fused_projections_over_a_4bit_base(tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from hf_instruct_tune.testing.tiny import build_tiny_model, build_tiny_tokenizer

    build_tiny_model(build_tiny_tokenizer(), num_layers=2, hidden_size=64).save_pretrained(tmp_path)
    base = AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.bfloat16, device_map="cpu", quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True))
    model = _lora_model(base=base)
    assert type(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    loss, grads = _loss_and_grads(model, autocast=True)
    fused_loss, fused_grads = _loss_and_grads(_fused_copy(model), autocast=True)
    assert_close(fused_loss, loss, rtol=2e-2, atol=1e-2)
    for name in grads:
        assert_close(fused_grads[name], grads[name], rtol=5e-2, atol=5e-3, msg=name)


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def _ops_per_step(model) -> int:
    with _OpCounter() as counter:
        _loss_and_grads(model, autocast=True)
    return counter.ops


def test_fused_projections_run_fewer_ops_and_autograd_nodes():
    model = _lora_model(dtype=torch.bfloat16)
    fused = _fused_copy(model)
    peft_ops, fused_ops = _ops_per_step(model), _ops_per_step(fused)
    projections = 2 * len(ALL_LINEAR)
    # PEFT's forward alone: the copy of the base output, the scale, the add and the reshapes around two linears
    assert peft_ops - fused_ops >= 5 * projections, (peft_ops, fused_ops)


def test_disabled_adapters_and_merged_weights_run_peft_forward():
    model = _lora_model()
    fused = _fused_copy(model)
    ids = torch.tensor([[5, 17, 42, 8]])
    with torch.no_grad():
        with model.disable_adapter():
            base_logits = model(input_ids=ids).logits
        with fused.disable_adapter():
            assert_close(fused(input_ids=ids).logits, base_logits)
        adapted = fused(input_ids=ids).logits
        assert not torch.allclose(adapted, base_logits)
        fused.merge_adapter()
        assert_close(fused(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-5)


def test_projections_with_dropout_are_left_to_peft(caplog):
    from hf_instruct_tune.fused_lora import apply_fused_lora, fused_projections

    model = _lora_model(dropout=0.1)
    with caplog.at_level("INFO", logger="hf_instruct_tune.fused_lora"):
        assert apply_fused_lora(model) == 0
    assert fused_projections(model) == 0
    assert "14 left to PEFT (LoRA dropout)" in caplog.text


def test_an_input_in_another_dtype_than_the_weights_runs_peft_forward():
    model = _fused_copy(_lora_model())
    projection = model.base_model.model.model.layers[0].self_attn.q_proj
    calls = []
    peft_forward = projection._peft_forward
    projection._peft_forward = lambda *args, **kwargs: calls.append(1) or peft_forward(*args, **kwargs)
    x = torch.randn(1, 3, projection.in_features, dtype=torch.float64)
    with pytest.raises(RuntimeError):  # PEFT's own error for a float64 input to float32 weights
        projection(x)
    assert calls == [1]


def test_auto_fuses_on_cuda_only_and_never_with_compiled_layers_unsloth_or_fsdp():
    from hf_instruct_tune.fused_lora import decide_fused_lora

    assert decide_fused_lora(None, device="cuda").used
    assert not decide_fused_lora(None, device="cpu").used
    assert not decide_fused_lora(None, device="cuda", compiled_layers=True).used
    assert not decide_fused_lora(None, device="cuda", fsdp=True).used
    assert decide_fused_lora(True, device="cpu").used and not decide_fused_lora(False, device="cuda").used
    refused = decide_fused_lora(True, device="cuda", unsloth=True)
    assert not refused.used and refused.describe() == (
        "Fused LoRA projections: off (fused_lora=True, but Unsloth runs its own LoRA kernels)")
    assert not decide_fused_lora(None, device="cuda", deepspeed=True).used
    assert not decide_fused_lora(True, device="cuda", deepspeed=True).used


def test_deepspeed_is_seen_in_the_arguments_or_from_accelerate_launch(monkeypatch):
    from types import SimpleNamespace

    from hf_instruct_tune.trainer import _deepspeed_wanted

    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert not _deepspeed_wanted(SimpleNamespace(deepspeed=None))
    assert _deepspeed_wanted(SimpleNamespace(deepspeed="ds_zero3.json"))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert _deepspeed_wanted(SimpleNamespace(deepspeed=None))


def test_the_trainer_trains_alike_fused_and_records_it(tmp_path):
    rows = sentiment_rows(8)
    peft = tiny_lora_trainer(tmp_path / "peft", rows, num_layers=2, max_steps=3)
    fused = tiny_lora_trainer(tmp_path / "fused", rows, num_layers=2, max_steps=3, fused_lora=True)
    assert not peft.fused_lora.used and peft.fused_lora.reason == "auto: on CUDA GPUs only, not cpu"
    from hf_instruct_tune.fused_lora import fused_projections

    assert fused.fused_lora.used and fused_projections(fused.model) == 4  # q and v in two layers
    peft.train()
    fused.train()
    assert_close(torch.tensor(logged_losses(fused)), torch.tensor(logged_losses(peft)), rtol=1e-5, atol=1e-6)
    fused.save_model(str(tmp_path / "saved"))
    recorded = json.loads((tmp_path / "saved" / "hf_instruct_tune.json").read_text())["training"]["fused_lora"]
    assert recorded == {"used": True, "asked": True, "reason": "fused_lora=True"}


def test_fused_lora_and_compiled_layers_together_are_refused(tmp_path):
    from hf_instruct_tune.errors import InputError

    with pytest.raises(InputError, match="compile_layers and fused_lora both fuse"):
        tiny_lora_trainer(tmp_path, sentiment_rows(4), num_layers=2, max_steps=1, compile_layers=True,
                          fused_lora=True)


def test_a_base_layer_with_a_bias_and_a_batch_of_rows():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 20, bias=True), torch.nn.Tanh(), torch.nn.Linear(20, 6))
    model = get_peft_model(model, LoraConfig(r=3, lora_alpha=6, target_modules=["0", "2"]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    fused = copy.deepcopy(model)
    from hf_instruct_tune.fused_lora import apply_fused_lora

    assert apply_fused_lora(fused) == 2
    x = torch.randn(3, 5, 12)

    def run(network):
        network.zero_grad(set_to_none=True)
        inputs = x.clone().requires_grad_()
        network(inputs).square().sum().backward()
        return [inputs.grad] + [p.grad for p in network.parameters() if p.requires_grad]

    for fused_grad, peft_grad in zip(run(fused), run(model), strict=True):
        assert_close(fused_grad, peft_grad, rtol=1e-5, atol=1e-6)
