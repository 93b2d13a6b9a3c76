"""Reading rows from every supported input, and errors that name the file and the line."""

from __future__ import annotations

import json

import pytest
from helpers import tiny_tokenizer, write_jsonl

from hf_instruct_tune.data import DataSource, tokenize_source
from hf_instruct_tune.errors import InputError
from hf_instruct_tune.formatters import get_formatter
from hf_instruct_tune.templating import get_template
from hf_instruct_tune.tokenization import ExampleEncoder

ROWS = [{"instruction": "hello", "input": "", "output": "yes"},
        {"instruction": "classify the sentiment", "input": "I like football", "output": "positive"}]


def _write_json(path, rows):
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")


def _write_json_lines_named_json(path, rows):
    write_jsonl(path, rows)


def _write_csv(path, rows):
    import csv

    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)


def _write_saved_dataset(path, rows):
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(path))


def _write_saved_dataset_dict(path, rows):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(path))


WRITERS = {
    "list.json": (_write_json, "row"),
    "rows.jsonl": (write_jsonl, "line"),
    "lines.json": (_write_json_lines_named_json, "line"),
    "rows.csv": (_write_csv, "line"),
    "rows.parquet": (_write_parquet, "row"),
    "saved": (_write_saved_dataset, "row"),
    "saved-dict": (_write_saved_dataset_dict, "row"),
}


@pytest.mark.parametrize("name", list(WRITERS))
def test_reads_every_format(tmp_path, name):
    write, unit = WRITERS[name]
    path = tmp_path / name
    write(path, ROWS)
    source = DataSource.open(path)
    rows = list(source.rows())
    assert [dict(row) for _, row in rows] == ROWS
    locations = [location for location, _ in rows]
    if name == "rows.csv":
        assert locations == ["line 2", "line 3"]
    else:
        assert locations == [f"{unit} 1", f"{unit} 2"]
    assert source.columns() == ["instruction", "input", "output"]
    assert len(source.sha256) == 64


def test_tokenizes_a_file_end_to_end(tmp_path):
    tok = tiny_tokenizer()
    data = tokenize_source(DataSource.open(write_jsonl(tmp_path / "d.jsonl", ROWS)), get_formatter("alpaca"),
                           ExampleEncoder(tok, get_template("alpaca")))
    try:
        assert (data.rows, len(data.dataset), data.dropped_overlong) == (2, 2, 0)
        assert data.dataset.column_names == ["input_ids", "labels"]
        assert all(row["labels"][-1] == tok.eos_token_id for row in data.dataset)
    finally:
        data.cleanup()


def test_in_memory_dataset(tmp_path):
    import datasets

    source = DataSource.open(datasets.Dataset.from_list(ROWS), name="mine")
    assert source.display == "mine" and [location for location, _ in source.rows()] == ["row 1", "row 2"]


def test_sha256_is_of_the_bytes(tmp_path):
    import hashlib

    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    assert DataSource.open(path).sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name,content,match,location", [
    ("bad.json", '[\n {"instruction": "a",\n  "output": }\n]', "malformed JSON", "line 3"),
    ("bad.jsonl", '{"instruction": "a", "output": "b"}\n\n{"instruction": "a" "output": "b"}\n', "malformed JSON",
     "line 3"),
    ("object.json", '{"data": [{"instruction": "a", "output": "b"}]}', "rows may be under the key 'data'", None),
    ("scalar.json", '"hello"', "expected a JSON list of rows, got str", None),
    ("items.json", '[{"instruction": "a", "output": "b"}, 3]', "expected an object, got int", "row 2"),
    ("array.jsonl", '{"instruction": "a", "output": "b"}\n[1, 2]\n', "a JSON object per line", "line 2"),
    ("wide.csv", 'instruction,output\na,b\nc,d,e\n', "more values than the header", "line 3"),
    ("lines-bad.json", '{"instruction": "a", "output": "b"}\n{"instruction": \n', "malformed JSON", "line 2"),
])
def test_malformed_files_name_the_line(tmp_path, name, content, match, location):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match=match) as info:
        list(DataSource.open(path).rows())
    assert info.value.source == str(path)
    assert info.value.location == location
    assert str(info.value).startswith(str(path))


@pytest.mark.parametrize("name", ["latin.jsonl", "latin.json", "latin.csv"])
def test_not_utf8(tmp_path, name):
    path = tmp_path / name
    text = ('instruction,output\nRéponse,oui\n' if name.endswith(".csv")
            else '[{"instruction": "Réponse", "output": "oui"}]')
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(InputError, match="not UTF-8") as info:
        list(DataSource.open(path).rows())
    assert info.value.source == str(path)


def test_damaged_parquet(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 not really")
    with pytest.raises(InputError, match="not a readable Parquet file"):
        list(DataSource.open(path).rows())


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such file or directory") as info:
        DataSource.open(tmp_path / "missing.jsonl")
    assert info.value.source == str(tmp_path / "missing.jsonl")


def test_directory_that_is_not_a_dataset(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(InputError, match="is a directory but not a dataset saved with `Dataset.save_to_disk`"):
        DataSource.open(tmp_path)


def test_dataset_dict_without_train_split(tmp_path):
    import datasets

    datasets.DatasetDict({"test": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(InputError, match=r"has splits \['test'\] but no 'train' split"):
        list(DataSource.open(tmp_path / "dd").rows())


@pytest.mark.parametrize("name", ["rows.txt", "rows.xlsx", "rows"])
def test_wrong_suffix(tmp_path, name):
    path = tmp_path / name
    path.write_text("instruction,output\n")
    with pytest.raises(InputError, match="unsupported file type") as info:
        DataSource.open(path)
    assert ".jsonl" in str(info.value) and info.value.source == str(path)


def test_bad_row_in_a_file_names_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], {"instruction": "a", "outptu": "b"}])
    with pytest.raises(InputError) as info:
        tokenize_source(DataSource.open(path), get_formatter("alpaca"),
                        ExampleEncoder(tiny_tokenizer(), get_template("alpaca")))
    assert str(info.value).startswith(f"{path}, line 2, field 'output': missing")
    assert "Rename 'outptu' to 'output'." in str(info.value)


def test_empty_csv_has_no_columns(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("instruction,output\n", encoding="utf-8")
    with pytest.raises(InputError, match="the dataset is empty"):
        DataSource.open(path).columns()
