"""Reading an adapter folder as untrusted input (it may come from anyone's Hub repo).

Nothing in it runs: weights are read from safetensors only (pickles refused unless allowed), a tokenizer
that asks for its own code (``auto_map``) is refused, templates render in Jinja2's sandbox, and every text
file is read only up to a size limit. Whatever is wrong is reported as one line naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import InputError
from .metadata import METADATA_FILE_NAME
from .outputs import ADAPTER_FILE

ADAPTER_CONFIG = "adapter_config.json"
PICKLED_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "adapter_model.ckpt")
MAX_SMALL_FILE = 1 << 20  # configs, metadata, templates
MAX_TOKENIZER_FILE = 64 << 20  # tokenizer.json of a large vocabulary is tens of MiB
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")


def read_text(path: Path, limit: int = MAX_SMALL_FILE) -> str:
    """The UTF-8 text of ``path``, refused when larger than ``limit`` bytes."""
    try:
        size = path.stat().st_size
        if size > limit:
            raise InputError(f"is {size:,} bytes, more than the {limit:,} this file may have", source=str(path))
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise InputError(f"is not UTF-8 text (byte {error.start})", source=str(path)) from None
    except OSError as error:
        raise InputError(f"cannot be read: {error.strerror}", source=str(path)) from None


def read_json_object(path: Path, limit: int = MAX_SMALL_FILE) -> dict[str, Any]:
    """The JSON object in ``path`` (size-limited), or a one-line :class:`InputError` naming the file."""
    try:
        data = json.loads(read_text(path, limit))
    except json.JSONDecodeError as error:
        raise InputError(f"malformed JSON: {error.msg}", source=str(path), location=f"line {error.lineno}") from None
    except RecursionError:
        raise InputError("JSON nested too deeply", source=str(path)) from None
    if not isinstance(data, dict):
        raise InputError(f"should hold a JSON object, got {type(data).__name__}", source=str(path))
    return data


def check_adapter_folder(folder: Path, *, allow_pickle: bool = False) -> None:
    """Refuse, before anything is loaded from ``folder``, what could run code or is not an adapter."""
    config = read_json_object(folder / ADAPTER_CONFIG) if (folder / ADAPTER_CONFIG).is_file() else None
    if config is None:
        raise InputError(f"no {ADAPTER_CONFIG} here; pass the folder 'hf-instruct-tune train' wrote", source=str(folder))
    for key in ("base_model_name_or_path", "peft_type"):
        if config.get(key) is not None and not isinstance(config[key], str):
            raise InputError(f"should be a string, got {type(config[key]).__name__}", source=str(folder / ADAPTER_CONFIG),
                             field=key)
    if not (folder / ADAPTER_FILE).is_file():
        pickled = [name for name in PICKLED_WEIGHTS if (folder / name).is_file()]
        if not pickled:
            raise InputError(f"no {ADAPTER_FILE} here", source=str(folder))
        if not allow_pickle:
            raise InputError(f"the adapter's weights are only a pickle ({pickled[0]}), which can run code when "
                             "loaded; convert it to safetensors, or pass --allow-pickle if you trust its source",
                             source=str(folder))
    for name in (METADATA_FILE_NAME, "prompt_template.jinja"):
        if (folder / name).is_file():
            read_text(folder / name)
    for name in TOKENIZER_FILES:
        path = folder / name
        if path.is_file() and path.stat().st_size > MAX_TOKENIZER_FILE:
            raise InputError(f"is {path.stat().st_size:,} bytes, more than the {MAX_TOKENIZER_FILE:,} a tokenizer "
                             "file may have", source=str(path))
    tokenizer_config = folder / "tokenizer_config.json"
    if tokenizer_config.is_file() and "auto_map" in read_json_object(tokenizer_config, MAX_TOKENIZER_FILE):
        raise InputError("the tokenizer asks to run code from the folder (auto_map); refused",
                         source=str(tokenizer_config), field="auto_map")


def _check_safetensors(path: Path) -> None:
    if not path.is_file():
        return
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as weights:
            names = list(weights.keys())
    except Exception as error:  # the safetensors parser reports a bad header in its own exception types
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InputError(f"is not a readable safetensors file: {detail}", source=str(path)) from None
    if not names:
        raise InputError("holds no tensors", source=str(path))


def load_tokenizer(folder: Path):
    """The tokenizer saved in ``folder``, without running code from it; load errors as one line."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception as error:  # transformers and tokenizers raise many types for a broken file
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"the tokenizer files cannot be loaded: {detail}", source=str(folder)) from None


def load_adapter(base_model, folder: Path):
    """``PeftModel.from_pretrained`` on a checked folder; load errors (mismatched shapes, ...) as one line."""
    from peft import PeftModel

    _check_safetensors(folder / ADAPTER_FILE)
    try:
        return PeftModel.from_pretrained(base_model, str(folder))
    except Exception as error:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"the adapter cannot be loaded onto its base model: {detail}", source=str(folder)) from None
