"""One process of ``tests/test_fsdp.py``: a tiny Llama with LoRA, sharded with FSDP2 as accelerate shards it.

usage: torchrun --nproc_per_node 2 fsdp_adapter_worker.py MODEL_DIR OUT_DIR

Each process trains on its own rows (:func:`rows`) for a few steps, then every process gathers the adapter
(``hf_instruct_tune.fsdp.adapter_state_dict``) and process 0 writes it as the Trainer's ``_save`` does.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

STEPS, LR, TARGETS = 3, 1e-2, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rows(rank: int) -> torch.Tensor:
    """Process ``rank``'s 2 rows of 16 token ids, different on each process, all the same length."""
    return torch.arange(16 * 2).view(2, 16) * (rank + 3) % 500 + 9


def lora_model(model_dir: str):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def train(model, batches: list[torch.Tensor]) -> None:
    """AdamW on the mean token loss of ``batches`` (each process's batch; FSDP averages the gradients)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    ids = torch.cat(batches)
    for _ in range(STEPS):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def main(model_dir: str, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    from hf_instruct_tune.fsdp import adapter_state_dict

    dist.init_process_group("gloo")
    model = lora_model(model_dir)
    for layer in model.base_model.model.model.layers:  # accelerate's TRANSFORMER_BASED_WRAP, then the root
        fully_shard(layer)
    fully_shard(model)
    train(model, [rows(dist.get_rank())])
    state_dict = adapter_state_dict(model)
    if dist.get_rank() == 0:
        model.save_pretrained(out, state_dict=state_dict)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
