"""`train --load-best-model-at-end`: the adapter saved (and published) is the best checkpoint's, not the last."""

from __future__ import annotations

import json

import torch
from helpers import write_jsonl
from safetensors.torch import load_file

from hf_instruct_tune.cli import main

ROWS = [{"instruction": "hello", "output": "yes"}, {"instruction": "classify the sentiment", "output": "positive"},
        {"instruction": "Paris is the capital of", "output": "France"}, {"instruction": "hello world", "output": "no"}]


def _train(tmp_path, name, *extra):
    from hf_instruct_tune.testing.tiny import save_tiny_checkpoint

    model = tmp_path / "tiny"
    if not model.exists():
        save_tiny_checkpoint(model)
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    contrary = write_jsonl(tmp_path / "eval.jsonl", [{**row, "output": "no"} for row in ROWS])  # worse as training goes
    out = tmp_path / name
    code = main(["train", "--model", str(model), "--data", str(data), "--eval-data", str(contrary), "--output-dir",
                 str(out), "--max-steps", "4", "--batch-size", "2", "--grad-accum", "1", "--lr", "0.2",
                 "--lora-r", "4", "--target-modules", "q_proj,v_proj", "--save-steps", "1", "--seed", "0", *extra])
    assert code == 0
    return out


def test_the_saved_adapter_is_the_best_checkpoints(tmp_path):
    out = _train(tmp_path, "best", "--load-best-model-at-end")
    last_checkpoint = max((out / "checkpoints").glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    state = json.loads((last_checkpoint / "trainer_state.json").read_text())
    evals = {entry["step"]: entry["eval_loss"] for entry in state["log_history"] if "eval_loss" in entry}
    assert sorted(evals) == [1, 2, 3, 4]  # evaluated at every checkpoint
    best = min(evals, key=evals.get)
    assert best < 4 and state["best_model_checkpoint"].endswith(f"checkpoint-{best}")
    saved = load_file(out / "adapter_model.safetensors")
    best_adapter = load_file(out / "checkpoints" / f"checkpoint-{best}" / "adapter_model.safetensors")
    last = load_file(_train(tmp_path, "last") / "adapter_model.safetensors")  # the same run, without the option
    assert saved.keys() == best_adapter.keys()
    for name, tensor in saved.items():
        assert torch.equal(tensor, best_adapter[name]), name
    assert any(not torch.equal(tensor, last[name]) for name, tensor in saved.items())
    metadata = json.loads((out / "hf_instruct_tune.json").read_text())["results"]
    assert metadata["best_checkpoint_step"] == best and metadata["eval"]["eval_loss"] == evals[best]
    assert f"checkpoint of step {best}" in (out / "README.md").read_text()
