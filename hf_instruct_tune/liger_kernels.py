"""Liger Kernel's fused Triton kernels for the decoder layers' RMSNorm, SwiGLU and rotary embeddings.

`Liger Kernel <https://github.com/linkedin/Liger-Kernel>`_ (``pip install "hf_instruct_tune[liger]"``) replaces a
layer's eager norm, activation and rotary embedding with one Triton kernel each, forward and backward, and keeps
less for backward: the norm's input in bf16 instead of its fp32 copy, the MLP's two projections without their
activation (recomputed in backward). The kernels compile once per shape class in about a second and are cached
on disk, so unlike compiled layers (:mod:`.layer_compilation`) they pay back from the first steps.

By default (``liger_kernels=None``, "auto") they are used on a CUDA GPU when the package is installed and the
model is a Llama-like decoder (RMSNorm and a SiLU-gated MLP: :data:`AUTO_MODEL_TYPES`), never with Unsloth (its
own kernels), compiled layers (which fuse the same work) or FSDP (not measured there). The loss is the package's
own (plain logits or the fused loss); Liger's loss kernels are not used. The rotary embedding is patched in the
model's transformers module, so it holds for every model of that type in the process.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from dataclasses import dataclass
from typing import ClassVar

from .memory_plan import unwrapped_model

logger = logging.getLogger(__name__)

AUTO_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "smollm3"})
"""Model types whose layers are RMSNorm, attention with rotary embeddings and a SiLU-gated MLP, as the memory
plan's estimate for Liger layers assumes."""
_SILU = frozenset({"silu", "swish"})


@dataclass(frozen=True)
class LayerKernelDecision:
    """Whether the layers run a kind of kernels, and why; logged in one line, kept in ``hf_instruct_tune.json``."""

    used: bool
    asked: bool | None
    """The option as given: ``None`` for auto."""
    reason: str
    label: ClassVar[str] = "Layer kernels"

    def describe(self) -> str:
        """The one line the trainer logs."""
        return f"{self.label}: {'on' if self.used else 'off'} ({self.reason})"

    def as_metadata(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class LigerDecision(LayerKernelDecision):
    """Whether the decoder layers run Liger's kernels, and why."""

    label: ClassVar[str] = "Liger kernels"


def liger_installed() -> bool:
    """Whether ``liger_kernel`` can be imported."""
    return importlib.util.find_spec("liger_kernel") is not None


def liger_blocker(model, device: str) -> str | None:
    """Why Liger's kernels cannot run for ``model`` (a model, or a name still to load) on ``device``; ``None``
    when they can."""
    if device != "cuda":
        return f"its Triton kernels need a CUDA GPU, not {device}"
    if not liger_installed():
        return 'not installed (pip install "hf_instruct_tune[liger]")'
    if isinstance(model, str):
        return None
    config = getattr(unwrapped_model(model), "config", None)
    model_type = getattr(config, "model_type", None)
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError as error:  # installed, but its Triton or transformers is not one it works with
        return f"it could not be imported ({error})"
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return f"Liger has no kernels for model type {model_type!r}"
    return None


def decide_liger(asked: bool | None, *, model, device: str, unsloth: bool = False, compiled_layers: bool = False,
                 fsdp: bool = False, blocker: str | None = None) -> LigerDecision:
    """Whether the layers of ``model`` run Liger's kernels: as ``asked`` (True or False; ``blocker``, from
    :func:`liger_blocker`, wins over True), or for ``None`` (auto) on a CUDA ``device`` for the model types of
    :data:`AUTO_MODEL_TYPES` with a SiLU-gated MLP, never with Unsloth, compiled layers or FSDP."""
    if blocker is not None:
        return LigerDecision(False, asked, f"{'liger_kernels=True, but ' if asked else ''}{blocker}")
    if asked is not None:
        return LigerDecision(asked, asked, f"liger_kernels={asked}")
    config = getattr(unwrapped_model(model), "config", None) if not isinstance(model, str) else None
    model_type = getattr(config, "model_type", None)
    if unsloth:
        reason = "auto: Unsloth patches the layers with its own kernels"
    elif compiled_layers:
        reason = "auto: the compiled layers fuse the same work"
    elif fsdp:
        reason = "auto: not measured under FSDP"
    elif model_type not in AUTO_MODEL_TYPES:
        reason = f"auto: model type {model_type!r} is not one the memory plan's estimate covers"
    elif getattr(config, "hidden_act", "silu") not in _SILU:
        reason = f"auto: the MLP's activation is {config.hidden_act!r}, not SiLU"
    else:
        return LigerDecision(True, None, f"auto: fused RMSNorm, SwiGLU and rotary kernels for {model_type}")
    return LigerDecision(False, None, reason)


def apply_liger_kernels(model) -> int:
    """Patch the decoder layers of ``model`` (possibly wrapped by PEFT) in place with Liger's RMSNorm, SwiGLU
    and rotary kernels; the model's loss is left as it is. Returns the number of norm and MLP modules patched."""
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

    base = unwrapped_model(model)
    before = _liger_modules(base)
    _apply_liger_kernel_to_instance(model=base, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    patched = _liger_modules(base) - before
    logger.info("Liger kernels in %d norm and MLP modules, and the rotary embedding", patched)
    return patched


def _liger_modules(model) -> int:
    """Modules whose forward is one of Liger's."""
    count = 0
    for module in model.modules():
        forward = getattr(module, "forward", None)
        if getattr(getattr(forward, "__func__", forward), "__module__", "").startswith("liger_kernel."):
            count += 1
    return count

