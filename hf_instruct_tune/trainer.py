"""``InstructTrainer``: a drop-in ``trl.SFTTrainer`` that formats raw rows itself and keeps the stop token."""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import Any

from transformers import Trainer
from transformers.trainer_callback import ProgressCallback
from trl import SFTConfig, SFTTrainer

from .adapter_casts import adapter_inputs_uncast
from .backends import offload_input_embeddings
from .checkpoints import checkpoint_step
from .collator import EOSSafeCollator
from .prefix_sharing import (BLOCK_MASK_ATTENTIONS, MASK_ATTENTIONS, SharingStats, attention_tokens_for,
                             merged_micro_batches, shared_prefix_loss)
from .data import DataSource, TokenizedData, is_pretokenized, tokenize_source
from .errors import InputError
from .fused_lora import apply_fused_lora, decide_fused_lora
from .language import guess_language
from .layer_compilation import (CompileDecision, compilation_blocker, compile_decoder_layers, decide_compilation,
                                planned_tokens, refuse_other_fusions)
from .launch import deepspeed_launched, fsdp_launched, world_size
from .liger_kernels import LigerDecision, apply_liger_kernels, decide_liger, liger_blocker
from .micro_batch_split import split_micro_batch
from .memory_plan import (CheckpointSwitch, Fixed, MemoryPlan, apply_checkpointing, micro_batch_tokens,
                          plan_for_trainer, planned_optimizer_steps, sampled_row_lengths, unwrapped_model)
from .progress import ReadableProgressCallback
from .quiet import filter_third_party_warnings
from .metadata import METADATA_FILE_NAME, TrainingMetadata, framework_versions, write_text_atomic
from .outputs import file_state, make_readable, written_since
from .throughput import Throughput
from .templating import TEMPLATE_FILE_NAME, PromptTemplate, get_template
from .chat_encoding import encoder_for
from .chat_template import ChatTemplate
from .recipe import default_template_name, resolve_recipe  # noqa: F401  (default_template_name: public name)
from .served_template import CHAT_TEMPLATE_FILE_NAME, served_chat_template
from .supervised_positions import KEY as SUPERVISED_POSITIONS, positions_loss, read_metrics

logger = logging.getLogger(__name__)


class InstructTrainer(SFTTrainer):
    """``SFTTrainer`` with EOS-safe labels: put it where your ``SFTTrainer`` was.

    It takes every ``SFTTrainer`` argument, plus:

    Args:
        template: ``"model"`` (the tokenizer's own ``chat_template``; ``"model:NAME"`` for a named one), a
            registered template name (``"alpaca"``, ``"alpaca-zh"``, ``"llama-3"``, ``"chatml"``, ...), a path to a
            ``.jinja`` file, or a :class:`~hf_instruct_tune.templating.PromptTemplate`. Default: ``"model"`` for
            conversations and prompt/completion rows when the tokenizer has a chat template, ``alpaca`` for
            Alpaca rows (see :mod:`hf_instruct_tune.recipe`).
        formatter: a registered formatter name or a callable; detected from the columns when omitted.
        train_on_prompt: also compute the loss on prompt tokens (default: responses only).
        overlong: ``"drop"`` rows longer than ``args.max_length`` (default) or ``"truncate"`` their responses.
        base_model_id: the Hub id of the base model, for the model card, when ``model`` was loaded from disk.
        dataset_name: the dataset's name for the model card (a Hub id makes the card link to it).
        language: language code(s) for the model card; guessed from the data when omitted.
        license: the adapter's license for the model card; never invented when omitted.
        fused_loss: compute the loss from the final hidden states and the ``lm_head`` weight
            (:func:`~hf_instruct_tune.loss.fused_cross_entropy`: Cut Cross-Entropy on CUDA when installed, else
            chunked logits recomputed in backward) instead of building ``[tokens, vocab]`` logits. The same
            loss and gradients, a fraction of the memory on large vocabularies. During ``train()`` the
            ``lm_head`` module is replaced by ``nn.Identity`` (it is put back for saving and afterwards);
            TRL's ``entropy`` and ``mean_token_accuracy`` metrics are not logged.
        loss_kernel: ``"plain"`` (logits, as ``fused_loss=False``), ``"chunked"`` (the fused loss in chunks of
            logits recomputed in backward) or ``"cce"`` (Cut Cross-Entropy); None or ``"auto"`` (default): as
            ``fused_loss`` says, or the memory plan decides (plain logits when they fit, else the fused loss).
        memory_plan: cut each optimizer step into micro-batches and choose the layers to checkpoint, the loss
            kernel and the input embeddings' place from the memory budget (:mod:`hf_instruct_tune.memory_plan`):
            ``args.per_device_train_batch_size x args.gradient_accumulation_steps`` rows per process and step
            stay the same, and so do the loss and gradients. None (default): on with a CUDA GPU or
            ``max_memory``. The plan is logged in one line and kept as ``trainer.memory_plan``.
        max_memory: the peak memory budget in GiB per process (default: this GPU's free memory).
        gradient_checkpointing: True recomputes every decoder layer, False none; None (default): as many as the
            memory plan needs, for each micro-batch by its own tokens (``args.gradient_checkpointing=False`` also
            means none), or ``args.gradient_checkpointing`` without a plan.
        offload_embeddings: keep the frozen input-embedding table in CPU memory (True), on the device
            (False), or as the plan decides (None).
        dequantize_base: keep a 4-bit base's weights dequantized once, in bf16 beside the 4-bit ones
            (:mod:`hf_instruct_tune.dequantized_base`): the same values each step would dequantize, no
            dequantization in the steps, the bf16 weights' memory (~13 GiB for Llama-3-8B). None (default): when the
            memory plan has room for it with no layer recomputed, plain logits and the embeddings on the GPU, on a
            CUDA GPU in one process, never with Unsloth.
        prefix_sharing: compute the token prefixes that rows of a micro-batch share once
            (:mod:`hf_instruct_tune.prefix_sharing`): the same loss and gradients, less work. None (default): on
            when the model's attention takes an explicit mask (``sdpa``, ``eager``) or a FlexAttention block mask
            (``torch_varlen``, the default on a GPU, and ``flex_attention``), for the micro-batches where it costs
            clearly less. On CPU it also merges the micro-batches of a step into one
            when they fit 16k tokens (same rows per step, same loss). The log says how many tokens it saved.
        balance_ranks: with several processes (DDP, FSDP), share each optimizer step's rows out between the
            processes and their micro-batches by work (tokens, plus attention's quadratic part) rather than in
            order, so that no process waits for a busier one (:mod:`hf_instruct_tune.rank_balance`). Each step
            trains the same rows and the loss is the same (it is normalized by the step's supervised tokens on
            all processes). On by default; False deals the rows out as transformers does, for repeating a run
            made that way exactly (with LoRA dropout, each process draws its own masks). The log says how even
            the work is, with and without.
        compile_layers: compile each decoder layer with ``torch.compile`` (regional compilation,
            :mod:`hf_instruct_tune.layer_compilation`): the same loss, fewer kernels per step once the first
            steps have compiled them. None (default): on a CUDA GPU when the planned tokens pay the compilation
            back (~12M tokens per process with no layer checkpointed, ~8M with all) and the memory plan for
            compiled layers keeps the eager plan's micro-batches, never on CPU or with Unsloth. The decision is
            logged in one line and kept as ``trainer.compilation``.
        liger_kernels: run the decoder layers' RMSNorm, SwiGLU and rotary embedding as Liger Kernel's fused Triton
            kernels (:mod:`hf_instruct_tune.liger_kernels`; ``pip install "hf_instruct_tune[liger]"``): the same
            loss, fewer kernels and less memory kept for backward, from the first step. None (default): on a CUDA
            GPU when installed, for Llama-like models, unless the layers are compiled (which fuses the same work),
            with Unsloth or under FSDP. Setting both this and ``compile_layers`` to True is an error. The decision is
            logged in one line and kept as ``trainer.liger``.
        fused_lora: run each LoRA projection (its frozen base matmul, 4-bit or dense, and the low-rank update) as
            one autograd node (:mod:`hf_instruct_tune.fused_lora`): the same loss within bf16 rounding, fewer
            kernel launches. None (default): on a CUDA GPU, unless the layers are compiled or under FSDP; never
            with Unsloth or DeepSpeed; projections with LoRA dropout, DoRA or a LoRA bias keep PEFT's forward.
            Setting both this and ``compile_layers`` to True is an error. The decision is logged in one line and
            kept as ``trainer.fused_lora``.

    A ``datasets.Dataset`` that already has ``input_ids`` and ``labels`` columns is used as-is (no formatting,
    no template, no length check): labels are -100 where no loss is taken and hold the stop token.

    ``args.packing=True`` or ``args.padding_free=True`` trains on packed rows with per-example attention
    isolation (see :mod:`hf_instruct_tune.packing`) instead of TRL's packing.

    After ``train()``, ``trainer.tokens_per_second`` holds the real (non-padding) tokens per second of every
    process together, over the steps after the first five, and ``trainer.peak_memory_gib`` each process's peak
    GPU memory during training; both are also in ``hf_instruct_tune.json`` (``results``).

    Saving (``save_model``, checkpoints) also writes ``hf_instruct_tune.json`` (training metadata) and
    ``prompt_template.jinja`` (the exact template) next to the adapter; ``save_model()`` and
    ``create_model_card()`` write the package's model card (``README.md``, ``loss_curve.png``), and
    ``push_to_hub()`` publishes all of it in one commit, as ``hf-instruct-tune upload`` does. The saved
    tokenizer's ``chat_template`` renders the format the adapter was trained in, so ``apply_chat_template`` and
    servers prompt it exactly as training did.

    Warm-up is capped at a tenth of the run (``args.warmup_steps`` of 5 on a 10-step run gives 1), and the log
    says how many steps it took.
    """

    def __init__(
        self,
        model: Any,
        args: SFTConfig | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        *,
        template: str | Path | PromptTemplate | ChatTemplate | None = None,
        formatter: str | Callable[[Mapping], dict] | None = None,
        train_on_prompt: bool = False,
        overlong: str = "drop",
        base_model_id: str | None = None,
        dataset_name: str | None = None,
        language: str | list[str] | None = None,
        license: str | None = None,
        fused_loss: bool | None = None,
        loss_kernel: str | None = None,
        prefix_sharing: bool | None = None,
        memory_plan: bool | None = None,
        max_memory: float | None = None,
        gradient_checkpointing: bool | None = None,
        offload_embeddings: bool | None = None,
        dequantize_base: bool | None = None,
        balance_ranks: bool = True,
        compile_layers: bool | None = None,
        liger_kernels: bool | None = None,
        fused_lora: bool | None = None,
        **kwargs: Any,
    ):
        if train_dataset is None:
            raise InputError("InstructTrainer needs a `train_dataset` (raw rows: it formats and tokenizes them).")
        refuse_other_fusions(compile_layers, {"liger_kernels": liger_kernels, "fused_lora": fused_lora})
        if args is None:
            from .arguments import InstructConfig

            args = InstructConfig(output_dir="outputs")
        tokenizer = processing_class if processing_class is not None else _tokenizer_for(model)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

        source = DataSource.open(train_dataset, name=dataset_name)
        if is_pretokenized(train_dataset):
            formatter_name, format_row = "pretokenized", None
            template = get_template(template if template is not None else "raw")
        else:
            recipe = resolve_recipe(source, tokenizer, formatter=formatter, template=template)
            formatter_name, format_row, template = recipe.formatter_name, recipe.format_row, recipe.template
        self.encoder = encoder_for(tokenizer, template, max_length=args.max_length,
                                   train_on_prompt=train_on_prompt, overlong=overlong)
        self.prompt_template = template
        self.formatter_name = formatter_name
        self.train_data = self._tokenized(train_dataset, source, format_row)
        self.eval_data = (self._tokenized(eval_dataset, DataSource.open(eval_dataset, name="eval_dataset"), format_row)
                          if eval_dataset is not None else None)
        self.loss_kernel = _loss_kernel(loss_kernel, fused_loss)
        if self.loss_kernel is not None:
            fused_loss = self.loss_kernel != "plain"
        self.fused_loss = bool(fused_loss)
        self._lm_head: tuple[Any, str, Any] | None = None  # (parent module, attribute, the head) while swapped

        self.packing = bool(args.packing or args.padding_free)
        args.packing = False
        args.padding_free = False
        args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}
        self.prefix_sharing = _prefix_sharing_wanted(prefix_sharing, model)
        self.balance_ranks = balance_ranks
        self.rank_balance: Any = None  # the BalancedBatchSampler while training with several processes
        self.sharing_stats = SharingStats()
        if self.prefix_sharing:
            _merge_cpu_micro_batches(args, self.train_data.dataset)
        self.compilation: CompileDecision  # set by _plan_memory, which judges it from the plan
        self._fused_lora_asked = fused_lora
        self.liger = self._decide_liger(liger_kernels, model, args, compiled_layers=bool(compile_layers))
        self.memory_plan = self._plan_memory(model, args, kwargs.get("peft_config"), memory_plan, max_memory,
                                             Fixed(gradient_checkpointing, fused_loss, offload_embeddings,
                                                   dequantized_base=dequantize_base), compile_layers)
        (logger.warning if compile_layers and not self.compilation.compiled else logger.info)(
            self.compilation.describe())
        (logger.warning if liger_kernels and not self.liger.used else logger.info)(self.liger.describe())
        self.fused_lora = decide_fused_lora(fused_lora, device=_training_device(args),
                                            compiled_layers=self.compilation.compiled,
                                            unsloth=not isinstance(model, str) and _is_unsloth(model),
                                            fsdp=fsdp_launched(), deepspeed=_deepspeed_wanted(args))
        (logger.warning if fused_lora and not self.fused_lora.used else logger.info)(self.fused_lora.describe())
        if data_collator is None:
            data_collator = EOSSafeCollator(pad_token_id=tokenizer.pad_token_id, padding_free=self.packing,
                                            pad_to_multiple_of=args.pad_to_multiple_of,
                                            prefix_sharing=self.prefix_sharing,
                                            attention_tokens=attention_tokens_for(model),
                                            block_sparse_attention=_attention_of(model) in BLOCK_MASK_ATTENTIONS)
        else:
            warnings.warn("A custom `data_collator` replaces the EOS-safe collator; its labels are yours to check.",
                          stacklevel=2)

        self.run_metadata = self._initial_metadata(model, source, base_model_id, language, license, format_row)
        filter_third_party_warnings()
        super().__init__(
            model=model, args=args, data_collator=data_collator, train_dataset=self.train_data.dataset,
            eval_dataset=self.eval_data.dataset if self.eval_data else None, processing_class=tokenizer, **kwargs,
        )
        if any(type(callback) is ProgressCallback for callback in self.callback_handler.callbacks):
            self.remove_callback(ProgressCallback)
            self.add_callback(ReadableProgressCallback)
        if self.packing and isinstance(self.data_collator, EOSSafeCollator):
            attn = _attention_of(self.model)
            self.data_collator.flash_attn_kwargs = attn in VARLEN_ATTENTIONS
        if self.packing and isinstance(self.data_collator, EOSSafeCollator) and _takes_logits_to_keep(self.model):
            self.data_collator.supervised_positions = True
        if (isinstance(self.data_collator, EOSSafeCollator) and self.data_collator.prefix_sharing
                and self.memory_plan is not None and self.memory_plan.split_above_tokens):
            self.data_collator.shared_tokens_limit = self.memory_plan.split_above_tokens
        self.micro_batches_in_parts = 0
        self.checkpoint_switch: CheckpointSwitch | None = None
        if self.memory_plan is not None:
            apply_checkpointing(self.model, self.memory_plan.checkpointed_layers)
            if self.memory_plan.tokens_within_budget is not None:
                self.checkpoint_switch = CheckpointSwitch(self.model, self.memory_plan)
        from .dequantized_base import quantized_projections

        self.dequantized_base = bool(self.memory_plan.dequantized_base if self.memory_plan is not None
                                     else dequantize_base) and bool(quantized_projections(self.model))
        self.compile_layers = self.compilation.compiled
        if self.compile_layers:
            compile_decoder_layers(self.model)
        if self.liger.used:
            apply_liger_kernels(self.model)
        if self.fused_lora.used:
            apply_fused_lora(self.model)
        self.throughput = Throughput()
        self.tokens_per_second: float | None = None
        self.peak_memory_gib: list[float] | None = None
        self.timed_tokens = 0
        self.add_callback(self.throughput)
        if getattr(self, "is_fsdp_enabled", False):
            from .fsdp_prefetch import FSDPPrefetch

            self.add_callback(FSDPPrefetch())

    def _plan_memory(self, model, args, peft_config, wanted: bool | None, max_memory: float | None,
                     fixed: Fixed, compile_layers: bool | None) -> MemoryPlan | None:
        """Plan the steps (see ``memory_plan``) and set ``args`` and the model up for it; None when off.

        Also decides ``self.compilation`` from the plan's checkpointed layers, and plans for compiled layers
        when they will be (which then run without Liger's kernels when those were auto)."""
        import torch

        fixed = dataclasses.replace(fixed, loss_kernel=self.loss_kernel)
        if fixed.checkpointing is None and _checkpointing_arg(args) is False:
            fixed = dataclasses.replace(fixed, checkpointing=False)
        on = wanted if wanted is not None else (max_memory is not None or torch.cuda.is_available())
        lengths = sampled_row_lengths(self.train_data.dataset)
        if not on or isinstance(model, str):
            if fixed.checkpointing is not None:
                _set_checkpointing_arg(args, fixed.checkpointing)
            self.compilation = self._decide_compilation(compile_layers, model, args, lengths,
                                                        1.0 if _checkpointing_arg(args) else 0.0)
            self._drop_liger_for_compiled_layers()
            if fixed.embeddings_on_cpu and not isinstance(model, str):
                micro = args.per_device_train_batch_size
                micro_batches = planned_optimizer_steps(args, len(self.train_data.dataset), world_size()) * \
                    args.gradient_accumulation_steps
                offload_input_embeddings(model, reserve_tokens=micro_batch_tokens(lengths, micro, self.packing,
                                                                                  micro_batches))
            return None
        # a micro-batch of several processes is not cut into parts: they would then run different numbers of
        # forward and backward passes, and so of collectives; nor under DeepSpeed, which counts backward passes as
        # accumulated micro-batches. A shared-prefix row cannot be cut: one over the budget is laid out as usual
        # (the collator's ``shared_tokens_limit``)
        can_split = world_size() == 1 and not _deepspeed_wanted(args)
        # Unsloth runs its own 4-bit kernels; several processes (DDP, FSDP, DeepSpeed) were not measured with a kept
        # bf16 copy
        can_dequantize = world_size() == 1 and not (_is_unsloth(model) or _deepspeed_wanted(args))
        plan = plan_for_trainer(model, args, self.train_data.dataset, packed=self.packing, peft_config=peft_config,
                                max_memory=max_memory, fixed=fixed, row_lengths=lengths, can_split=can_split,
                                liger_layers=self.liger.used, can_dequantize=can_dequantize)
        # judged at the eager plan's checkpointed layers: planned for compiled layers, as many or fewer are
        # checkpointed, which only adds to what compiling saves
        self.compilation = self._decide_compilation(compile_layers, model, args, lengths,
                                                    plan.checkpointed_layers / max(plan.layers, 1))
        if self.compilation.compiled:
            compiled_plan = plan_for_trainer(model, args, self.train_data.dataset, packed=self.packing,
                                             peft_config=peft_config, max_memory=max_memory, fixed=fixed,
                                             row_lengths=lengths, compiled_layers=True, can_split=can_split,
                                             can_dequantize=can_dequantize)
            if self.compilation.asked is None and compiled_plan.grad_accum > plan.grad_accum:
                # more, smaller micro-batches cost more than compiling saves (8 GiB on the 8B bench: 4,994 tok/s
                # compiled at 8 x 2 against 5,945 eager at 16 x 1)
                self.compilation = dataclasses.replace(
                    self.compilation, compiled=False,
                    reason=f"auto: compiled layers would need {compiled_plan.grad_accum} micro-batches a step "
                           f"within this budget, eager layers {plan.grad_accum}")
            else:
                plan = compiled_plan
        self._drop_liger_for_compiled_layers()
        if fsdp_launched():  # every process recomputes the same layers: FSDP's gathers follow the layers run
            plan = dataclasses.replace(plan, tokens_within_budget=None)
        args.per_device_train_batch_size = plan.micro_batch
        args.gradient_accumulation_steps = plan.grad_accum
        _set_checkpointing_arg(args, False)  # the plan's layers are set after PEFT wraps the model
        if plan.embeddings_on_cpu:
            reserve = plan.micro_batch_tokens or 0
            if plan.split_above_tokens:
                reserve = min(reserve, plan.split_above_tokens)
            offload_input_embeddings(model, reserve_tokens=reserve)
        self.fused_loss = plan.fused_loss
        logger.info(plan.describe())
        return plan

    def _drop_liger_for_compiled_layers(self) -> None:
        """Compiled layers fuse what Liger's kernels would: auto leaves them out then."""
        if self.compilation.compiled and self.liger.used and self.liger.asked is None:
            self.liger = LigerDecision(False, None, "auto: the compiled layers fuse the same work")

    def _decide_liger(self, asked: bool | None, model, args, *, compiled_layers: bool) -> LigerDecision:
        """``liger_kernels`` resolved (see :func:`~hf_instruct_tune.liger_kernels.decide_liger`)."""
        device = _training_device(args)
        return decide_liger(asked, model=model, device=device, compiled_layers=compiled_layers,
                            unsloth=not isinstance(model, str) and _is_unsloth(model), fsdp=fsdp_launched(),
                            blocker=liger_blocker(model, device) if asked is not False else None)

    def _decide_compilation(self, asked: bool | None, model, args, lengths: list[int],
                            checkpointed_fraction: float) -> CompileDecision:
        """``compile_layers`` resolved (see :func:`~hf_instruct_tune.layer_compilation.decide_compilation`), from the
        sampled row ``lengths`` of the training data."""
        if asked is None and self.liger.asked:
            return CompileDecision(False, None, "auto: liger_kernels=True fuses the layers' elementwise work")
        if asked is None and self._fused_lora_asked:
            return CompileDecision(False, None, "auto: fused_lora=True fuses the LoRA projections")
        device = _training_device(args)
        tokens = planned_tokens(sum(lengths) / max(len(lengths), 1), len(self.train_data.dataset),
                                rows_per_step=args.per_device_train_batch_size * args.gradient_accumulation_steps,
                                max_steps=args.max_steps, epochs=args.num_train_epochs, processes=world_size())
        return decide_compilation(asked, device=device, planned_tokens=tokens,
                                  checkpointed_fraction=checkpointed_fraction,
                                  unsloth=not isinstance(model, str) and _is_unsloth(model), fsdp=fsdp_launched(),
                                  blocker=compilation_blocker(model, device))

    def _tokenized(self, data, source: DataSource, format_row) -> TokenizedData:
        if is_pretokenized(data):
            return TokenizedData(dataset=data, rows=len(data), dropped_overlong=0, truncated=0)
        if format_row is None:
            raise InputError("`train_dataset` is pre-tokenized (`input_ids` and `labels` columns), so "
                             "`eval_dataset` should be too; got the columns " + ", ".join(source.columns()))
        return tokenize_source(source, format_row, self.encoder)

    # -- fused loss --------------------------------------------------------------------------------

    def train(self, *args: Any, **kwargs: Any):
        """``Trainer.train``; with ``fused_loss`` the ``lm_head`` is swapped out for its duration only. Under autocast
        the LoRA layers take their inputs uncast (:mod:`.adapter_casts`) for its duration only, and a 4-bit base
        kept dequantized (``dequantize_base``) is so for its duration only: its memory is freed at the end."""
        from .dequantized_base import kept_dequantized

        with kept_dequantized(self.model, self.dequantized_base), \
                adapter_inputs_uncast(self.model, autocast=bool(getattr(self.accelerator, "native_amp", False))):
            if not self.fused_loss:
                result = super().train(*args, **kwargs)
            else:
                with self._hidden_states_out():
                    result = super().train(*args, **kwargs)
        if self.sharing_stats.batches and self.is_world_process_zero():
            logger.info(self.sharing_stats.summary())
        self._sum_throughput()
        return result

    def _sum_throughput(self) -> None:
        """Add up every process's own tokens per second (not process 0's times the count) for the metadata."""
        import torch

        rate = self.throughput.tokens_per_second()
        local = [rate or 0.0, self.throughput.peak_memory_gib() or 0.0, self.throughput.timed_tokens()]
        gathered = self.accelerator.gather(torch.tensor([local], device=self.accelerator.device, dtype=torch.float64))
        rates, peaks, tokens = gathered[:, 0], gathered[:, 1], gathered[:, 2]
        self.tokens_per_second = float(rates.sum()) if rate is not None else None
        self.peak_memory_gib = [round(float(p), 2) for p in peaks] if torch.cuda.is_available() else None
        self.timed_tokens = int(tokens.sum())
        if self.tokens_per_second and self.is_world_process_zero():
            logger.info("Throughput: %s real tokens/s%s (after the first steps)", f"{self.tokens_per_second:,.0f}",
                        f" over {len(rates)} processes" if len(rates) > 1 else "")

    def get_train_dataloader(self):
        """The Trainer's loader; with several processes and ``balance_ranks``, each step's rows shared out by work."""
        loader = super().get_train_dataloader()
        if self.balance_ranks and self.args.world_size > 1 and self.args.average_tokens_across_devices:
            from .rank_balance import balance_loader

            self.rank_balance = balance_loader(
                loader, [len(ids) for ids in self.train_dataset["input_ids"]],
                attention_tokens=attention_tokens_for(self.model), batch_size=self._train_batch_size,
                grad_accum=self.args.gradient_accumulation_steps, report=self.is_world_process_zero())
        return loader

    def get_eval_dataloader(self, eval_dataset=None):
        """Evaluation batches are laid out as usual (TRL's metrics read their logits row by row)."""
        collator = self.data_collator
        if isinstance(collator, EOSSafeCollator) and (collator.prefix_sharing or collator.supervised_positions):
            self.data_collator = dataclasses.replace(collator, prefix_sharing=False, supervised_positions=False)
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = collator

    @contextmanager
    def _hidden_states_out(self) -> Iterator[None]:
        """Replace the output head by ``nn.Identity``, so the (DDP-wrapped) forward returns hidden states."""
        import torch

        if self._lm_head is not None:  # already swapped (a nested call)
            yield
            return
        self._lm_head = _find_lm_head(self.model)
        parent, name, head = self._lm_head
        setattr(parent, name, torch.nn.Identity())
        try:
            yield
        finally:
            setattr(parent, name, head)
            self._lm_head = None

    @contextmanager
    def _lm_head_restored(self) -> Iterator[None]:
        """Put the real head back for a while (saving a checkpoint in the middle of training)."""
        if self._lm_head is None:
            yield
            return
        parent, name, head = self._lm_head
        identity = getattr(parent, name)
        setattr(parent, name, head)
        try:
            yield
        finally:
            setattr(parent, name, identity)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """``Trainer.training_step``; a micro-batch longer than the memory plan holds runs in parts, each its own
        forward and backward (:mod:`~hf_instruct_tune.micro_batch_split`). Only where the loss is a sum over
        the step's supervised tokens divided by their count (``num_items_in_batch``), so the parts add up to
        the whole."""
        limit = self.memory_plan.split_above_tokens if self.memory_plan is not None else None
        if limit and num_items_in_batch is not None and self._loss_sums_over_tokens():
            parts = split_micro_batch(inputs, limit)
            if len(parts) > 1:
                self.micro_batches_in_parts += 1
                loss = super().training_step(model, parts[0], num_items_in_batch)
                for part in parts[1:]:
                    loss = loss + super().training_step(model, part, num_items_in_batch)
                return loss
        return super().training_step(model, inputs, num_items_in_batch)

    def _loss_sums_over_tokens(self) -> bool:
        """The loss is normalized by ``num_items_in_batch`` (the fused loss, or a model taking loss kwargs)."""
        return self._lm_head is not None or bool(getattr(self, "model_accepts_loss_kwargs", False))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's loss; with ``fused_loss`` (inside ``train()``), the fused cross-entropy from hidden states."""
        if model.training:
            self.throughput.count(inputs)
            if self.checkpoint_switch is not None:
                self.checkpoint_switch.set_for(inputs)
        if "loss_positions" in inputs:
            return self._shared_prefix_loss(model, inputs, return_outputs, num_items_in_batch)
        if SUPERVISED_POSITIONS in inputs:
            return self._supervised_positions_loss(model, inputs, return_outputs, num_items_in_batch)
        if self._lm_head is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                         num_items_in_batch=num_items_in_batch)
        from .loss import fused_cross_entropy

        head = self._lm_head[2]
        labels = inputs.pop("labels")
        inputs["use_cache"] = False
        outputs = model(**inputs)
        hidden = outputs.logits  # the head is an Identity: the final normed hidden states
        scale = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
        config = getattr(self.model, "config", None)
        loss = fused_cross_entropy(hidden, head.weight, labels, bias=head.bias, num_items_in_batch=num_items_in_batch,
                                   softcap=getattr(config, "final_logit_softcapping", None),
                                   num_processes=scale if num_items_in_batch is not None else 1,
                                   implementation=self._fused_implementation)
        mode = "train" if self.model.training else "eval"
        if mode == "train" and hasattr(self, "_total_train_tokens"):  # TRL's `num_tokens` metric
            local = inputs["attention_mask"].sum() if "attention_mask" in inputs else labels.numel()
            self._total_train_tokens += self._summed_over_processes(local, labels.device)
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        if return_outputs:
            outputs.logits = head(hidden.to(head.weight.dtype)).float()
            return loss, outputs
        return loss

    @property
    def _fused_implementation(self) -> str:
        """The fused loss's kernel: the one given, else its own choice (Cut Cross-Entropy where it runs)."""
        return self.loss_kernel if self.loss_kernel in ("chunked", "cce") else "auto"

    def _loss_options(self, num_items_in_batch) -> dict:
        """What the package's own losses take besides the model and the batch: the head (None: the model's own),
        the logit softcap, the normalization over the step's supervised tokens and processes, the fused kernel."""
        scale = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
        config = getattr(self.model, "config", None)
        return {"head": self._lm_head[2] if self._lm_head is not None else None,
                "softcap": getattr(config, "final_logit_softcapping", None),
                "num_items_in_batch": num_items_in_batch,
                "num_processes": scale if num_items_in_batch is not None else 1,
                "implementation": self._fused_implementation}

    def _count_train_tokens(self, inputs) -> None:
        """TRL's ``num_tokens`` metric, for a training batch whose loss the package computed."""
        if self.model.training and hasattr(self, "_total_train_tokens"):
            self._total_train_tokens += self._summed_over_processes(inputs["input_ids"].numel(),
                                                                    inputs["input_ids"].device)
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]

    def _shared_prefix_loss(self, model, inputs, return_outputs, num_items_in_batch):
        loss, outputs = shared_prefix_loss(model, inputs, stats=self.sharing_stats,
                                           **self._loss_options(num_items_in_batch))
        self._count_train_tokens(inputs)
        return (loss, outputs) if return_outputs else loss

    def _supervised_positions_loss(self, model, inputs, return_outputs, num_items_in_batch):
        metrics = self._metrics["train" if self.model.training else "eval"] if hasattr(self, "_metrics") else None
        loss, outputs = positions_loss(model, inputs, metrics=metrics, **self._loss_options(num_items_in_batch))
        self._count_train_tokens(inputs)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """TRL's ``log``; the metrics the packed loss kept on the device are read here, once per logging step."""
        for metrics in getattr(self, "_metrics", {}).values():
            read_metrics(metrics)
        super().log(logs, *args, **kwargs)

    def _summed_over_processes(self, count, device) -> int:
        """``count`` (an int, or a tensor on ``device``) summed over the processes. An int in one process is
        returned as it is: reading a GPU tensor back would make the CPU wait for the forward to finish before it
        queues the backward."""
        import torch

        if isinstance(count, int) and self.accelerator.num_processes == 1:
            return count
        local = count if isinstance(count, torch.Tensor) else torch.tensor(count, device=device)
        return int(self.accelerator.gather_for_metrics(local).sum().item())

    # -- schedule ----------------------------------------------------------------------------------

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """TRL's scheduler, with the warm-up capped at a tenth of the run so short runs train from step 1."""
        if self.lr_scheduler is None:
            asked = self.args.get_warmup_steps(num_training_steps)
            used = min(asked, num_training_steps // WARMUP_FRACTION)
            if used != asked:
                self.args.warmup_steps = used
            if self.is_world_process_zero():
                capped = f" ({asked} asked; at most 1/{WARMUP_FRACTION} of the run)" if used != asked else ""
                # a shortened warm-up is a change to what was asked: shown even where INFO logs are not
                logger.log(logging.WARNING if capped else logging.INFO, "Warm-up: %d of %d steps%s", used,
                           num_training_steps, capped)
        return super().create_scheduler(num_training_steps, optimizer)

    # -- metadata ----------------------------------------------------------------------------------

    def _initial_metadata(self, model, source: DataSource, base_model_id, language, license, format_row):
        if base_model_id is None:
            base_model_id, base_source = _base_model_id(model)
        else:
            base_source = "hub"
        if isinstance(language, str):
            language = [language]
        example_messages, texts = None, []
        for _, row in islice(source.rows(), 200) if format_row is not None else ():
            normalized = format_row(row)
            if "messages" in normalized:
                if example_messages is None:
                    example_messages = normalized["messages"]
                texts += [m["content"] + " " + m.get("input", "") for m in normalized["messages"]]
            else:
                texts.append(normalized["text"])
        if language is None:
            guessed = guess_language(texts)
            language = [guessed] if guessed else None
        example = {}
        if example_messages:
            prompt_messages = example_messages[: max(i for i, m in enumerate(example_messages) if m["role"] == "assistant")]
            last_user = next((m for m in reversed(prompt_messages) if m["role"] == "user"), {})
            example = {"instruction": last_user.get("content", ""), "input": last_user.get("input", ""),
                       "messages": prompt_messages, "rendered_prompt": self.encoder.render_prompt(prompt_messages)}
        is_hub = source.path is None and "/" in (source.name or "") and not Path(source.name).exists()
        return TrainingMetadata(
            base_model=base_model_id,
            base_model_source=base_source,
            dataset={"name": source.name, "rows": self.train_data.rows, "trained_rows": len(self.train_data.dataset),
                     "dropped_overlong": self.train_data.dropped_overlong, "truncated": self.train_data.truncated,
                     "sha256": source.sha256, "is_hub_dataset": is_hub},
            template={"name": self.prompt_template.name, "text": self.prompt_template.source,
                      "stop_token": self.encoder.stop_text, "multi_turn": self.prompt_template.multi_turn},
            formatter=self.formatter_name,
            language=language,
            license=license,
            example=example,
        )

    def _complete_metadata(self) -> TrainingMetadata:
        metadata = self.run_metadata
        peft_config = getattr(self.model, "peft_config", None)
        if peft_config:
            config = next(iter(peft_config.values()))
            targets = config.target_modules
            metadata.lora = {"r": config.r, "alpha": config.lora_alpha, "dropout": config.lora_dropout,
                             "rslora": bool(getattr(config, "use_rslora", False)),
                             "target_modules": sorted(targets) if isinstance(targets, (set, list)) else targets}
        args = self.args
        metadata.training = {
            **metadata.training,
            "learning_rate": args.learning_rate, "max_steps": args.max_steps,
            "epochs": args.num_train_epochs if args.max_steps <= 0 else None,  # only used when max_steps is not
            "batch_size": args.per_device_train_batch_size, "grad_accum": args.gradient_accumulation_steps,
            "world_size": args.world_size, "max_length": args.max_length, "seed": args.seed,
            "lr_scheduler": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
            "warmup_steps": args.warmup_steps, "weight_decay": args.weight_decay, "optimizer": str(
                getattr(args.optim, "value", args.optim)), "packing": self.packing,
            "train_on_prompt": self.encoder.train_on_prompt, "overlong": self.encoder.overlong,
            "prefix_sharing": self.prefix_sharing, "balance_ranks": self.rank_balance is not None,
            "compile_layers": self.compilation.as_metadata(),
            "liger_kernels": self.liger.as_metadata(),
            "fused_lora": self.fused_lora.as_metadata(),
            "dequantized_base": self.dequantized_base,
        }
        metadata.training.setdefault("changed", changed_hyperparameters(args))
        history = [{"step": entry["step"], "loss": entry["loss"]} for entry in self.state.log_history if "loss" in entry]
        evals = [entry for entry in self.state.log_history if "eval_loss" in entry]
        best_step = checkpoint_step(self.state.best_model_checkpoint) if self.args.load_best_model_at_end else None
        published_eval = next((entry for entry in evals if entry.get("step") == best_step), None) or (
            evals[-1] if evals else None)  # the evaluation of the adapter that is saved
        summary = next((entry for entry in reversed(self.state.log_history) if "train_runtime" in entry), {})
        metadata.results = {
            "loss_history": history,
            "final_loss": history[-1]["loss"] if history else None,
            "best_loss": min(entry["loss"] for entry in history) if history else None,
            "train_loss": summary.get("train_loss"),
            "train_runtime_s": summary.get("train_runtime"),
            "first_loss": history[0]["loss"] if history else None,
            "global_step": self.state.global_step,
            "epochs_done": round(self.state.epoch or 0.0, 4),
            "rows_seen": round((self.state.epoch or 0.0) * len(self.train_data.dataset)),
            "tokens_per_second": self.tokens_per_second,
            "timed_tokens": self.timed_tokens,
            "step_seconds": self.throughput.step_seconds(),
            "step_tokens": self.throughput.step_tokens(),
            "step_peak_memory_gib": self.throughput.step_peak_gib(),
            "micro_batches_in_parts": self.micro_batches_in_parts,
            "checkpointed_layers_per_micro_batch": (
                {str(count): n for count, n in sorted(self.checkpoint_switch.counts.items())}
                if self.checkpoint_switch is not None else None),
            "peak_memory_gib_per_process": self.peak_memory_gib,
            "eval": {k: v for k, v in published_eval.items() if k.startswith("eval_")} if published_eval else None,
            "best_checkpoint_step": best_step,
        }
        metadata.versions = framework_versions()
        return metadata

    # -- saving ------------------------------------------------------------------------------------

    def create_accelerator_and_postprocess(self) -> None:
        """The Trainer's accelerator; under FSDP2 with bf16 (or fp16) mixed precision, gradients reduced in fp32
        and the model's outputs (the loss among them) left as computed (:func:`~hf_instruct_tune.fsdp.reduce_in_fp32`)."""
        super().create_accelerator_and_postprocess()
        if getattr(self, "is_fsdp_enabled", False):
            from .fsdp import reduce_in_fp32

            if reduce_in_fp32(self.accelerator.state.fsdp_plugin):
                logger.info("FSDP mixed precision: parameters in %s, gradients reduced in fp32, outputs uncast",
                            str(self.accelerator.state.fsdp_plugin.mixed_precision_policy.param_dtype)
                            .removeprefix("torch."))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Save the adapter (or model) and tokenizer, the training metadata, the prompt template and the model card.

        Checkpoints (``_internal_call``) get everything but the card.
        """
        folder = Path(output_dir or self.args.output_dir)
        before = file_state(folder) if self.args.should_save else {}
        with self._lm_head_restored():
            if getattr(self, "is_fsdp_enabled", False):
                self._save_sharded(output_dir)
            else:
                super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            written = written_since(folder, before)
            for name in written:
                make_readable(folder / name)
            ours = {METADATA_FILE_NAME, TEMPLATE_FILE_NAME, CHAT_TEMPLATE_FILE_NAME}
            card = set() if _internal_call else {"README.md", "loss_curve.png"}
            self.run_metadata.files = sorted(set(written) | ours | card)
            self.save_run_files(folder)
            if not _internal_call:
                self._write_card(folder)

    def _save_sharded(self, output_dir: str | None) -> None:
        """Under FSDP: the adapter gathered whole from every process, written by process 0 as on one GPU."""
        from .fsdp import adapter_state_dict

        state_dict = adapter_state_dict(self.model)
        if self.args.should_save:
            self._save(output_dir, state_dict=state_dict)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Under FSDP: the optimizer state gathered whole, written by process 0 next to the scheduler's."""
        if not getattr(self, "is_fsdp_enabled", False):
            return super()._save_optimizer_and_scheduler(output_dir)
        import torch
        from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME

        from .fsdp import save_optimizer

        save_optimizer(self.model, self.optimizer, Path(output_dir) / OPTIMIZER_NAME, write=self.args.should_save)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), Path(output_dir) / SCHEDULER_NAME)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Under FSDP: every process loads the checkpoint's whole adapter into its shard of the model."""
        if not getattr(self, "is_fsdp_enabled", False):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        from .fsdp import load_adapter

        load_adapter(self.model if model is None else model, resume_from_checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Under FSDP: every process loads the whole optimizer state into its shard, and the scheduler."""
        if not getattr(self, "is_fsdp_enabled", False) or checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        import torch
        from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME

        from .fsdp import load_optimizer

        folder = Path(checkpoint)
        if not (folder / OPTIMIZER_NAME).is_file() or not (folder / SCHEDULER_NAME).is_file():
            return  # as the Trainer does: a checkpoint saved without them resumes the weights only
        load_optimizer(self.model, self.optimizer, folder / OPTIMIZER_NAME)
        self.lr_scheduler.load_state_dict(torch.load(folder / SCHEDULER_NAME, weights_only=True))

    def _save_checkpoint(self, model, trial):
        """Write the checkpoint into a staging folder, then rename it into place (see :mod:`.checkpoints`)."""
        from .checkpoints import STAGING_DIR, publish_checkpoint, rotate_run_checkpoints

        run_dir = Path(self._get_output_dir(trial=trial))
        self._checkpoint_root = run_dir / STAGING_DIR
        try:
            # Skip TRL's generic card: a checkpoint carries the metadata, and the final save writes the real card.
            Trainer._save_checkpoint(self, model, trial)
        finally:
            self._checkpoint_root = None
        staged = run_dir / STAGING_DIR / f"checkpoint-{self.state.global_step}"
        self._point_best_checkpoint_at(run_dir, staged)
        self.accelerator.wait_for_everyone()  # every rank's files (RNG states) are in the staged folder
        if self.args.should_save:
            publish_checkpoint(staged, run_dir)
            rotate_run_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()

    def _point_best_checkpoint_at(self, run_dir: Path, staged: Path) -> None:
        """Where the Trainer recorded the staged folder as the best checkpoint, record the folder it is published as,
        in this process's state and in the staged ``trainer_state.json``, so that ``load_best_model_at_end`` and
        ``save_total_limit`` find it."""
        from transformers.trainer import TRAINER_STATE_NAME

        best = self.state.best_model_checkpoint
        if best is None or Path(best).parent != staged.parent:
            return
        self.state.best_model_checkpoint = str(run_dir / Path(best).name)
        if self.args.should_save:
            self.state.save_to_json(str(staged / TRAINER_STATE_NAME))

    def _load_best_model(self) -> None:
        """Under FSDP: every process loads the best checkpoint's whole adapter into its shard of the model."""
        if not getattr(self, "is_fsdp_enabled", False):
            return super()._load_best_model()
        from .fsdp import load_adapter

        logger.info("Loading the best checkpoint, %s (%s %s)", self.state.best_model_checkpoint,
                    self.args.metric_for_best_model, self.state.best_metric)
        load_adapter(self.model, self.state.best_model_checkpoint, field="load_best_model_at_end")

    def _get_output_dir(self, trial):
        staging = getattr(self, "_checkpoint_root", None)
        return str(staging) if staging is not None else super()._get_output_dir(trial)

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None,
                          tags: str | list[str] | None = None, **kwargs: Any) -> None:
        """Write the package's model card (``README.md``, and ``loss_curve.png`` with matplotlib) to ``args.output_dir``.

        The card is rendered from the run's metadata, saved alongside: the template verbatim with an example,
        the stop token, the data's rows and SHA-256, every setting that differs from its default, the steps,
        epochs and rows the run went through, and its losses. ``model_name``, ``dataset_name`` and ``tags``
        are accepted for ``SFTTrainer`` compatibility; the card names the repo ``args.hub_model_id``.
        """
        if not self.is_world_process_zero():
            return
        self.save_run_files(self.args.output_dir)
        self._write_card(self.args.output_dir)

    def push_to_hub(self, commit_message: str | None = None, blocking: bool = True, token: str | None = None,
                    revision: str | None = None, private: bool | None = None, **kwargs: Any):
        """Save, then publish to ``args.hub_model_id`` in one commit, as ``hf-instruct-tune upload`` does.

        The repo is created if needed; the adapter, tokenizer, ``prompt_template.jinja``, ``hf_instruct_tune.json``,
        the package's card and the loss curve are uploaded together (checkpoints and pickles never). The token is
        ``token``, ``args.hub_token``, ``HF_TOKEN`` or the saved login; the endpoint ``HF_ENDPOINT`` or the Hub.
        Returns the ``CommitInfo`` (``None`` on other processes, and when the repo already held these files).
        The upload always completes before returning (``blocking`` is accepted for compatibility).
        """
        from .hub.push import push_adapter

        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        output_dir = Path(self.args.output_dir)
        repo_id = self.args.hub_model_id or output_dir.resolve().name
        self._write_card(output_dir)
        return push_adapter(output_dir, repo_id, token=token or self.args.hub_token,
                            private=self.args.hub_private_repo if private is None else private,
                            revision=revision or self.args.hub_revision, commit_message=commit_message,
                            token_hint="pass token=... to push_to_hub()")

    def _write_card(self, output_dir: str | Path) -> None:
        from .hub.card import write_card

        write_card(output_dir, repo_id=self.args.hub_model_id)


    def save_run_files(self, output_dir: str | Path) -> None:
        """Write ``hf_instruct_tune.json`` and ``prompt_template.jinja`` into ``output_dir``, and next to a saved
        tokenizer the ``chat_template.jinja`` that renders this run's prompt format."""
        output_dir = Path(output_dir)
        self._complete_metadata().save(output_dir)
        write_text_atomic(output_dir / TEMPLATE_FILE_NAME, self.prompt_template.source)
        if (output_dir / CHAT_TEMPLATE_FILE_NAME).exists() or (output_dir / "tokenizer_config.json").exists():
            # the saved tokenizer serves the trained format: apply_chat_template renders this run's prompts
            write_text_atomic(output_dir / CHAT_TEMPLATE_FILE_NAME,
                              served_chat_template(self.prompt_template, self.encoder.stop_text,
                                                   adds_bos=self.encoder.adds_bos))


# The training arguments a model card lists when they differ from their defaults.
HYPERPARAMETER_FIELDS = (
    "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
    "warmup_steps", "lr_scheduler_type", "lr_scheduler_kwargs", "weight_decay", "optim", "adam_beta1", "adam_beta2",
    "adam_epsilon", "max_grad_norm", "seed", "data_seed", "max_length", "fp16", "bf16", "gradient_checkpointing",
    "label_smoothing_factor", "neftune_noise_alpha", "completion_only_loss", "assistant_only_loss", "loss_type",
)


def changed_hyperparameters(args) -> dict[str, Any]:
    """The training arguments in :data:`HYPERPARAMETER_FIELDS` whose values differ from their class's defaults."""
    import dataclasses

    changed = {}
    for item in dataclasses.fields(args):
        if item.name not in HYPERPARAMETER_FIELDS:
            continue
        if item.default is not dataclasses.MISSING:
            default = item.default
        elif item.default_factory is not dataclasses.MISSING:
            default = item.default_factory()
        else:
            continue
        value = getattr(args, item.name)
        plain = getattr(value, "value", value)
        if default is None and item.name in ("bf16", "gradient_checkpointing"):
            continue  # resolved from the machine, not chosen
        if plain != getattr(default, "value", default) and not (plain in ({}, None) and default in ({}, None)):
            changed[item.name] = plain if isinstance(plain, (int, float, str, bool, type(None))) else str(plain)
    return changed


WARMUP_FRACTION = 10
"""Warm-up takes at most ``1 / WARMUP_FRACTION`` of the optimizer steps."""

def _checkpointing_arg(args) -> bool | None:
    """Whether ``args`` asks the Trainer to checkpoint every layer (``activation_checkpointing`` on transformers
    that renamed ``gradient_checkpointing``)."""
    return getattr(args, "activation_checkpointing", args.gradient_checkpointing)


def _set_checkpointing_arg(args, on: bool) -> None:
    """Set both names: where ``activation_checkpointing`` exists the Trainer reads it alone, and the old name only
    mirrors it when the arguments are built, so setting ``gradient_checkpointing`` later would not reach it."""
    args.gradient_checkpointing = on
    if hasattr(args, "activation_checkpointing"):
        args.activation_checkpointing = on


def _loss_kernel(asked: str | None, fused_loss: bool | None) -> str | None:
    """``loss_kernel`` checked, and against ``fused_loss``; None for ``"auto"``."""
    from .loss import cce_available
    from .memory_plan import LOSS_KERNELS

    if asked in (None, "auto"):
        return None
    if asked not in LOSS_KERNELS:
        raise InputError(f"`loss_kernel` should be one of auto, {', '.join(LOSS_KERNELS)}, got {asked!r}.",
                         field="loss_kernel")
    if fused_loss is not None and fused_loss != (asked != "plain"):
        raise InputError(f"`loss_kernel` {asked!r} contradicts `fused_loss={fused_loss}`; give one of them.",
                         field="loss_kernel")
    if asked == "cce" and not cce_available():
        raise InputError("`loss_kernel` 'cce' needs the cut_cross_entropy package and a CUDA GPU; use 'chunked'.",
                         field="loss_kernel")
    return asked


def _prefix_sharing_wanted(asked: bool | None, model) -> bool:
    """``prefix_sharing`` as asked, or by default on when the model's attention takes an explicit or a block mask."""
    attn = _attention_of(model)
    masked = MASK_ATTENTIONS | BLOCK_MASK_ATTENTIONS
    if asked is None:
        return attn in masked and not _is_unsloth(model)
    if asked and attn not in masked:
        raise InputError(f"prefix sharing needs an attention that takes an explicit mask ({', '.join(sorted(masked))}); "
                         f"the model uses {attn!r}. Load it with attn_implementation='sdpa' or turn prefix sharing off.",
                         field="prefix_sharing")
    return bool(asked)


def _takes_logits_to_keep(model) -> bool:
    """The model's forward computes its head at the positions given as ``logits_to_keep`` (not Unsloth's)."""
    import inspect

    if _is_unsloth(model):
        return False
    try:
        return "logits_to_keep" in inspect.signature(unwrapped_model(model).forward).parameters
    except (TypeError, ValueError):
        return False


def _attention_of(model) -> str | None:
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def _training_device(args) -> str:
    """``"cuda"`` where a CUDA GPU is there and ``args.use_cpu`` is not set, else ``"cpu"``."""
    import torch

    return "cuda" if torch.cuda.is_available() and not args.use_cpu else "cpu"


def _deepspeed_wanted(args) -> bool:
    """Whether the run trains under DeepSpeed (a config in ``args``, or ``accelerate launch`` with DeepSpeed)."""
    return bool(getattr(args, "deepspeed", None)) or deepspeed_launched()


def _is_unsloth(model) -> bool:
    return "unsloth" in type(model).__module__.lower() or hasattr(model, "_unsloth_max_seq_length") or hasattr(
        getattr(model, "config", None), "unsloth_version")


def _merge_cpu_micro_batches(args, dataset) -> None:
    """On CPU, one micro-batch per optimizer step when it fits (see :func:`merged_micro_batches`)."""
    import torch

    if torch.cuda.is_available() or args.world_size > 1 or args.gradient_accumulation_steps == 1:
        return
    longest = max((len(ids) for ids in dataset["input_ids"]), default=0)
    batch, accum = merged_micro_batches(args.per_device_train_batch_size, args.gradient_accumulation_steps, longest)
    if (batch, accum) != (args.per_device_train_batch_size, args.gradient_accumulation_steps):
        logger.info("Micro-batches: %d rows x %d per step on CPU (%d x %d asked: the same rows and loss per step; "
                    "more rows share their prefixes)", batch, accum, args.per_device_train_batch_size,
                    args.gradient_accumulation_steps)
        args.per_device_train_batch_size, args.gradient_accumulation_steps = batch, accum


VARLEN_ATTENTIONS = {"flash_attention_2", "flash_attention_3", "torch_varlen"}
"""Attention implementations that isolate packed examples by ``cu_seq_lens`` (the collator then adds them)."""


def _find_lm_head(model) -> tuple[Any, str, Any]:
    """``(parent, attribute, head)`` of the model's output embedding, a plain ``nn.Linear``."""
    import torch

    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        raise InputError(f"`fused_loss` needs the output head to be a plain `nn.Linear`, got {type(head).__name__} "
                         "(a LoRA on `lm_head` or a model with its own head); train with `fused_loss=False`.")
    for name, module in model.named_modules():
        if module is head:
            parent_name, _, attribute = name.rpartition(".")
            return model.get_submodule(parent_name), attribute, head
    raise InputError("`fused_loss` could not find the output head among the model's modules.")


def _tokenizer_for(model):
    from transformers import AutoTokenizer

    name = model if isinstance(model, str) else model.config._name_or_path
    return AutoTokenizer.from_pretrained(name)


def _base_model_id(model) -> tuple[str | None, str]:
    name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", None)
    if not name or Path(name).expanduser().exists():
        return None, "local"
    return name, "hub"
