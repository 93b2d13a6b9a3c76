"""A 4-bit base dequantized once: its bf16 weights kept beside the 4-bit ones, no dequantization in the steps.

A bitsandbytes 4-bit projection dequantizes its weight in every forward pass and again in every backward pass
(and once more in a recomputed forward). With memory to spare, :func:`dequantize_base_once` does it once and the
projections multiply by the kept matrices. These are the very values bitsandbytes' dequantization gives, so the
training is QLoRA's: the 4-bit weights stay the model's weights (the adapter is trained against, saved with and
merged into them), and only memory and speed change. The memory plan (:mod:`~hf_instruct_tune.memory_plan`) turns
it on where the kept matrices fit the budget with nothing else traded for memory (no layer recomputed, plain
logits, the input embeddings on the GPU); ``InstructTrainer.train`` keeps them for its duration only
(:func:`kept_dequantized`), so their memory is freed when training ends.
"""

from __future__ import annotations

import contextlib
import logging
import math
import types

import torch

logger = logging.getLogger(__name__)

BUFFER = "dequantized_weight"
"""The name of the kept matrix on each 4-bit projection (a non-persistent buffer: never in a state dict)."""


def quantized_projections(model) -> list[torch.nn.Module]:
    """The bitsandbytes 4-bit linear layers of ``model`` (their weight has a quantization state)."""
    return [module for _, module in _named_quantized_projections(model)]


def _named_quantized_projections(model):
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and getattr(module.weight, "quant_state", None) is not None:
            yield name, module


def dequantized_bytes(model) -> int:
    """Bytes the kept matrices of ``model``'s 4-bit projections would take (0 for a model without any)."""
    return sum(math.prod(module.weight.quant_state.shape) * module.weight.quant_state.dtype.itemsize
               for module in quantized_projections(model))


def dequantize_base_once(model) -> int:
    """Keep each 4-bit projection of ``model`` dequantized and multiply by that (in place). Returns how many.

    A projection whose weight is in bitsandbytes' CPU inference layout is left as it is."""
    import bitsandbytes.functional as bnb_functional

    kept = []
    for name, module in _named_quantized_projections(model):
        state = module.weight.quant_state
        if getattr(module, BUFFER, None) is not None or getattr(state, "packing_format_for_cpu", False):
            continue
        with torch.no_grad():
            dense = bnb_functional.dequantize_4bit(module.weight.data, state)
        module.register_buffer(BUFFER, dense.view(state.shape), persistent=False)
        module._quantized_forward = module.forward
        module.forward = types.MethodType(_dequantized_forward, module)
        kept.append(f"{name}.{BUFFER}" if name else BUFFER)
    # DistributedDataParallel would broadcast every buffer from rank 0 before each forward: each process
    # dequantizes its own copy, the same values
    model._ddp_params_and_buffers_to_ignore = [*getattr(model, "_ddp_params_and_buffers_to_ignore", ()), *kept]
    logger.info("4-bit base dequantized once: %d projections", len(kept))
    return len(kept)


def restore_quantized(model) -> int:
    """Undo :func:`dequantize_base_once`: drop the kept matrices (their memory is freed) and let the projections
    dequantize as bitsandbytes does. Returns how many were restored."""
    count = 0
    for module in quantized_projections(model):
        if getattr(module, "_quantized_forward", None) is None:
            continue
        del module._buffers[BUFFER]
        module.forward = module._quantized_forward
        del module._quantized_forward
        count += 1
    if hasattr(model, "_ddp_params_and_buffers_to_ignore"):
        model._ddp_params_and_buffers_to_ignore = [
            name for name in model._ddp_params_and_buffers_to_ignore if not name.endswith(BUFFER)]
    return count


@contextlib.contextmanager
def kept_dequantized(model, keep: bool = True):
    """Keep ``model``'s 4-bit base dequantized inside the block (when ``keep``), and only there."""
    if not keep:
        yield 0
        return
    count = dequantize_base_once(model)
    try:
        yield count
    finally:
        restore_quantized(model)


def dequantized_weight(module) -> torch.Tensor | None:
    """The kept matrix of a 4-bit projection (``out_features x in_features``), or None."""
    return getattr(module, BUFFER, None)


def _dequantized_forward(self, x: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' ``Linear4bit.forward`` with the kept matrix in place of a fresh dequantization."""
    input_dtype = x.dtype
    if self.compute_dtype is not None:
        x = x.to(self.compute_dtype)
    weight = self.dequantized_weight
    bias = None if self.bias is None else self.bias.to(x.dtype)
    return torch.nn.functional.linear(x, weight if weight.dtype == x.dtype else weight.to(x.dtype),
                                      bias).to(input_dtype)
