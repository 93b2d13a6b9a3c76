"""Formatters: every built-in on a sample row, detection from columns, errors that name the field."""

from __future__ import annotations

import logging

import pytest
from helpers import SAMPLE_ROWS

from hf_instruct_tune.errors import InputError
from hf_instruct_tune.formatters import FORMATTERS, FieldError, detect_formatter, get_formatter
from hf_instruct_tune.templating import get_template

BUILTIN_FORMATTERS = ["alpaca", "messages", "prompt_completion", "sharegpt", "text"]


def test_every_builtin_has_a_sample_row():
    assert set(BUILTIN_FORMATTERS) <= set(FORMATTERS.names())
    assert set(SAMPLE_ROWS) == set(BUILTIN_FORMATTERS)


@pytest.mark.parametrize("name", BUILTIN_FORMATTERS)
def test_formatter_normalizes_its_sample_row(name):
    normalized = get_formatter(name)(SAMPLE_ROWS[name])
    if name == "text":
        assert normalized == {"text": SAMPLE_ROWS["text"]["text"]}
        return
    messages = normalized["messages"]
    assert messages[-1]["role"] == "assistant" and messages[-1]["content"].strip()
    assert {m["role"] for m in messages} <= {"system", "user", "assistant"}
    assert all(isinstance(m["content"], str) for m in messages)


@pytest.mark.parametrize("name", BUILTIN_FORMATTERS)
def test_detected_from_its_own_columns(name, caplog):
    with caplog.at_level(logging.INFO, logger="hf_instruct_tune.formatters"):
        assert detect_formatter(list(SAMPLE_ROWS[name])) == name
    assert f"Formatter: '{name}' (detected from the columns" in caplog.text


def test_alpaca_exact_output():
    row = {"instruction": "Classify.", "input": "I like it", "output": "positive", "system": "Be brief."}
    assert get_formatter("alpaca")(row) == {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Classify.", "input": "I like it"},
        {"role": "assistant", "content": "positive"}]}
    assert get_formatter("alpaca")({"instruction": "a", "input": "  ", "output": "b"}) == {"messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}


def test_sharegpt_maps_speakers():
    assert get_formatter("sharegpt")(SAMPLE_ROWS["sharegpt"])["messages"] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "yes"}]


def test_detection_failure_lists_the_options():
    with pytest.raises(InputError, match="cannot detect the formatter") as info:
        detect_formatter(["question", "answer"], source="data.jsonl")
    message = str(info.value)
    assert message.startswith("data.jsonl: ")
    for name in BUILTIN_FORMATTERS:
        assert f"{name}:" in message


@pytest.mark.parametrize("name,row,field,hint", [
    ("alpaca", {"instruction": "a", "outptu": "b"}, "output", "Rename 'outptu' to 'output'."),
    ("alpaca", {"instrucion": "a", "output": "b"}, "instruction", "Rename 'instrucion' to 'instruction'."),
    ("prompt_completion", {"prompt": "a", "completions": "b"}, "completion", "Rename 'completions' to 'completion'."),
    ("messages", {"message": []}, "messages", "Rename 'message' to 'messages'."),
    ("sharegpt", {"conversation": []}, "conversations", "Rename 'conversation' to 'conversations'."),
    ("alpaca", {"instruction": "a", "answer": "b"}, "output", "Rename 'answer' to 'output'."),
    ("text", {"txt": "a"}, "text", ""),
])
def test_missing_field_suggests_a_close_column(name, row, field, hint):
    with pytest.raises(FieldError) as info:
        get_formatter(name)(row)
    assert info.value.field == field
    assert f"field '{field}'" in str(info.value)
    assert hint in str(info.value)


@pytest.mark.parametrize("name,row,field,match", [
    ("alpaca", {"instruction": "a", "output": ""}, "output", "is empty"),
    ("alpaca", {"instruction": 3, "output": "b"}, "instruction", "expected text, got int"),
    ("alpaca", {"instruction": None, "output": "b"}, "instruction", "null"),
    ("messages", {"messages": "hi"}, "messages", "expected a list"),
    ("messages", {"messages": []}, "messages", "empty list"),
    ("messages", {"messages": [{"role": "user", "content": "a"}]}, "messages", "no assistant turn"),
    ("messages", {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]},
     "messages", "end with an assistant turn"),
    ("messages", {"messages": [{"role": "robot", "content": "a"}]}, "messages[0].role", "unknown role"),
    ("messages", {"messages": [{"role": "user", "contents": "a"}]}, "messages[0].content", "Rename 'contents' to 'content'"),
    ("messages", {"messages": ["hi"]}, "messages[0]", "expected an object"),
    ("sharegpt", {"conversations": [{"from": "alien", "value": "a"}]}, "conversations[0].from", "unknown speaker"),
    ("sharegpt", {"conversations": [{"value": "a"}]}, "conversations[0].from", "missing"),
    ("sharegpt", {"conversations": [{"from": "gpt", "value": 1}]}, "conversations[0].value", "expected text"),
])
def test_bad_rows_name_the_field(name, row, field, match):
    with pytest.raises(FieldError, match=match) as info:
        get_formatter(name)(row)
    assert info.value.field == field


@pytest.mark.parametrize("lookup,kind,names,guess", [
    (get_formatter, "formatter", BUILTIN_FORMATTERS, ("alpacaa", "alpaca")),
    (get_template, "template", ["alpaca", "chatml", "llama-3", "raw"], ("chatmll", "chatml")),
])
def test_unknown_names_list_the_available_ones(lookup, kind, names, guess):
    typo, meant = guess
    with pytest.raises(InputError) as info:
        lookup(typo)
    message = str(info.value)
    assert message.startswith(f"Unknown {kind} '{typo}'. Available: ")
    for name in names:
        assert name in message
    assert message.endswith(f"Did you mean '{meant}'?")
    with pytest.raises(InputError, match="Available") as info:
        lookup("zzzzzz")
    assert "Did you mean" not in str(info.value)
