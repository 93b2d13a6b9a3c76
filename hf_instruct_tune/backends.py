"""Training backends: plain transformers + PEFT, or Unsloth; optionally a 4-bit (NF4) base.

Three public steps, in this order:

1. :func:`resolve_backend` (``"auto" | "transformers" | "unsloth"`` -> the concrete name). Call it, or
   :func:`import_backend_early`, **before** transformers, trl or peft are imported: Unsloth patches them on
   import. The CLI's ``train`` command does this first thing, from the raw ``--backend`` value, before it
   imports the trainer module.
2. :func:`load_for_training` -> ``(model, tokenizer_or_None)``; the tokenizer is only returned by Unsloth
   (the transformers backend leaves tokenizer loading to the caller).
3. :func:`add_lora` -> the LoRA-wrapped model (``FastLanguageModel.get_peft_model`` for Unsloth).

Nothing here imports Unsloth, bitsandbytes or peft unless that backend or option is chosen.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import warnings
from typing import Any

from hf_instruct_tune.errors import InputError, unknown_name

BACKENDS = ("auto", "transformers", "unsloth")
"""Values accepted by ``--backend``."""

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_backend(name: str) -> str:
    """Return ``"transformers"`` or ``"unsloth"`` for a ``--backend`` value.

    ``auto`` is transformers: with the memory plan and the packed, isolated path it was measured faster than
    Unsloth's best configuration that fits the same memory at every budget from 8 GiB (1.4-1.6x on a 16-step run
    with eager layers, 1.4-1.7x on a long run, whose layers it compiles; ``BENCHMARKS.md``, "GPU"), and it also runs
    on several processes.
    Unsloth runs when asked for by name.
    Raises :class:`InputError` for an unknown name, or for ``unsloth`` where it cannot run.
    """
    if name not in BACKENDS:
        raise unknown_name("backend", name, BACKENDS)
    if name == "auto":
        return "transformers"
    if name == "unsloth":
        if not _installed("unsloth"):
            raise InputError(
                "Backend 'unsloth' needs the unsloth package. Install it with "
                "`pip install hf_instruct_tune[unsloth]`, or use `--backend transformers`.", field="backend")
        if not _cuda():
            raise InputError("Backend 'unsloth' needs a CUDA GPU, and none is visible. "
                             "Use `--backend transformers` on this machine.", field="backend")
    return name


def import_backend_early(name: str) -> str:
    """Resolve ``name`` and, for Unsloth, import it now so that its patches reach transformers, trl and peft.

    Call it before anything imports transformers (the CLI's ``train`` command does so first). Warns when
    transformers is already imported, since Unsloth's patches may then be incomplete.
    """
    backend = resolve_backend(name)
    if backend == "unsloth" and "unsloth" not in sys.modules:
        late = [m for m in ("transformers", "trl", "peft") if m in sys.modules]
        if late:
            warnings.warn(f"Unsloth is imported after {', '.join(late)}; import hf_instruct_tune.backends and call "
                          "import_backend_early() first for all of Unsloth's optimisations.", stacklevel=2)
        importlib.import_module("unsloth")
    return backend


def check_4bit() -> None:
    """Raise :class:`InputError` unless 4-bit loading can work here (bitsandbytes and a CUDA GPU)."""
    if not _installed("bitsandbytes"):
        raise InputError("`load_in_4bit` needs bitsandbytes. Install it with `pip install hf_instruct_tune[qlora]`, "
                         "or train without `--load-in-4bit`.", field="load_in_4bit")
    if not _cuda():
        raise InputError("`load_in_4bit` needs a CUDA GPU, and none is visible. Train without `--load-in-4bit` "
                         "on this machine.", field="load_in_4bit")


def nf4_config(dtype: Any = None):
    """The ``BitsAndBytesConfig`` used for 4-bit: NF4, double quantization, bf16 compute, ``uint8`` storage.

    Under FSDP the packed 4-bit weights stay whole on every GPU (accelerate leaves ``uint8`` weights out of
    sharding) while the rest of the model is sharded: storing them in bf16 lets FSDP2 shard them, but the
    sharded layers then compute wrong outputs (their quantization state is lost; bitsandbytes issue #1945,
    measured in BENCHMARKS.md "Multi-GPU").
    """
    import torch
    from transformers import BitsAndBytesConfig

    dtype = dtype or torch.bfloat16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=torch.uint8)


def load_for_training(
    model_name_or_path: str,
    *,
    backend: str = "auto",
    load_in_4bit: bool = False,
    dtype: Any = "auto",
    attn_implementation: str | None = None,
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
    max_seq_length: int = 2048,
) -> tuple[Any, Any | None]:
    """Load a causal LM for fine-tuning with the chosen backend.

    Args:
        model_name_or_path: Hub id or local folder.
        backend: ``auto``, ``transformers`` or ``unsloth`` (see :func:`resolve_backend`).
        load_in_4bit: quantize the frozen base to NF4 with bitsandbytes (:func:`nf4_config`).
        dtype: torch dtype or ``"auto"`` for the weights that stay unquantized.
        attn_implementation: transformers' name (``sdpa``, ``eager``, ``flash_attention_2``,
            :data:`hf_instruct_tune.packing.VARLEN_ATTENTION`, ...); ignored by Unsloth, which picks its own.
        gguf_file: a GGUF file inside ``model_name_or_path`` (transformers backend only).
        trust_remote_code: passed through to transformers.
        max_seq_length: Unsloth's context length (its RoPE and kernels are sized from it).

    Returns:
        ``(model, tokenizer)`` for Unsloth, ``(model, None)`` for transformers.
    """
    backend = resolve_backend(backend)
    if load_in_4bit:
        check_4bit()
    if backend == "unsloth":
        if gguf_file:
            raise InputError("Backend 'unsloth' cannot load a GGUF file; use `--backend transformers`.",
                             field="gguf_file")
        from unsloth import FastLanguageModel

        return FastLanguageModel.from_pretrained(
            model_name_or_path, max_seq_length=max_seq_length, dtype=None if dtype == "auto" else dtype,
            load_in_4bit=load_in_4bit, trust_remote_code=trust_remote_code)
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        from hf_instruct_tune.packing import VARLEN_ATTENTION, register_varlen_attention

        if attn_implementation == VARLEN_ATTENTION:
            register_varlen_attention()
        kwargs["attn_implementation"] = attn_implementation
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    if load_in_4bit:
        kwargs["quantization_config"] = nf4_config()
        kwargs["device_map"] = {"": _current_device()}
    return AutoModelForCausalLM.from_pretrained(model_name_or_path, **kwargs), None


def add_lora(
    model: Any,
    *,
    backend: str,
    r: int = 16,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    target_modules: tuple[str, ...] | list[str] = LORA_TARGETS,
    gradient_checkpointing: bool = True,
    seed: int = 0,
    use_rslora: bool = False,
) -> Any:
    """Wrap ``model`` with LoRA adapters for the backend it was loaded with.

    ``use_rslora`` scales the adapters by ``alpha / sqrt(r)`` instead of ``alpha / r`` (rank-stabilized LoRA).

    Unsloth: ``FastLanguageModel.get_peft_model`` with its offloaded checkpointing (``"unsloth"``).
    transformers: ``peft.get_peft_model``. The frozen base keeps its dtype (no fp32 upcast of embeddings and
    norms as ``prepare_model_for_kbit_training`` does: that costs ~4 GiB on an 8B model); the adapters are
    fp32 and run in the trainer's bf16 autocast. Gradient checkpointing is non-reentrant.
    """
    backend = resolve_backend(backend)
    if backend == "unsloth":
        from unsloth import FastLanguageModel

        return FastLanguageModel.get_peft_model(
            model, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias="none",
            target_modules=list(target_modules), random_state=seed, use_rslora=use_rslora,
            use_gradient_checkpointing="unsloth" if gradient_checkpointing else False)
    from peft import LoraConfig, get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias="none",
                        target_modules=list(target_modules), task_type="CAUSAL_LM", use_rslora=use_rslora)
    return get_peft_model(model, config)


def offload_input_embeddings(model: Any, *, reserve_tokens: int = 0) -> Any:
    """Keep the frozen input-embedding table in CPU memory and look tokens up there (saves ~1 GiB on Llama-3-8B).

    Only the looked-up rows travel to the GPU (``T x hidden`` per micro-batch), to wherever the model is
    (``model.to()`` moves an empty marker buffer, not the table). The rows are gathered into one pinned staging
    buffer that every micro-batch reuses, sized up front for ``reserve_tokens`` tokens (the largest micro-batch
    the run expects) and grown if a larger one comes: pinning host memory is slow, so it is done once rather
    than in the step that first meets a larger micro-batch. The table is a plain attribute, not a parameter, so
    DDP and ``model.to()`` leave it alone; use it for training LoRA adapters, not for saving the full model.
    Returns ``model``; a second call changes nothing but the reservation.
    """
    import torch

    old = model.get_input_embeddings()
    if isinstance(old, _cpu_embedding_class()):
        old.reserve(reserve_tokens)
        return model
    embedding = _CPUEmbedding(old.weight.detach().to("cpu"), old.weight.device)
    model.set_input_embeddings(embedding)
    if old.weight.is_cuda:
        del old
        torch.cuda.empty_cache()
    embedding.reserve(reserve_tokens)
    return model


_CPU_EMBEDDING = None
_STAGING_GROWTH = 1.25  # a staging buffer outgrown is replaced by one this much larger than the micro-batch


def _cpu_embedding_class():
    global _CPU_EMBEDDING
    if _CPU_EMBEDDING is not None:
        return _CPU_EMBEDDING
    import torch

    class CPUEmbedding(torch.nn.Module):
        def __init__(self, table: torch.Tensor, device: torch.device):
            super().__init__()
            self.table = table
            self.register_buffer("marker", torch.empty(0, device=device), persistent=False)
            self.staging: torch.Tensor | None = None  # pinned rows, reused by every micro-batch
            self._staging_free: torch.cuda.Event | None = None  # recorded after the last copy out of it

        def reserve(self, tokens: int) -> None:
            """Pin a staging buffer for ``tokens`` looked-up rows now (on a CUDA model; else nothing)."""
            if self.marker.device.type != "cuda" or tokens <= 0:
                return
            if self.staging is not None and self.staging.shape[0] >= tokens:
                return
            if self._staging_free is not None:
                self._staging_free.synchronize()
            self.staging = None
            self.staging = torch.empty((tokens, self.table.shape[1]), dtype=self.table.dtype, pin_memory=True)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            ids = input_ids.to("cpu")
            device = self.marker.device
            if device.type != "cuda":
                return torch.nn.functional.embedding(ids, self.table).to(device)
            tokens = ids.numel()
            if self.staging is None or self.staging.shape[0] < tokens:
                self.reserve(math.ceil(tokens * _STAGING_GROWTH))
            if self._staging_free is not None:
                self._staging_free.synchronize()  # the previous micro-batch's rows have left the buffer
            rows = self.staging[:tokens]
            torch.index_select(self.table, 0, ids.reshape(-1), out=rows)
            on_device = rows.to(device, non_blocking=True).view(*ids.shape, self.table.shape[1])
            self._staging_free = torch.cuda.Event()
            self._staging_free.record()
            return on_device

    _CPU_EMBEDDING = CPUEmbedding
    return CPUEmbedding


def _CPUEmbedding(table, device):  # noqa: N802 - a class built lazily so that torch is imported late
    return _cpu_embedding_class()(table, device)


def _current_device() -> int | str:
    import os

    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))  # one GPU per process under DDP
