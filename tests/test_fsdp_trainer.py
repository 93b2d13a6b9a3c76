"""``InstructTrainer`` under accelerate's FSDP2: the best checkpoint loaded at the end, and its checkpoints resumed
in one process.

Two CPU processes over gloo train, evaluate and checkpoint through the Trainer, with accelerate kept on FSDP
(``tests/fsdp_trainer_worker.py``); the checkpoints they wrote are then resumed here, in one process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from helpers import run_two_cpu_processes

WORKER = Path(__file__).with_name("fsdp_trainer_worker.py")
sys.path.insert(0, str(WORKER.parent))
import fsdp_trainer_worker as worker  # noqa: E402


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """The tiny model's folder, the run's folder, and what each of the two processes ended with."""
    from hf_instruct_tune.testing.tiny import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("fsdp_trainer")
    model_dir = save_tiny_checkpoint(root / "model")
    run_two_cpu_processes(WORKER, model_dir, root, home=root / "hf_home")
    results = [torch.load(root / f"results_{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert all(result["fsdp"] for result in results)  # sharded by accelerate's FSDP2, not replicated by DDP
    return model_dir, root / "run", results


def _in_file(adapter: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's adapter names as ``adapter_model.safetensors`` has them (without the adapter's name)."""
    return {name.replace(".default.", "."): tensor for name, tensor in adapter.items()}


def test_load_best_model_at_end_loads_the_best_checkpoint_on_every_process(fsdp_run):
    _, run_dir, results = fsdp_run
    best = min(results[0]["evals"], key=results[0]["evals"].get)
    assert best < worker.STEPS  # the last checkpoint is not the best: loading has something to do
    assert all(result["best_model_checkpoint"] == str(run_dir / f"checkpoint-{best}") for result in results)
    saved = load_file(run_dir / f"checkpoint-{best}" / "adapter_model.safetensors")
    last = load_file(run_dir / f"checkpoint-{worker.STEPS}" / "adapter_model.safetensors")
    assert any(not torch.equal(last[name], tensor) for name, tensor in saved.items())
    for result in results:
        adapter = _in_file(result["adapter"])
        assert adapter.keys() == saved.keys()
        for name, tensor in saved.items():
            assert torch.equal(adapter[name], tensor), name


def test_a_checkpoint_saved_under_fsdp_resumes_in_one_process_as_the_run_went_on(fsdp_run, tmp_path):
    """One process taking both processes' rows per step resumes checkpoint 2 (adapter, Adam's moments, the schedule)
    and its steps 3 and 4 end where the two processes' did."""
    from peft import get_peft_model_state_dict

    model_dir, run_dir, _ = fsdp_run
    one = worker.trainer(model_dir, tmp_path / "resumed", gradient_accumulation_steps=2, eval_strategy="no",
                         save_strategy="no", load_best_model_at_end=False)
    one.train(resume_from_checkpoint=str(run_dir / "checkpoint-2"))
    assert one.state.global_step == worker.STEPS
    resumed = get_peft_model_state_dict(one.model)
    unbroken = load_file(run_dir / f"checkpoint-{worker.STEPS}" / "adapter_model.safetensors")
    start = load_file(run_dir / "checkpoint-2" / "adapter_model.safetensors")
    assert resumed.keys() == unbroken.keys()
    for name, tensor in unbroken.items():
        assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-5, msg=name)
    assert any((unbroken[name] - start[name]).abs().max() > 1e-2 for name in start)  # the steps moved the adapter
