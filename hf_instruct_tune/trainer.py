"""``InstructTrainer``: a drop-in ``trl.SFTTrainer`` that formats raw rows itself and keeps the stop token."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping
from itertools import islice
from pathlib import Path
from typing import Any

from trl import SFTConfig, SFTTrainer

from .collator import EOSSafeCollator
from .data import DataSource, tokenize_source
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
        **kwargs: Any,
    ):
        if train_dataset is None:
            raise InputError("InstructTrainer needs a `train_dataset` (raw rows: it formats and tokenizes them).")
        args = args if args is not None else SFTConfig(output_dir="outputs")
        tokenizer = processing_class if processing_class is not None else _tokenizer_for(model)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

        source = DataSource.open(train_dataset, name=dataset_name)
        formatter_name, format_row = _resolve_formatter(formatter, source)
        template = get_template(template) if template is not None else get_template(
            default_template_name(formatter_name, tokenizer))
        self.encoder = ExampleEncoder(tokenizer, template, max_length=args.max_length,
                                      train_on_prompt=train_on_prompt, overlong=overlong)
        self.prompt_template = template
        self.formatter_name = formatter_name
        self.train_data = tokenize_source(source, format_row, self.encoder)
        self.eval_data = (tokenize_source(DataSource.open(eval_dataset, name="eval_dataset"), format_row, self.encoder)
                          if eval_dataset is not None else None)

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

    # -- metadata ----------------------------------------------------------------------------------

    def _initial_metadata(self, model, source: DataSource, base_model_id, language, license, format_row):
        if base_model_id is None:
            base_model_id, base_source = _base_model_id(model)
        else:
            base_source = "hub"
        if isinstance(language, str):
            language = [language]
        example_messages, texts = None, []
        for _, row in islice(source.rows(), 200):
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
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            self.save_run_files(output_dir or self.args.output_dir)

    def save_run_files(self, output_dir: str | Path) -> None:
        """Write ``hf_instruct_tune.json`` and ``prompt_template.jinja`` into ``output_dir``."""
        output_dir = Path(output_dir)
        self._complete_metadata().save(output_dir)
        write_text_atomic(output_dir / TEMPLATE_FILE_NAME, self.prompt_template.source)


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
