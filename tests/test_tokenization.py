"""The labels rules of ``ExampleEncoder``, each against the naive way that breaks it."""

from __future__ import annotations

import pytest
import torch
from helpers import MULTI_TURN, SINGLE_TURN, assert_single_turn_invariants, supervised_runs, tiny_tokenizer, write_jsonl
from transformers import DataCollatorForLanguageModeling

from hf_instruct_tune.collator import EOSSafeCollator
from hf_instruct_tune.data import DataSource, tokenize_source
from hf_instruct_tune.errors import InputError
from hf_instruct_tune.formatters import get_formatter
from hf_instruct_tune.templating import PromptTemplate, get_template
from hf_instruct_tune.tokenization import IGNORE_INDEX, ExampleEncoder, ExampleError


@pytest.fixture(scope="module")
def tok():
    """pad == eos, adds BOS: the configuration of most instruct checkpoints."""
    return tiny_tokenizer(pad_is_eos=True, adds_bos=True)


def _messages(response: str, instruction: str = "hello world") -> list[dict]:
    return [{"role": "user", "content": instruction}, {"role": "assistant", "content": response}]


def _naive(tok, template, messages, *, add_special_tokens=True) -> list[int]:
    """The usual hand-rolled version: one string, prompt + response + EOS."""
    prompt = template.render_prompt(messages[:-1], bos_token=tok.bos_token, eos_token=tok.eos_token)
    text = prompt + messages[-1]["content"] + template.stop_text(tok.eos_token)
    return tok(text, add_special_tokens=add_special_tokens)["input_ids"]


# -- stop token ------------------------------------------------------------------------------------


@pytest.mark.parametrize("response", ["yes", "yes</s>", "yes</s></s>", "yes </s>\n"])
def test_stop_token_exactly_once_at_the_end(tok, response):
    assert tok.pad_token_id == tok.eos_token_id
    template = get_template("alpaca")
    example = ExampleEncoder(tok, template).encode({"messages": _messages(response)})
    assert_single_turn_invariants(example.input_ids, example.labels, stop_id=tok.eos_token_id, bos_id=tok.bos_token_id)
    assert tok.decode(supervised_runs(example.labels)[0]) == "yes</s>"

    naive = _naive(tok, template, _messages(response))
    if response != "yes":  # the text already ends with EOS: appending one more gives two
        assert naive.count(tok.eos_token_id) >= 2


def test_naive_collator_drops_eos_label_when_pad_is_eos(tok):
    example = ExampleEncoder(tok, get_template("alpaca")).encode({"messages": _messages("yes")})
    short = {"input_ids": example.input_ids, "labels": example.labels}
    long = ExampleEncoder(tok, get_template("alpaca")).encode({"messages": _messages("no maybe yes no")}).as_dict()

    naive = DataCollatorForLanguageModeling(tok, mlm=False)([{"input_ids": short["input_ids"]},
                                                              {"input_ids": long["input_ids"]}])
    assert (naive["labels"] == tok.eos_token_id).sum() == 0  # the stop token is never trained

    ours = EOSSafeCollator(pad_token_id=tok.pad_token_id)([short, long])
    for row, features in enumerate([short, long]):
        n = len(features["input_ids"])
        assert ours["labels"][row, n - 1].item() == tok.eos_token_id
        assert (ours["labels"][row] == tok.eos_token_id).sum() == 1


def test_llama3_stop_is_eot_once_at_the_end(tok):
    template = get_template("llama-3")
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    for response in ["yes", "yes<|eot_id|>", "yes<|eot_id|><|eot_id|>"]:
        example = ExampleEncoder(tok, template).encode({"messages": _messages(response)})
        assert example.labels[-1] == eot == example.input_ids[-1]
        assert supervised_runs(example.labels) == [tok("yes", add_special_tokens=False)["input_ids"] + [eot]]
        assert tok.eos_token_id not in example.labels
    assert _naive(tok, template, _messages("yes<|eot_id|>"), add_special_tokens=False)[-2:] == [eot, eot]


@pytest.mark.parametrize("stop", ["</s>", "<|eot_id|>"])
def test_stop_token_inside_a_response_is_text(tok, stop):
    template = get_template("alpaca" if stop == "</s>" else "llama-3")
    stop_id = tok.convert_tokens_to_ids(stop)
    response = f"yes{stop} no"
    example = ExampleEncoder(tok, template).encode({"messages": _messages(response)})
    assert_single_turn_invariants(example.input_ids, example.labels, stop_id=stop_id, bos_id=tok.bos_token_id)
    assert tok.decode(supervised_runs(example.labels)[0]) == response + stop

    naive = _naive(tok, template, _messages(response), add_special_tokens=False)
    assert naive.count(stop_id) == example.input_ids.count(stop_id) + 1  # an early stop inside the response


# -- masking ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_prompt_masked_unless_train_on_prompt(tok, train_on_prompt):
    encoder = ExampleEncoder(tok, get_template("alpaca"), train_on_prompt=train_on_prompt)
    example = encoder.encode({"messages": _messages("yes")})
    prompt = encoder.encode_prompt(_messages("yes")[:-1])
    n = len(prompt)
    assert example.input_ids[:n] == prompt
    if train_on_prompt:
        assert example.labels[1:] == example.input_ids[1:]  # only BOS (never predicted) is masked
    else:
        assert example.labels[:n] == [IGNORE_INDEX] * n
        assert example.labels[n:] == example.input_ids[n:]


def test_padding_masked_by_position_not_token_id():
    # A batch where one example's last real token equals the pad id, as literal tensors.
    pad = 7
    features = [{"input_ids": [1, 5, 7], "labels": [-100, 5, 7]},
                {"input_ids": [1, 5, 6, 8, 9], "labels": [-100, -100, 6, 8, 9]}]
    batch = EOSSafeCollator(pad_token_id=pad)(features)
    torch.testing.assert_close(batch["input_ids"], torch.tensor([[1, 5, 7, 7, 7], [1, 5, 6, 8, 9]]))
    torch.testing.assert_close(batch["labels"], torch.tensor([[-100, 5, 7, -100, -100], [-100, -100, 6, 8, 9]]))
    torch.testing.assert_close(batch["attention_mask"], torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))


# -- BOS -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("adds_bos", [True, False])
@pytest.mark.parametrize("template_name", ["llama-3", "alpaca", "chatml"])
def test_never_two_bos(template_name, adds_bos):
    tok = tiny_tokenizer(adds_bos=adds_bos)
    template = get_template(template_name)
    encoder = ExampleEncoder(tok, template)
    example = encoder.encode({"messages": _messages("yes")})
    bos = tok.bos_token_id
    assert example.input_ids.count(bos) <= 1
    renders_bos = template_name == "llama-3"
    if adds_bos or renders_bos:
        assert example.input_ids[0] == bos and example.labels[0] == IGNORE_INDEX
    else:
        assert bos not in example.input_ids
    assert encoder.encode_prompt(_messages("yes")[:-1]).count(bos) <= 1
    if adds_bos and renders_bos:
        assert _naive(tok, template, _messages("yes"))[:2] == [bos, bos]  # the naive way: two BOS


def test_bos_written_in_an_instruction_is_text(tok):
    example = ExampleEncoder(tok, get_template("alpaca")).encode({"messages": _messages("yes", "say <s> and </s>")})
    assert example.input_ids.count(tok.bos_token_id) == 1
    assert example.input_ids.count(tok.eos_token_id) == 1


# -- prompt ids at training == at inference --------------------------------------------------------

SPACE_TEMPLATE = """{#---
stop: eos_token
---#}
{{- instruction }}
Answer: """


def test_prompt_ids_match_inference_across_a_space_boundary(tok):
    template = PromptTemplate.from_source(SPACE_TEMPLATE, name="answer-space")
    messages = [{"role": "user", "content": "Paris is the capital of France."}, {"role": "assistant", "content": "yes"}]
    encoder = ExampleEncoder(tok, template)
    example = encoder.encode({"messages": messages})
    inference = encoder.encode_prompt(messages[:-1])
    assert example.input_ids[: len(inference)] == inference
    assert example.labels[: len(inference)] == [IGNORE_INDEX] * len(inference)
    assert example.labels[len(inference):] == tok("yes", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

    naive = _naive(tok, template, messages)
    assert naive[: len(inference)] != inference  # " " and "yes" merged into " yes" across the boundary


@pytest.mark.parametrize("template_name", ["chatml", "llama-3"])
def test_multi_turn_prompt_ids_match_inference(tok, template_name):
    encoder = ExampleEncoder(tok, get_template(template_name))
    example = encoder.encode({"messages": MULTI_TURN})
    inference = encoder.encode_prompt(MULTI_TURN[:-1])
    assert example.input_ids[: len(inference)] == inference
    assert example.input_ids[len(inference):] == example.labels[len(inference):]


# -- overlong --------------------------------------------------------------------------------------


def _rows():
    return [{"instruction": "hello", "output": "yes"},
            {"instruction": "hello", "output": "The quick brown fox jumps over the lazy dog. " * 4},
            {"instruction": "hello", "output": "no"}]


def test_overlong_drop_counts(tok, tmp_path):
    encoder = ExampleEncoder(tok, get_template("alpaca"), max_length=50)
    data = tokenize_source(DataSource.open(write_jsonl(tmp_path / "d.jsonl", _rows())), get_formatter("alpaca"), encoder)
    try:
        assert (data.rows, data.dropped_overlong, data.truncated, len(data.dataset)) == (3, 1, 0, 2)
        for row in data.dataset:
            assert len(row["input_ids"]) <= 50
            assert_single_turn_invariants(row["input_ids"], row["labels"], stop_id=tok.eos_token_id)
    finally:
        data.cleanup()


def test_overlong_truncate_does_not_end_in_stop(tok, tmp_path):
    encoder = ExampleEncoder(tok, get_template("alpaca"), max_length=50, overlong="truncate")
    long = {"messages": _messages("The quick brown fox jumps over the lazy dog. " * 4)}
    example = encoder.encode(long)
    assert example.truncated and len(example.input_ids) == 50
    assert_single_turn_invariants(example.input_ids, example.labels, stop_id=tok.eos_token_id, ends_with_stop=False)

    data = tokenize_source(DataSource.open(write_jsonl(tmp_path / "d.jsonl", _rows())), get_formatter("alpaca"), encoder)
    try:
        assert (data.rows, data.dropped_overlong, data.truncated, len(data.dataset)) == (3, 0, 1, 3)
        assert data.dataset[1]["labels"][-1] != tok.eos_token_id
    finally:
        data.cleanup()


@pytest.mark.parametrize("overlong", ["drop", "truncate"])
def test_all_rows_too_long_names_max_length(tok, tmp_path, overlong):
    encoder = ExampleEncoder(tok, get_template("alpaca"), max_length=8, overlong=overlong)
    source = DataSource.open(write_jsonl(tmp_path / "d.jsonl", _rows()))
    with pytest.raises(InputError, match="max.length") as info:
        tokenize_source(source, get_formatter("alpaca"), encoder)
    assert info.value.field == "max_length" and "d.jsonl" in str(info.value)


# -- rows with nothing to train ----------------------------------------------------------------------


@pytest.mark.parametrize("output", ["", "   ", "</s>", "</s></s>"])
def test_row_without_supervised_tokens(tok, tmp_path, output):
    rows = [{"instruction": "hello", "output": "yes"}, {"instruction": "hello", "output": output}]
    source = DataSource.open(write_jsonl(tmp_path / "d.jsonl", rows))
    with pytest.raises(InputError) as info:
        tokenize_source(source, get_formatter("alpaca"), ExampleEncoder(tok, get_template("alpaca")))
    error = info.value
    assert error.source.endswith("d.jsonl") and error.location == "line 2"
    assert error.field in {"output", "messages[1].content"}
    assert "d.jsonl, line 2, field '" in str(error)


@pytest.mark.parametrize("content", ["[]", ""])
def test_empty_dataset(tok, tmp_path, content):
    path = tmp_path / ("d.json" if content else "d.jsonl")
    path.write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match="empty") as info:
        tokenize_source(DataSource.open(path), get_formatter("alpaca"), ExampleEncoder(tok, get_template("alpaca")))
    assert info.value.source == str(path)


# -- multi-turn ------------------------------------------------------------------------------------


@pytest.mark.parametrize("template_name,stop", [("chatml", "<|im_end|>"), ("llama-3", "<|eot_id|>")])
def test_multi_turn_trains_every_assistant_turn(tok, template_name, stop):
    example = ExampleEncoder(tok, get_template(template_name)).encode({"messages": MULTI_TURN})
    stop_id = tok.convert_tokens_to_ids(stop)
    runs = supervised_runs(example.labels)
    answers = [m["content"] for m in MULTI_TURN if m["role"] == "assistant"]
    assert runs == [tok(a, add_special_tokens=False)["input_ids"] + [stop_id] for a in answers]
    assert example.labels[-1] == stop_id
    for position, label in enumerate(example.labels):
        assert label in (IGNORE_INDEX, example.input_ids[position])


def test_single_turn_template_rejects_multi_turn(tok):
    with pytest.raises(ExampleError, match="single-turn") as info:
        ExampleEncoder(tok, get_template("alpaca")).encode({"messages": MULTI_TURN})
    assert info.value.field == "messages"


def test_single_turn_template_rejects_multi_turn_in_a_file(tok, tmp_path):
    rows = [{"messages": SINGLE_TURN}, {"messages": MULTI_TURN}]
    source = DataSource.open(write_jsonl(tmp_path / "chat.jsonl", rows))
    with pytest.raises(InputError, match="single-turn") as info:
        tokenize_source(source, get_formatter("messages"), ExampleEncoder(tok, get_template("alpaca")))
    assert (info.value.location, info.value.field) == ("line 2", "messages")


def test_stop_token_must_be_one_token(tok):
    template = PromptTemplate.from_source("{#---\nstop: <|nope|>\n---#}\n{{ instruction }}", name="nope")
    with pytest.raises(InputError, match="not a single token"):
        ExampleEncoder(tok, template)


@pytest.mark.parametrize("kwargs", [{"overlong": "cut"}, {"max_length": 1}])
def test_bad_encoder_options(tok, kwargs):
    with pytest.raises(InputError, match="should be"):
        ExampleEncoder(tok, get_template("alpaca"), **kwargs)
