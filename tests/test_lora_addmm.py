"""LoRA's output added inside one matmul (`hf_instruct_tune.lora_addmm`): PEFT's values and gradients, fewer kernels."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import logged_losses, sentiment_rows, tiny_lora_trainer


class CountOps(TorchDispatchMode):
    """Counts the aten ops run inside the block, by name (``addmm``, ``mul``, ``add``, ``clone``...)."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _lora_model(seed=0, **lora):
    from peft import LoraConfig, get_peft_model

    from hf_instruct_tune.testing.tiny import build_tiny_model, build_tiny_tokenizer

    torch.manual_seed(seed)
    model = build_tiny_model(build_tiny_tokenizer(), num_layers=2)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM",
                        init_lora_weights=False, **lora)  # B not zero: the adapter changes the output
    return get_peft_model(model, config)


def _loss_and_grads(model, autocast=False):
    """The loss and the adapter's gradients, and the aten ops the forward ran."""
    ids = torch.arange(3, 27).reshape(2, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        with CountOps() as ops:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return loss.detach(), grads, ops.counts


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_the_fused_forward_gives_peft_s_loss_and_gradients(autocast):
    from hf_instruct_tune.lora_addmm import fuse_lora_output

    reference_loss, reference_grads, peft_ops = _loss_and_grads(_lora_model(), autocast)
    model = _lora_model()
    assert fuse_lora_output(model) == 6  # 3 targets x 2 layers
    loss, grads, fused_ops = _loss_and_grads(model, autocast)
    # under autocast PEFT rounds its product and its sum to bf16, the fused matmul neither
    tolerance = dict(rtol=5e-2, atol=5e-2) if autocast else dict(rtol=1e-5, atol=1e-6)
    assert_close(loss, reference_loss, **tolerance)
    assert grads.keys() == reference_grads.keys() and len(grads) == 12
    for name, grad in grads.items():
        assert_close(grad, reference_grads[name], **tolerance, msg=name)
    # each layer's forward: no scaling and no sum of full-size outputs, one addmm instead of lora_B's mm
    assert fused_ops["addmm"] == peft_ops.get("addmm", 0) + 6
    assert (fused_ops["mul"], fused_ops["add"]) == (peft_ops["mul"] - 6, peft_ops["add"] - 6)


@pytest.mark.parametrize("case", ["dora", "lora_bias", "disabled", "merged", "off"])
def test_what_the_fused_forward_leaves_to_peft(case, monkeypatch):
    from hf_instruct_tune.lora_addmm import fuse_lora_output

    lora = {"use_dora": True} if case == "dora" else {"lora_bias": True} if case == "lora_bias" else {}
    reference, model = _lora_model(**lora), _lora_model(**lora)
    if case == "off":
        monkeypatch.setenv("HF_INSTRUCT_TUNE_LORA_ADDMM", "0")
        assert fuse_lora_output(model) == 0
    else:
        assert fuse_lora_output(model) == 6
    ids = torch.arange(3, 27).reshape(2, 12)
    if case == "merged":
        reference.merge_adapter()
        model.merge_adapter()
    results, counts = [], []
    for each in (model, reference):
        with torch.no_grad(), CountOps() as ops:
            if case == "disabled":
                with each.disable_adapter():
                    results.append(each(input_ids=ids).logits)
            else:
                results.append(each(input_ids=ids).logits)
        counts.append(ops.counts)
    assert counts[0] == counts[1]  # PEFT's own forward ran
    assert_close(results[0], results[1], rtol=0, atol=0)


def test_the_trainer_fuses_its_lora_layers_and_trains_to_the_same_losses(tmp_path, monkeypatch):
    rows = sentiment_rows(8)
    fused = tiny_lora_trainer(tmp_path / "fused", rows, num_layers=2, max_steps=3, memory_plan=False)
    assert fused.lora_addmm_layers == 4  # q_proj and v_proj in 2 layers
    fused.train()
    monkeypatch.setenv("HF_INSTRUCT_TUNE_LORA_ADDMM", "0")
    plain = tiny_lora_trainer(tmp_path / "plain", rows, num_layers=2, max_steps=3, memory_plan=False)
    assert plain.lora_addmm_layers == 0
    plain.train()
    assert_close(logged_losses(fused), logged_losses(plain), rtol=1e-5, atol=1e-5)
    fused.save_run_files(tmp_path / "saved")
    import json

    recorded = json.loads((tmp_path / "saved" / "hf_instruct_tune.json").read_text())["training"]
    assert recorded["lora_addmm_layers"] == 4
