"""EOSSafeCollator: padding by position on tiny literal tensors, raw rows encoded on the fly."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_single_turn_invariants, tiny_tokenizer

from hf_instruct_tune.collator import EOSSafeCollator, pad_examples
from hf_instruct_tune.errors import InputError
from hf_instruct_tune.formatters import get_formatter
from hf_instruct_tune.templating import get_template
from hf_instruct_tune.tokenization import ExampleEncoder

PAD = EOS = 2
FEATURES = [{"input_ids": [1, 5, 6, 2], "labels": [-100, -100, 6, 2]},
            {"input_ids": [1, 7, 2], "labels": [-100, 7, 2]}]


def test_right_padding_keeps_eos_equal_to_pad():
    batch = EOSSafeCollator(pad_token_id=PAD)(FEATURES)
    torch.testing.assert_close(batch["input_ids"], torch.tensor([[1, 5, 6, 2], [1, 7, 2, 2]]))
    torch.testing.assert_close(batch["labels"], torch.tensor([[-100, -100, 6, 2], [-100, 7, 2, -100]]))
    torch.testing.assert_close(batch["attention_mask"], torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]))


def test_left_padding_and_multiple_of():
    batch = EOSSafeCollator(pad_token_id=PAD, padding_side="left", pad_to_multiple_of=3)(FEATURES)
    torch.testing.assert_close(batch["input_ids"], torch.tensor([[2, 2, 1, 5, 6, 2], [2, 2, 2, 1, 7, 2]]))
    torch.testing.assert_close(batch["labels"],
                               torch.tensor([[-100, -100, -100, -100, 6, 2], [-100, -100, -100, -100, 7, 2]]))
    torch.testing.assert_close(batch["attention_mask"], torch.tensor([[0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]]))


def test_label_equal_to_pad_id_in_the_middle_survives():
    batch = pad_examples([{"input_ids": [3, 0, 4], "labels": [3, 0, 4]}, {"input_ids": [3], "labels": [3]}],
                         pad_token_id=0)
    torch.testing.assert_close(batch["labels"], torch.tensor([[3, 0, 4], [3, -100, -100]]))


def test_raw_rows_are_encoded_on_the_fly():
    tok = tiny_tokenizer()
    encoder = ExampleEncoder(tok, get_template("alpaca"), max_length=100)
    collator = EOSSafeCollator(pad_token_id=tok.pad_token_id, encoder=encoder, formatter=get_formatter("alpaca"))
    rows = [{"instruction": "hello", "output": "yes"}, {"instruction": "hello", "input": "world", "output": "no maybe"},
            {"instruction": "hello", "output": "The quick brown fox jumps over the lazy dog. " * 10}]  # dropped
    batch = collator(rows)
    assert batch["input_ids"].shape[0] == 2
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        n = int(mask.sum())
        assert_single_turn_invariants(ids[:n].tolist(), labels[:n].tolist(), stop_id=tok.eos_token_id)
        assert (labels[n:] == -100).all()
    with pytest.raises(InputError, match="longer than max_length"):
        collator(rows[2:])


def test_raw_rows_without_an_encoder_are_an_error():
    with pytest.raises(InputError, match="encoder"):
        EOSSafeCollator(pad_token_id=PAD)([{"instruction": "hello", "output": "yes"}])


@pytest.mark.parametrize("kwargs,match", [({"pad_token_id": None}, "pad_token_id"),
                                          ({"pad_token_id": 0, "padding_side": "top"}, "padding_side")])
def test_bad_options(kwargs, match):
    with pytest.raises(InputError, match=match):
        EOSSafeCollator(**kwargs)


def test_mismatched_lengths_are_an_error():
    with pytest.raises(InputError, match="3 input_ids but 2 labels"):
        pad_examples([{"input_ids": [1, 2, 3], "labels": [1, 2]}], pad_token_id=0)
