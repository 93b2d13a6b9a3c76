"""LoRA on a bf16 base under autocast takes the layers' inputs as they are: the same numbers, less kept for backward.

PEFT casts each LoRA layer's input to the fp32 adapter's dtype; under autocast the matmul casts it back to bf16,
so every projection keeps a bf16 copy of its input for backward. ``adapter_inputs_uncast`` skips that cast while
the trainer's forward runs under autocast (CPU autocast here; the same code path as CUDA's).
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from hf_instruct_tune.adapter_casts import adapter_inputs_uncast, casts_adapter_inputs

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def bf16_lora_model(use_dora: bool = False):
    from peft import LoraConfig, get_peft_model

    from hf_instruct_tune.testing.tiny import build_tiny_model, build_tiny_tokenizer

    torch.manual_seed(0)
    model = build_tiny_model(build_tiny_tokenizer(), num_layers=2).to(torch.bfloat16)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, use_dora=use_dora,
                        task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    for name, param in model.named_parameters():
        if param.requires_grad:
            param.data = param.data.float()  # the adapter in fp32, as the package trains it
    return model


def step(model, uncast: bool):
    """Loss, LoRA gradients and the bytes autograd kept for backward, of one forward/backward under autocast."""
    ids = torch.arange(48).view(2, 24) % 90 + 5
    kept = []

    def pack(tensor):
        kept.append(tensor.untyped_storage().data_ptr() if tensor.numel() else 0)
        kept.append(tensor.untyped_storage().nbytes())
        return tensor

    model.zero_grad()
    with adapter_inputs_uncast(model, autocast=uncast), torch.autocast("cpu", dtype=torch.bfloat16), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    storages = dict(zip(kept[::2], kept[1::2]))  # each storage counted once, however many ops keep it
    grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.requires_grad}
    return loss.detach(), grads, sum(storages.values())


def test_uncast_inputs_give_the_same_loss_and_gradients_and_keep_less():
    model = bf16_lora_model()
    loss, grads, kept = step(model, uncast=False)
    loss_uncast, grads_uncast, kept_uncast = step(model, uncast=True)
    assert_close(loss_uncast, loss, rtol=0, atol=0)
    for name, grad in grads.items():
        assert_close(grads_uncast[name], grad, rtol=0, atol=0)
    tokens, layers, hidden, bf16 = 48, 2, model.config.hidden_size, 2
    # at least: q, k and v (and gate and up) keep one input between them instead of one each
    assert kept - kept_uncast >= 3 * tokens * layers * hidden * bf16, (kept_uncast, kept)


def test_peft_casts_again_after_the_block():
    model = bf16_lora_model()
    with adapter_inputs_uncast(model, autocast=True) as active:
        assert active
    layers = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    assert layers and all(m.cast_input_dtype_enabled for m in layers)


@pytest.mark.parametrize("autocast, use_dora", [(False, False), (True, True)])
def test_without_autocast_or_with_dora_the_inputs_are_cast(autocast, use_dora):
    model = bf16_lora_model(use_dora=use_dora)
    assert casts_adapter_inputs(model) is not use_dora
    with adapter_inputs_uncast(model, autocast=autocast) as active:
        assert not active
        assert all(m.cast_input_dtype_enabled for m in model.modules() if hasattr(m, "cast_input_dtype_enabled"))


def test_the_trainer_trains_with_uncast_inputs_under_autocast_only(tmp_path):
    from transformers import TrainerCallback

    from helpers import sentiment_rows, tiny_lora_trainer

    class CastFlags(TrainerCallback):
        seen: list[bool] = []

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.seen.extend(m.cast_input_dtype_enabled for m in model.modules()
                             if hasattr(m, "cast_input_dtype_enabled"))

    for bf16 in (True, False):
        trainer = tiny_lora_trainer(tmp_path / str(bf16), sentiment_rows(8), num_layers=2, max_steps=2,
                                    config={"bf16": bf16})
        flags = CastFlags()
        flags.seen = []
        trainer.add_callback(flags)
        trainer.train()
        assert flags.seen and set(flags.seen) == {not bf16}
        layers = [m for m in trainer.model.modules() if hasattr(m, "cast_input_dtype_enabled")]
        assert all(m.cast_input_dtype_enabled for m in layers)
