"""``TrainConfig``: every ``train`` option, with its help, accepted from YAML and from flags alike."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import InputError, did_you_mean
from .models import DEFAULT_MODEL

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_MAX_STEPS = 60
_DATA_SUFFIXES = {".json", ".jsonl", ".csv", ".parquet"}
_SECRET_KEYS = {"token", "hf_token", "hub_token", "api_key", "password"}


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass
class TrainConfig:
    """Options of ``hf-instruct-tune train``. Each field is a ``--flag`` (dashes for underscores) and a YAML key."""

    data: str | None = field(default=None, metadata=_help(
        "Training data: .json, .jsonl, .csv, .parquet, or a folder saved with `Dataset.save_to_disk`."))
    model: str = field(default=DEFAULT_MODEL, metadata=_help(
        "Base model: a Hub id, a local folder or .gguf file. The default runs offline from the embedded GGUF."))
    output_dir: str = field(default="outputs/adapter", metadata=_help(
        "Where the adapter, tokenizer, metadata and template are written."))
    formatter: str | None = field(default=None, metadata=_help("Row format; detected from the columns when omitted."))
    template: str | None = field(default=None, metadata=_help("Prompt template name or path to a .jinja file."))
    base_model_id: str | None = field(default=None, metadata=_help(
        "Hub id of the base model, for the model card, when --model is a local path."))
    dataset_name: str | None = field(default=None, metadata=_help("Dataset name for the model card."))
    eval_data: str | None = field(default=None, metadata=_help("Optional evaluation data, same formats as --data."))
    max_steps: int | None = field(default=None, metadata=_help(
        f"Optimizer steps (default: {DEFAULT_MAX_STEPS}, or -1 when --epochs is given)."))
    epochs: float | None = field(default=None, metadata=_help("Passes over the data; used when --max-steps is -1."))
    lr: float = field(default=2e-4, metadata=_help("Peak learning rate."))
    warmup_steps: int = field(default=5, metadata=_help(
        "Linear warm-up steps, at most a tenth of the run's steps (the log says how many ran)."))
    lr_scheduler: str = field(default="linear", metadata=_help("Learning-rate schedule (transformers' names)."))
    weight_decay: float = field(default=0.01, metadata=_help("AdamW weight decay."))
    batch_size: int = field(default=4, metadata=_help("Examples per device per micro-batch."))
    grad_accum: int = field(default=4, metadata=_help("Micro-batches per optimizer step."))
    lora_r: int = field(default=16, metadata=_help("LoRA rank."))
    lora_alpha: int = field(default=16, metadata=_help(
        "LoRA alpha: adapters are scaled by alpha/sqrt(r) (rank-stabilized, the default) or alpha/r with --no-rslora."))
    lora_dropout: float = field(default=0.0, metadata=_help("LoRA dropout."))
    rslora: bool = field(default=True, metadata=_help(
        "Rank-stabilized LoRA: scale adapters by alpha/sqrt(r) instead of alpha/r (--no-rslora for alpha/r)."))
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS), metadata=_help(
        "Modules that get LoRA adapters."))
    max_length: int = field(default=1024, metadata=_help("Longest example in tokens (prompt + response + stop)."))
    overlong: str = field(default="drop", metadata=_help(
        "Examples longer than --max-length: 'drop' them (counted in the log) or 'truncate' their responses.",
        choices=("drop", "truncate")))
    train_on_prompt: bool = field(default=False, metadata=_help("Also compute the loss on prompt tokens."))
    packing: bool | None = field(default=None, metadata=_help(
        "Pack several examples per row, each attending only to itself (padding-free). Default: on with a CUDA "
        "GPU, off on CPU."))
    prefix_sharing: bool | None = field(default=None, metadata=_help(
        "Compute the token prefixes that rows of a micro-batch share (a preamble, a system prompt) once: the same "
        "loss and gradients, less work. Default: on where it pays (an attention that takes a mask: sdpa, "
        "eager, torch_varlen and flex_attention with a block mask); on CPU the micro-batches of a step are then "
        "merged into one when they fit."))
    fused_loss: bool | None = field(default=None, metadata=_help(
        "Compute the loss from hidden states, with logits only at supervised positions and never all at once "
        "(Cut Cross-Entropy on CUDA when installed, else chunked): the same loss, less memory and time. "
        "Default: on with the transformers backend (Unsloth fuses its own)."))
    loss_kernel: str = field(default="auto", metadata=_help(
        "The loss kernel: plain (logits, as --no-fused-loss), chunked (the fused loss, a chunk of logits at a "
        "time, recomputed in backward) or cce (Cut Cross-Entropy, no logits). auto: as --fused-loss says, or the "
        "memory plan decides (plain logits when they fit, else the fused loss).",
        choices=("auto", "plain", "chunked", "cce")))
    attn_implementation: str = field(default="auto", metadata=_help(
        "Attention kernel. auto: with --packing on a CUDA GPU the fastest isolated one (flash_attention_2 if "
        "installed, else torch_varlen), otherwise the model's default.",
        choices=("auto", "sdpa", "eager", "flash_attention_2", "torch_varlen")))
    offload_embeddings: bool | None = field(default=None, metadata=_help(
        "Keep the frozen input-embedding table in CPU memory (saves ~1 GiB on Llama-3-8B). Default: when the "
        "memory plan needs it."))
    dequantize_base: bool | None = field(default=None, metadata=_help(
        "With --load-in-4bit: dequantize the base's weights once and keep them in bf16 beside the 4-bit ones, so "
        "no step dequantizes (the same numbers; ~13 GiB more on Llama-3-8B). Default: when the memory plan has "
        "room with nothing else traded for memory, on a CUDA GPU in one process."))
    memory_plan: bool = field(default=True, metadata=_help(
        "Plan each step from the memory budget: rows per micro-batch (--batch-size x --grad-accum rows per step "
        "stay the same), layers checkpointed, loss kernel, embeddings' place; logged in one line. On with a CUDA "
        "GPU or --max-memory; --no-memory-plan runs --batch-size, --grad-accum and --gradient-checkpointing as "
        "given."))
    compile_layers: bool | None = field(default=None, metadata=_help(
        "Compile each decoder layer with torch.compile (regional compilation): the same loss, fewer kernels "
        "(1.2x the tokens/s on Llama-3-8B); the first steps take longer (~70 s). Default: on a CUDA GPU when the "
        "run's planned tokens pay that back 3x (~12M tokens per process with no layer checkpointed, ~8M with "
        "all) and the memory plan keeps its micro-batches, never on CPU or with Unsloth; logged in one line. "
        "transformers backend only."))
    liger_kernels: bool | None = field(default=None, metadata=_help(
        "Run each decoder layer's RMSNorm, SwiGLU and rotary embedding as Liger Kernel's fused Triton kernels "
        "(pip install \"hf_instruct_tune[liger]\"): the same loss, fewer kernels, less memory kept for backward, "
        "fast from the first step. Default: on a CUDA GPU when installed, for Llama-like models, unless the layers "
        "are compiled; logged in one line. transformers backend only."))
    fused_lora: bool | None = field(default=None, metadata=_help(
        "Run each LoRA projection (the frozen base matmul, 4-bit or dense, and the low-rank update) as one "
        "autograd node: the same loss within bf16 rounding, fewer kernel launches. Default: on a CUDA GPU unless "
        "the layers are compiled, never with DeepSpeed; projections with LoRA dropout, DoRA or a LoRA bias keep "
        "PEFT's forward; logged in one line. transformers backend only."))
    balance_ranks: bool = field(default=True, metadata=_help(
        "With several processes, share each step's rows out between them by work (tokens and attention), so none "
        "waits for a busier one: the same rows per step, the same loss. --no-balance-ranks deals them out in order, "
        "to repeat a run made that way exactly."))
    max_memory: float | None = field(default=None, metadata=_help(
        "Peak memory budget per GPU in GiB for the memory plan (default: the GPU's free memory)."))
    seed: int = field(default=3407, metadata=_help("Random seed."))
    logging_steps: int = field(default=1, metadata=_help("Log the loss every N steps."))
    report_to: list[str] = field(default_factory=lambda: ["none"], metadata=_help(
        "Where training logs go: none, or trackers transformers supports, comma-separated (tensorboard, wandb, "
        "trackio, mlflow, ...). TensorBoard writes to <output-dir>/checkpoints/runs."))
    save_steps: int | None = field(default=None, metadata=_help("Write a checkpoint every N steps."))
    save_total_limit: int | None = field(default=2, metadata=_help("Checkpoints to keep."))
    load_best_model_at_end: bool = field(default=False, metadata=_help(
        "With --eval-data: evaluate at every checkpoint (every --save-steps, else every epoch) and end with the "
        "adapter of the lowest evaluation loss, which is the one saved and published."))
    resume: bool = field(default=False, metadata=_help("Continue from the last checkpoint in --output-dir."))
    overwrite: bool = field(default=False, metadata=_help("Replace an adapter already in --output-dir."))
    backend: str = field(default="auto", metadata=_help(
        "auto, transformers or unsloth. auto: transformers with the package's packed path, measured "
        "faster than Unsloth's fastest configuration that fits the same memory at every budget from 8 GiB "
        "(BENCHMARKS.md); unsloth only when asked.",
        choices=("auto", "transformers", "unsloth")))
    load_in_4bit: bool = field(default=False, metadata=_help("Load the frozen base in 4-bit NF4 (bitsandbytes)."))
    gradient_checkpointing: bool | None = field(default=None, metadata=_help(
        "Recompute every layer's activations in backward (--no-gradient-checkpointing: none). Default: as many "
        "layers as the memory plan needs, none without a plan."))
    dtype: str = field(default="auto", metadata=_help("Weights dtype: auto, float32, bfloat16 or float16."))
    optim: str = field(default="adamw_torch_fused", metadata=_help(
        "Optimizer (transformers' names). The default is transformers' own: AdamW in fused kernels, fewer "
        "launches per step than adamw_torch."))
    trust_remote_code: bool = field(default=False, metadata=_help("Run Python code from the model repository."))
    allow_pickle: bool = field(default=False, metadata=_help("Allow loading pickle (*.bin) weights."))
    language: list[str] | None = field(default=None, metadata=_help("Language code(s) for the model card."))
    license: str | None = field(default=None, metadata=_help("License of the adapter, for the model card."))
    push_to: str | None = field(default=None, metadata=_help(
        "Hub repo to publish to after training; write access is checked before training starts."))
    private: bool = field(default=False, metadata=_help("Create the --push-to repo as private."))
    endpoint: str | None = field(default=None, metadata=_help("Hub endpoint (default: HF_ENDPOINT or huggingface.co)."))
    num_processes: int | None = field(default=None, metadata=_help(
        "Re-launch this command through `accelerate launch` with N processes."))
    fsdp: bool = field(default=False, metadata=_help(
        "With --num-processes: shard the base model across the GPUs with FSDP2 instead of giving each a whole copy "
        "(for a bf16 base too large for one GPU; with --load-in-4bit the 4-bit weights stay whole on every GPU "
        "and the rest is sharded). See docs/multi_gpu.md."))

    def __post_init__(self):
        for item in dataclasses.fields(self):
            setattr(self, item.name, _coerce(item, getattr(self, item.name)))
        if self.max_steps is None:
            self.max_steps = -1 if self.epochs is not None else DEFAULT_MAX_STEPS
        if self.epochs is None:
            self.epochs = 3.0
        if self.epochs <= 0:
            raise InputError(f"`epochs` should be positive, got {self.epochs}.", field="epochs")
        positive = ("batch_size", "grad_accum", "lora_r", "lora_alpha", "max_length", "logging_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise InputError(f"`{name}` should be at least 1, got {getattr(self, name)}.", field=name)
        if self.save_steps is not None and self.save_steps < 1:
            raise InputError(f"`save_steps` should be at least 1, got {self.save_steps}.", field="save_steps")
        if self.load_best_model_at_end and not self.eval_data:
            raise InputError("`load_best_model_at_end` needs evaluation data to choose the best checkpoint by; give "
                             "--eval-data", field="load_best_model_at_end")
        if self.max_steps == 0 or self.max_steps < -1:
            raise InputError(f"`max_steps` should be -1 or a positive number, got {self.max_steps}.", field="max_steps")
        if self.lr <= 0:
            raise InputError(f"`lr` should be positive, got {self.lr}.", field="lr")
        if self.max_memory is not None and self.max_memory <= 0:
            raise InputError(f"`max_memory` should be a positive number of GiB, got {self.max_memory}.",
                             field="max_memory")
        if not 0 <= self.lora_dropout < 1:
            raise InputError(f"`lora_dropout` should be in [0, 1), got {self.lora_dropout}.", field="lora_dropout")
        if self.report_to != ["none"]:
            from .reporting import check_report_to

            check_report_to(self.report_to)


# Options that say where things are or what to do with the result, rather than how to train.
_NOT_HYPERPARAMETERS = {"data", "model", "output_dir", "formatter", "template", "base_model_id", "dataset_name",
                        "eval_data", "resume", "overwrite", "push_to", "private", "endpoint", "num_processes",
                        "language", "license", "save_steps", "save_total_limit", "load_best_model_at_end", "logging_steps",
                        "report_to", "trust_remote_code",
                        "allow_pickle", "memory_plan", "max_memory", "fsdp"}


def changed_options(config: TrainConfig) -> dict[str, Any]:
    """The training settings of ``config`` that differ from ``train``'s defaults, by option name."""
    defaults = TrainConfig()
    return {item.name: getattr(config, item.name) for item in dataclasses.fields(TrainConfig)
            if item.name not in _NOT_HYPERPARAMETERS and getattr(config, item.name) != getattr(defaults, item.name)}


def _coerce(item: dataclasses.Field, value: Any) -> Any:
    """Check ``value`` against the field's type, converting strings from the command line."""
    kind = _base_type(item.type)
    if value is None:
        if "None" in str(item.type):
            return None
        value = "null"  # as the YAML said; reported below as the wrong type
    choices = item.metadata.get("choices")
    try:
        if kind is bool:
            if isinstance(value, str) and value.lower() in {"true", "false", "1", "0", "yes", "no"}:
                value = value.lower() in {"true", "1", "yes"}
            if not isinstance(value, bool):
                raise TypeError
        elif kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            value = int(value)
        elif kind is float:
            if isinstance(value, bool):
                raise TypeError
            value = float(value)
        elif kind is list:
            if isinstance(value, str):
                value = [part.strip() for part in value.split(",") if part.strip()]
            if not isinstance(value, list) or not all(isinstance(part, str) for part in value):
                raise TypeError
        elif kind is str and not isinstance(value, str):
            raise TypeError
    except (TypeError, ValueError):
        expected = {bool: "true or false", int: "an integer", float: "a number", list: "a list of names",
                    str: "text"}[kind]
        raise InputError(f"`{item.name}` should be {expected}, got {value!r}.", field=item.name) from None
    if choices and value not in choices:
        raise InputError(f"`{item.name}` should be one of {', '.join(choices)}, got {value!r}."
                         f"{did_you_mean(str(value), choices)}", field=item.name)
    return value


def _base_type(annotation: Any) -> type:
    annotation = eval(annotation, {**typing.__dict__, "list": list}) if isinstance(annotation, str) else annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    return typing.get_origin(annotation) or annotation


def field_type(item: dataclasses.Field) -> type:
    """The plain type of a config field (``bool``, ``int``, ``float``, ``str`` or ``list``)."""
    return _base_type(item.type)


def load_yaml_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML config into field values; unknown keys, secrets and wrong types are errors naming the key."""
    path = Path(path)
    if not path.is_file():
        raise InputError("config file not found", source=str(path))
    if path.suffix.lower() in _DATA_SUFFIXES:
        raise InputError(f"is a data file, not a YAML config: pass it with --data {path}", source=str(path))
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        location = f"line {mark.line + 1}" if mark else None
        raise InputError(f"malformed YAML: {getattr(error, 'problem', error)}", source=str(path),
                         location=location) from None
    except UnicodeDecodeError:
        raise InputError("is not UTF-8 text", source=str(path)) from None
    if not isinstance(values, dict):
        data_hint = f"; if this is training data, pass it with --data {path}" if isinstance(values, list) else ""
        raise InputError(f"expected a YAML config (a mapping of option names to values), got a "
                         f"{type(values).__name__}{data_hint}", source=str(path))
    known = {item.name for item in dataclasses.fields(TrainConfig)}
    normalized = {}
    for key, value in values.items():
        name = str(key)
        if name.replace("-", "_").lower() in _SECRET_KEYS:
            raise InputError("configs must not hold secrets; set HF_TOKEN or run `hf auth login` instead",
                             source=str(path), location=_key_line(path, key), field=str(key))
        if name not in known:
            underscored = name.replace("-", "_")
            hint = (f" YAML keys are spelled with underscores: did you mean '{underscored}'?"
                    if underscored in known else did_you_mean(name, known))
            raise InputError(f"unknown option.{hint}", source=str(path),
                             location=_key_line(path, key), field=str(key))
        normalized[name] = value
    return normalized


def _key_line(path: str | Path, key: Any) -> str | None:
    """``"line N"`` of a top-level ``key`` in a YAML file, for error messages."""
    try:
        node = yaml.compose(Path(path).read_text(encoding="utf-8"))
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        return None
    if isinstance(node, yaml.MappingNode):
        for key_node, _ in node.value:
            if str(key_node.value) == str(key) or str(key_node.value).replace("-", "_") == str(key):
                return f"line {key_node.start_mark.line + 1}"
    return None


def build_config(yaml_path: str | None, overrides: dict[str, Any]) -> TrainConfig:
    """Merge a YAML file and command-line overrides (flags win) into a checked :class:`TrainConfig`."""
    values = load_yaml_config(yaml_path) if yaml_path else {}
    values.update(overrides)
    source = yaml_path
    try:
        return TrainConfig(**values)
    except InputError as error:
        if source and error.field in values and error.field not in overrides:
            error.source = source
            error.location = _key_line(source, error.field)
            error.args = (error._format(),)
        raise
