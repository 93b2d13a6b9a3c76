"""FSDP2 through accelerate: the config ``train --fsdp`` launches with, and the adapter gathered whole for saving.

There is no distributed layer here. ``accelerate launch`` starts the processes and accelerate shards the model
(``fully_shard`` on each decoder layer, then on the whole model); the Trainer trains it. This module holds:

- :data:`FSDP_CONFIG`, the accelerate config ``--fsdp`` writes (:func:`write_accelerate_config`; the same as
  ``examples/accelerate_fsdp.yaml``);
- :func:`check_plugin`: the FSDP settings ``train`` can save a whole adapter from;
- :func:`reduce_in_fp32`: accelerate's bf16 policy made to reduce gradients in fp32 and leave outputs uncast;
- :func:`adapter_state_dict`: the adapter's weights gathered from every process, whole, for process 0 to write;
- :func:`save_optimizer` / :func:`load_optimizer` / :func:`load_adapter`: what a checkpoint needs for ``--resume``
  besides the adapter, gathered whole for process 0 to write, and loaded back into a sharded model on every process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import InputError, InstructTuneError
from .outputs import ADAPTER_FILE

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


def reduce_in_fp32(plugin) -> bool:
    """Keep FSDP2 computing in bf16 (or fp16), but reduce the gradients across processes in fp32 and leave each
    sharded module's outputs in the dtype they were computed in. Returns whether the policy was changed.

    For ``mixed_precision: bf16`` accelerate builds ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=bf16,
    output_dtype=bf16)``: the model's outputs, its loss among them, are cast to bf16 (on two GPUs the logged
    losses were 12.59375, 12.53125, 12.5625: the means of two bf16 values), and the adapter's gradients are summed
    across processes in bf16. Only that policy is replaced; one set in the accelerate config or the plugin (any
    other dtypes) is kept. Only the adapter has gradients, so fp32 reduces few bytes.
    """
    import torch

    policy = getattr(plugin, "mixed_precision_policy", None)
    if getattr(plugin, "fsdp_version", 1) != 2 or policy is None:
        return False
    low = policy.param_dtype
    if low not in (torch.bfloat16, torch.float16) or policy.reduce_dtype != low or policy.output_dtype != low:
        return False
    from torch.distributed.fsdp import MixedPrecisionPolicy

    plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32,
                                                         output_dtype=None,
                                                         cast_forward_inputs=policy.cast_forward_inputs)
    return True


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


def save_optimizer(model, optimizer, path: str | Path, *, write: bool) -> None:
    """Gather the optimizer state of a model sharded with FSDP2 whole, and write it to ``path`` where ``write``.

    Call it on every process (each takes part in gathering); pass ``write`` on process 0 only. The file holds
    torch's full optimizer state dict (``get_optimizer_state_dict``): every state tensor whole, on the CPU, keyed
    by its parameter's name, so it loads into any number of processes (:func:`load_optimizer`).
    """
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # process 0 gets it all, the others nothing
    state = get_optimizer_state_dict(model, _unwrapped(optimizer), options=options)
    if write:
        torch.save(state, path)


def load_optimizer(model, optimizer, path: str | Path) -> None:
    """Load the optimizer state :func:`save_optimizer` wrote into the optimizer of a model sharded with FSDP2.

    Call it on every process: each reads the whole state and keeps its own shard of each tensor. Raises
    :class:`InputError` for a state written without FSDP (keyed by position, not by parameter name).
    """
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state = torch.load(path, map_location="cpu", weights_only=True)
    if any(not isinstance(key, str) for key in state.get("state", {})):
        raise InputError(f"{Path(path).name} was saved by a run without FSDP; resume it as it was launched (without "
                         "--fsdp), or start again with --overwrite", source=str(Path(path).parent), field="resume")
    set_optimizer_state_dict(model, _unwrapped(optimizer), state, options=StateDictOptions(full_state_dict=True))


def _unwrapped(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer holds torch's


def load_adapter(model, folder: str | Path, *, field: str = "resume") -> None:
    """Load the whole adapter a checkpoint holds (``adapter_model.safetensors``) into a model sharded with FSDP2.

    Call it on every process: each reads the file and keeps its own shard of each tensor (no communication).
    Only the trainable weights are written: the frozen base stays as loaded (torch's ``set_model_state_dict``
    would copy every base weight, 4-bit ones included, onto itself). File names are the model's parameter names
    as PEFT's ``save_pretrained`` writes them (without the adapter's name). Raises :class:`InputError` when the
    file lacks a tensor of the model's adapter or holds one at another shape (naming ``field``, the setting that
    asked for the checkpoint); nothing is loaded then.
    """
    import torch
    from safetensors.torch import load_file
    from torch.distributed.tensor import DTensor, distribute_tensor

    path = Path(folder) / ADAPTER_FILE
    if not path.is_file():
        raise InputError(f"holds no {ADAPTER_FILE}", source=str(folder), field=field)
    saved = load_file(path)
    trainable = {name: param for name, param in model.named_parameters() if param.requires_grad}
    in_file = _file_names(model, list(trainable))
    wrong = [name for name, param in trainable.items()
             if in_file[name] not in saved or tuple(saved[in_file[name]].shape) != tuple(param.shape)]
    if wrong:
        raise InputError(f"{path.name} does not hold this model's adapter: {len(wrong)} of {len(trainable)} tensors "
                         f"missing or at another shape ({in_file[wrong[0]]}, ...); load it with the settings it "
                         "was trained with", source=str(folder), field=field)
    with torch.no_grad():
        for name, param in trainable.items():
            whole = saved[in_file[name]].to(param.device, param.dtype)
            if isinstance(param, DTensor):  # this process's shard, cut from the whole tensor in place
                whole = distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=None)
            param.copy_(whole)


def _file_names(model, names: list[str]) -> dict[str, str | None]:
    """The name each of the model's parameters ``names`` has in the file ``save_pretrained`` writes (None: absent)."""
    if not hasattr(model, "peft_config"):
        return {name: name for name in names}
    import torch
    from peft import get_peft_model_state_dict

    # PEFT's own renaming, as save_pretrained applies it; each name is recognized by its placeholder's identity
    placeholders = {name: torch.empty(0) for name in names}
    renamed = get_peft_model_state_dict(model, state_dict=placeholders, adapter_name=model.active_adapter)
    saved_as = {id(tensor): saved for saved, tensor in renamed.items()}
    return {name: saved_as.get(id(tensor)) for name, tensor in placeholders.items()}
