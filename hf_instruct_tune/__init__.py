"""Instruction fine-tuning for the Hugging Face stack, EOS-safe by construction.

The public API is imported lazily, so that ``import hf_instruct_tune`` does not import transformers
(Unsloth must be imported before it when that backend is used).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .quiet import filter_third_party_logs as _filter_third_party_logs

__version__ = "0.1.0"
_filter_third_party_logs()

_EXPORTS = {
    "InstructTrainer": "trainer",
    "InstructConfig": "arguments",
    "load_model": "models",
    "EOSSafeCollator": "collator",
    "ExampleEncoder": "tokenization",
    "EncodedExample": "tokenization",
    "PromptTemplate": "templating",
    "get_template": "templating",
    "register_template": "templating",
    "ChatTemplate": "chat_template",
    "encoder_for": "chat_encoding",
    "resolve_recipe": "recipe",
    "get_formatter": "formatters",
    "register_formatter": "formatters",
    "detect_formatter": "formatters",
    "DataSource": "data",
    "tokenize_source": "data",
    "AdapterGenerator": "generation",
    "TrainConfig": "config",
    "TrainingMetadata": "metadata",
    "InputError": "errors",
    "InstructTuneError": "errors",
    "push_adapter": "hub.push",
    "pack_features": "packing",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'hf_instruct_tune' has no attribute {name!r}")


if TYPE_CHECKING:
    from .arguments import InstructConfig
    from .chat_encoding import encoder_for
    from .chat_template import ChatTemplate
    from .collator import EOSSafeCollator
    from .config import TrainConfig
    from .data import DataSource, tokenize_source
    from .errors import InputError, InstructTuneError
    from .formatters import detect_formatter, get_formatter, register_formatter
    from .generation import AdapterGenerator
    from .hub.push import push_adapter
    from .metadata import TrainingMetadata
    from .models import load_model
    from .packing import pack_features
    from .recipe import resolve_recipe
    from .templating import PromptTemplate, get_template, register_template
    from .tokenization import EncodedExample, ExampleEncoder
    from .trainer import InstructTrainer
