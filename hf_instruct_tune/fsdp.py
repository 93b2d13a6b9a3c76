"""FSDP2 through accelerate: the config ``train --fsdp`` launches with, and the adapter gathered whole for saving.

There is no distributed layer here. ``accelerate launch`` starts the processes and accelerate shards the model
(``fully_shard`` on each decoder layer, then on the whole model); the Trainer trains it. This module holds:

- :data:`FSDP_CONFIG`, the accelerate config ``--fsdp`` writes (:func:`write_accelerate_config`; the same as
  ``examples/accelerate_fsdp.yaml``);
- :func:`check_plugin`: the FSDP settings ``train`` can save a whole adapter from;
- :func:`adapter_state_dict`: the adapter's weights gathered from every process, whole, for process 0 to write.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import InputError, InstructTuneError

FSDP_CONFIG: dict[str, Any] = {
    "compute_environment": "LOCAL_MACHINE",
    "distributed_type": "FSDP",
    "num_machines": 1,
    "machine_rank": 0,
    "num_processes": 2,
    "main_process_port": 0,
    "rdzv_backend": "static",
    "same_network": True,
    "mixed_precision": "bf16",
    "downcast_bf16": "no",
    "use_cpu": False,
    "fsdp_config": {
        "fsdp_version": 2,
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_state_dict_type": "FULL_STATE_DICT",
        "fsdp_reshard_after_forward": True,
        "fsdp_offload_params": False,
        "fsdp_cpu_ram_efficient_loading": False,
        "fsdp_activation_checkpointing": False,
    },
}
"""FSDP2 on one machine: one shard unit per decoder layer (the model's ``_no_split_modules``), weights,
gradients and optimizer state sharded, bf16 mixed precision (the fp32 adapter computes in bf16). Activation
checkpointing is the memory plan's (transformers' per-layer checkpointing), not FSDP's, which would recompute
every layer. Every process reads the base model itself (``cpu_ram_efficient_loading`` off): a 4-bit base is
quantized on each GPU, which accelerate cannot broadcast from process 0."""


def accelerate_config(num_processes: int) -> dict[str, Any]:
    """:data:`FSDP_CONFIG` for ``num_processes`` processes."""
    return {**FSDP_CONFIG, "num_processes": num_processes, "fsdp_config": dict(FSDP_CONFIG["fsdp_config"])}


def write_accelerate_config(path: str | Path, num_processes: int) -> Path:
    """Write the accelerate config of ``--fsdp`` (YAML) to ``path`` and return it."""
    import yaml

    path = Path(path)
    path.write_text(yaml.safe_dump(accelerate_config(num_processes), sort_keys=False), encoding="utf-8")
    return path


def check_plugin(plugin) -> None:
    """Refuse, before training, FSDP settings that ``train`` cannot save a whole adapter from.

    ``plugin`` is accelerate's ``FullyShardedDataParallelPlugin`` of the running process.
    """
    version = getattr(plugin, "fsdp_version", 1)
    if version != 2:
        raise InputError(f"FSDP version {version} is not supported (on two H200s it saved adapters without weights); "
                         "set `fsdp_version: 2` in the accelerate config, or use `train --fsdp`", field="fsdp_version")
    state_dict_type = str(plugin.state_dict_type)
    if "FULL_STATE_DICT" not in state_dict_type:
        raise InputError(f"FSDP saves no adapter with the state dict type {state_dict_type}; set "
                         "`fsdp_state_dict_type: FULL_STATE_DICT` in the accelerate config (see "
                         "examples/accelerate_fsdp.yaml)", field="fsdp_state_dict_type")


class PartialAdapterError(InstructTuneError):
    """The weights gathered from the processes do not make up the whole adapter; nothing is written."""

    exit_code = 1


def adapter_state_dict(model) -> dict[str, Any]:
    """The trainable weights (the adapter) of a model sharded with FSDP2, each gathered whole.

    Call it on every process: each takes part in gathering every tensor (``DTensor.full_tensor``, one
    all-gather per tensor, in the model's parameter order). Process 0 gets every tensor whole, on the CPU; the
    others get an empty dict. Frozen weights (the base, 4-bit or not) are neither gathered nor read. Keys are
    the model's own parameter names, as ``model.state_dict()`` has them, so
    ``PeftModel.save_pretrained(folder, state_dict=...)`` writes the same adapter as on one GPU.
    Raises :class:`PartialAdapterError` when what process 0 got is not every trainable tensor at full shape.
    """
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    writer = not dist.is_initialized() or dist.get_rank() == 0
    gathered, expected = {}, {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        expected[name] = tuple(param.shape)  # a DTensor's shape is the whole tensor's
        whole = param.full_tensor() if isinstance(param, DTensor) else param
        if writer:
            gathered[name] = whole.detach().to("cpu", copy=True)
    if not writer:
        return {}
    check_whole(gathered, expected)
    return gathered


def check_whole(gathered: dict[str, Any], expected: dict[str, tuple[int, ...]]) -> None:
    """Raise :class:`PartialAdapterError` unless ``gathered`` holds every ``expected`` name at its shape."""
    got = {name: tuple(tensor.shape) for name, tensor in gathered.items()}
    if got == expected:
        return
    missing = sorted(set(expected) - set(got))
    wrong = sorted(name for name in set(expected) & set(got) if got[name] != expected[name])
    raise PartialAdapterError(
        f"the adapter gathered from the processes is not whole: {len(missing)} of {len(expected)} tensors "
        f"missing{' (' + missing[0] + ', ...)' if missing else ''}, {len(wrong)} at a shard's shape"
        f"{' (' + wrong[0] + f': {got[wrong[0]]} instead of {expected[wrong[0]]})' if wrong else ''}; nothing "
        "was saved")
