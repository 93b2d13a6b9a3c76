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
                 "row_tokens": 14, "rows": 2})
    assert meter.tokens == 27


def test_the_rate_leaves_out_the_warm_up_steps_and_each_step_time_is_kept():
    meter = Throughput()
    meter.stamps = [(float(t), 100 * n) for n, t in enumerate([5, 15, 16, 17, 18, 20, 22, 24, 26, 28], start=1)]
    assert meter.step_seconds() == [10.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0]
    assert meter.step_tokens() == [100] * 10
    # ten steps: the first five are left out, the last five made 500 tokens in 28 - 18 seconds
    assert meter.timed_tokens() == 500
    assert meter.tokens_per_second() == 50.0


def test_the_per_step_records_cover_the_first_thousand_steps():
    from hf_instruct_tune.throughput import RECORDED_STEPS

    meter = Throughput()
    meter.stamps = [(float(step), 7 * step) for step in range(1, RECORDED_STEPS + 51)]
    assert meter.step_tokens() == [7] * RECORDED_STEPS
    assert len(meter.step_seconds()) == RECORDED_STEPS - 1


def test_a_run_writes_each_steps_seconds_and_tokens(tmp_path):
    from helpers import sentiment_rows, tiny_lora_trainer

    trainer = tiny_lora_trainer(tmp_path, sentiment_rows(12), num_layers=1, max_steps=3)
    trainer.train()
    results = trainer._complete_metadata().results
    assert len(results["step_tokens"]) == 3 and sum(results["step_tokens"]) == trainer.throughput.tokens > 0
    assert len(results["step_seconds"]) == 2 and all(s > 0 for s in results["step_seconds"])
    assert results["step_peak_memory_gib"] == []  # CPU: no GPU memory to record


class _FakeEvent:
    """A CUDA timing event stamped from a fake GPU clock (milliseconds)."""

    clock_ms = 0.0
    waited: list = []

    def __init__(self):
        self.at = _FakeEvent.clock_ms

    def synchronize(self):
        _FakeEvent.waited.append(self)

    def elapsed_time(self, later):
        return later.at - self.at


def test_on_a_gpu_no_step_waits_for_the_gpu_and_the_rate_is_the_gpus_time_line(monkeypatch):
    import hf_instruct_tune.throughput as throughput
    from hf_instruct_tune.throughput import RECORDED_STEPS

    def synchronize():
        raise AssertionError("a step waited for the GPU")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)
    monkeypatch.setattr(throughput, "_recorded_event", _FakeEvent)
    monkeypatch.setattr(_FakeEvent, "waited", [])
    meter = Throughput()
    meter.on_train_begin(None, None, None)
    steps = RECORDED_STEPS + 50
    for step in range(1, steps + 1):
        meter.tokens += 100
        _FakeEvent.clock_ms += 500.0  # each step takes half a second on the GPU
        meter.on_step_end(None, None, None)
        assert len(meter._events) <= RECORDED_STEPS + 1
    assert _FakeEvent.waited == []  # nothing read until the rate is asked for
    assert meter.tokens_per_second() == 200.0
    assert len(_FakeEvent.waited) == 1  # the last stamp only
    assert meter.step_seconds()[:3] == [0.5, 0.5, 0.5] and len(meter.step_seconds()) == RECORDED_STEPS - 1
    assert meter.timed_tokens() == 100 * (steps - 5) and meter.peak_memory_gib() == 3.0  # after the 5th step
