"""One process of ``tests/test_fsdp_trainer.py``: ``InstructTrainer`` training under accelerate's FSDP2, on CPU.

usage: torchrun --nproc_per_node 2 fsdp_trainer_worker.py MODEL_DIR OUT_DIR

accelerate runs FSDP on GPUs only: on CPU it sets up plain multi-process training. Here its state is set to FSDP
with the plugin it built from the environment ``train --fsdp`` launches with (:data:`hf_instruct_tune.fsdp.
FSDP_CONFIG`, in fp32), so the Trainer shards the model with accelerate's FSDP2 and trains, evaluates, saves its
checkpoints and loads the best one at the end as on GPUs. Each process writes what it ended with to
``OUT_DIR/results_RANK.pt``; the checkpoints are in ``OUT_DIR/run``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

STEPS, SAVE_EVERY, ROWS_PER_PROCESS, LR = 4, 1, 2, 2e-1
TARGETS = ["q_proj", "v_proj"]
WORDS = ["hello", "world", "classify", "the", "sentiment", "yes", "no", "maybe", "Paris", "France"]


def train_rows() -> list[dict]:
    return [{"instruction": f"{WORDS[i % 10]} {WORDS[(3 * i) % 10]}", "output": WORDS[(7 * i) % 10]}
            for i in range(16)]


def eval_rows() -> list[dict]:
    """Training rows with other answers: the loss on them rises once training learns the rows' answers."""
    return [{**row, "output": WORDS[(7 * i + 1) % 10]} for i, row in enumerate(train_rows()[:4])]


def training_args(output_dir: str | Path, **changes):
    """The two processes' arguments, with ``changes``."""
    from trl import SFTConfig

    settings = dict(output_dir=str(output_dir), use_cpu=True, bf16=False, report_to=[], max_steps=STEPS, seed=5,
                    per_device_train_batch_size=ROWS_PER_PROCESS, gradient_checkpointing=False, learning_rate=LR,
                    lr_scheduler_type="linear", save_strategy="steps",
                    save_steps=SAVE_EVERY, eval_strategy="steps", eval_steps=SAVE_EVERY,
                    per_device_eval_batch_size=2, load_best_model_at_end=True, metric_for_best_model="eval_loss")
    return SFTConfig(**{**settings, **changes})


def trainer(model_dir: str | Path, output_dir: str | Path, **changes):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_instruct_tune import InstructTrainer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return InstructTrainer(model=model, args=training_args(output_dir, **changes),
                           processing_class=AutoTokenizer.from_pretrained(model_dir), template="alpaca",
                           train_dataset=train_rows(), eval_dataset=eval_rows(),
                           peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM"))


def fsdp_on_cpu() -> None:
    """Launch as ``train --fsdp`` does, and let accelerate keep FSDP on CPU (it would fall back to DDP)."""
    import accelerate.state
    from accelerate.utils import DistributedType

    from hf_instruct_tune.fsdp import FSDP_CONFIG

    os.environ.update({"ACCELERATE_USE_FSDP": "true", "ACCELERATE_MIXED_PRECISION": "no"})
    os.environ.update({key.upper(): str(value).lower() if isinstance(value, bool) else str(value)
                       for key, value in FSDP_CONFIG["fsdp_config"].items()})
    setup = accelerate.state.AcceleratorState.__init__

    def fsdp_setup(self, *args, fsdp_plugin=None, **kwargs):
        setup(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None:
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin

    accelerate.state.AcceleratorState.__init__ = fsdp_setup


def main(model_dir: str, out: str) -> None:
    from torch.distributed.tensor import DTensor

    fsdp_on_cpu()
    run = trainer(model_dir, Path(out) / "run")
    run.train()
    adapter = {name: param for name, param in run.model.named_parameters() if param.requires_grad}
    results = {
        "fsdp": run.is_fsdp_enabled and all(isinstance(param, DTensor) for param in adapter.values()),
        "best_model_checkpoint": run.state.best_model_checkpoint,
        "evals": {entry["step"]: entry["eval_loss"] for entry in run.state.log_history if "eval_loss" in entry},
        # every process gathers every tensor whole: what each process's shards make up
        "adapter": {name: param.full_tensor().detach().clone() for name, param in adapter.items()},
    }
    torch.save(results, Path(out) / f"results_{dist.get_rank()}.pt")
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
