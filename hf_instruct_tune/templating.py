"""Jinja2 prompt templates, rendered in a sandbox.

A template renders the *prompt* of one assistant turn: everything the model sees before it answers.
The response is never rendered by the template for the turn being trained; the package appends it,
tokenized on its own, followed by the template's stop token. That is what makes the prompt's token
ids at training time exactly the ids used at inference.

A template file starts with a front-matter comment::

    {#---
    description: Stanford Alpaca, with the input section when the row has one.
    stop: eos_token          # the tokenizer's EOS, or a literal token such as <|eot_id|>
    multi_turn: false        # true when the template renders earlier turns of a conversation
    ---#}

Variables: ``messages`` (the conversation before the answer; earlier assistant turns are followed by
the stop token in the rendered text), ``system``, ``instruction`` and ``input`` (the last user turn),
``bos_token``, ``eos_token``, ``stop_token``, and ``raise_exception(message)``.
"""

from __future__ import annotations

import functools
import importlib.resources
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import yaml
from jinja2.exceptions import SecurityError, TemplateSyntaxError, UndefinedError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import InputError
from .registry import Registry

EOS_STOP = "eos_token"
TEMPLATE_FILE_NAME = "prompt_template.jinja"
_FRONT_MATTER = re.compile(r"\A\{#-?\s*---\s*\n(?P<meta>.*?)\n---\s*-?#\}\n?", re.DOTALL)
_KNOWN_META = {"description", "stop", "multi_turn", "name"}


class TemplateRenderError(ValueError):
    """Rendering failed for a row; ``field`` names the missing variable when there is one."""

    def __init__(self, message: str, field: str | None = None):
        self.field = field
        super().__init__(message)


def _raise_exception(message: str):
    raise TemplateRenderError(str(message))


@functools.lru_cache(maxsize=1)
def sandbox() -> ImmutableSandboxedEnvironment:
    """The one sandboxed Jinja2 environment every prompt and card template renders in."""
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, undefined=jinja2.StrictUndefined,
        autoescape=False,
    )
    environment.globals["raise_exception"] = _raise_exception
    return environment


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt template: its Jinja source, where the prompt ends, and which token ends a response."""

    name: str
    source: str
    stop: str = EOS_STOP
    multi_turn: bool = False
    description: str = ""
    origin: str = "built-in"
    _compiled: jinja2.Template | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_source(cls, source: str, *, name: str, origin: str = "built-in") -> PromptTemplate:
        meta = {}
        match = _FRONT_MATTER.match(source)
        if match:
            try:
                meta = yaml.safe_load(match.group("meta")) or {}
            except yaml.YAMLError as error:
                raise InputError(f"the front matter is not valid YAML: {error}", source=origin) from None
            if not isinstance(meta, dict):
                raise InputError("the front matter should be a YAML mapping", source=origin)
            unknown = set(meta) - _KNOWN_META
            if unknown:
                raise InputError(f"unknown front-matter keys {sorted(unknown)}; known: {sorted(_KNOWN_META)}", source=origin)
        stop = meta.get("stop", EOS_STOP)
        if not isinstance(stop, str) or not stop:
            raise InputError(f"`stop` should be 'eos_token' or a token such as '<|eot_id|>', got {stop!r}", source=origin)
        try:
            compiled = sandbox().from_string(source)
        except TemplateSyntaxError as error:
            raise InputError(f"Jinja syntax error: {error.message}", source=origin, location=f"line {error.lineno}") from None
        return cls(name=name, source=source, stop=stop, multi_turn=bool(meta.get("multi_turn", False)),
                   description=str(meta.get("description", "")), origin=origin, _compiled=compiled)

    @classmethod
    def from_file(cls, path: str | Path) -> PromptTemplate:
        path = Path(path)
        if not path.is_file():
            raise InputError("template file not found" if not path.exists() else "is not a file", source=str(path))
        try:
            source = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise InputError(f"is not UTF-8 text (byte {error.start})", source=str(path)) from None
        return cls.from_source(source, name=path.stem, origin=str(path))

    def stop_text(self, eos_token: str | None) -> str:
        if self.stop == EOS_STOP:
            if not eos_token:
                raise InputError(f"template '{self.name}' ends responses with the tokenizer's EOS token, "
                                 "but the tokenizer has none; use a template with an explicit `stop` token")
            return eos_token
        return self.stop

    def render_prompt(self, messages: Sequence[Mapping], *, bos_token: str | None, eos_token: str | None) -> str:
        """Render the prompt that precedes the next assistant turn of ``messages``.

        Raises :class:`TemplateRenderError` (with ``field`` set for an undefined variable).
        """
        last_user = next((m for m in reversed(messages) if m.get("role") == "user"), {})
        system = next((m["content"] for m in messages if m.get("role") == "system"), "")
        context = {
            "messages": [dict(m) for m in messages],
            "system": system,
            "instruction": last_user.get("content", ""),
            "input": last_user.get("input", ""),
            "bos_token": bos_token or "",
            "eos_token": eos_token or "",
            "stop_token": self.stop_text(eos_token),
        }
        try:
            return self._compiled.render(context)
        except UndefinedError as error:
            name = re.search(r"'([^']+)' is undefined", str(error))
            raise TemplateRenderError(f"template '{self.name}': {error}", field=name.group(1) if name else None) from None
        except SecurityError as error:
            raise TemplateRenderError(f"template '{self.name}' was refused by the sandbox: {error}") from None
        except TemplateRenderError:
            raise
        except Exception as error:  # any other runtime error raised inside a user's template
            raise TemplateRenderError(f"template '{self.name}' failed to render: {type(error).__name__}: {error}") from None


def _coerce_template(name: str, entry: object) -> PromptTemplate:
    if callable(entry) and not isinstance(entry, PromptTemplate):
        entry = entry()
    if isinstance(entry, PromptTemplate):
        return entry
    if isinstance(entry, Path):
        return PromptTemplate.from_file(entry)
    if isinstance(entry, str):
        return PromptTemplate.from_source(entry, name=name, origin=f"plugin '{name}'")
    raise InputError(f"The template plugin '{name}' should provide a PromptTemplate, a path or Jinja source, "
                     f"got {type(entry).__name__}")


class TemplateRegistry(Registry[PromptTemplate]):
    def _coerce_plugin(self, name: str, loaded: object) -> PromptTemplate:
        return _coerce_template(name, loaded)


TEMPLATES = TemplateRegistry("template", "hf_instruct_tune.templates")


def register_template(name: str, template: PromptTemplate | str | Path, *, overwrite: bool = False) -> PromptTemplate:
    """Register a template under ``name`` from a :class:`PromptTemplate`, Jinja source, or a file path."""
    return TEMPLATES.register(name, _coerce_template(name, template), overwrite=overwrite)


def _register_builtins() -> None:
    for resource in sorted(importlib.resources.files("hf_instruct_tune.templates").iterdir(), key=lambda r: r.name):
        if resource.name.endswith(".jinja"):
            name = resource.name[: -len(".jinja")]
            TEMPLATES.register(name, PromptTemplate.from_source(resource.read_text(encoding="utf-8"), name=name))


def get_template(name_or_path: str | Path | PromptTemplate) -> PromptTemplate:
    """A registered template by name, or a template file (any path ending in ``.jinja`` or that exists)."""
    if isinstance(name_or_path, PromptTemplate):
        return name_or_path
    text = str(name_or_path)
    if text.endswith(".jinja") or "/" in text or Path(text).is_file():
        return PromptTemplate.from_file(text)
    return TEMPLATES.get(text)


_register_builtins()
