"""Errors that the CLI turns into a one-line message and exit code 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class InstructTuneError(Exception):
    """Base class of every error this package raises on purpose.

    The CLI prints ``str(error)`` on one line and exits with code 2; no traceback unless ``--debug``.
    """

    exit_code = 2


class InputError(InstructTuneError, ValueError):
    """Bad user input: a data file, a row, a template, a config value.

    Args:
        message: what is wrong and what was expected.
        source: the file (or dataset name) the input came from.
        row: 1-based line (JSONL, CSV) or 0-based row index (JSON list, Parquet, datasets), as ``location``.
        field: the column, key or option that is wrong.
    """

    def __init__(self, message: str, *, source: str | None = None, location: str | None = None, field: str | None = None):
        self.message = message
        self.source = source
        self.location = location
        self.field = field
        super().__init__(self._format())

    def _format(self) -> str:
        where = []
        if self.source:
            where.append(str(self.source))
        if self.location:
            where.append(self.location)
        if self.field:
            where.append(f"field '{self.field}'")
        prefix = ", ".join(where)
        return f"{prefix}: {self.message}" if prefix else self.message


class PublishError(InstructTuneError):
    """A Hub operation failed; the message says what to run next."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest choice, or an empty string."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" Did you mean '{match[0]}'?" if match else ""


# Column names that datasets use for what a formatter reads under another name.
COLUMN_ALIASES = {
    "output": ("response", "answer", "target"),
    "instruction": ("question", "query"),
    "input": ("context",),
}


def column_for(field: str, columns: Iterable[str]) -> str | None:
    """The column of ``columns`` that is most likely ``field`` misspelled or under another name, if any."""
    columns = [str(column) for column in columns if str(column) != field]
    match = difflib.get_close_matches(field, columns, n=1, cutoff=0.6)
    if match:
        return match[0]
    return next((column for column in columns if column.lower() in COLUMN_ALIASES.get(field, ())), None)


def rename_hint(field: str, columns: Iterable[str]) -> str:
    """``" Rename 'instrction' to 'instruction'."`` when a column looks meant as ``field``."""
    column = column_for(field, columns)
    return f" Rename '{column}' to '{field}'." if column else ""


def unknown_name(kind: str, name: str, available: Iterable[str]) -> InputError:
    """The error for an unknown registry name, listing the known ones."""
    available = sorted(available)
    return InputError(f"Unknown {kind} '{name}'. Available: {', '.join(available)}.{did_you_mean(name, available)}")
