"""LoRA projections as one autograd node each: the frozen base matmul and the low-rank update together.

PEFT runs a LoRA projection as a chain of modules: the base layer (for a 4-bit base, bitsandbytes' own autograd
function), a copy of its output, ``lora_A``, ``lora_B``, a scale and an add, each a Python call and an autograd
node, and the adapter's fp32 weights cast to bf16 by autocast in their own nodes; on a GPU the eager layers wait
for the CPU to launch their kernels (``BENCHMARKS.md``, "GPU"). :func:`apply_fused_lora` runs each
eligible projection as one :class:`torch.autograd.Function` instead:

* forward: ``out = x W^T + scaling * (x A^T) B^T``, the sum and the scale done by the second matmul (``addmm``);
* backward: ``dx = g W + scaling * (g B) A``, ``dA = scaling * (g B)^T x``, ``dB = scaling * g^T (x A^T)``, the
  base weight dequantized again as bitsandbytes does (or its kept bf16 copy used,
  :mod:`~hf_instruct_tune.dequantized_base`), nothing else recomputed.

It keeps what PEFT keeps for backward (the input and ``x A^T``); the numbers are PEFT's within bf16 rounding (the
sum is rounded once instead of twice). A projection keeps PEFT's forward where the fused one would differ: LoRA
dropout, DoRA or another variant, a LoRA bias, several active adapters, merged or disabled adapters, and an input
whose dtype is neither autocast's nor the weights' own.

By default (``fused_lora=None``, "auto") the projections are fused on a CUDA GPU, unless the layers are compiled
(compiling fuses the same work) or under FSDP (not measured there); never with Unsloth (its own fused LoRA
kernels) or DeepSpeed (ZeRO-3 gathers a module's weights when that module's own forward runs, and the fused
projection does not run ``lora_A``'s, ``lora_B``'s or the base layer's).
"""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass
from typing import ClassVar

import torch

from .dequantized_base import dequantized_weight
from .liger_kernels import LayerKernelDecision

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FusedLoraDecision(LayerKernelDecision):
    """Whether the LoRA projections run fused, and why; logged in one line, kept in ``hf_instruct_tune.json``."""

    label: ClassVar[str] = "Fused LoRA projections"


def decide_fused_lora(asked: bool | None, *, device: str, compiled_layers: bool = False, unsloth: bool = False,
                      fsdp: bool = False, deepspeed: bool = False) -> FusedLoraDecision:
    """As ``asked`` (True or False), or for ``None`` (auto) on a CUDA ``device`` only, never with compiled layers
    or FSDP. Unsloth and DeepSpeed win even over ``asked=True``."""
    blocker = ("Unsloth runs its own LoRA kernels" if unsloth else
               "DeepSpeed gathers each module's weights in that module's own forward" if deepspeed else None)
    if blocker is not None:
        return FusedLoraDecision(False, asked, f"{'fused_lora=True, but ' if asked else ''}{blocker}")
    if asked is not None:
        return FusedLoraDecision(asked, asked, f"fused_lora={asked}")
    if device != "cuda":
        reason = f"auto: on CUDA GPUs only, not {device}"
    elif compiled_layers:
        reason = "auto: the compiled layers fuse the same work"
    elif fsdp:
        reason = "auto: not measured under FSDP"
    else:
        return FusedLoraDecision(True, None, "auto: one autograd node per projection, fewer kernel launches")
    return FusedLoraDecision(False, None, reason)


def apply_fused_lora(model) -> int:
    """Run every eligible LoRA projection of ``model`` through :class:`FusedLoraLinear` (in place). Returns how
    many were patched; :func:`fusion_blocker` says why a projection is left to PEFT."""
    patched, blocked = 0, {}
    for module in model.modules():
        if not _is_lora_linear(module) or getattr(module, "_peft_forward", None) is not None:
            continue
        reason = fusion_blocker(module)
        if reason is not None:
            blocked[reason] = blocked.get(reason, 0) + 1
            continue
        module._peft_forward = module.forward
        module.forward = types.MethodType(_fused_forward, module)
        patched += 1
    logger.info("LoRA projections fused: %d%s", patched,
                "".join(f"; {count} left to PEFT ({reason})" for reason, count in blocked.items()))
    return patched


def fused_projections(model) -> int:
    """How many projections of ``model`` run fused."""
    return sum(getattr(module, "_peft_forward", None) is not None for module in model.modules())


def fusion_blocker(module) -> str | None:
    """Why the LoRA projection ``module`` cannot run fused whatever its input; ``None`` when it can."""
    adapters = list(module.lora_A.keys())
    if len(adapters) != 1:
        return "several adapters"
    adapter = adapters[0]
    if getattr(module, "lora_variant", {}).get(adapter) is not None or module.use_dora.get(adapter, False):
        return "DoRA or another LoRA variant"
    if not isinstance(module.lora_dropout[adapter], torch.nn.Identity):
        return "LoRA dropout"
    if module.lora_A[adapter].bias is not None or module.lora_B[adapter].bias is not None:
        return "a LoRA bias"
    if not isinstance(module.lora_A[adapter], torch.nn.Linear) or not isinstance(module.lora_B[adapter],
                                                                                  torch.nn.Linear):
        return "not a linear adapter"
    base = module.get_base_layer()
    if _quant_state(base) is None and type(base) is not torch.nn.Linear:
        return f"a {type(base).__name__} base layer"
    if base.weight.requires_grad:
        return "a trained base weight"
    return None


def _is_lora_linear(module) -> bool:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return False
    return isinstance(module, LoraLayer) and hasattr(module, "lora_A") and isinstance(
        getattr(module, "base_layer", None), torch.nn.Linear)


def _quant_state(base):
    """The bitsandbytes 4-bit quantization state of ``base``'s weight, or None for a dense weight."""
    return getattr(base.weight, "quant_state", None) if hasattr(base.weight, "quant_type") else None


def _fused_forward(self, x, *args, **kwargs):
    """PEFT's forward for one adapter, as one autograd node; PEFT's own where they would differ."""
    if args or kwargs or self.disable_adapters or self.merged:
        return self._peft_forward(x, *args, **kwargs)
    adapter = self.active_adapters
    if len(adapter) != 1 or adapter[0] not in self.lora_A:
        return self._peft_forward(x, *args, **kwargs)
    adapter = adapter[0]
    lora_A, lora_B = self.lora_A[adapter].weight, self.lora_B[adapter].weight
    base = self.base_layer
    quant_state = _quant_state(base)
    dtype = _compute_dtype(x, base.weight if quant_state is None else None, lora_A)
    if dtype is None or getattr(quant_state, "packing_format_for_cpu", False):  # bitsandbytes' CPU inference layout
        return self._peft_forward(x, *args, **kwargs)
    weight, kept = base.weight, dequantized_weight(base)
    if kept is not None:  # a 4-bit base kept dequantized: no dequantization in forward or backward
        weight, quant_state = kept, None
    return FusedLoraLinear.apply(x, weight, base.bias, quant_state, lora_A, lora_B, self.scaling[adapter], dtype)


def _compute_dtype(x, dense_weight, lora_A) -> torch.dtype | None:
    """The dtype the projection computes in: autocast's when on (and it is ``x``'s), else ``x``'s when the
    weights share it; None when PEFT's casts would make the numbers differ."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return dtype if x.dtype == dtype else None
    weights = (lora_A,) if dense_weight is None else (lora_A, dense_weight)
    return x.dtype if all(weight.dtype == x.dtype for weight in weights) else None


def _dense(weight, quant_state, dtype):
    """The base weight as a ``dtype`` matrix (out_features x in_features), dequantized from 4 bits if it is."""
    if quant_state is not None:
        import bitsandbytes.functional as bnb_functional

        weight = bnb_functional.dequantize_4bit(weight, quant_state)
    return weight if weight.dtype == dtype else weight.to(dtype)


class FusedLoraLinear(torch.autograd.Function):
    """``x W^T + bias + scaling * (x A^T) B^T`` with ``W`` (4-bit or dense) and ``bias`` frozen, one node."""

    @staticmethod
    def forward(ctx, x, weight, bias, quant_state, lora_A, lora_B, scaling, dtype):
        with torch.autocast(x.device.type, enabled=False):
            rows = x.reshape(-1, x.shape[-1])
            A, B = lora_A.to(dtype), lora_B.to(dtype)
            dense = _dense(weight, quant_state, dtype)
            base = torch.nn.functional.linear(rows, dense, None if bias is None else bias.to(dtype))
            low_rank = torch.mm(rows, A.t())
            out = torch.addmm(base, low_rank, B.t(), alpha=scaling)
        ctx.save_for_backward(rows, low_rank, A, B)
        ctx.weight, ctx.quant_state, ctx.scaling, ctx.dtype = weight, quant_state, scaling, dtype
        ctx.input_shape, ctx.adapter_dtypes = x.shape, (lora_A.dtype, lora_B.dtype)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        rows, low_rank, A, B = ctx.saved_tensors
        needs_x, needs_A, needs_B = ctx.needs_input_grad[0], ctx.needs_input_grad[4], ctx.needs_input_grad[5]
        grad_rows = grad.reshape(-1, grad.shape[-1]).to(ctx.dtype)
        grad_x = grad_A = grad_B = None
        if needs_B:
            grad_B = torch.mm(grad_rows.t(), low_rank).mul_(ctx.scaling).to(ctx.adapter_dtypes[1])
        if needs_x or needs_A:
            grad_low_rank = torch.mm(grad_rows, B).mul_(ctx.scaling)
            if needs_A:
                grad_A = torch.mm(grad_low_rank.t(), rows).to(ctx.adapter_dtypes[0])
            if needs_x:
                dense = _dense(ctx.weight, ctx.quant_state, ctx.dtype)
                grad_x = torch.mm(grad_rows, dense).addmm_(grad_low_rank, A).view(ctx.input_shape)
        return grad_x, None, None, None, grad_A, grad_B, None, None
