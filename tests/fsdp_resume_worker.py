"""One process of ``tests/test_fsdp_resume.py``: a checkpoint of a model sharded with FSDP2, loaded into a new one.

usage: torchrun --nproc_per_node 2 fsdp_resume_worker.py MODEL_DIR OUT_DIR

Both processes train the tiny LoRA model of ``fsdp_adapter_worker`` for a few steps, save a checkpoint as
``InstructTrainer`` does under FSDP (the adapter gathered whole, the optimizer state gathered whole), and take one
more step: the unbroken run. Then a second model, sharded afresh with a new optimizer, loads the checkpoint
(``load_adapter``, ``load_optimizer``) and takes the same step: the resumed run. Process 0 writes what the test
compares to ``OUT_DIR/results.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from fsdp_adapter_worker import LR, STEPS, lora_model, rows

PROBE = torch.arange(40).view(2, 20) + 30


def sharded_model(model_dir: str, seed: int):
    from torch.distributed.fsdp import fully_shard

    model = lora_model(model_dir)
    torch.manual_seed(seed)  # a fresh model's adapter differs from the checkpoint's: lora_A drawn again, lora_B moved
    for name, param in model.named_parameters():
        if param.requires_grad:
            param.data.normal_(0, 0.02)
    for layer in model.base_model.model.model.layers:  # accelerate's TRANSFORMER_BASED_WRAP, then the root
        fully_shard(layer)
    fully_shard(model)
    return model


def step(model, optimizer) -> None:
    ids = rows(dist.get_rank())
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def new_optimizer(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.1)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROBE).logits


def main(model_dir: str, out: str) -> None:
    from hf_instruct_tune.fsdp import adapter_state_dict, load_adapter, load_optimizer, save_optimizer

    dist.init_process_group("gloo")
    writer = dist.get_rank() == 0
    checkpoint = Path(out) / "checkpoint"
    results = {}

    model = sharded_model(model_dir, seed=1)
    optimizer = new_optimizer(model)
    for _ in range(STEPS):
        step(model, optimizer)
    results["saved"] = adapter_state_dict(model)
    if writer:
        model.save_pretrained(checkpoint, state_dict=results["saved"])
    save_optimizer(model, optimizer, checkpoint / "optimizer.pt", write=writer)
    dist.barrier()  # the checkpoint is on disk before anyone reads it
    results["saved_logits"] = logits(model)
    step(model, optimizer)
    results["unbroken"] = adapter_state_dict(model)

    resumed = sharded_model(model_dir, seed=2)
    resumed_optimizer = new_optimizer(resumed)
    results["fresh"] = adapter_state_dict(resumed)
    load_adapter(resumed, checkpoint)
    load_optimizer(resumed, resumed_optimizer, checkpoint / "optimizer.pt")
    results["loaded"] = adapter_state_dict(resumed)
    results["loaded_logits"] = logits(resumed)
    step(resumed, resumed_optimizer)
    results["resumed"] = adapter_state_dict(resumed)

    if writer:
        torch.save(results, Path(out) / "results.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
