"""The ``train`` workflow: check everything, train, save the adapter atomically, optionally publish."""

from __future__ import annotations

import errno
import itertools
import logging
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

from .checkpoints import (CHECKPOINTS_DIR, DiskFullError, SaveOnInterrupt, last_checkpoint,
                          remove_incomplete_checkpoints, remove_run_checkpoints)
from .outputs import ADAPTER_FILE, check_output_dir, install_run, untrained_lora
from .config import TrainConfig, changed_options
from .data import DataSource, row_error
from .errors import InputError, InstructTuneError
from .formatters import get_formatter
from .layer_compilation import refuse_other_fusions
from .models import load_base_model, load_tokenizer, name_base_model, resolve_model
from .recipe import check_template_name

logger = logging.getLogger(__name__)


class TrainingInterrupted(InstructTuneError):
    """Training stopped on Ctrl-C after saving a checkpoint."""

    exit_code = 130


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    final_loss: float | None
    adapter_moved: bool = True  # False when every LoRA B matrix is still 0: the adapter is the base model


def run_training(config: TrainConfig) -> TrainResult:
    """Train a LoRA adapter as ``config`` says and save it to ``config.output_dir``.

    Every input is checked before anything is written. The finished adapter is written to a hidden
    sibling folder and renamed into place, so a crash never leaves a half-written adapter where a good
    one was. Files in ``output_dir`` that no run wrote are kept. One run at a time per ``output_dir``:
    a second is refused while the first is alive. With ``push_to``, write access is checked before
    training and the push happens last; a failed push leaves the saved adapter and says how to retry.
    """
    from .launch import process_rank
    from .run_lock import OutputFolderLock

    if process_rank() != 0 or not config.output_dir:  # rank 0 holds the lock for the whole launch
        return _run_training(config)
    with OutputFolderLock(config.output_dir):
        return _run_training(config)


def _run_training(config: TrainConfig) -> TrainResult:
    from .backends import resolve_backend
    from .launch import quiet_replicas

    quiet_replicas()  # under accelerate launch / torchrun every rank runs this; rank 0 speaks for them
    if not config.data:
        raise InputError("no training data; pass --data PATH (or `data:` in the config)", field="data")
    output_dir = Path(config.output_dir)
    source = DataSource.open(config.data, name=config.dataset_name)
    if config.formatter:
        get_formatter(config.formatter)
    check_template_name(config.template)
    template = config.template
    if (output_dir / "adapter_config.json").exists() and not (config.overwrite or config.resume):
        raise InputError("already holds an adapter; pass --overwrite to replace it, --resume to continue its "
                         "checkpoints, or choose another --output-dir", source=str(output_dir), field="output_dir")
    checkpoint = last_checkpoint(output_dir) if config.resume else None
    if config.resume and checkpoint is None:
        raise InputError(f"no checkpoint to resume from in {output_dir / CHECKPOINTS_DIR}", source=str(output_dir),
                         field="resume")
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError("exists and is not a folder; choose another --output-dir", source=str(output_dir),
                         field="output_dir")
    check_output_dir(output_dir)
    backend = resolve_backend(config.backend)
    spec = resolve_model(config.model, base_model_id=config.base_model_id)
    if config.push_to:
        from .hub.push import check_write_access

        check_write_access(config.push_to, endpoint=config.endpoint, token_hint=None)  # train has no --token

    tokenizer = load_tokenizer(spec, trust_remote_code=config.trust_remote_code)
    formatter, template = _check_data(source, config.formatter, template, tokenizer)
    model, peft_config = _load_model(config, spec, backend)
    trainer = _build_trainer(config, model, tokenizer, peft_config, source, template, spec, backend, formatter)

    _check_fsdp_saves_an_adapter(trainer)
    interrupt = SaveOnInterrupt()
    trainer.add_callback(interrupt)
    if checkpoint is not None:
        for partial in remove_incomplete_checkpoints(output_dir):
            logger.warning("Removed %s: a checkpoint left half-written by an earlier run", partial)
        logger.info("Resuming from %s", checkpoint)
    elif config.overwrite and trainer.is_world_process_zero():
        remove_run_checkpoints(output_dir)  # the replaced run's, which --resume must not mistake for ours
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except BaseException as error:
        _close_progress_bars(trainer)  # so the error starts on a line of its own
        if not isinstance(error, OSError) or error.errno != errno.ENOSPC:
            raise
        if trainer.is_world_process_zero():
            remove_incomplete_checkpoints(output_dir)
        kept = last_checkpoint(output_dir)
        where = f"; the last checkpoint, {kept}, is intact" if kept else "; no checkpoint was complete yet"
        raise DiskFullError(f"disk full while saving a checkpoint{where}. Free space and run the same command"
                            f"{' with --resume' if kept else ''}.") from None
    if interrupt.interrupted:
        saved = last_checkpoint(output_dir)
        raise TrainingInterrupted(f"interrupted at step {trainer.state.global_step}; checkpoint saved to {saved}. "
                                  "Run the same command with --resume to continue.")
    _save_final(trainer, output_dir)
    for tokenized in (trainer.train_data, trainer.eval_data):
        if tokenized is not None:  # each rank tokenized into its own temporary folder
            tokenized.cleanup()
    result = TrainResult(output_dir, trainer.state.global_step, trainer.run_metadata.results.get("final_loss"),
                         adapter_moved=not untrained_lora(output_dir / ADAPTER_FILE))
    if config.push_to and trainer.is_world_process_zero():
        _push_after_training(config, output_dir)
    return result


def _attn_implementation(config: TrainConfig) -> str | None:
    """The attention to load with: the named one, or for packed training on a CUDA GPU the fastest isolated one."""
    import torch

    from .packing import VARLEN_ATTENTION, best_attn_implementation, register_varlen_attention

    if config.attn_implementation == VARLEN_ATTENTION:
        return register_varlen_attention()
    if config.attn_implementation != "auto":
        return config.attn_implementation
    if packing_wanted(config) and torch.cuda.is_available():
        return best_attn_implementation()
    return None


def packing_wanted(config: TrainConfig) -> bool:
    """``--packing`` as given, else on with a CUDA GPU (the packed, isolated path) and off on CPU."""
    import torch

    return config.packing if config.packing is not None else torch.cuda.is_available()


def memory_plan_wanted(config: TrainConfig, backend: str) -> bool:
    """The memory plan runs for the transformers backend with a CUDA GPU or ``--max-memory``, unless turned off."""
    import torch

    return (config.memory_plan and backend == "transformers"
            and (torch.cuda.is_available() or config.max_memory is not None))


def _fused_loss(config: TrainConfig, backend: str) -> bool | None:
    """``--fused-loss`` as given, else as ``--loss-kernel`` says; else the plan's choice, or on for the
    transformers backend without a plan.

    Under FSDP the output head is sharded with the rest of the model, so the loss goes through it (off).
    """
    from .launch import fsdp_launched

    if config.fused_loss is not None:
        return config.fused_loss
    if config.loss_kernel != "auto":
        return config.loss_kernel != "plain"
    if fsdp_launched():
        return False
    if memory_plan_wanted(config, backend):
        return None
    return backend == "transformers"


def _load_model(config: TrainConfig, spec, backend: str):
    """The model to train and, for the plain transformers path, the LoRA config for the trainer to apply."""
    if backend == "unsloth" and config.fused_loss:  # explicitly asked for
        raise InputError("Unsloth computes its own fused loss; drop --fused-loss or use --backend transformers",
                         field="fused_loss")
    if backend == "unsloth" and config.loss_kernel != "auto":
        raise InputError("Unsloth computes its own loss; drop --loss-kernel or use --backend transformers",
                         field="loss_kernel")
    if backend == "unsloth" and config.offload_embeddings:
        raise InputError("--offload-embeddings works with --backend transformers only", field="offload_embeddings")
    for field in ("compile_layers", "liger_kernels", "fused_lora", "dequantize_base"):
        if backend == "unsloth" and getattr(config, field):
            raise InputError(f"--{field.replace('_', '-')} works with --backend transformers only (Unsloth patches "
                             "the layers with its own kernels)", field=field)
    refuse_other_fusions(config.compile_layers, {"--liger-kernels": config.liger_kernels,
                                                 "--fused-lora": config.fused_lora}, "--compile-layers")
    attn_implementation = _attn_implementation(config)
    if attn_implementation:
        logger.info("Attention: %s", attn_implementation)
    if backend == "unsloth" or config.load_in_4bit:
        from .backends import add_lora, load_for_training, offload_input_embeddings

        model, _ = load_for_training(spec.load_path, backend=backend, load_in_4bit=config.load_in_4bit,
                                     gguf_file=spec.gguf_file, trust_remote_code=config.trust_remote_code,
                                     max_seq_length=config.max_length, attn_implementation=attn_implementation)
        if spec.base_model_id:
            name_base_model(model, spec.base_model_id)
        if config.offload_embeddings:
            offload_input_embeddings(model)
        planned = memory_plan_wanted(config, backend)  # then the trainer sets checkpointing up layer by layer
        model = add_lora(model, backend=backend, r=config.lora_r, lora_alpha=config.lora_alpha,
                         lora_dropout=config.lora_dropout, target_modules=config.target_modules,
                         gradient_checkpointing=bool(config.gradient_checkpointing) and not planned, seed=config.seed,
                         use_rslora=config.rslora)
        return model, None
    from peft import LoraConfig

    model = load_base_model(spec, dtype=config.dtype, trust_remote_code=config.trust_remote_code,
                            allow_pickle=config.allow_pickle, attn_implementation=attn_implementation)
    peft_config = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                             target_modules=config.target_modules, bias="none", task_type="CAUSAL_LM",
                             use_rslora=config.rslora)
    return model, peft_config


def _close_progress_bars(trainer) -> None:
    from transformers.trainer_callback import ProgressCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, ProgressCallback) and callback.training_bar is not None:
            callback.training_bar.close()
            callback.training_bar = None


def _check_data(source: DataSource, formatter_name: str | None, template, tokenizer):
    """Format every row and encode the first, so bad data is reported before the model loads.

    Formatting is cheap next to loading a model; length checks need the trainer and come later.
    Returns the formatter name and the template (detected or defaulted as the trainer would).
    """
    from .chat_encoding import encoder_for
    from .formatters import FieldError, detect_formatter
    from .recipe import resolve_template
    from .tokenization import ExampleError

    rows = source.rows()
    first = next(rows, None)
    if first is None:
        raise InputError("the dataset is empty: it has no rows", source=source.display)
    name = formatter_name or detect_formatter(list(first[1]), source=source.display, location=first[0])
    format_row = get_formatter(name)
    template = resolve_template(template, name, tokenizer)
    encoder = encoder_for(tokenizer, template)
    for index, (location, row) in enumerate(itertools.chain([first], rows)):
        try:
            example = format_row(row)
            if index == 0:
                encoder.encode(example)
        except (FieldError, ExampleError) as error:
            raise row_error(error, source.display, location) from None
    return name, template


def _build_trainer(config: TrainConfig, model, tokenizer, peft_config, source: DataSource, template, spec, backend,
                   formatter: str | None = None):
    import torch
    from trl import SFTConfig

    from .launch import fsdp_launched
    from .trainer import InstructTrainer

    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    planned = memory_plan_wanted(config, backend)
    with warnings.catch_warnings():  # TRL's default for a deprecated name, not a choice of the user's
        warnings.filterwarnings("ignore", message=r"`gradient_checkpointing(_kwargs)?` is deprecated",
                                category=FutureWarning)
        args = SFTConfig(
            output_dir=str(Path(config.output_dir) / CHECKPOINTS_DIR),
            max_steps=config.max_steps, num_train_epochs=config.epochs, learning_rate=config.lr,
            warmup_steps=config.warmup_steps, lr_scheduler_type=config.lr_scheduler, weight_decay=config.weight_decay,
            per_device_train_batch_size=config.batch_size, gradient_accumulation_steps=config.grad_accum,
            max_length=config.max_length, seed=config.seed, data_seed=config.seed, logging_steps=config.logging_steps,
            save_strategy=_save_strategy(config), save_steps=config.save_steps or 500,
            save_total_limit=config.save_total_limit, report_to=config.report_to, use_cpu=not cuda, bf16=bf16,
            gradient_checkpointing=(config.gradient_checkpointing is not False) if planned
            else bool(config.gradient_checkpointing) and peft_config is not None,
            gradient_checkpointing_kwargs={"use_reentrant": False},
            ddp_find_unused_parameters=False,  # every LoRA weight gets a gradient: no graph walk per step
            optim=config.optim, packing=packing_wanted(config), per_device_eval_batch_size=config.batch_size,
            eval_strategy=_eval_strategy(config), eval_steps=config.save_steps if config.save_steps else None,
            load_best_model_at_end=config.load_best_model_at_end,
            metric_for_best_model="eval_loss" if config.load_best_model_at_end else None, dataloader_num_workers=0,
            disable_tqdm=False, save_only_model=False, dataloader_pin_memory=cuda,
            # a NaN or infinite loss is logged as it is; the filter read every step's loss back, mid-step
            logging_nan_inf_filter=False,
        )
    trainer = InstructTrainer(
        model=model, args=args, train_dataset=config.data, eval_dataset=config.eval_data,
        processing_class=tokenizer, peft_config=peft_config, template=template,
        formatter=formatter or config.formatter, train_on_prompt=config.train_on_prompt, overlong=config.overlong,
        base_model_id=spec.base_model_id, dataset_name=source.name, language=config.language,
        license=config.license, fused_loss=_fused_loss(config, backend), loss_kernel=config.loss_kernel,
        prefix_sharing=config.prefix_sharing,
        memory_plan=planned, max_memory=config.max_memory,
        gradient_checkpointing=config.gradient_checkpointing if planned else None,
        offload_embeddings=(False if fsdp_launched() else config.offload_embeddings) if planned else None,
        dequantize_base=config.dequantize_base,
        balance_ranks=config.balance_ranks,
        compile_layers=config.compile_layers,
        liger_kernels=config.liger_kernels,
        fused_lora=config.fused_lora,
    )
    trainer.run_metadata.base_model_source = spec.source
    trainer.run_metadata.training.update({"backend": backend, "load_in_4bit": config.load_in_4bit,
                                          "fused_loss": trainer.fused_loss, "fsdp": fsdp_launched(),
                                          "memory_plan": trainer.memory_plan.describe() if trainer.memory_plan else None,
                                          "changed": changed_options(config)})
    return trainer


def _save_strategy(config: TrainConfig) -> str:
    """Checkpoints every ``save_steps``; with ``load_best_model_at_end`` and no ``save_steps``, every epoch."""
    if config.save_steps:
        return "steps"
    return "epoch" if config.load_best_model_at_end else "no"


def _eval_strategy(config: TrainConfig) -> str:
    """Evaluation every epoch, or with ``load_best_model_at_end`` at every checkpoint (the Trainer compares them)."""
    if not config.eval_data:
        return "no"
    return _save_strategy(config) if config.load_best_model_at_end else "epoch"


def _check_fsdp_saves_an_adapter(trainer) -> None:
    """Under FSDP, refuse before training the settings a whole adapter cannot be saved from (FSDP1, sharded dicts)."""
    if not getattr(trainer, "is_fsdp_enabled", False):
        return
    from .fsdp import check_plugin

    check_plugin(trainer.accelerator.state.fsdp_plugin)


def _save_final(trainer, output_dir: Path) -> None:
    """Save the adapter into a staged sibling and rename it into place (rank 0 renames; all ranks save)."""
    staged = output_dir.with_name(f".{output_dir.name}.staged")
    if trainer.is_world_process_zero() and staged.exists():
        shutil.rmtree(staged)
    trainer.accelerator.wait_for_everyone()
    try:
        trainer.save_model(str(staged))
    except BaseException as error:
        if trainer.is_world_process_zero():
            shutil.rmtree(staged, ignore_errors=True)
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            kept = last_checkpoint(output_dir)
            where = f"; the last checkpoint, {kept}, is intact" if kept else ""
            raise DiskFullError(f"disk full while saving the adapter{where}. Free space and run with --resume.") from None
        raise
    if not trainer.is_world_process_zero():
        return
    _refuse_empty_adapter(staged, output_dir)
    (staged / "training_args.bin").unlink(missing_ok=True)  # a pickle; checkpoints keep their own copy
    checkpoints = output_dir / CHECKPOINTS_DIR
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        checkpoints.rename(staged / CHECKPOINTS_DIR)
    install_run(staged, output_dir)
    _write_card(output_dir)  # again: the card names the repo after the folder, no longer the staged one


class EmptyAdapterError(InstructTuneError):
    """The processes handed back an adapter without weights; nothing was put in place."""

    exit_code = 1


def _refuse_empty_adapter(staged: Path, output_dir: Path) -> None:
    """Never put an adapter file without a single tensor in place of a good one.

    Under FSDP the state dict gathered for saving can come back without the adapter's weights; PEFT then
    writes a valid but empty ``adapter_model.safetensors`` that loads silently as the base model.
    """
    from safetensors import safe_open

    weights = staged / ADAPTER_FILE
    if not weights.is_file():
        return
    with safe_open(str(weights), framework="pt") as opened:
        if any(True for _ in opened.keys()):
            return
    shutil.rmtree(staged, ignore_errors=True)
    kept = last_checkpoint(output_dir)
    where = f"; the last checkpoint, {kept}, is kept" if kept else ""
    raise EmptyAdapterError(f"the adapter gathered from the processes holds no weights (0 tensors), so it was not "
                            f"saved{where}. With FSDP, train with DDP instead (docs/multi_gpu.md).")


def _write_card(folder: Path) -> None:
    """Write this adapter's model card, ``README.md``, from the metadata saved with it."""
    from .hub.card import write_card

    write_card(folder)


def _push_after_training(config: TrainConfig, output_dir: Path) -> None:
    from .errors import PublishError
    from .hub.push import push_adapter

    try:
        push_adapter(output_dir, config.push_to, endpoint=config.endpoint, private=config.private, token_hint=None)
    except PublishError as error:
        raise PublishError(f"{error} The adapter is saved in {output_dir}; retry with: "
                           f"hf-instruct-tune upload {config.push_to} {output_dir}") from None
