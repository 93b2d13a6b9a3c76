"""Regional compilation: each decoder layer's forward compiled by ``torch.compile``, the rest of the model eager.

A decoder-only model repeats one layer many times; compiling the layers one by one (``nn.Module.compile``)
fuses their elementwise work (norms, activations, residual adds, rotary embeddings) into fewer kernels while
keeping the model's structure, its state-dict keys and its gradient checkpointing as they are. Shapes are
compiled as dynamic, so micro-batches of any token count reuse the same graphs.

The first steps pay for the compilation; the loss and gradients are those of the eager layers, within
floating-point reordering.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def compile_decoder_layers(model, *, backend: str = "inductor") -> int:
    """Compile the forward of every decoder layer of ``model`` (possibly wrapped by PEFT) in place, for training.

    Returns the number of layers compiled; a layer compiled before is left as it is. The input embeddings'
    output is made to require grad, so the first layer's input looks like every other layer's and all layers
    share one graph (otherwise the first layer's frozen input compiles a graph of its own). Each layer may need a
    graph of its own (4-bit weights carry per-layer quantization state), so torch's recompilation limit is
    raised to the number of layers where it is lower. ``backend`` is ``torch.compile``'s.
    """
    import torch

    from .memory_plan import _decoder_layers

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = _decoder_layers(base)
    if layers and not getattr(base, "_require_grads_hooks", None):
        base.enable_input_require_grads()
    dynamo = torch._dynamo.config
    for limit in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo, limit) and getattr(dynamo, limit) < len(layers) + 8:
            setattr(dynamo, limit, len(layers) + 8)
            break
    compiled = 0
    for layer in layers:
        if not is_compiled(layer):
            layer.compile(dynamic=True, backend=backend)
            compiled += 1
    if layers:
        logger.info("Compiling %d decoder layers with torch.compile (the first steps take longer)", len(layers))
    return compiled


def is_compiled(layer) -> bool:
    """Whether ``layer.compile()`` was called on ``layer``."""
    return getattr(layer, "_compiled_call_impl", None) is not None
