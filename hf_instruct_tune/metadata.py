"""What a training run records next to its adapter, for inference and for the model card.

Saved as ``hf_instruct_tune.json``; the template used is saved beside it as ``prompt_template.jinja``
so that ``generate`` rebuilds the exact training prompt. Nothing here is a secret or a local path.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError

METADATA_FILE_NAME = "hf_instruct_tune.json"
SCHEMA_VERSION = 1


@dataclass
class TrainingMetadata:
    """Everything the model card and ``generate`` need to know about a run."""

    base_model: str | None = None
    base_model_source: str = "hub"  # "hub" | "local" | "embedded-gguf"
    dataset: dict[str, Any] = field(default_factory=dict)  # name, rows, trained_rows, sha256, is_hub_dataset
    template: dict[str, Any] = field(default_factory=dict)  # name, text, stop_token, multi_turn
    formatter: str | None = None
    lora: dict[str, Any] = field(default_factory=dict)  # r, alpha, dropout, target_modules
    training: dict[str, Any] = field(default_factory=dict)  # lr, epochs, max_steps, batch_size, ...
    results: dict[str, Any] = field(default_factory=dict)  # loss_history, final_loss, best_loss, eval, ...
    language: list[str] | None = None
    license: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    example: dict[str, Any] = field(default_factory=dict)  # instruction, input, rendered_prompt
    files: list[str] | None = None  # what the run wrote into its folder; nothing else there is replaced or uploaded
    schema_version: int = SCHEMA_VERSION

    def save(self, directory: str | Path) -> Path:
        """Write ``hf_instruct_tune.json`` into ``directory`` atomically."""
        path = Path(directory) / METADATA_FILE_NAME
        write_text_atomic(path, json.dumps(asdict(self), ensure_ascii=False, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> TrainingMetadata:
        path = Path(directory) / METADATA_FILE_NAME
        if not path.is_file():
            raise InputError(f"no {METADATA_FILE_NAME} here; is this an adapter trained with hf-instruct-tune?",
                             source=str(directory))
        from .adapter_folder import read_json_object

        data = read_json_object(path)
        fields = {item.name: item for item in dataclasses.fields(cls)}
        for key, value in data.items():
            if key in fields and value is not None and not _has_type(value, fields[key]):
                raise InputError(f"has the wrong type ({type(value).__name__})", source=str(path), field=key)
        return cls(**{key: value for key, value in data.items() if key in fields})


def _has_type(value: Any, item: dataclasses.Field) -> bool:
    """Whether ``value``, read from a file, has the kind of the field ``item`` (a dict, a list, text, a number)."""
    kind = str(item.type)
    if kind.startswith("dict"):
        return isinstance(value, dict)
    if kind.startswith("list"):
        return isinstance(value, list) and all(isinstance(entry, str) for entry in value)
    if kind.startswith("str"):
        return isinstance(value, str)
    if kind.startswith("int"):
        return isinstance(value, int) and not isinstance(value, bool)
    return True


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling and a rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    from .outputs import make_readable

    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        make_readable(temporary)
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def framework_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("hf_instruct_tune", "transformers", "trl", "peft", "torch", "datasets", "accelerate", "unsloth"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            continue
    return versions
