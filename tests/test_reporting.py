"""``--report-to``: logs go nowhere by default, and to TensorBoard event files (with the loss) when asked."""

from __future__ import annotations

import pytest
from helpers import write_jsonl

from hf_instruct_tune.config import TrainConfig, build_config
from hf_instruct_tune.errors import InputError

ROWS = [{"instruction": "hello", "output": "yes"}, {"instruction": "hello world", "output": "no"}]


def test_none_by_default_and_names_checked():
    assert TrainConfig().report_to == ["none"]
    assert TrainConfig(report_to="tensorboard").report_to == ["tensorboard"]
    with pytest.raises(InputError, match="Did you mean 'tensorboard'"):
        TrainConfig(report_to="tensorbord")
    with pytest.raises(InputError, match="'none' or 'all' alone"):
        TrainConfig(report_to=["none", "tensorboard"])


def test_yaml_key(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("report_to: tensorboard\n", encoding="utf-8")
    assert build_config(str(config), {}).report_to == ["tensorboard"]


def test_a_missing_tracker_package_is_named(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(InputError, match="pip install wandb"):
        TrainConfig(report_to="wandb")


def test_tensorboard_event_files_hold_the_loss(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from hf_instruct_tune.cli import main
    from hf_instruct_tune.testing.tiny import save_tiny_checkpoint

    model = save_tiny_checkpoint(tmp_path / "tiny")
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    out = tmp_path / "adapter"
    assert main(["train", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--max-steps", "2",
                 "--batch-size", "2", "--grad-accum", "1", "--report-to", "tensorboard"]) == 0
    events = sorted(out.glob("checkpoints/runs/*/events.out.tfevents.*"))
    assert events, sorted(str(path.relative_to(out)) for path in out.rglob("*"))
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    losses = accumulator.Scalars("train/loss")
    assert [event.step for event in losses] == [1, 2]
    assert all(event.value > 0 for event in losses)


def test_no_event_files_by_default(tmp_path):
    from hf_instruct_tune.cli import main
    from hf_instruct_tune.testing.tiny import save_tiny_checkpoint

    model = save_tiny_checkpoint(tmp_path / "tiny")
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    out = tmp_path / "adapter"
    assert main(["train", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--max-steps", "1",
                 "--batch-size", "2", "--grad-accum", "1"]) == 0
    assert not list(out.rglob("events.out.tfevents.*"))
