"""Property-based: the labels rules hold for arbitrary text, and through collation with padding."""

from __future__ import annotations

import pytest
from helpers import assert_single_turn_invariants, tiny_tokenizer
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from hf_instruct_tune.collator import EOSSafeCollator
from hf_instruct_tune.formatters import FieldError, get_formatter
from hf_instruct_tune.templating import get_template
from hf_instruct_tune.tokenization import IGNORE_INDEX, ExampleEncoder, ExampleError

STOPS = {"alpaca": "</s>", "chatml": "<|im_end|>", "llama-3": "<|eot_id|>"}
PROPERTY_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

pieces = st.one_of(
    st.text(max_size=8),
    st.sampled_from(["</s>", "<|im_end|>", "<|eot_id|>", " ", "\n", "\t", "  \n", "é", "中文", "🙂", "yes", "Answer: ",
                    "The quick brown fox jumps over the lazy dog."]),
)
texts = st.lists(pieces, max_size=6).map("".join)
nonblank = st.tuples(texts, st.sampled_from(["yes", "no maybe", "中文", "🙂", "x", "</s>x"]), texts).map("".join)
mostly_nonblank = st.one_of(nonblank, nonblank, nonblank, texts)
rows = st.fixed_dictionaries({"instruction": mostly_nonblank, "input": texts, "output": mostly_nonblank})
max_lengths = st.one_of(st.none(), st.integers(min_value=2, max_value=80), st.integers(min_value=12, max_value=45))


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(pad_is_eos=True, adds_bos=True)


def _strip_stops(text: str, stop: str) -> str:
    stripped = text.rstrip()
    while stripped.endswith(stop):
        stripped = stripped[: -len(stop)].rstrip()
    return stripped


def _encode(tok, template_name, row, max_length, overlong):
    """Encode ``row``; ``None`` when it is (rightly) refused or dropped. Checks the refusal was for a reason."""
    encoder = ExampleEncoder(tok, get_template(template_name), max_length=max_length, overlong=overlong)
    try:
        normalized = get_formatter("alpaca")(row)
    except FieldError as error:
        assert error.field in {"instruction", "output"}
        assert not row[error.field].strip()
        return encoder, None
    try:
        example = encoder.encode(normalized)
    except ExampleError as error:
        assert not _strip_stops(row["output"], STOPS[template_name]).strip(), error
        return encoder, None
    assert _strip_stops(row["output"], STOPS[template_name]).strip()
    return encoder, example


def _check(tok, encoder, example, row, max_length, overlong):
    stop_id = encoder.stop_token_id
    bos_id = tok.bos_token_id if "<s>" not in row["instruction"] + row["input"] else None
    trained = [label for label in example.labels if label != IGNORE_INDEX]
    written = trained[:-1] if trained and trained[-1] == stop_id else trained
    assert not set(written) & set(tok.all_special_ids), "a special token typed in a response was read as one"
    if max_length is not None:
        assert len(example.input_ids) <= max_length
    assert_single_turn_invariants(example.input_ids, example.labels, stop_id=stop_id, bos_id=bos_id,
                                  ends_with_stop=not example.truncated)
    if example.truncated:
        assert overlong == "truncate" and len(example.input_ids) == max_length


def _with_special_tokens_inside(test):
    """Explicit cases, so that every run tries each template's special tokens in the middle of a response."""
    for template_name in STOPS:
        for token in ("</s>", "<|im_end|>", "<|eot_id|>", "<s>"):
            row = {"instruction": f"say {token} please", "input": "", "output": f"yes {token} no"}
            test = example(row=row, max_length=None, overlong="drop", template_name=template_name)(test)
    return test


@PROPERTY_SETTINGS
@given(row=rows, max_length=max_lengths, overlong=st.sampled_from(["drop", "truncate"]),
       template_name=st.sampled_from(list(STOPS)))
@_with_special_tokens_inside
def test_encoded_examples_keep_the_rules(tok, row, max_length, overlong, template_name):
    encoder, example = _encode(tok, template_name, row, max_length, overlong)
    event("refused or dropped" if example is None else "truncated" if example.truncated else "encoded")
    if example is None:
        return
    _check(tok, encoder, example, row, max_length, overlong)
    if not example.truncated:
        prompt = encoder.encode_prompt(get_formatter("alpaca")(row)["messages"][:-1])
        assert example.input_ids[: len(prompt)] == prompt
        assert example.labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
        assert all(label != IGNORE_INDEX for label in example.labels[len(prompt):])


@PROPERTY_SETTINGS
@given(batch_rows=st.lists(rows, min_size=1, max_size=4), max_length=max_lengths,
       overlong=st.sampled_from(["drop", "truncate"]), padding_side=st.sampled_from(["right", "left"]))
def test_collated_batches_keep_the_rules(tok, batch_rows, max_length, overlong, padding_side):
    examples = []
    for row in batch_rows:
        encoder, example = _encode(tok, "alpaca", row, max_length, overlong)
        if example is not None:
            examples.append((row, example))
    if not examples:
        return
    batch = EOSSafeCollator(pad_token_id=tok.pad_token_id, padding_side=padding_side)(
        [example.as_dict() for _, example in examples])
    width = max(len(example.input_ids) for _, example in examples)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (len(examples), width)
    for (row, example), ids, labels, mask in zip(examples, batch["input_ids"], batch["labels"], batch["attention_mask"]):
        n = len(example.input_ids)
        real = slice(0, n) if padding_side == "right" else slice(width - n, width)
        padding = slice(n, width) if padding_side == "right" else slice(0, width - n)
        assert ids[real].tolist() == example.input_ids and labels[real].tolist() == example.labels
        assert bool((mask[real] == 1).all()) and bool((mask[padding] == 0).all())
        assert bool((labels[padding] == IGNORE_INDEX).all()) and bool((ids[padding] == tok.pad_token_id).all())
        _check(tok, encoder, example, row, max_length, overlong)
