"""``InstructTrainer``: a drop-in ``trl.SFTTrainer`` that formats raw rows itself and keeps the stop token."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import Any

from trl import SFTConfig, SFTTrainer

from .collator import EOSSafeCollator
from .data import DataSource, TokenizedData, is_pretokenized, tokenize_source
from .errors import InputError
from .formatters import detect_formatter, get_formatter
from .language import guess_language
from .metadata import TrainingMetadata, framework_versions, write_text_atomic
from .templating import TEMPLATE_FILE_NAME, PromptTemplate, get_template
from .tokenization import ExampleEncoder

logger = logging.getLogger(__name__)


class InstructTrainer(SFTTrainer):
    """``SFTTrainer`` with EOS-safe labels: put it where your ``SFTTrainer`` was.

    It takes every ``SFTTrainer`` argument, plus:

    Args:
        template: a registered template name (``"alpaca"``, ``"alpaca-zh"``, ``"llama-3"``, ``"chatml"``, ...),
            a path to a ``.jinja`` file, or a :class:`~hf_instruct_tune.templating.PromptTemplate`.
            Default: ``alpaca`` for instruction data, the chat format whose stop token the tokenizer knows
            for conversations.
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

    A ``datasets.Dataset`` that already has ``input_ids`` and ``labels`` columns is used as-is (no formatting,
    no template, no length check): labels are -100 where no loss is taken and hold the stop token.

    ``args.packing=True`` or ``args.padding_free=True`` trains on packed rows with per-example attention
    isolation (see :mod:`hf_instruct_tune.packing`) instead of TRL's packing.

    Saving (``save_model``, checkpoints) also writes ``hf_instruct_tune.json`` (training metadata) and
    ``prompt_template.jinja`` (the exact template) next to the adapter.
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
        template: str | Path | PromptTemplate | None = None,
        formatter: str | Callable[[Mapping], dict] | None = None,
        train_on_prompt: bool = False,
        overlong: str = "drop",
        base_model_id: str | None = None,
        dataset_name: str | None = None,
        language: str | list[str] | None = None,
        license: str | None = None,
        fused_loss: bool = False,
        **kwargs: Any,
    ):
        if train_dataset is None:
            raise InputError("InstructTrainer needs a `train_dataset` (raw rows: it formats and tokenizes them).")
        args = args if args is not None else SFTConfig(output_dir="outputs")
        tokenizer = processing_class if processing_class is not None else _tokenizer_for(model)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

        source = DataSource.open(train_dataset, name=dataset_name)
        if is_pretokenized(train_dataset):
            formatter_name, format_row = "pretokenized", None
            template = get_template(template if template is not None else "raw")
        else:
            formatter_name, format_row = _resolve_formatter(formatter, source)
            template = get_template(template) if template is not None else get_template(
                default_template_name(formatter_name, tokenizer))
        self.encoder = ExampleEncoder(tokenizer, template, max_length=args.max_length,
                                      train_on_prompt=train_on_prompt, overlong=overlong)
        self.prompt_template = template
        self.formatter_name = formatter_name
        self.train_data = self._tokenized(train_dataset, source, format_row)
        self.eval_data = (self._tokenized(eval_dataset, DataSource.open(eval_dataset, name="eval_dataset"), format_row)
                          if eval_dataset is not None else None)
        self.fused_loss = fused_loss
        self._lm_head: tuple[Any, str, Any] | None = None  # (parent module, attribute, the head) while swapped

        self.packing = bool(args.packing or args.padding_free)
        args.packing = False
        args.padding_free = False
        args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}
        if data_collator is None:
            data_collator = EOSSafeCollator(pad_token_id=tokenizer.pad_token_id, padding_free=self.packing,
                                            pad_to_multiple_of=args.pad_to_multiple_of)
        else:
            warnings.warn("A custom `data_collator` replaces the EOS-safe collator; its labels are yours to check.",
                          stacklevel=2)

        self.run_metadata = self._initial_metadata(model, source, base_model_id, language, license, format_row)
        super().__init__(
            model=model, args=args, data_collator=data_collator, train_dataset=self.train_data.dataset,
            eval_dataset=self.eval_data.dataset if self.eval_data else None, processing_class=tokenizer, **kwargs,
        )
        if self.packing and isinstance(self.data_collator, EOSSafeCollator):
            attn = getattr(getattr(self.model, "config", None), "_attn_implementation", None)
            self.data_collator.flash_attn_kwargs = attn in VARLEN_ATTENTIONS

    def _tokenized(self, data, source: DataSource, format_row) -> TokenizedData:
        if is_pretokenized(data):
            return TokenizedData(dataset=data, rows=len(data), dropped_overlong=0, truncated=0)
        if format_row is None:
            raise InputError("`train_dataset` is pre-tokenized (`input_ids` and `labels` columns), so "
                             "`eval_dataset` should be too; got the columns " + ", ".join(source.columns()))
        return tokenize_source(source, format_row, self.encoder)

    # -- fused loss --------------------------------------------------------------------------------

    def train(self, *args: Any, **kwargs: Any):
        """``Trainer.train``; with ``fused_loss`` the ``lm_head`` is swapped out for its duration only."""
        if not self.fused_loss:
            return super().train(*args, **kwargs)
        with self._hidden_states_out():
            return super().train(*args, **kwargs)

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

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's loss; with ``fused_loss`` (inside ``train()``), the fused cross-entropy from hidden states."""
        if self._lm_head is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                         num_items_in_batch=num_items_in_batch)
        import torch

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
                                   num_processes=scale if num_items_in_batch is not None else 1)
        mode = "train" if self.model.training else "eval"
        if mode == "train" and hasattr(self, "_total_train_tokens"):  # TRL's `num_tokens` metric
            local = inputs["attention_mask"].sum() if "attention_mask" in inputs else torch.tensor(labels.numel(), device=labels.device)
            self._total_train_tokens += self.accelerator.gather_for_metrics(local).sum().item()
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        if return_outputs:
            outputs.logits = head(hidden.to(head.weight.dtype)).float()
            return loss, outputs
        return loss

    # -- saving ------------------------------------------------------------------------------------

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
            "learning_rate": args.learning_rate, "epochs": args.num_train_epochs, "max_steps": args.max_steps,
            "batch_size": args.per_device_train_batch_size, "grad_accum": args.gradient_accumulation_steps,
            "world_size": args.world_size, "max_length": args.max_length, "seed": args.seed,
            "lr_scheduler": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
            "warmup_steps": args.warmup_steps, "weight_decay": args.weight_decay, "optimizer": str(
                getattr(args.optim, "value", args.optim)), "packing": self.packing,
            "train_on_prompt": self.encoder.train_on_prompt, "overlong": self.encoder.overlong,
        }
        history = [{"step": entry["step"], "loss": entry["loss"]} for entry in self.state.log_history if "loss" in entry]
        evals = [entry for entry in self.state.log_history if "eval_loss" in entry]
        summary = next((entry for entry in reversed(self.state.log_history) if "train_runtime" in entry), {})
        metadata.results = {
            "loss_history": history,
            "final_loss": history[-1]["loss"] if history else None,
            "best_loss": min(entry["loss"] for entry in history) if history else None,
            "train_loss": summary.get("train_loss"),
            "train_runtime_s": summary.get("train_runtime"),
            "global_step": self.state.global_step,
            "eval": {k: v for k, v in evals[-1].items() if k.startswith("eval_")} if evals else None,
        }
        metadata.versions = framework_versions()
        return metadata

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Save the adapter (or model) and tokenizer, plus the training metadata and the prompt template."""
        with self._lm_head_restored():
            super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            self.save_run_files(output_dir or self.args.output_dir)

    def save_run_files(self, output_dir: str | Path) -> None:
        """Write ``hf_instruct_tune.json`` and ``prompt_template.jinja`` into ``output_dir``."""
        output_dir = Path(output_dir)
        self._complete_metadata().save(output_dir)
        write_text_atomic(output_dir / TEMPLATE_FILE_NAME, self.prompt_template.source)


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


def default_template_name(formatter_name: str, tokenizer) -> str:
    """The template used when none is named: Alpaca for instruction rows, a chat format for conversations."""
    if formatter_name in {"alpaca", "prompt_completion"}:
        return "alpaca"
    if formatter_name == "text":
        return "raw"
    vocabulary = tokenizer.get_vocab()
    for template, token in (("chatml", "<|im_end|>"), ("llama-3", "<|eot_id|>")):
        if token in vocabulary:
            logger.info("Template: '%s' (the tokenizer knows its stop token %s)", template, token)
            return template
    raise InputError(f"no default template for '{formatter_name}' rows with this tokenizer; name one with "
                     "--template (e.g. chatml, llama-3, or a path to a .jinja file)")


def _resolve_formatter(formatter, source: DataSource) -> tuple[str, Callable[[Mapping], dict]]:
    if callable(formatter):
        return getattr(formatter, "__name__", "custom"), formatter
    name = formatter or detect_formatter(source.columns(), source=source.display)
    return name, get_formatter(name)


def _tokenizer_for(model):
    from transformers import AutoTokenizer

    name = model if isinstance(model, str) else model.config._name_or_path
    return AutoTokenizer.from_pretrained(name)


def _base_model_id(model) -> tuple[str | None, str]:
    name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", None)
    if not name or Path(name).expanduser().exists():
        return None, "local"
    return name, "hub"
