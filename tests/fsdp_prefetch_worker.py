"""One process of ``tests/test_fsdp_prefetch.py``: a tiny Llama with LoRA sharded with FSDP2, trained a few steps
with or without :func:`hf_instruct_tune.fsdp_prefetch.prefetch_layers`.

usage: torchrun --nproc_per_node 2 fsdp_prefetch_worker.py MODEL_DIR OUT_FILE DEPTH

Process 0 writes (with ``torch.save``) the losses of every step, the gathered adapter, and for each sharded layer
the indices of the layers it prefetches in forward and in backward.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from fsdp_adapter_worker import lora_model, rows

STEPS, LR = 3, 1e-2


def prefetch_plan(layers: list) -> dict[str, list[list[int]]]:
    """Which layers (by index) each layer's FSDP state prefetches, forward and backward."""
    index = {id(layer._get_fsdp_state()): i for i, layer in enumerate(layers)}
    state = [layer._get_fsdp_state() for layer in layers]
    return {"forward": [[index[id(s)] for s in st._states_to_forward_prefetch] for st in state],
            "backward": [[index[id(s)] for s in st._states_to_backward_prefetch] for st in state]}


def main(model_dir: str, out: str, depth: int) -> None:
    from torch.distributed.fsdp import fully_shard

    from hf_instruct_tune.fsdp import adapter_state_dict
    from hf_instruct_tune.fsdp_prefetch import prefetch_layers, sharded_layers

    dist.init_process_group("gloo")
    model = lora_model(model_dir)
    decoder_layers = list(model.base_model.model.model.layers)
    for layer in decoder_layers:  # accelerate's TRANSFORMER_BASED_WRAP, then the root
        fully_shard(layer)
    fully_shard(model.base_model.model.lm_head)  # a sharded module that is not a decoder layer
    fully_shard(model)
    prefetch_layers(model, depth)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    ids = rows(dist.get_rank())
    losses = []
    for _ in range(STEPS):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    state_dict = adapter_state_dict(model)
    if dist.get_rank() == 0:
        torch.save({"losses": losses, "adapter": state_dict, "decoder_layers": len(decoder_layers),
                    "prefetch": prefetch_plan(sharded_layers(model))}, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
