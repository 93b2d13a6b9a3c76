"""LoRA on a bf16 (or fp16) base under autocast: the layers' inputs go to the adapter as they are.

PEFT casts a LoRA layer's input to the adapter's dtype before ``lora_A`` (fp32 adapters: an fp32 copy of every
projection's input), except on 4-bit bases under autocast. Under autocast that copy is cast straight back to
bf16 for the matmul, and autograd keeps one such bf16 copy per projection (q, k and v each hold their own copy of
the same input), where the base projection keeps the input itself. The numbers are the same either way (bf16 ->
fp32 -> bf16 is exact), so while the trainer's forward runs under autocast, :func:`adapter_inputs_uncast` turns
PEFT's cast off: no copies, and the saved inputs are shared with the base projections.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


def casts_adapter_inputs(model) -> bool:
    """True when ``model`` has plain LoRA layers whose input PEFT would cast (not DoRA or other variants)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return False
    layers = [module for module in model.modules() if isinstance(module, LoraLayer)]
    return bool(layers) and not any(getattr(layer, "lora_variant", None) for layer in layers)


@contextmanager
def adapter_inputs_uncast(model, autocast: bool) -> Iterator[bool]:
    """Within the block, LoRA layers of ``model`` take their input in its own dtype, when ``autocast`` says the
    forward runs under autocast (which then picks the matmul dtype). Yields whether it did."""
    if not (autocast and casts_adapter_inputs(model)):
        yield False
        return
    from peft.helpers import disable_input_dtype_casting

    with disable_input_dtype_casting(model):
        yield True
