"""``--resume`` under FSDP2: a checkpoint's adapter and optimizer state load back into a freshly sharded model.

accelerate runs FSDP on GPUs only, so the loading runs here in two CPU processes over gloo
(``tests/fsdp_resume_worker.py``), sharded as accelerate shards a model; the Trainer's use of it is checked on one
process. ``bench/fsdp_resume_check.sh`` runs ``train --fsdp --resume`` end to end on two GPUs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from helpers import run_two_cpu_processes
from hf_instruct_tune import fsdp
from hf_instruct_tune.errors import InputError

WORKER = Path(__file__).with_name("fsdp_resume_worker.py")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """What two FSDP2 processes saved, loaded back into a new sharded model, and trained one step further."""
    from hf_instruct_tune.testing.tiny import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("fsdp_resume")
    model_dir = save_tiny_checkpoint(root / "model")
    run_two_cpu_processes(WORKER, model_dir, root, home=root / "hf_home")
    return torch.load(root / "results.pt", weights_only=True)


def test_the_loaded_adapter_is_the_saved_one_on_every_process(results):
    saved, loaded, fresh = results["saved"], results["loaded"], results["fresh"]
    assert len(saved) == len(loaded) == len(fresh) > 0
    assert any(not torch.equal(fresh[name], saved[name]) for name in saved)  # loading had something to do
    for name, tensor in saved.items():
        assert torch.equal(loaded[name], tensor), name  # gathered from both processes' shards


def test_the_loaded_model_gives_the_saved_models_logits(results):
    assert_close(results["loaded_logits"], results["saved_logits"], rtol=0, atol=0)


def test_a_step_after_loading_is_the_unbroken_runs_step(results):
    """Adam's moments and step count came back: the step equals the one the unbroken run took, not a first step."""
    unbroken, resumed, saved = results["unbroken"], results["resumed"], results["saved"]
    for name, tensor in unbroken.items():
        assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-7, msg=name)
    assert any((unbroken[name] - saved[name]).abs().max() > 1e-4 for name in saved)  # the step moved the adapter


def _lora_model():
    from peft import LoraConfig, get_peft_model

    from hf_instruct_tune.testing.tiny import build_tiny_model, build_tiny_tokenizer

    torch.manual_seed(0)
    return get_peft_model(build_tiny_model(build_tiny_tokenizer()),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))


def test_a_checkpoint_without_the_models_adapter_is_an_input_error(tmp_path):
    model = _lora_model()
    model.save_pretrained(tmp_path / "q_only", state_dict={k: v for k, v in model.state_dict().items()
                                                           if "v_proj" not in k})
    with pytest.raises(InputError, match=r"field 'resume': adapter_model.safetensors does not hold this model's "
                                         r"adapter: 4 of 8 tensors missing"):
        fsdp.load_adapter(model, tmp_path / "q_only")
    with pytest.raises(InputError, match="holds no adapter_model.safetensors"):
        fsdp.load_adapter(model, tmp_path)
    with pytest.raises(InputError, match="field 'load_best_model_at_end': holds no adapter_model.safetensors"):
        fsdp.load_adapter(model, tmp_path, field="load_best_model_at_end")


def test_an_optimizer_state_saved_without_fsdp_is_an_input_error(tmp_path):
    model = _lora_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model(input_ids=torch.tensor([[5, 6, 7]]), labels=torch.tensor([[5, 6, 7]])).loss.backward()
    optimizer.step()
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")  # as the Trainer saves it on one process
    with pytest.raises(InputError, match=r"field 'resume': optimizer.pt was saved by a run without FSDP"):
        fsdp.load_optimizer(model, optimizer, tmp_path / "optimizer.pt")


def test_under_fsdp_the_trainer_checkpoints_and_resumes_through_the_fsdp_functions(tmp_path, monkeypatch):
    """The Trainer's FSDP hooks write the optimizer and scheduler and read them back with the adapter (one process)."""
    from peft import LoraConfig
    from trl import SFTConfig

    from hf_instruct_tune import InstructTrainer
    from hf_instruct_tune.testing.tiny import build_tiny_model, build_tiny_tokenizer

    tok = build_tiny_tokenizer()

    def trainer(seed):
        torch.manual_seed(seed)
        args = SFTConfig(output_dir=str(tmp_path / "run"), use_cpu=True, bf16=False, report_to=[], max_steps=3,
                         gradient_checkpointing=False, learning_rate=1e-2, lr_scheduler_type="linear")
        return InstructTrainer(model=build_tiny_model(tok), args=args, processing_class=tok, template="alpaca",
                               train_dataset=[{"instruction": "hello", "output": "yes"}] * 16,
                               peft_config=LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))

    first = trainer(0)
    first.train()
    checkpoint = tmp_path / "checkpoint"
    monkeypatch.setattr(first, "is_fsdp_enabled", True)
    first.save_model(str(checkpoint), _internal_call=True)
    first._save_optimizer_and_scheduler(str(checkpoint))
    assert {"optimizer.pt", "scheduler.pt", "adapter_model.safetensors"} <= {p.name for p in checkpoint.iterdir()}
    assert not list(checkpoint.glob("*fsdp*"))  # the adapter is written once, not again by accelerate

    second = trainer(1)
    second.create_optimizer_and_scheduler(num_training_steps=3)
    monkeypatch.setattr(second, "is_fsdp_enabled", True)
    second._load_from_checkpoint(str(checkpoint))
    second._load_optimizer_and_scheduler(str(checkpoint))
    trained = dict(first.model.named_parameters())
    for name, param in second.model.named_parameters():
        assert torch.equal(param, trained[name]), name
    first_state, second_state = (t.optimizer.state_dict() for t in (first, second))
    assert len(second_state["state"]) == len(first_state["state"]) > 0
    for index, moments in first_state["state"].items():
        for key, value in moments.items():
            assert torch.equal(second_state["state"][index][key], value), (index, key)
    assert second.lr_scheduler.state_dict() == first.lr_scheduler.state_dict()
