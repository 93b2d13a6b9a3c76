"""Property-based fuzzing of every input surface: data files in each format, YAML configs, user templates, adapters.

Each generated case must either be accepted or end with exit code 2 and one ``error:`` line naming the file;
never a traceback (an exception escaping ``main`` fails the test), never a file written. Bounded for CI by the
``fuzz-ci`` hypothesis profile; ``FUZZ_PROFILE=fuzz-long`` (``bench/fuzz_inputs.py``) tries many more cases.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import random
import shutil
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_instruct_tune.cli import main

settings.register_profile("fuzz-ci", max_examples=25, deadline=None, database=None,
                          suppress_health_check=list(HealthCheck))
settings.register_profile("fuzz-long", max_examples=int(os.environ.get("FUZZ_LONG_EXAMPLES", "400")), deadline=None, database=None,
                          suppress_health_check=list(HealthCheck))
FUZZ = settings.get_profile(os.environ.get("FUZZ_PROFILE", "fuzz-ci"))
REPORT = os.environ.get("FUZZ_REPORT")  # a JSON Lines file that bench/fuzz_inputs.py counts outcomes from

# -- values and rows -------------------------------------------------------------------------------

texts = st.one_of(st.text(max_size=30), st.sampled_from(["", " ", "</s>", "<|im_end|>", "{{ x }}", "\ufeff", "é中🙂",
                                                           "x" * 5000, "\x00", "line\nbreak", '"quoted",comma']))
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), texts)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(texts, inner, max_size=4)), max_leaves=12)
turn = st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["user", "assistant", "system", "tool"]), values),
                              "content": st.one_of(texts, values)})
share_turn = st.fixed_dictionaries({"from": st.one_of(st.sampled_from(["human", "gpt", "system"]), values),
                                    "value": st.one_of(texts, values)})
rows = st.one_of(
    st.fixed_dictionaries({"instruction": st.one_of(texts, values), "output": st.one_of(texts, values)},
                          optional={"input": st.one_of(texts, values)}),
    st.fixed_dictionaries({"messages": st.one_of(st.lists(turn, max_size=4), values)}),
    st.fixed_dictionaries({"conversations": st.one_of(st.lists(share_turn, max_size=4), values)}),
    st.fixed_dictionaries({"prompt": st.one_of(texts, values), "completion": st.one_of(texts, values)}),
    st.fixed_dictionaries({"text": st.one_of(texts, values)}),
    st.dictionaries(texts, values, max_size=3),
)
flat_rows = st.fixed_dictionaries({"instruction": texts, "output": texts}, optional={"input": texts})
words = st.text(alphabet="abcdefghij 中é", min_size=1, max_size=20).filter(str.strip)
good_rows = st.fixed_dictionaries({"instruction": words, "output": words}, optional={"input": texts})
mostly_good = st.one_of(good_rows, good_rows, rows)  # so that accepted files are tried too
encodings = st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "latin-1"])


def _encode(text: str, encoding: str) -> bytes:
    return text.encode(encoding, errors="replace") if encoding == "latin-1" else text.encode(encoding)


def _damage(data: bytes, draw) -> bytes:
    """Leave as is, cut short, or overwrite a stretch with random bytes."""
    how = draw(st.sampled_from(["keep", "keep", "truncate", "garble"]))
    if how == "truncate" and data:
        return data[: draw(st.integers(0, len(data) - 1))]
    if how == "garble" and data:
        start = draw(st.integers(0, len(data) - 1))
        return data[:start] + draw(st.binary(min_size=1, max_size=16)) + data[start + 16:]
    return data


@st.composite
def data_files(draw):
    """(suffix, bytes) of a JSON, JSON Lines or CSV data file, possibly broken."""
    kind = draw(st.sampled_from(["jsonl", "json", "csv"]))
    encoding = draw(encodings)
    if kind == "jsonl":
        lines = draw(st.lists(st.one_of(mostly_good.map(json.dumps), mostly_good.map(json.dumps), texts),
                              min_size=0, max_size=5))
        text = "\n".join(lines) + draw(st.sampled_from(["", "\n", "\r\n"]))
    elif kind == "json":
        body = draw(st.one_of(st.lists(mostly_good, max_size=5), st.lists(mostly_good, max_size=5), rows, values))
        text = json.dumps(body)
        if draw(st.booleans()) and isinstance(body, list):
            text = json.dumps({"data": body})
    else:
        header = draw(st.sampled_from([["instruction", "output"], ["instruction", "input", "output"], ["text"],
                                       ["prompt", "completion"], ["a"]]))
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(header)
        for _ in range(draw(st.integers(0, 4))):
            writer.writerow(draw(st.one_of(st.lists(words, min_size=len(header), max_size=len(header)),
                                           st.lists(texts, min_size=0, max_size=len(header) + 1))))
        text = buffer.getvalue()
    return kind, _damage(_encode(text, encoding), draw)


# -- fixtures and the outcome rule -----------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from hf_instruct_tune.testing.tiny import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("fuzz") / "tiny")


def _run(argv: list[str]) -> tuple[int, str]:
    """Exit code and stderr of ``main(argv)``; ``inspect``'s report of rows that fail a check counts as stderr."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main(argv)
    if code == 1 and argv[0] == "inspect":
        assert "fail a check" in out.getvalue(), out.getvalue()[-2000:]
        return 0, err.getvalue()  # the data was read and checked: rows flagged, as inspect is meant to
    return code, err.getvalue()


def _check_outcome(surface: str, code: int, err: str, *names: str) -> None:
    """Accepted (0), or exit 2 with one line naming one of ``names``; recorded for the long run's counts."""
    assert "Traceback" not in err, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    if code != 0:
        assert code == 2 and len(lines) == 1, (code, err[-2000:])
        assert any(name in lines[0] for name in names), (lines[0], names)
    if REPORT:
        with open(REPORT, "a", encoding="utf-8") as stream:
            stream.write(json.dumps({"surface": surface, "outcome": "accepted" if code == 0 else "refused"}) + "\n")


def _fresh(tmp_path_factory, name: str) -> Path:
    folder = tmp_path_factory.mktemp(name)
    return folder


# -- data files ------------------------------------------------------------------------------------

@FUZZ
@given(case=data_files())
def test_fuzzed_text_data_files(tiny, tmp_path_factory, case):
    kind, data = case
    folder = _fresh(tmp_path_factory, "data")
    path = folder / f"train.{kind}"
    path.write_bytes(data)
    code, err = _run(["inspect", "--data", str(path), "--model", str(tiny), "--rows", "0"])
    _check_outcome(f"data.{kind}", code, err, str(path))
    assert sorted(p.name for p in folder.iterdir()) == [path.name]


@FUZZ
@given(table=st.lists(st.one_of(good_rows.map(lambda row: {"input": "", **row}), flat_rows), min_size=0, max_size=4), kind=st.sampled_from(["parquet", "saved"]),
       damage=st.sampled_from(["none", "truncate", "remove", "garble"]), seed=st.integers(0, 2**16))
def test_fuzzed_binary_data_files(tiny, tmp_path_factory, table, kind, damage, seed):
    from datasets import Dataset

    folder = _fresh(tmp_path_factory, "binary")
    dataset = Dataset.from_list(table) if table else Dataset.from_dict({"instruction": [], "output": []})
    path = folder / ("train.parquet" if kind == "parquet" else "saved")
    if kind == "parquet":
        dataset.to_parquet(str(path))
        files = [path]
    else:
        dataset.save_to_disk(str(path))
        files = sorted(p for p in path.iterdir() if p.is_file())
    target = random.Random(seed).choice(files)
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[: random.Random(seed).randint(0, max(0, target.stat().st_size - 1))])
    elif damage == "remove":
        target.unlink()
    elif damage == "garble":
        data = bytearray(target.read_bytes())
        for index in random.Random(seed).sample(range(len(data)), min(8, len(data))):
            data[index] ^= 0xFF
        target.write_bytes(bytes(data))
    before = sorted(p.name for p in folder.rglob("*"))
    code, err = _run(["inspect", "--data", str(path), "--model", str(tiny), "--rows", "0"])
    _check_outcome(f"data.{kind}", code, err, str(path))
    assert sorted(p.name for p in folder.rglob("*")) == before


# -- YAML configs ----------------------------------------------------------------------------------

def _config_keys() -> list[str]:
    import dataclasses

    from hf_instruct_tune.config import TrainConfig

    return [item.name for item in dataclasses.fields(TrainConfig)]


@FUZZ
@given(document=st.one_of(
    st.dictionaries(st.one_of(st.sampled_from(_config_keys()), texts), values, max_size=5),
    values,
    st.text(max_size=80),
), encoding=encodings)
def test_fuzzed_yaml_configs(tmp_path_factory, document, encoding):
    from hf_instruct_tune.config import build_config
    from hf_instruct_tune.errors import InputError

    folder = _fresh(tmp_path_factory, "config")
    path = folder / "config.yaml"
    text = document if isinstance(document, str) else yaml.safe_dump(document, allow_unicode=True)
    path.write_bytes(_encode(text, encoding))
    try:
        build_config(str(path), {})
    except InputError as error:
        message = str(error)
        assert "\n" not in message.strip() or message.count("\n") < 3, message
        assert str(path) in message, message
        refused = True
    else:
        refused = False
    _check_outcome("config.yaml", 2 if refused else 0, f"error: {path}" if refused else "", str(path))
    assert [p.name for p in folder.iterdir()] == ["config.yaml"]


# -- user templates --------------------------------------------------------------------------------

template_pieces = st.sampled_from([
    "{% for message in messages %}", "{% endfor %}", "{% if message.role == 'user' %}", "{% endif %}",
    "{{ message.content }}", "{{ messages[0].content }}", "{{ eos_token }}", "{{ bos_token }}", "### Response:\n",
    "{{ raise_exception('no') }}", "{{ undefined_name }}", "{{ ''.__class__.__mro__ }}", "{% set x = 1 %}",
    "{#---\nstop: eos_token\n---#}", "{#---\nstop: <|im_end|>\n---#}", "{#---\nstop: [\n---#}", "{{", "}}", "{%", "text",
    "{{ message['content'] | upper }}", "{% generation %}", "{% endgeneration %}", "\n",
])


@FUZZ
@given(pieces=st.lists(st.one_of(template_pieces, texts), max_size=10), encoding=encodings)
def test_fuzzed_user_templates(tiny, tmp_path_factory, pieces, encoding):
    folder = _fresh(tmp_path_factory, "template")
    data = folder / "train.jsonl"
    data.write_text(json.dumps({"instruction": "hello", "output": "yes"}) + "\n")
    template = folder / "mine.jinja"
    template.write_bytes(_encode("".join(pieces), encoding))
    code, err = _run(["inspect", "--data", str(data), "--model", str(tiny), "--template", str(template),
                      "--rows", "0"])
    _check_outcome("template.jinja", code, err, str(template), str(data))


# -- adapter folders -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def adapter(tiny, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz_adapter")
    data = root / "train.jsonl"
    data.write_text(json.dumps({"instruction": "hello", "output": "yes"}) + "\n")
    out = root / "adapter"
    code, err = _run(["train", "--model", str(tiny), "--data", str(data), "--output-dir", str(out), "--max-steps", "1",
                      "--lora-r", "2", "--target-modules", "q_proj", "--max-length", "64"])
    assert code == 0, err[-2000:]
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return out


ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "hf_instruct_tune.json", "prompt_template.jinja",
                 "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]


@FUZZ
@given(changes=st.lists(st.tuples(st.sampled_from(ADAPTER_FILES),
                                  st.sampled_from(["remove", "truncate", "garble", "json"]),
                                  st.integers(0, 2**16), values), min_size=1, max_size=3))
def test_fuzzed_adapter_folders(tiny, adapter, tmp_path_factory, changes):
    folder = _fresh(tmp_path_factory, "downloaded") / "adapter"
    shutil.copytree(adapter, folder)
    for name, how, seed, value in changes:
        path = folder / name
        if not path.exists():
            continue
        data = path.read_bytes()
        if how == "remove":
            path.unlink()
        elif how == "truncate":
            path.write_bytes(data[: random.Random(seed).randint(0, max(0, len(data) - 1))])
        elif how == "garble":
            changed = bytearray(data)
            for index in random.Random(seed).sample(range(len(changed)), min(8, len(changed))):
                changed[index] ^= 0xFF
            path.write_bytes(bytes(changed))
        else:
            path.write_text(json.dumps(value))
    before = sorted(p.name for p in folder.iterdir())
    for argv in (["generate", "--adapter", str(folder), "--model", str(tiny), "--instruction", "hello",
                  "--max-new-tokens", "2"], ["card", str(folder)]):
        code, err = _run(argv)
        _check_outcome(f"adapter.{argv[0]}", code, err, str(folder))
    assert sorted(p.name for p in folder.iterdir()) == before or "README.md" in set(before) ^ {
        p.name for p in folder.iterdir()}
