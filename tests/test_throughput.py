import torch

from hf_instruct_tune.throughput import Throughput


def test_real_tokens_are_the_tokens_the_rows_hold():
    meter = Throughput()
    meter.count({"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.tensor([[1] * 5, [1, 1, 0, 0, 0]])})
    assert meter.tokens == 7  # padding is not a real token
    meter.count({"input_ids": torch.ones(1, 6, dtype=torch.long), "position_ids": torch.arange(6)[None]})
    assert meter.tokens == 13  # a packed row: every token is real
    # A prefix-shared micro-batch computes 9 tokens (one 5-token prefix, two 2-token rests) for rows of 7 + 7.
    meter.count({"input_ids": torch.ones(1, 9, dtype=torch.long), "attention_mask": torch.ones(1, 1, 9, 9),
                 "row_tokens": torch.tensor(14), "rows": torch.tensor(2)})
    assert meter.tokens == 27
