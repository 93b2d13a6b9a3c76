"""Reading training data: JSON, JSON Lines, CSV, Parquet, a saved ``datasets`` folder, or a ``Dataset``.

Rows are read one at a time and tokenized into an Arrow-backed :class:`datasets.Dataset`, so memory stays
bounded however large the file. Every error names the file, the line or row, and the field.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError
from .formatters import FieldError
from .tokenization import ExampleEncoder, ExampleError

logger = logging.getLogger(__name__)

SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
_PROGRESS_EVERY = 50_000


@dataclass
class DataSource:
    """A dataset to read rows from: a file, a saved ``datasets`` folder, or an in-memory ``Dataset``."""

    display: str
    name: str
    path: Path | None = None
    dataset: Any = None
    _sha256: str | None = field(default=None, repr=False)

    @classmethod
    def open(cls, data: str | Path | Any, *, name: str | None = None) -> DataSource:
        """Check that ``data`` can be read; a path, or a :class:`datasets.Dataset` passed from Python."""
        if not isinstance(data, (str, Path)):
            return cls(display=name or "train_dataset", name=name or "train_dataset", dataset=data)
        path = Path(data)
        display = str(data)
        if not path.exists():
            raise InputError("no such file or directory", source=display)
        if path.is_dir():
            if not any((path / marker).exists() for marker in ("dataset_info.json", "state.json", "dataset_dict.json")):
                raise InputError("is a directory but not a dataset saved with `Dataset.save_to_disk`; "
                                 f"pass a file ending in one of {', '.join(SUFFIXES)}", source=display)
        elif path.suffix.lower() not in SUFFIXES:
            raise InputError(f"unsupported file type '{path.suffix}'; expected one of {', '.join(SUFFIXES)} "
                             "or a saved `datasets` folder", source=display)
        return cls(display=display, name=name or path.name, path=path)

    @property
    def sha256(self) -> str:
        """The SHA-256 of the data: of the file's bytes, the saved dataset's files, or an in-memory dataset's rows.

        An in-memory dataset is hashed as JSON Lines (one row a line, keys sorted), so the same rows saved as a
        ``.jsonl`` file that way hash the same.
        """
        if self._sha256 is None and self.dataset is not None:
            digest = hashlib.sha256()
            for row in self.dataset:
                digest.update(json.dumps(row, ensure_ascii=False, sort_keys=True, default=str).encode("utf-8") + b"\n")
            self._sha256 = digest.hexdigest()
        if self._sha256 is None:
            digest = hashlib.sha256()
            files = [self.path] if self.path.is_file() else sorted(p for p in self.path.rglob("*") if p.is_file())
            for file in files:
                with open(file, "rb") as handle:
                    for block in iter(lambda: handle.read(1 << 20), b""):
                        digest.update(block)
            self._sha256 = digest.hexdigest()
        return self._sha256

    def rows(self) -> Iterator[tuple[str, Mapping[str, Any]]]:
        """Yield ``(location, row)`` pairs, where ``location`` is ``"line N"`` or ``"row N"`` (1-based)."""
        if self.dataset is not None:
            for index, row in enumerate(self.dataset):
                yield f"row {index + 1}", row
            return
        if self.path.is_dir():
            yield from self._readable(self._saved_rows(), "saved dataset folder")
            return
        reader = {".json": self._json_rows, ".jsonl": self._jsonl_rows, ".csv": self._csv_rows,
                  ".parquet": self._parquet_rows}[self.path.suffix.lower()]
        yield from self._readable(reader(), "Parquet file") if self.path.suffix.lower() == ".parquet" else reader()

    def _saved_rows(self) -> Iterator[tuple[str, Mapping[str, Any]]]:
        import datasets

        loaded = datasets.load_from_disk(str(self.path))
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise InputError(f"has splits {sorted(loaded)} but no 'train' split", source=self.display)
            loaded = loaded["train"]
        for index, row in enumerate(loaded):
            yield f"row {index + 1}", row

    def _readable(self, rows: Iterator[tuple[str, Mapping[str, Any]]], kind: str):
        """``rows``, with a damaged file's read error (arrow, pyarrow, json, OS) as one line naming the file."""
        try:
            yield from rows
        except InputError:
            raise
        except Exception as error:  # datasets and pyarrow raise many types for a damaged file
            detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise InputError(f"is not a readable {kind}: {detail}", source=self.display) from None

    def _text_lines(self) -> Iterator[tuple[int, str]]:
        # Decoded line by line, so an encoding error names its line (a UTF-8 BOM is accepted).
        with open(self.path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                try:
                    line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as error:
                    raise InputError(f"is not UTF-8 text (invalid byte 0x{raw[error.start]:02x} at column "
                                     f"{error.start + 1}); re-save it as UTF-8", source=self.display,
                                     location=f"line {number}") from None
                yield number, line.replace("\r\n", "\n")

    def _jsonl_rows(self) -> Iterator[tuple[str, Mapping[str, Any]]]:
        for number, line in self._text_lines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise InputError(f"malformed JSON: {error.msg} (column {error.colno})", source=self.display,
                                 location=f"line {number}") from None
            if not isinstance(row, dict):
                raise InputError(f"expected a JSON object per line, got {type(row).__name__}", source=self.display,
                                 location=f"line {number}")
            yield f"line {number}", row

    def _json_rows(self) -> Iterator[tuple[str, Mapping[str, Any]]]:
        text = "".join(line for _, line in self._text_lines())
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            if error.msg == "Extra data" and text.lstrip().startswith("{"):
                yield from self._jsonl_rows()  # JSON Lines saved with a .json name
                return
            raise InputError(f"malformed JSON: {error.msg} (column {error.colno})", source=self.display,
                             location=f"line {error.lineno}") from None
        if isinstance(document, dict):
            lists = [key for key, value in document.items() if isinstance(value, list)]
            hint = f"; the rows may be under the key '{lists[0]}'" if len(lists) == 1 else ""
            raise InputError(f"expected a JSON list of rows, got an object{hint}", source=self.display)
        if not isinstance(document, list):
            raise InputError(f"expected a JSON list of rows, got {type(document).__name__}", source=self.display)
        for index, row in enumerate(document):
            if not isinstance(row, dict):
                raise InputError(f"expected an object, got {type(row).__name__}", source=self.display,
                                 location=f"row {index + 1}")
            yield f"row {index + 1}", row

    def _csv_rows(self) -> Iterator[tuple[str, Mapping[str, Any]]]:
        lines = (line for _, line in self._text_lines())
        reader = csv.DictReader(lines)
        try:
            for row in reader:
                if None in row:
                    raise InputError("has more values than the header has columns", source=self.display,
                                     location=f"line {reader.line_num}")
                yield f"line {reader.line_num}", row
        except csv.Error as error:
            raise InputError(f"malformed CSV: {error}", source=self.display, location=f"line {reader.line_num}") from None

    def _parquet_rows(self) -> Iterator[tuple[str, Mapping[str, Any]]]:
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(self.path)
        except Exception as error:  # pyarrow raises several types for a damaged file
            raise InputError(f"is not a readable Parquet file: {error}", source=self.display) from None
        index = 0
        for batch in parquet.iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                index += 1
                yield f"row {index}", row

    def columns(self) -> list[str]:
        """The columns of the first row, for formatter detection."""
        for _, row in self.rows():
            return list(row)
        raise InputError("the dataset is empty: it has no rows", source=self.display)


def row_error(error: FieldError | ExampleError, source: str, location: str) -> InputError:
    """The error for a row that a formatter or the encoder refused, with its file, row and field."""
    return InputError(error.message, source=source, location=location, field=error.field)


@dataclass
class TokenizedData:
    """The tokenized training set and what happened on the way."""

    dataset: Any
    rows: int
    dropped_overlong: int
    truncated: int
    workdir: str | None = field(default=None, repr=False)

    def cleanup(self) -> None:
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def is_pretokenized(data: Any) -> bool:
    """True for an in-memory dataset with ``input_ids`` and ``labels`` columns: it is trained on as-is."""
    if isinstance(data, (str, Path)):
        return False
    columns = getattr(data, "column_names", None)
    return isinstance(columns, list) and {"input_ids", "labels"} <= set(columns)


def tokenize_source(source: DataSource, formatter: Callable[[Mapping], dict], encoder: ExampleEncoder,
                    *, workdir: str | None = None) -> TokenizedData:
    """Format and tokenize every row of ``source`` into an Arrow-backed dataset of ``input_ids``/``labels``.

    Raises :class:`InputError` naming the file, row and field for the first bad row, for an empty
    dataset, and when every row is longer than ``encoder.max_length``.
    """
    import datasets

    stats = {"rows": 0, "dropped": 0, "truncated": 0}

    def generate():
        for location, row in source.rows():
            stats["rows"] += 1
            try:
                encoded_rows = encoder.encode_rows(formatter(row))
            except (FieldError, ExampleError) as error:
                raise row_error(error, source.display, location) from None
            if stats["rows"] % _PROGRESS_EVERY == 0:
                logger.info("Tokenized %d rows of %s", stats["rows"], source.display)
            if not encoded_rows:
                stats["dropped"] += 1
                continue
            for encoded in encoded_rows:
                stats["truncated"] += encoded.truncated
                yield encoded.as_dict()

    workdir = workdir or tempfile.mkdtemp(prefix="hf_instruct_tune-data-")
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")),
                                  "labels": datasets.Sequence(datasets.Value("int32"))})
    try:
        dataset = datasets.Dataset.from_generator(generate, features=features, cache_dir=workdir,
                                                  keep_in_memory=False)
    except datasets.exceptions.DatasetGenerationError as error:
        cause = error.__cause__ or error.__context__
        shutil.rmtree(workdir, ignore_errors=True)
        if isinstance(cause, InputError):
            raise cause from None
        raise
    except InputError:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    except Exception as error:
        shutil.rmtree(workdir, ignore_errors=True)
        if "empty" in str(error).lower() or stats["rows"] == 0:
            raise InputError("the dataset is empty: it has no rows", source=source.display) from None
        if stats["dropped"] == stats["rows"]:  # `datasets` refuses a generator that yields nothing
            raise _all_overlong(source, stats["rows"], encoder.max_length) from None
        raise
    if stats["rows"] == 0:
        shutil.rmtree(workdir, ignore_errors=True)
        raise InputError("the dataset is empty: it has no rows", source=source.display)
    if len(dataset) == 0:
        shutil.rmtree(workdir, ignore_errors=True)
        raise _all_overlong(source, stats["rows"], encoder.max_length)
    if stats["dropped"]:
        logger.warning("Dropped %d of %d rows longer than max_length=%s (policy: overlong=drop).",
                       stats["dropped"], stats["rows"], encoder.max_length)
    if stats["truncated"]:
        logger.warning("Truncated the responses of %d of %d rows to max_length=%s; they end without the stop "
                       "token (policy: overlong=truncate).", stats["truncated"], stats["rows"], encoder.max_length)
    return TokenizedData(dataset=dataset, rows=stats["rows"], dropped_overlong=stats["dropped"],
                         truncated=stats["truncated"], workdir=workdir)


def _all_overlong(source: DataSource, rows: int, max_length: int | None) -> InputError:
    return InputError(f"every one of its {rows} rows is longer than --max-length {max_length}; "
                      "raise --max-length or use --overlong truncate (in Python: the config's `max_length`, "
                      "`overlong=\"truncate\"`)", source=source.display, field="max_length")
