"""Formatters: turn one raw dataset row into the normalized example that templates render.

A normalized example is ``{"messages": [{"role": ..., "content": ...}, ...]}`` with roles ``system``,
``user`` and ``assistant``; a user message may carry an ``input`` (Alpaca's optional context). The
``text`` formatter instead returns ``{"text": ...}``: already-formatted text, trained as a whole.

Register your own with ``@register_formatter("name")`` or the ``hf_instruct_tune.formatters`` entry-point
group. A formatter raises :class:`FieldError` for a bad row; the caller adds the file and row.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .errors import InputError, column_for, rename_hint
from .registry import Registry, decorator_for

logger = logging.getLogger(__name__)

Formatter = Callable[[Mapping[str, Any]], dict]

FORMATTERS: Registry[Formatter] = Registry("formatter", "hf_instruct_tune.formatters")
register_formatter = decorator_for(FORMATTERS)


class FieldError(ValueError):
    """A row is missing a field or has a value of the wrong type. ``field`` names it, dotted for nesting."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"field '{field}': {message}")


def get_formatter(name: str) -> Formatter:
    """The formatter registered as ``name`` (built-in or plugin)."""
    return FORMATTERS.get(name)


def text_field(row: Mapping[str, Any], field: str, *, required: bool = True, allow_empty: bool = False) -> str:
    """Read a string field from ``row``, with errors that name the field and suggest close matches."""
    if field not in row or (row[field] is None and not required):
        if not required:
            return ""
        raise FieldError(field, f"missing; the row has {sorted(map(str, row))}.{rename_hint(field, row)}")
    value = row[field]
    if value is None:
        if required:
            raise FieldError(field, "is null, expected text")
        return ""
    if not isinstance(value, str):
        raise FieldError(field, f"expected text, got {type(value).__name__} {value!r:.40}")
    if required and not allow_empty and not value.strip():
        raise FieldError(field, "is empty")
    return value


@register_formatter("alpaca")
def alpaca(row: Mapping[str, Any]) -> dict:
    """Alpaca rows: ``instruction``, optional ``input`` (context), ``output`` (the response)."""
    user = {"role": "user", "content": text_field(row, "instruction")}
    context = text_field(row, "input", required=False)
    if context.strip():
        user["input"] = context
    messages = [user, {"role": "assistant", "content": text_field(row, "output")}]
    system = text_field(row, "system", required=False)
    if system.strip():
        messages.insert(0, {"role": "system", "content": system})
    return {"messages": messages}


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "model": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
                   "system": "system"}


@register_formatter("sharegpt")
def sharegpt(row: Mapping[str, Any]) -> dict:
    """ShareGPT rows: ``conversations``, a list of ``{"from": "human"|"gpt"|"system", "value": text}``."""
    return {"messages": _conversation(row, "conversations", "from", "value", _SHAREGPT_ROLES, "speaker",
                                      fold_case=True)}


@register_formatter("messages")
def messages(row: Mapping[str, Any]) -> dict:
    """OpenAI-style rows: ``messages``, a list of ``{"role": "system"|"user"|"assistant", "content": text}``."""
    return {"messages": _conversation(row, "messages", "role", "content", _MESSAGE_ROLES, "role")}


@register_formatter("prompt_completion")
def prompt_completion(row: Mapping[str, Any]) -> dict:
    """Rows with a ``prompt`` (the user turn) and a ``completion`` (the response)."""
    return {"messages": [{"role": "user", "content": text_field(row, "prompt")},
                         {"role": "assistant", "content": text_field(row, "completion")}]}


@register_formatter("text")
def text(row: Mapping[str, Any]) -> dict:
    """Already-formatted ``text``: trained as a whole, with the stop token appended once."""
    return {"text": text_field(row, "text")}


_MESSAGE_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}


def _conversation(row: Mapping[str, Any], field: str, role_key: str, content_key: str, roles: dict[str, str],
                  role_name: str, *, fold_case: bool = False) -> list[dict]:
    """Normalize a list of turns; errors name the turn, e.g. ``conversations[2].value``."""
    messages = []
    for index, turn in enumerate(_turn_list(row, field)):
        where = f"{field}[{index}]"
        if not isinstance(turn, Mapping):
            raise FieldError(where, f"expected an object with '{role_key}' and '{content_key}', "
                                    f"got {type(turn).__name__}")
        try:
            speaker = text_field(turn, role_key)
            content = text_field(turn, content_key)
        except FieldError as error:
            raise FieldError(f"{where}.{error.field}", error.message) from None
        role = roles.get(speaker.lower() if fold_case else speaker)
        if role is None:
            raise FieldError(f"{where}.{role_key}", f"unknown {role_name} {speaker!r}; expected one of {sorted(roles)}")
        messages.append({"role": role, "content": content})
    return _checked_conversation(messages, field)


def _turn_list(row: Mapping[str, Any], field: str) -> Sequence:
    if field not in row:
        raise FieldError(field, f"missing; the row has {sorted(map(str, row))}.{rename_hint(field, row)}")
    turns = row[field]
    if not isinstance(turns, Sequence) or isinstance(turns, str):
        raise FieldError(field, f"expected a list of turns, got {type(turns).__name__}")
    if not turns:
        raise FieldError(field, "is an empty list")
    return turns


def _checked_conversation(messages: list[dict], field: str) -> list[dict]:
    if not any(message["role"] == "assistant" for message in messages):
        raise FieldError(field, "has no assistant turn, so nothing would be trained")
    if messages[-1]["role"] != "assistant":
        raise FieldError(field, "should end with an assistant turn, got a trailing "
                                f"'{messages[-1]['role']}' turn that would never be trained")
    return messages


# Column signatures, most specific first: (formatter, columns that must all be present).
_SIGNATURES: list[tuple[str, tuple[str, ...]]] = [
    ("sharegpt", ("conversations",)),
    ("messages", ("messages",)),
    ("alpaca", ("instruction", "output")),
    ("prompt_completion", ("prompt", "completion")),
    ("text", ("text",)),
]


def detect_formatter(columns: Sequence[str], *, source: str | None = None, location: str | None = None) -> str:
    """Pick a built-in formatter from a dataset's column names, or raise an error listing the options.

    ``location`` names the row the columns came from ("line 1"); a misspelled column gets a suggestion.
    """
    present = set(columns)
    for name, required in _SIGNATURES:
        if present.issuperset(required):
            logger.info("Formatter: '%s' (detected from the columns %s)", name, sorted(present))
            return name
    expected = "; ".join(f"{name}: {', '.join(cols)}" for name, cols in _SIGNATURES)
    hint, culprit = "", None
    for _, required in _SIGNATURES:  # the first signature that one renamed column would complete
        missing = [column for column in required if column not in present]
        if len(missing) == 1:
            culprit = column_for(missing[0], sorted(map(str, present - set(required))))
            if culprit:
                hint = rename_hint(missing[0], [culprit])
                break
    raise InputError(
        f"cannot detect the formatter from the columns {sorted(present)}. Expected one of: {expected}. "
        f"Name one with --formatter (`formatter=` in Python).{hint}",
        source=source, location=location, field=culprit,
    )
