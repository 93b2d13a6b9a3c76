"""Multi-GPU choices made before the Trainer exists: the FSDP launch, 4-bit storage for FSDP, the loss under FSDP."""

from __future__ import annotations

import pytest
import torch

from hf_instruct_tune import launch


def test_fsdp_launch_options():
    command = launch.accelerate_command(["train", "c.yaml", "--fsdp", "--num-processes", "2"], 2, fsdp=True)
    options = dict(zip(command, command[1:]))
    assert "--use_fsdp" in command and "--multi_gpu" not in command
    assert options["--fsdp_version"] == "1" and options["--fsdp_use_orig_params"] == "false"
    assert options["--fsdp_state_dict_type"] == "FULL_STATE_DICT"  # the whole adapter, gathered for process 0
    assert options["--fsdp_cpu_ram_efficient_loading"] == "true" and options["--fsdp_sync_module_states"] == "true"
    assert options["--mixed_precision"] == "bf16"
    assert command[-4:] == ["c.yaml", "--fsdp", "--num-processes", "1"]  # the workers do not launch again


def test_fsdp_without_processes_is_a_one_line_error(capsys):
    from hf_instruct_tune.cli import main

    assert main(["train", "--data", "missing.jsonl", "--fsdp"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--fsdp" in err and "--num-processes" in err


def test_4bit_storage_follows_fsdp(monkeypatch):
    from hf_instruct_tune.backends import nf4_config

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert nf4_config().bnb_4bit_quant_storage == torch.uint8
    assert nf4_config(for_fsdp=True).bnb_4bit_quant_storage == torch.bfloat16  # shards flatten with bf16 weights
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert nf4_config().bnb_4bit_quant_storage == torch.bfloat16


def test_loss_goes_through_the_sharded_head_under_fsdp(monkeypatch):
    from hf_instruct_tune.config import TrainConfig
    from hf_instruct_tune.training import _fused_loss

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert _fused_loss(TrainConfig(), "transformers") is False
    assert _fused_loss(TrainConfig(fused_loss=True), "transformers") is True  # asked for: kept
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    assert _fused_loss(TrainConfig(), "transformers") in (None, True)  # the plan's choice, or on without a plan
