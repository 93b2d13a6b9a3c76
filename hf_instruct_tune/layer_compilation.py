"""Regional compilation: each decoder layer's forward compiled by ``torch.compile``, the rest of the model eager.

A decoder-only model repeats one layer many times; compiling the layers one by one (``nn.Module.compile``)
fuses their elementwise work (norms, activations, residual adds, rotary embeddings) into fewer kernels while
keeping the model's structure, its state-dict keys and its gradient checkpointing as they are. Shapes are
compiled as dynamic, so micro-batches of any token count reuse the same graphs.

The first steps pay for the compilation; the loss and gradients are those of the eager layers, within
floating-point reordering.

By default (``compile_layers=None``, "auto") the layers are compiled on a CUDA GPU when the run is long enough to
pay the compilation back (:func:`decide_compilation`): on one H200, compiling Llama-3-8B's 32 layers costs ~10 s
of a run's wall time (the layers' float attributes compiled as constants; ~68 s before, most of it C++ kernels
built on the host for them) and made each token ~17 us faster than the eager layers with Liger's kernels with no
layer checkpointed, ~25 us with every layer checkpointed (the recomputed forward is compiled too), so it pays for
itself after ~0.6M tokens, or ~0.4M. Auto asks for three times that (:data:`PAYBACK_MARGIN`): a smaller model
saves less per token for a similar compilation time.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)

COMPILE_SECONDS = 10.0
"""Wall time compiling Llama-3-8B's 32 decoder layers (NF4, LoRA) adds to a run on one H200 (BENCHMARKS.md, "GPU":
a 16-step run took 51.1 s compiled against 45.9 s eager, whose steps 2-16 were 2.9 s longer from one slow step;
torch.compile's own phases 10.6 s in another run of the same lease kind)."""
SAVED_SECONDS_PER_TOKEN = {"none checkpointed": (6.576 - 5.480) / 62_984, "all checkpointed": 0.126 / 4_943}
"""Step time compiled layers saved per token there: with no layer checkpointed, the CLI's steps 2-16 (62,984
tokens) took 5.480 s compiled against 6.416 and 6.735 s eager with Liger's kernels in the same lease; with every
layer checkpointed, a step of 4,943 tokens was 0.126 s shorter (the profile). The lease's partly checkpointed plans
saved ~23 us a token (12 and 32 GiB: 29 and 9 of 32 layers), at or above the interpolation."""
PAYBACK_MARGIN = 3
"""Auto compiles when the planned tokens pay the measured compilation time back this many times over."""


def refuse_other_fusions(compile_layers: bool | None, fusions: dict[str, bool | None],
                         compile_name: str = "compile_layers") -> None:
    """Raise :class:`~hf_instruct_tune.errors.InputError` when ``compile_layers`` and one of ``fusions`` (each
    other fusion by the name the user set it as, option or argument, and its value) were both asked for."""
    from .errors import InputError

    for name, asked in fusions.items():
        if compile_layers and asked:
            raise InputError(f"{compile_name} and {name} both fuse the layers' work: choose one",
                             field=name.lstrip("-").replace("-", "_"))


def compile_decoder_layers(model, *, backend: str = "inductor") -> int:
    """Compile the forward of every decoder layer of ``model`` (possibly wrapped by PEFT) in place, for training.

    Returns the number of layers compiled; a layer compiled before is left as it is. The input embeddings'
    output is made to require grad, so the first layer's input looks like every other layer's and all layers
    share one graph (otherwise the first layer's frozen input compiles a graph of its own). Each layer may need a
    graph of its own (4-bit weights carry per-layer quantization state), so torch's recompilation limit is
    raised to the number of layers where it is lower. Float attributes are compiled as constants
    (``torch._dynamo.config.specialize_float``, for the process): as graph inputs they cost a host compiler's C++
    kernels, ~50 of the ~60 s the compilation took on an H200 host. ``backend`` is ``torch.compile``'s.
    """
    import torch

    from .memory_plan import _decoder_layers, unwrapped_model

    base = unwrapped_model(model)
    layers = _decoder_layers(base)
    if layers and not getattr(base, "_require_grads_hooks", None):
        base.enable_input_require_grads()
    dynamo = torch._dynamo.config
    for limit in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo, limit) and getattr(dynamo, limit) < len(layers) + 8:
            setattr(dynamo, limit, len(layers) + 8)
            break
    # the layers' float attributes (norm epsilons, LoRA and attention scalings, dropout rates) as constants: promoted
    # to graph inputs, they are CPU scalar tensors, and Inductor compiles C++ kernels for their arithmetic
    dynamo.specialize_float = True
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


def payback_tokens(checkpointed_fraction: float) -> int:
    """Tokens per process from which auto compiles: :data:`PAYBACK_MARGIN` times the measured break-even at
    this fraction of the layers checkpointed (~1.7M with none, ~1.2M with all), the saving per token
    interpolated between the two measurements."""
    none, every = SAVED_SECONDS_PER_TOKEN["none checkpointed"], SAVED_SECONDS_PER_TOKEN["all checkpointed"]
    fraction = min(max(checkpointed_fraction, 0.0), 1.0)
    return int(PAYBACK_MARGIN * COMPILE_SECONDS / (none + fraction * (every - none)))


def planned_tokens(mean_row_tokens: float, rows: int, *, rows_per_step: int, max_steps: int, epochs: float,
                   processes: int = 1) -> int:
    """Tokens each process will train on: ``max_steps`` x its ``rows_per_step`` rows when ``max_steps`` > 0,
    else ``epochs`` x its share of the ``rows``, at ``mean_row_tokens`` a row."""
    planned_rows = max_steps * rows_per_step if max_steps > 0 else epochs * rows / max(processes, 1)
    return int(planned_rows * mean_row_tokens)


@dataclass(frozen=True)
class CompileDecision:
    """Whether the decoder layers are compiled, and why; logged in one line and kept in ``hf_instruct_tune.json``."""

    compiled: bool
    asked: bool | None
    """``compile_layers`` as given: ``None`` for auto."""
    reason: str
    planned_tokens: int | None = None
    """Tokens per process the run plans (auto only)."""
    threshold_tokens: int | None = None
    """:func:`payback_tokens` at the plan's checkpointed layers (auto only)."""

    def describe(self) -> str:
        """The one line the trainer logs."""
        return f"Compiled layers: {'on' if self.compiled else 'off'} ({self.reason})"

    def as_metadata(self) -> dict:
        return dataclasses.asdict(self)


def decide_compilation(asked: bool | None, *, device: str, planned_tokens: int, checkpointed_fraction: float,
                       unsloth: bool = False, fsdp: bool = False, blocker: str | None = None) -> CompileDecision:
    """Whether to compile the decoder layers: as ``asked`` (True or False), or for ``None`` (auto) on a CUDA
    ``device`` only, never with Unsloth or FSDP (not measured there), and only when ``planned_tokens`` per process
    reach :func:`payback_tokens` at ``checkpointed_fraction``. ``blocker`` (from :func:`compilation_blocker`) says
    why the layers cannot be compiled at all; it wins even over ``asked=True``."""
    if blocker is not None:
        return CompileDecision(False, asked, f"{'compile_layers=True, but ' if asked else ''}{blocker}")
    if asked is not None:
        return CompileDecision(asked, asked, f"compile_layers={asked}")
    threshold = payback_tokens(checkpointed_fraction)
    if device != "cuda":
        reason = f"auto: not on {device}, where compiling costs more than it saves"
    elif unsloth:
        reason = "auto: Unsloth patches the layers with its own kernels"
    elif fsdp:
        reason = "auto: not measured under FSDP"
    else:
        on = planned_tokens >= threshold
        reason = (f"auto: {_millions(planned_tokens)} tokens per process planned {'>=' if on else '<'} "
                  f"{threshold / 1e6:.1f}M, which pay the compilation back {PAYBACK_MARGIN}x with "
                  f"{checkpointed_fraction:.0%} of the layers checkpointed")
        return CompileDecision(on, None, reason, planned_tokens, threshold)
    return CompileDecision(False, None, reason, planned_tokens, threshold)


def _millions(tokens: float) -> str:
    """``25.0M``; a run under a million tokens as ``42k``."""
    return f"{tokens / 1e6:.1f}M" if tokens >= 1e6 else f"{tokens / 1e3:.0f}k"


def compilation_blocker(model, device: str) -> str | None:
    """Why the decoder layers of ``model`` (a model, or a name still to load) cannot be compiled on ``device``;
    ``None`` when they can."""
    import torch

    from .memory_plan import _decoder_layers, unwrapped_model

    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile is not supported on this Python"
    if device == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "torch.compile needs Triton on the GPU, and it is not installed"
    if not isinstance(model, str):
        base = unwrapped_model(model)
        if not _decoder_layers(base):
            return f"no transformers decoder layers found in {type(base).__name__}"
    return None
