"""What a run trains on, resolved once: the data source, the formatter, the template and its stop token.

``train``, ``inspect`` and :class:`~hf_instruct_tune.trainer.InstructTrainer` all call :func:`resolve_recipe`
(or its parts), so the same rows get the same formatter and template everywhere; resolved objects passed
back in are kept as they are.

The default template: the tokenizer's own ``chat_template`` (``model``) for conversations and
prompt/completion rows when the tokenizer has one; ``alpaca`` for Alpaca rows; ``raw`` for ``text`` rows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .chat_template import MODEL_TEMPLATE, ChatTemplate
from .data import DataSource
from .errors import InputError
from .formatters import detect_formatter, get_formatter
from .templating import PromptTemplate, get_template

logger = logging.getLogger(__name__)

Template = PromptTemplate | ChatTemplate


@dataclass
class Recipe:
    """The resolved inputs of a run."""

    source: DataSource
    formatter_name: str
    format_row: Callable[[Mapping], dict]
    template: Template
    tokenizer: Any

    def encoder(self, **options):
        """The encoder for this template and tokenizer; it holds the stop token (``stop_text``, ``stop_token_id``)."""
        from .chat_encoding import encoder_for

        return encoder_for(self.tokenizer, self.template, **options)


def resolve_recipe(data: Any, tokenizer, *, formatter: str | Callable | None = None,
                   template: str | Path | Template | None = None, dataset_name: str | None = None) -> Recipe:
    """Open ``data``, pick its formatter (named, a callable, or detected) and its template (named or default)."""
    source = data if isinstance(data, DataSource) else DataSource.open(data, name=dataset_name)
    formatter_name, format_row = resolve_formatter(formatter, source)
    return Recipe(source, formatter_name, format_row, resolve_template(template, formatter_name, tokenizer), tokenizer)


def resolve_formatter(formatter: str | Callable | None, source: DataSource) -> tuple[str, Callable[[Mapping], dict]]:
    """``(name, function)`` of a named or callable formatter, or the one detected from ``source``'s columns."""
    if callable(formatter):
        return getattr(formatter, "__name__", "custom"), formatter
    name = formatter or detect_formatter(source.columns(), source=source.display)
    return name, get_formatter(name)


def resolve_template(template: str | Path | Template | None, formatter_name: str, tokenizer) -> Template:
    """The template object for a name, path or object; the default for ``formatter_name`` when ``None``."""
    if isinstance(template, (PromptTemplate, ChatTemplate)):
        return template
    name = str(template) if template is not None else default_template_name(formatter_name, tokenizer)
    if is_model_template(name):
        return ChatTemplate.from_tokenizer(tokenizer, name=name)
    return get_template(name)


def check_template_name(template: str | Path | Template | None) -> None:
    """Fail early on an unknown template name or a broken file (``model`` needs the tokenizer: checked later)."""
    if template is not None and not isinstance(template, ChatTemplate) and not is_model_template(str(template)):
        get_template(template)


def is_model_template(name: str) -> bool:
    """``model`` or ``model:NAME`` (a named chat template of the tokenizer)."""
    return name == MODEL_TEMPLATE or name.startswith(MODEL_TEMPLATE + ":")


def default_template_name(formatter_name: str, tokenizer) -> str:
    """The template used when none is named (see the module docstring)."""
    if formatter_name == "text":
        return "raw"
    if formatter_name == "alpaca":
        return "alpaca"
    if getattr(tokenizer, "chat_template", None):
        logger.info("Template: the tokenizer's own chat_template ('%s')", MODEL_TEMPLATE)
        return MODEL_TEMPLATE
    if formatter_name == "prompt_completion":
        return "alpaca"
    vocabulary = tokenizer.get_vocab()
    for template, token in (("chatml", "<|im_end|>"), ("llama-3", "<|eot_id|>")):
        if token in vocabulary:
            logger.info("Template: '%s' (the tokenizer has no chat_template but knows the stop token %s)",
                        template, token)
            return template
    raise InputError(f"no default template for '{formatter_name}' rows with this tokenizer: it has no chat_template; "
                     "name one with --template (`template=` in Python), e.g. chatml, llama-3, or a .jinja file")
