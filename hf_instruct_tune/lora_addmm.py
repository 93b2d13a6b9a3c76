"""LoRA's output added to the base projection's inside one matmul.

PEFT computes a LoRA projection as ``result = base(x)``, then ``result + lora_B(lora_A(x)) * scaling``: besides
``lora_B``'s matmul, one kernel scales its output and another adds it, each reading and writing a tensor of the
projection's full output size, and on 4-bit bases a third copies ``base(x)`` first ("defensively"). For the 224
projections of Llama-3-8B that is ~670 such kernels in every forward and again in every recomputed one.
:func:`fuse_lora_output` gives plain LoRA layers a forward that computes ``addmm(base(x), lora_A(x), lora_B^T,
alpha=scaling)`` instead: the scaling and the sum happen in the matmul's epilogue, in its fp32 accumulator, so the
values differ from PEFT's only by bf16 roundings PEFT takes and this does not.

Anything else runs PEFT's own forward: DoRA and other variants, LoRA biases, merged or disabled adapters, mixed
adapter batches, and inputs whose dtypes PEFT would cast without autocast.
``HF_INSTRUCT_TUNE_LORA_ADDMM=0`` leaves every layer to PEFT.
"""

from __future__ import annotations

import os
import types

ENV_SWITCH = "HF_INSTRUCT_TUNE_LORA_ADDMM"


def enabled() -> bool:
    """False when ``HF_INSTRUCT_TUNE_LORA_ADDMM=0``."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in {"0", "false", "no", "off"}


def _plain_lora_classes() -> tuple[type, ...]:
    """PEFT's LoRA layers whose forward is ``base(x) + lora_B(lora_A(dropout(x))) * scaling``."""
    from peft.tuners.lora import layer

    classes = [layer.Linear]
    try:
        from peft.tuners.lora import bnb
    except ImportError:  # bitsandbytes not installed
        return tuple(classes)
    classes += [getattr(bnb, name) for name in ("Linear4bit", "Linear8bitLt") if hasattr(bnb, name)]
    return tuple(classes)


def fuse_lora_output(model) -> int:
    """Give every plain LoRA linear layer of ``model`` the fused forward; returns how many layers got it."""
    if not enabled():
        return 0
    classes = _plain_lora_classes()
    count = 0
    for module in model.modules():
        if isinstance(module, classes) and not getattr(module, "_lora_addmm", False):
            module.forward = types.MethodType(_fused_forward, module)
            module._lora_addmm = True
            count += 1
    return count


def _fusable(layer, x, args, kwargs) -> bool:
    if args or kwargs or layer.disable_adapters or layer.merged:
        return False
    import torch

    autocast = torch.is_autocast_enabled(x.device.type)
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        if name in getattr(layer, "lora_variant", {}) or layer.lora_B[name].bias is not None:
            return False
        if not autocast and x.dtype != layer.lora_A[name].weight.dtype:
            return False  # PEFT casts the input to the adapter's dtype and the output back
    return True


def _fused_forward(self, x, *args, **kwargs):
    """``base(x)`` plus each active adapter's ``scaling * lora_B(lora_A(dropout(x)))``, the sum in ``addmm``."""
    if not _fusable(self, x, args, kwargs):
        return type(self).forward(self, x, *args, **kwargs)
    import torch

    self._check_forward_args(x)
    result = self.base_layer(x)
    out_shape = result.shape
    for name in self.active_adapters:
        if name not in self.lora_A:
            continue
        hidden = self.lora_A[name](self.lora_dropout[name](x))
        weight = self.lora_B[name].weight
        if not torch.is_autocast_enabled(x.device.type) and result.dtype != weight.dtype:
            return type(self).forward(self, x, *args, **kwargs)
        result = torch.addmm(result.reshape(-1, out_shape[-1]), hidden.reshape(-1, hidden.shape[-1]), weight.t(),
                             alpha=self.scaling[name]).view(out_shape)
    return result
