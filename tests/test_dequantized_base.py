"""A 4-bit base dequantized once (`dequantize_base`): bitsandbytes' numbers, no dequantization in a step, nothing
of it saved, and the memory plan keeps it only where it fits with nothing else traded for memory."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json

import pytest
import torch
from helpers import logged_losses, sentiment_rows, tiny_lora_trainer
from test_fused_lora import _fused_copy, _lora_model, _loss_and_grads
from test_memory_plan import LLAMA3_8B_NF4, _bench_lengths, _plan
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import TrainerCallback

from hf_instruct_tune.dequantized_base import BUFFER, dequantize_base_once, dequantized_bytes, restore_quantized
from hf_instruct_tune.memory_plan import GIB, Fixed, plan_memory
from hf_instruct_tune.testing.tiny import build_tiny_model, build_tiny_tokenizer

pytestmark = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")

LLAMA3_8B_LINEAR_BF16 = 32 * (4096 * (4096 + 1024 + 1024 + 4096) + 3 * 4096 * 14336) * 2
"""Bytes of Llama-3-8B's decoder projections in bf16."""


def _quantized_base(folder, num_layers=2):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    build_tiny_model(build_tiny_tokenizer(), num_layers=num_layers, hidden_size=64).save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.bfloat16, device_map="cpu", quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True))


class _BitsandbytesOps(TorchDispatchMode):
    """Counts bitsandbytes' own operators (its dequantization, its 4-bit matmul) run under it."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.namespace == "bitsandbytes"
        return func(*args, **(kwargs or {}))


class _CountedSteps(TrainerCallback):
    """Runs each optimizer step under ``counter`` (a TorchDispatchMode), and nothing between steps."""

    def __init__(self, counter):
        self.counter = counter

    def on_step_begin(self, args, state, control, **kwargs):
        self.counter.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        self.counter.__exit__(None, None, None)


def test_kept_weights_give_bitsandbytes_loss_and_gradients(tmp_path):
    model = _lora_model(base=_quantized_base(tmp_path))
    loss, grads = _loss_and_grads(model, autocast=True)
    kept = copy.deepcopy(model)
    assert dequantize_base_once(kept) == 14  # 7 projections in each of 2 layers
    kept_loss, kept_grads = _loss_and_grads(kept, autocast=True)
    assert_close(kept_loss, loss, rtol=0, atol=0)
    for name in grads:
        assert_close(kept_grads[name], grads[name], rtol=0, atol=0, msg=name)


def test_a_step_over_kept_weights_runs_no_bitsandbytes_operator(tmp_path):
    model = _lora_model(base=_quantized_base(tmp_path))
    kept = copy.deepcopy(model)
    dequantize_base_once(kept)
    for network, expected_none in ((model, False), (kept, True)):
        with _BitsandbytesOps() as ops:
            _loss_and_grads(network, autocast=True)
        assert (ops.count == 0) == expected_none, ops.count


def test_fused_projections_over_kept_weights(tmp_path):
    model = _lora_model(base=_quantized_base(tmp_path))
    loss, grads = _loss_and_grads(model, autocast=True)
    fused = _fused_copy(model)
    dequantize_base_once(fused)
    with _BitsandbytesOps() as ops:
        fused_loss, fused_grads = _loss_and_grads(fused, autocast=True)
    assert ops.count == 0
    assert_close(fused_loss, loss, rtol=2e-2, atol=1e-2)
    for name in grads:
        assert_close(fused_grads[name], grads[name], rtol=5e-2, atol=5e-3, msg=name)


def test_kept_weights_are_in_no_state_dict_and_counted_before_they_exist(tmp_path):
    model = _quantized_base(tmp_path)
    keys = set(model.state_dict())
    counted = dequantized_bytes(model)
    dequantize_base_once(model)
    kept = [buffer for name, buffer in model.named_buffers() if name.endswith(BUFFER)]
    assert len(kept) == 14 and all(buffer.dtype == torch.bfloat16 for buffer in kept)
    assert counted == sum(buffer.numel() * buffer.element_size() for buffer in kept)
    assert set(model.state_dict()) == keys
    assert restore_quantized(model) == 14 and not any(name.endswith(BUFFER) for name, _ in model.named_buffers())
    with _BitsandbytesOps() as ops:
        model(input_ids=torch.tensor([[5, 17, 42]]))
    assert ops.count > 0  # bitsandbytes' own forward again


def test_the_trainer_trains_over_kept_weights_alike_frees_them_and_saves_only_the_adapter(tmp_path, monkeypatch):
    import hf_instruct_tune.testing.tiny as tiny

    monkeypatch.setattr(tiny, "build_tiny_model", lambda tok, **kwargs: _quantized_base(
        tmp_path / f"base{len(list(tmp_path.glob('base*')))}", num_layers=kwargs.get("num_layers", 2)))
    rows = sentiment_rows(8)
    runs = {kept: tiny_lora_trainer(tmp_path / f"run_{kept}", rows, num_layers=2, max_steps=3, dequantize_base=kept,
                                    config={"bf16": True}) for kept in (False, True)}
    monkeypatch.undo()
    assert not runs[False].dequantized_base and runs[True].dequantized_base
    operators = {}
    for kept, trainer in runs.items():
        trainer.add_callback(_CountedSteps(counter := _BitsandbytesOps()))
        trainer.train()
        operators[kept] = counter.count
    assert operators[True] == 0 < operators[False]  # the kept weights, not bitsandbytes, in every step
    assert_close(torch.tensor(logged_losses(runs[True])), torch.tensor(logged_losses(runs[False])), rtol=0, atol=0)
    assert not any(name.endswith(BUFFER) for name, _ in runs[True].model.named_buffers())  # freed after training
    runs[True].save_model(str(tmp_path / "saved"))
    saved = json.loads((tmp_path / "saved" / "hf_instruct_tune.json").read_text())["training"]
    assert saved["dequantized_base"] is True
    from safetensors.torch import load_file

    assert all("lora_" in key for key in load_file(tmp_path / "saved" / "adapter_model.safetensors"))


# -- the plan ----------------------------------------------------------------------------------------


LLAMA3_8B_NF4_KEEPABLE = dataclasses.replace(LLAMA3_8B_NF4, dequantized_bytes=LLAMA3_8B_LINEAR_BF16)


def _keepable_plan(budget, **kwargs):
    """``test_memory_plan._plan`` for the 8B model whose 4-bit projections can be kept dequantized."""
    return plan_memory(LLAMA3_8B_NF4_KEEPABLE, rows_per_process=16, processes=1, row_lengths=_bench_lengths(),
                       packed=True, budget_gib=budget, **kwargs)


def test_the_plan_keeps_the_base_dequantized_only_with_room_to_spare(monkeypatch):
    monkeypatch.setattr("hf_instruct_tune.memory_plan._cut_cross_entropy", lambda: True)
    roomy = _keepable_plan(139, can_dequantize=True)
    lean = _keepable_plan(139)
    assert roomy.dequantized_base and not lean.dequantized_base
    assert roomy.estimate_gib == pytest.approx(lean.estimate_gib + LLAMA3_8B_LINEAR_BF16 / GIB)
    assert "4-bit base dequantized once" in roomy.describe() and "dequantized" not in lean.describe()
    # just short of room for the kept weights: everything else stays at its fastest, without them
    tight = _keepable_plan(lean.estimate_gib + LLAMA3_8B_LINEAR_BF16 / GIB - 0.1, can_dequantize=True)
    assert not tight.dequantized_base and tight.checkpointed_layers == 0 and not tight.fused_loss
    for budget in (8, 12, 32):  # where layers are recomputed, memory goes to them first
        plan = _keepable_plan(budget, can_dequantize=True)
        assert not plan.dequantized_base and plan.estimate_gib <= budget


def test_asked_for_the_plan_counts_the_kept_weights_first(monkeypatch):
    monkeypatch.setattr("hf_instruct_tune.memory_plan._cut_cross_entropy", lambda: True)
    asked = _keepable_plan(32, fixed=Fixed(dequantized_base=True))
    plain = _keepable_plan(32)
    assert asked.dequantized_base and asked.fits
    assert asked.checkpointed_layers > plain.checkpointed_layers  # the kept weights' memory comes from recompute
    assert not _keepable_plan(139, fixed=Fixed(dequantized_base=False), can_dequantize=True).dequantized_base
    assert not _plan(139, fixed=Fixed(dequantized_base=True)).dequantized_base  # no 4-bit base: nothing to keep


def test_ddp_leaves_the_kept_weights_to_each_process(tmp_path):
    """DDP broadcasts every buffer from rank 0 before each forward; 13 GiB a forward for values each process has."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    model = _lora_model(base=_quantized_base(tmp_path))
    dequantize_base_once(model)
    names = {name for name, _ in model.named_buffers() if name.endswith(BUFFER)}
    assert len(names) == 14
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(model)
        assert names <= wrapped.parameters_to_ignore
        kept = {id(buffer) for name, buffer in model.named_buffers() if name.endswith(BUFFER)}
        assert wrapped.modules_buffers and not kept & {id(buffer) for buffer in wrapped.modules_buffers}
    finally:
        dist.destroy_process_group()
    restore_quantized(model)
    assert not [name for name in model._ddp_params_and_buffers_to_ignore if name.endswith(BUFFER)]
