"""Each optimizer step's rows shared out between processes by work: the same rows per step, every row once, the
processes in lockstep, more even work than dealing the rows out in order, and the same losses.

The end-to-end check trains a tiny Llama on 2 CPU processes (gloo) twice, balanced and ``--no-balance-ranks``,
on rows of very different lengths with a sharp output layer: a row trained twice, dropped, or moved to another
step would change a step's loss by far more than the tolerance.
"""

from __future__ import annotations

import math
import os
import random
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard, SeedableRandomSampler
from helpers import write_jsonl
from torch.testing import assert_close
from torch.utils.data import BatchSampler

from hf_instruct_tune.metadata import TrainingMetadata
from hf_instruct_tune.rank_balance import (BalancedBatchSampler, balance_loader, even_split, fill_least_loaded,
                                           row_costs)


def _lengths(n: int, seed: int = 0) -> list[int]:
    """Long-tailed row lengths (median ~200 tokens), as instruction data has."""
    rng = random.Random(seed)
    return [int(min(2048, max(24, rng.lognormvariate(math.log(200), 0.75)))) for _ in range(n)]


def _balanced(rows: int, *, batch_size: int, grad_accum: int, processes: int, seed: int = 0,
              drop_last: bool = False) -> BalancedBatchSampler:
    sampler = SeedableRandomSampler(range(rows), data_seed=seed)
    return BalancedBatchSampler(sampler, row_costs(_lengths(rows), 4096), batch_size=batch_size,
                                grad_accum=grad_accum, num_processes=processes, drop_last=drop_last)


def _per_process(batches, processes: int) -> list[list[list[int]]]:
    """What accelerate hands each process in epoch 0 (the wrapper the Trainer's loader uses)."""
    shards = []
    for rank in range(processes):
        batches.sampler.set_epoch(0)  # a process of its own: the sampler starts the epoch afresh
        shards.append(list(BatchSamplerShard(batches, num_processes=processes, process_index=rank)))
    return shards


def test_fill_least_loaded_puts_the_long_rows_apart():
    assert fill_least_loaded([10, 9, 1, 1], [2, 2]) == [[0, 3], [1, 2]]  # in order: [[0, 1], [2, 3]], 19 vs 2
    assert fill_least_loaded([5, 5, 5], [1, 2]) == [[0], [1, 2]]  # a full bin takes no more
    assert even_split(7, 3) == [3, 2, 2]
    with pytest.raises(ValueError, match="do not fit"):
        fill_least_loaded([1, 1, 1], [1, 1])


@pytest.mark.parametrize("rows, batch_size, grad_accum, processes", [
    (64, 4, 2, 2),  # full steps only
    (203, 4, 2, 2),  # a last step of 11 rows: 2 micro-batches per process
    (203, 16, 1, 2), (203, 5, 2, 3), (203, 3, 1, 4),
    (203, 1, 3, 2),  # batch size 1: the last step's 5 rows in 2 micro-batches per process, one of them 2 rows
    (18, 2, 2, 2),  # a last step of 2 rows: one each
])
def test_every_row_once_and_the_processes_in_lockstep(rows, batch_size, grad_accum, processes):
    batches = _balanced(rows, batch_size=batch_size, grad_accum=grad_accum, processes=processes)
    shards = _per_process(batches, processes)
    assert len({len(shard) for shard in shards}) == 1  # every process takes the same number of micro-batches
    assert len(shards[0]) == len(BatchSamplerShard(batches, num_processes=processes))
    assert sorted(row for shard in shards for batch in shard for row in batch) == list(range(rows))
    largest = batch_size if batch_size > 1 else 2
    assert all(1 <= len(batch) <= largest for shard in shards for batch in shard)
    full = rows // (batch_size * grad_accum * processes)
    for shard in shards:  # full steps: batch_size rows in each of grad_accum micro-batches, as asked
        assert all(len(batch) == batch_size for batch in shard[:full * grad_accum])


def test_a_last_step_smaller_than_the_processes_repeats_rows_as_accelerate_does():
    batches = _balanced(9, batch_size=2, grad_accum=1, processes=2)  # 2 full steps, then 1 row
    shards = _per_process(batches, 2)
    assert [len(shard) for shard in shards] == [3, 3]
    seen = [row for shard in shards for batch in shard for row in batch]
    assert sorted(set(seen)) == list(range(9))
    assert shards[1][-1] == shards[0][0]  # the epoch's first batch again, as accelerate fills a last round


def test_drop_last_drops_what_the_trainer_drops():
    batches = _balanced(203, batch_size=4, grad_accum=2, processes=2, drop_last=True)
    default = BatchSampler(SeedableRandomSampler(range(203), data_seed=0), 4, drop_last=True)
    shards, in_order = _per_process(batches, 2), _per_process(default, 2)
    assert [len(s) for s in shards] == [len(s) for s in in_order] == [25, 25]
    assert sorted(r for s in shards for b in s for r in b) == sorted(r for s in in_order for b in s for r in b)


@pytest.mark.parametrize("rows, batch_size, grad_accum, processes", [(203, 4, 2, 2), (203, 5, 2, 3), (96, 16, 1, 2)])
def test_each_step_trains_the_rows_it_trained_when_dealt_out_in_order(rows, batch_size, grad_accum, processes):
    balanced = _per_process(_balanced(rows, batch_size=batch_size, grad_accum=grad_accum, processes=processes),
                            processes)
    default = BatchSampler(SeedableRandomSampler(range(rows), data_seed=0), batch_size, drop_last=False)
    in_order = _per_process(default, processes)  # the Trainer's loader without balancing
    full = rows // (batch_size * grad_accum * processes)
    assert full >= 2
    for step in range(full):
        def step_rows(shards):
            return sorted(row for shard in shards for batch in shard[step * grad_accum:(step + 1) * grad_accum]
                          for row in batch)
        assert step_rows(balanced) == step_rows(in_order)


def test_every_process_plans_the_same_batches():
    one, two = (_balanced(203, batch_size=4, grad_accum=2, processes=2) for _ in range(2))
    one.set_epoch(1)
    two.set_epoch(1)
    epoch_one = list(one)
    assert epoch_one == list(two)
    one.set_epoch(2)
    assert list(one) != epoch_one  # each epoch reshuffles, as the Trainer's sampler does


def _balance(batches: BalancedBatchSampler):
    return batches.measure(*batches.plan_epoch(list(batches.sampler)))


def test_work_is_more_even_than_dealt_out_in_order():
    """On long-tailed lengths the busiest process's work per step is within a few percent of the mean."""
    balance = _balance(_balanced(512, batch_size=16, grad_accum=1, processes=2))
    assert balance.in_order > 1.08
    assert balance.balanced < 1.01
    assert "the busiest does 1.00x the mean work (1.1" in balance.describe()
    skewed = _balance(_balanced(203, batch_size=4, grad_accum=2, processes=4))
    assert skewed.balanced < skewed.in_order - 0.1


def test_the_balance_is_logged_once_before_the_first_epoch(caplog):
    caplog.set_level("INFO", logger="hf_instruct_tune.rank_balance")
    batches = _balanced(64, batch_size=4, grad_accum=2, processes=2)
    batches.report = True
    batches.sampler.set_epoch(0)
    expected = list(batches)
    batches.report = True
    caplog.clear()
    batches.sampler.set_epoch(0)
    batches.report_ahead()
    assert [r.getMessage()[:13] for r in caplog.records] == ["Rank balance:"]
    assert list(batches) == expected  # looking ahead drew nothing from the sampler
    assert len(caplog.records) == 1


def test_balance_loader_replaces_only_a_sharded_plain_batch_sampler():
    def loader(processes=2, split_batches=False, batch_size=4):
        inner = BatchSampler(SeedableRandomSampler(range(20), data_seed=0), batch_size, drop_last=False)
        shard = BatchSamplerShard(inner, num_processes=processes, process_index=0, split_batches=split_batches)
        return SimpleNamespace(batch_sampler=shard)

    lengths = _lengths(20)
    prepared = loader()
    sampler = prepared.batch_sampler.batch_sampler.sampler
    balanced = balance_loader(prepared, lengths, attention_tokens=4096, batch_size=4, grad_accum=1)
    assert isinstance(balanced, BalancedBatchSampler) and prepared.batch_sampler.batch_sampler is balanced
    assert balanced.sampler is sampler  # the order accelerate seeded stays
    assert sorted(r for s in _per_process(balanced, 2) for b in s for r in b) == list(range(20))
    for other in (loader(processes=1), loader(split_batches=True), SimpleNamespace(batch_sampler=None)):
        assert balance_loader(other, lengths, attention_tokens=4096, batch_size=4, grad_accum=1) is None
    assert balance_loader(loader(), lengths[:10], attention_tokens=4096, batch_size=4, grad_accum=1) is None


# -- two CPU processes, balanced and in order ------------------------------------------------------

WORDS = "the quick brown fox jumps over the lazy dog while a cat sleeps on the warm mat".split()


def _rows() -> list[dict]:
    """16 rows: 12 short, 4 long, shuffled so that the order deals some step's long rows to one process."""
    rng = random.Random(1)
    rows = []
    for i in range(16):
        words = 60 if i % 4 == 0 else rng.randint(1, 4)
        rows.append({"instruction": f"row {i}: " + " ".join(rng.choice(WORDS) for _ in range(3)),
                     "output": " ".join(rng.choice(WORDS) for _ in range(words))})
    return rows


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    from hf_instruct_tune.testing.tiny import build_tiny_model, build_tiny_tokenizer

    root = tmp_path_factory.mktemp("rank_balance")
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(50)  # rows then have clearly different losses
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    data = write_jsonl(root / "train.jsonl", _rows())
    env = {key: value for key, value in os.environ.items()
           if key not in {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "RANK", "WORLD_SIZE", "LOCAL_RANK"}}
    env.update(HF_HOME=str(root / "hf_home"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    common = [sys.executable, "-m", "hf_instruct_tune", "train", "--model", str(root / "model"), "--data", str(data),
              "--output-dir", "adapter", "--num-processes", "2", "--batch-size", "2", "--grad-accum", "2",
              "--max-steps", "4", "--lr", "0.01", "--warmup-steps", "0", "--lora-r", "4", "--lora-alpha", "8",
              "--max-length", "256", "--seed", "0", "--logging-steps", "1", "--packing"]
    runs = {}
    for name, flags in {"balanced": [], "in_order": ["--no-balance-ranks"]}.items():
        folder = root / name
        folder.mkdir()
        done = subprocess.run([*common, *flags], cwd=folder, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{name} failed:\n{done.stderr[-5000:]}"
        runs[name] = SimpleNamespace(metadata=TrainingMetadata.load(folder / "adapter"), log=done.stderr,
                                     adapter=folder / "adapter" / "adapter_model.safetensors")
    return runs


def test_two_processes_balanced_log_the_same_losses(two_process_runs):
    balanced, in_order = two_process_runs["balanced"].metadata, two_process_runs["in_order"].metadata
    losses = [[entry["loss"] for entry in run.results["loss_history"]] for run in (balanced, in_order)]
    assert len(losses[0]) == 4
    assert_close(torch.tensor(losses[0], dtype=torch.float64), torch.tensor(losses[1], dtype=torch.float64),
                 rtol=2e-6, atol=0)
    assert (balanced.training["balance_ranks"], in_order.training["balance_ranks"]) == (True, False)


def test_two_processes_balanced_train_the_same_adapter(two_process_runs):
    from safetensors.torch import load_file

    assert_close(load_file(two_process_runs["balanced"].adapter), load_file(two_process_runs["in_order"].adapter))


def test_two_processes_log_the_balance_once(two_process_runs):
    log = two_process_runs["balanced"].log
    lines = [line for line in log.splitlines() if "Rank balance:" in line]
    assert len(lines) == 1, log[-3000:]
    busiest, in_order = map(float, re.search(r"does ([\d.]+)x the mean work \(([\d.]+)x", lines[0]).groups())
    assert busiest < in_order  # the data is laid out so that dealing in order is uneven: balancing moved rows
    assert "Rank balance:" not in two_process_runs["in_order"].log
