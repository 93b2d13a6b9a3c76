"""Under FSDP2, gather the next decoder layers' weights while the current layer computes.

FSDP2 gathers a layer's weights when its forward starts, unless something asked for them earlier; by default the
next layer's gather is issued only when the CPU reaches that layer, which a LoRA layer's many small kernels can
delay until the GPU is already waiting. :func:`prefetch_layers` asks each sharded decoder layer to issue the
gathers of the ``depth`` layers after it (forward) and before it (backward) as it starts, so the transfers
overlap the computation. Each prefetched layer holds one more gathered layer per GPU at a time.

:class:`~hf_instruct_tune.InstructTrainer` sets it up when training starts under FSDP
(``HF_INSTRUCT_TUNE_FSDP_PREFETCH`` sets ``depth``, 2 by default: on two H200s two layers ahead ran 4.6% faster
than one at the same peak memory, BENCHMARKS.md "Multi-GPU"; 0 leaves FSDP2's own order).
"""

from __future__ import annotations

import logging
import os

from transformers import TrainerCallback

logger = logging.getLogger(__name__)

PREFETCH_ENV = "HF_INSTRUCT_TUNE_FSDP_PREFETCH"
DEFAULT_DEPTH = 2


def prefetch_depth() -> int:
    """Layers gathered ahead under FSDP: ``HF_INSTRUCT_TUNE_FSDP_PREFETCH`` (a count >= 0), else 2."""
    from .errors import InputError

    value = os.environ.get(PREFETCH_ENV, "").strip()
    if not value:
        return DEFAULT_DEPTH
    if not value.isdigit():
        raise InputError(f"`{PREFETCH_ENV}` should be a whole number of layers >= 0, got {value!r}", field=PREFETCH_ENV)
    return int(value)


def sharded_layers(model) -> list:
    """The model's FSDP2-sharded decoder layers, in forward order (other sharded modules, such as a model that
    holds the layers or the output head, are left to FSDP2's own order)."""
    from torch.distributed.fsdp import FSDPModule
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [module for module in model.modules()
            if isinstance(module, FSDPModule) and isinstance(module, GradientCheckpointingLayer)]


def prefetch_layers(model, depth: int = DEFAULT_DEPTH) -> int:
    """Make each sharded layer of ``model`` gather the next ``depth`` layers in forward, the previous in backward.

    Returns the number of sharded layers set up (0 when ``model`` is not sharded with FSDP2 or ``depth`` is 0).
    """
    layers = sharded_layers(model)
    if depth <= 0 or len(layers) < 2:
        return 0
    for index, layer in enumerate(layers):
        following = layers[index + 1:index + 1 + depth]
        preceding = layers[max(0, index - depth):index][::-1]
        if following:
            layer.set_modules_to_forward_prefetch(following)
        if preceding:
            layer.set_modules_to_backward_prefetch(preceding)
    return len(layers)


class FSDPPrefetch(TrainerCallback):
    """Set up :func:`prefetch_layers` on the model the Trainer trains, once it is sharded (training start)."""

    def __init__(self, depth: int | None = None):
        self.depth = prefetch_depth() if depth is None else depth

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        layers = prefetch_layers(model, self.depth)
        if layers:
            logger.info("FSDP: each of %d sharded decoder layers gathers the next %d ahead", layers, self.depth)
