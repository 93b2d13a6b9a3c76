"""A micro-batch over the memory budget runs in parts: the parts hold the same tokens, and training on them gives
the same losses and adapter as the whole micro-batch."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import logged_losses, sentiment_rows, tiny_lora_trainer
from torch.testing import assert_close

from hf_instruct_tune.collator import pad_examples
from hf_instruct_tune.micro_batch_split import split_micro_batch
from hf_instruct_tune.packing import pack_features

EXAMPLES = [{"input_ids": list(range(10 + i, 10 + i + n)), "labels": [-100] * 2 + list(range(n - 2))}
            for i, n in enumerate((5, 9, 3, 7, 4))]  # 28 tokens


def test_a_packed_micro_batch_is_cut_between_examples():
    batch = pack_features(EXAMPLES, flash_attn_kwargs=True)
    parts = split_micro_batch(batch, 12)
    assert [part["input_ids"].shape[1] for part in parts] == [5, 12, 11]  # in order, each as full as fits
    for key in ("input_ids", "labels", "position_ids"):
        assert torch.equal(torch.cat([part[key] for part in parts], dim=1), batch[key])
    for part, lengths in zip(parts, ([5], [9, 3], [7, 4])):
        assert part["cu_seq_lens_q"].tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()]
        assert part["max_length_q"] == part["max_length_k"] == max(lengths)
        assert (part["position_ids"][0] == 0).sum() == len(lengths)  # whole examples only
        assert part["use_cache"] is False
    assert split_micro_batch(batch, 28) == [batch]  # it fits
    assert [part["input_ids"].shape[1] for part in split_micro_batch(batch, 6)] == [5, 9, 3, 7, 4]  # 9 > 6: alone


def test_a_padded_micro_batch_is_cut_between_rows():
    batch = pad_examples(EXAMPLES, pad_token_id=0)  # 5 rows of 9
    parts = split_micro_batch(batch, 20)
    assert [part["input_ids"].shape[0] for part in parts] == [2, 2, 1]
    for key in ("input_ids", "labels", "attention_mask"):
        assert torch.equal(torch.cat([part[key] for part in parts]), batch[key])


def test_a_batch_of_another_layout_is_not_cut():
    batch = {**pack_features(EXAMPLES), "loss_positions": torch.arange(3)}
    assert len(split_micro_batch(batch, 10)) == 1


ROWS = sentiment_rows(16)


@pytest.mark.parametrize("packing", [True, False])
def test_training_in_parts_gives_the_same_losses_and_adapter(tmp_path, monkeypatch, packing):
    from hf_instruct_tune import memory_plan

    config = {"packing": packing}
    whole = tiny_lora_trainer(tmp_path / "whole", ROWS, num_layers=2, max_steps=4, max_memory=100.0, config=config)
    whole.train()
    assert whole.micro_batches_in_parts == 0
    original = memory_plan.plan_memory

    def plan(*args, **kwargs):  # a budget that holds about a third of a micro-batch
        return dataclasses.replace(original(*args, **kwargs), split_above_tokens=60)

    monkeypatch.setattr(memory_plan, "plan_memory", plan)
    cut = tiny_lora_trainer(tmp_path / "cut", ROWS, num_layers=2, max_steps=4, max_memory=100.0, config=config)
    cut.train()
    assert cut.micro_batches_in_parts == 4  # every micro-batch of the run
    assert_close(torch.tensor(logged_losses(cut)), torch.tensor(logged_losses(whole)), rtol=1e-5, atol=1e-6)
    adapter = {name: p.detach() for name, p in cut.model.named_parameters() if p.requires_grad}
    for name, reference in whole.model.named_parameters():
        if reference.requires_grad:
            assert_close(adapter[name], reference.detach(), rtol=1e-4, atol=1e-6)


def test_with_prefix_sharing_a_micro_batch_over_the_budget_is_packed_and_cut(tmp_path, monkeypatch):
    """Prefix sharing (on by default on a GPU) does not keep the plan from cutting micro-batches: one whose
    shared-prefix row would pass the budget is packed as usual and run in parts, with the same losses."""
    from hf_instruct_tune import memory_plan

    asked = {}
    original = memory_plan.plan_memory

    def plan(*args, **kwargs):
        asked["can_split"] = kwargs.get("can_split")
        return dataclasses.replace(original(*args, **kwargs), split_above_tokens=60)

    config = {"packing": True}
    whole = tiny_lora_trainer(tmp_path / "whole", ROWS, num_layers=2, max_steps=4, max_memory=100.0, config=config,
                              prefix_sharing=True)
    whole.train()
    assert whole.sharing_stats.batches == 4 and whole.micro_batches_in_parts == 0  # every micro-batch shared
    monkeypatch.setattr(memory_plan, "plan_memory", plan)
    cut = tiny_lora_trainer(tmp_path / "cut", ROWS, num_layers=2, max_steps=4, max_memory=100.0, config=config,
                            prefix_sharing=True)
    assert asked["can_split"] is True and cut.data_collator.shared_tokens_limit == 60
    cut.train()
    assert cut.micro_batches_in_parts == 4 and cut.sharing_stats.batches == 0
    assert_close(torch.tensor(logged_losses(cut)), torch.tensor(logged_losses(whole)), rtol=1e-4, atol=1e-5)


def test_the_plan_cuts_only_the_longest_micro_batches(monkeypatch):
    from hf_instruct_tune.memory_plan import SPLIT_SHARE, micro_batch_quantile, plan_memory
    from test_memory_plan import LLAMA3_8B_NF4, _bench_lengths

    monkeypatch.setattr("hf_instruct_tune.memory_plan._cut_cross_entropy", lambda: True)
    lengths = [int(length * 1.1) for length in _bench_lengths()]  # as long as the GPU bench's rows
    options = dict(rows_per_process=16, processes=1, row_lengths=lengths, packed=True, budget_gib=8,
                   optimizer_steps=16)
    whole, in_parts = plan_memory(LLAMA3_8B_NF4, **options), plan_memory(LLAMA3_8B_NF4, can_split=True, **options)
    assert (whole.micro_batch, whole.split_above_tokens) == (8, None)  # all 16 rows would not fit the longest
    assert in_parts.micro_batch == 16 and in_parts.fits
    assert micro_batch_quantile(lengths, 16, True, 1 - SPLIT_SHARE) <= in_parts.split_above_tokens
    assert in_parts.split_above_tokens < in_parts.micro_batch_tokens  # the longest run in parts
    assert "runs in parts" in in_parts.describe()
    larger = plan_memory(LLAMA3_8B_NF4, can_split=True, **{**options, "budget_gib": 32})
    assert larger == dataclasses.replace(plan_memory(LLAMA3_8B_NF4, **{**options, "budget_gib": 32}),
                                         split_above_tokens=larger.split_above_tokens)  # nothing else changes
    assert "runs in parts" not in larger.describe()
