"""FSDP2: the adapter saved from a sharded model is whole, and ``train --fsdp`` launches the config it documents.

accelerate runs FSDP on GPUs only, but FSDP2's ``fully_shard`` runs on CPU processes over gloo. So the saving
path runs here in two CPU processes (``tests/fsdp_adapter_worker.py``) sharded as accelerate shards a model;
what accelerate and the Trainer add (the launch, the plugin, the save hook) is checked piece by piece.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch.testing import assert_close

from helpers import run_two_cpu_processes
from hf_instruct_tune import fsdp, launch
from hf_instruct_tune.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("fsdp_adapter_worker.py")
sys.path.insert(0, str(WORKER.parent))
import fsdp_adapter_worker as worker  # noqa: E402


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    """A tiny model's folder, and the adapter two FSDP2 processes trained and saved from it."""
    from hf_instruct_tune.testing.tiny import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("fsdp")
    model_dir = save_tiny_checkpoint(root / "model")
    out = root / "adapter"
    run_two_cpu_processes(WORKER, model_dir, out, home=root / "hf_home")
    return model_dir, out


def test_the_saved_adapter_holds_every_lora_tensor_whole(sharded_run):
    from safetensors.torch import load_file
    from transformers import AutoConfig

    model_dir, out = sharded_run
    config = AutoConfig.from_pretrained(model_dir)
    weights = load_file(out / "adapter_model.safetensors")
    assert len(weights) == config.num_hidden_layers * len(worker.TARGETS) * 2
    reference = worker.lora_model(str(model_dir))
    shapes = {name.replace(".default", ""): tuple(p.shape) for name, p in reference.named_parameters() if p.requires_grad}
    assert {name: tuple(t.shape) for name, t in weights.items()} == shapes


def test_the_saved_adapter_gives_the_logits_of_one_process_trained_alike(sharded_run):
    """One process trained on both processes' rows (FSDP averages their gradients) has the same adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir, out = sharded_run
    reference = worker.lora_model(str(model_dir))
    worker.train(reference, [worker.rows(0), worker.rows(1)])
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), out)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = torch.arange(40).view(2, 20) + 30
    with torch.no_grad():
        expected, got, untrained = (m.eval()(input_ids=ids).logits for m in (reference, loaded, base))
    assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert (got - untrained).abs().max() > 1e-3  # the adapter moved: equal logits are not the base model's


def test_a_partial_gather_is_refused():
    """What a save of one process's shard would hold: half of each tensor, or nothing. Refused, not written."""
    from peft import LoraConfig, get_peft_model

    from hf_instruct_tune.testing.tiny import build_tiny_model, build_tiny_tokenizer

    model = get_peft_model(build_tiny_model(build_tiny_tokenizer()),
                           LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    whole = fsdp.adapter_state_dict(model)  # not sharded: every tensor as it is
    expected = {name: tuple(p.shape) for name, p in model.named_parameters() if p.requires_grad}
    assert len(whole) == 4 and all(t.device.type == "cpu" for t in whole.values())
    fsdp.check_whole(whole, expected)
    with pytest.raises(fsdp.PartialAdapterError, match="4 at a shard's shape"):
        fsdp.check_whole({k: v[: v.shape[0] // 2] for k, v in whole.items()}, expected)
    with pytest.raises(fsdp.PartialAdapterError, match="4 of 4 tensors missing"):
        fsdp.check_whole({}, expected)


def test_under_fsdp_the_trainer_saves_the_gathered_adapter(tmp_path, monkeypatch):
    """``save_model`` (final adapter and checkpoints) writes what :func:`adapter_state_dict` gathered."""
    from safetensors.torch import load_file
    from trl import SFTConfig

    from hf_instruct_tune import InstructTrainer
    from hf_instruct_tune.testing.tiny import build_tiny_model, build_tiny_tokenizer

    from peft import LoraConfig

    tok = build_tiny_tokenizer()
    args = SFTConfig(output_dir=str(tmp_path / "checkpoints"), use_cpu=True, bf16=False, report_to=[],
                     gradient_checkpointing=False, max_steps=1)
    trainer = InstructTrainer(model=build_tiny_model(tok), args=args, processing_class=tok, template="alpaca",
                              train_dataset=[{"instruction": "hello", "output": "yes"}] * 4,
                              peft_config=LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    gathered = {name: torch.full(tuple(p.shape), 0.5) for name, p in trainer.model.named_parameters()
                if p.requires_grad}
    monkeypatch.setattr(fsdp, "adapter_state_dict", lambda model: gathered)
    monkeypatch.setattr(trainer, "is_fsdp_enabled", True)
    trainer.save_model(str(tmp_path / "adapter"))
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert len(saved) == len(gathered) == 4 and all(bool((t == 0.5).all()) for t in saved.values())


def test_fsdp_writes_the_example_config():
    """``train --fsdp`` and ``examples/accelerate_fsdp.yaml`` are one config, so the documented file is what runs."""
    example = yaml.safe_load((ROOT / "examples" / "accelerate_fsdp.yaml").read_text(encoding="utf-8"))
    assert example == fsdp.accelerate_config(2)
    assert fsdp.accelerate_config(4)["num_processes"] == 4
    settings = fsdp.FSDP_CONFIG["fsdp_config"]
    assert settings["fsdp_version"] == 2 and settings["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    assert settings["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert settings["fsdp_activation_checkpointing"] is False  # the memory plan checkpoints layers
    assert fsdp.FSDP_CONFIG["mixed_precision"] == "bf16"


def test_accelerate_reads_the_written_config_as_fsdp2(tmp_path):
    """``accelerate launch`` with the written file gives each process the FSDP2 plugin ``train`` accepts."""
    config = fsdp.write_accelerate_config(tmp_path / "fsdp.yaml", 1)
    probe = ("import os; from accelerate.utils import FullyShardedDataParallelPlugin as P; "
             "from hf_instruct_tune.fsdp import check_plugin; p = P(); check_plugin(p); "
             "print(os.environ['ACCELERATE_USE_FSDP'], os.environ['ACCELERATE_MIXED_PRECISION'], p.fsdp_version, "
             "getattr(p.auto_wrap_policy, '__name__', p.auto_wrap_policy), p.activation_checkpointing, p.cpu_ram_efficient_loading)")
    script = tmp_path / "probe.py"
    script.write_text(probe, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK"}}
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                           "--num_processes", "1", str(script)], env={**env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["true", "bf16", "2", "transformer_auto_wrap_policy", "False", "False"]


def test_relaunch_with_fsdp_passes_the_written_config(monkeypatch):
    seen = {}

    def command(argv, n, *, config_file=None):
        seen["config"] = yaml.safe_load(Path(config_file).read_text(encoding="utf-8"))
        seen["command"] = launch.accelerate_command.__wrapped__(argv, n, config_file=config_file)
        return [sys.executable, "-c", "pass"]

    command.__wrapped__ = launch.accelerate_command
    monkeypatch.setattr(launch, "accelerate_command", command)
    assert launch.relaunch_with_accelerate(["train", "c.yaml", "--fsdp", "--num-processes", "4"], 4, fsdp=True) == 0
    assert seen["config"] == fsdp.accelerate_config(4)
    built = seen["command"]
    assert "--config_file" in built and "--multi_gpu" not in built
    assert built[built.index("-m", 3):] == ["-m", "hf_instruct_tune", "train", "c.yaml", "--fsdp",
                                            "--num-processes", "1"]


def test_fsdp_without_processes_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    from hf_instruct_tune.cli import main

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert main(["train", "--fsdp", "--data", str(tmp_path / "rows.jsonl")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: field 'fsdp': --fsdp shards the model across processes: add --num-processes N (N >= 2), or start the "
        "command with `accelerate launch --config_file examples/accelerate_fsdp.yaml`"]


def test_resume_under_fsdp_looks_for_the_checkpoint(tmp_path, capsys, monkeypatch):
    """``--resume`` is accepted under FSDP (tests/test_fsdp_resume.py loads the checkpoint into sharded models)."""
    from hf_instruct_tune.cli import main

    data = tmp_path / "rows.jsonl"
    data.write_text('{"instruction": "hello", "output": "yes"}\n', encoding="utf-8")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # as `accelerate launch --config_file examples/accelerate_fsdp.yaml`
    assert main(["train", "--data", str(data), "--output-dir", str(tmp_path / "out"), "--resume"]) == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err


def test_fsdp_without_gpus_is_a_one_line_error(tmp_path, capsys):
    from hf_instruct_tune.cli import main

    if torch.cuda.is_available():
        pytest.skip("a machine with a GPU")
    assert main(["train", "--fsdp", "--num-processes", "2", "--data", str(tmp_path / "rows.jsonl")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: field 'fsdp': --fsdp needs CUDA GPUs (accelerate runs FSDP on GPUs only); without them, "
        "--num-processes N alone trains in N CPU processes"]


def test_fsdp1_and_sharded_state_dicts_are_refused():
    from accelerate.utils import FullyShardedDataParallelPlugin

    with pytest.raises(InputError, match="FSDP version 1 is not supported"):
        fsdp.check_plugin(FullyShardedDataParallelPlugin(fsdp_version=1, state_dict_type="FULL_STATE_DICT"))
    with pytest.raises(InputError, match="set `fsdp_state_dict_type: FULL_STATE_DICT`"):
        fsdp.check_plugin(SimpleNamespace(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT"))
    fsdp.check_plugin(FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="FULL_STATE_DICT"))


PAPER_SHAPES = {  # docs/multi_gpu.md, "Memory per GPU, on paper": (base GiB, adapter parameters, layers, hidden, MLP);
    # a QLoRA base is 4-bit but for its input embeddings and output head (bf16), and FSDP keeps the 4-bit part whole
    ("8B", "QLoRA"): (5.4, 41_943_040, 32, 4096, 14336), ("8B", "bf16"): (14.9, 41_943_040, 32, 4096, 14336),
    ("70B", "QLoRA"): (36.0, 207_093_760, 80, 8192, 28672), ("70B", "bf16"): (130.0, 207_093_760, 80, 8192, 28672),
}


def test_the_memory_table_on_paper_is_the_estimate(monkeypatch):
    """Every DDP and FSDP cell of the docs' table is ``estimate_bytes`` at 4,096 tokens, all layers checkpointed."""
    import re

    from hf_instruct_tune.memory_plan import GIB, ModelShape, estimate_bytes

    monkeypatch.setattr("hf_instruct_tune.memory_plan._cut_cross_entropy", lambda: True)  # as on the H200
    rows = re.findall(r"^\| (8B|70B) \| (DDP|FSDP), (QLoRA|bf16) [^|]*\| ([\d.]+)[^|]*\| ([\d.]+) \| ([\d.]+) \|$",
                      (ROOT / "docs" / "multi_gpu.md").read_text(encoding="utf-8"), flags=re.MULTILINE)
    assert len(rows) == 8
    for model, strategy, kind, *cells in rows:
        base, adapter, layers, hidden, mlp = PAPER_SHAPES[model, kind]
        embeddings = 128256 * hidden * 2
        shape = ModelShape(layers=layers, hidden=hidden, intermediate=mlp, vocab=128256, weight_bytes=int(base * GIB),
                           embedding_bytes=embeddings, trainable_params=adapter,
                           quantized_bytes=int(base * GIB) - 2 * embeddings if kind == "QLoRA" else 0,
                           adapter_bytes_per_param=8 if kind == "QLoRA" else 16)
        for gpus, cell in zip((2, 4, 8), cells):
            share = shape.sharded(gpus) if strategy == "FSDP" else shape
            gib = estimate_bytes(share, tokens=4096, checkpointed_layers=layers, fused_loss=True,
                                 embeddings_on_cpu=False) / GIB
            assert round(gib, 1) == float(cell), (model, strategy, kind, gpus)


def test_under_fsdp_the_memory_plan_budgets_for_one_share(monkeypatch):
    from datasets import Dataset
    from trl import SFTConfig

    from hf_instruct_tune.memory_plan import plan_for_trainer
    from hf_instruct_tune.testing.tiny import build_tiny_model, build_tiny_tokenizer

    model = build_tiny_model(build_tiny_tokenizer(), hidden_size=256, num_layers=4)
    args = SFTConfig(output_dir="unused", use_cpu=True, bf16=False, report_to=[], per_device_train_batch_size=2)
    data = Dataset.from_dict({"input_ids": [[1] * 64] * 8})
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    whole = plan_for_trainer(model, args, data, packed=False, max_memory=1.0).estimate_gib
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    share = plan_for_trainer(model, args, data, packed=False, max_memory=1.0).estimate_gib
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    assert whole - share > 0.5 * weights  # three quarters of the weights are on the other processes


def _plugin_as_accelerate_sets_it(mixed_precision: str):
    """An FSDP2 plugin whose policy accelerate built for ``mixed_precision`` (as its state does on GPUs)."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="FULL_STATE_DICT")
    plugin.set_mixed_precision(mixed_precision)
    return plugin


def test_bf16_fsdp_reduces_gradients_in_fp32_and_leaves_the_loss_uncast():
    plugin = _plugin_as_accelerate_sets_it("bf16")
    policy = plugin.mixed_precision_policy  # accelerate's: everything in bf16, outputs cast
    assert (policy.param_dtype, policy.reduce_dtype, policy.output_dtype) == (torch.bfloat16,) * 3
    assert fsdp.reduce_in_fp32(plugin)
    policy = plugin.mixed_precision_policy
    assert (policy.param_dtype, policy.reduce_dtype, policy.output_dtype) == (torch.bfloat16, torch.float32, None)
    assert policy.cast_forward_inputs
    assert not fsdp.reduce_in_fp32(plugin)  # already done


def test_a_policy_of_the_users_own_is_kept():
    from accelerate.utils import FullyShardedDataParallelPlugin

    own = {"param_dtype": torch.bfloat16, "reduce_dtype": torch.bfloat16, "output_dtype": torch.float32}
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, mixed_precision_policy=own)
    kept = plugin.mixed_precision_policy
    assert not fsdp.reduce_in_fp32(plugin) and plugin.mixed_precision_policy is kept
    fp32 = _plugin_as_accelerate_sets_it("fp32")
    assert not fsdp.reduce_in_fp32(fp32) and fp32.mixed_precision_policy.reduce_dtype == torch.float32


def test_the_trainer_sets_the_policy_before_the_model_is_sharded(tmp_path, monkeypatch):
    """``InstructTrainer`` changes accelerate's bf16 policy right after the Trainer builds its accelerator, before
    ``accelerator.prepare`` shards the model with it; without FSDP it changes nothing."""
    from accelerate.state import AcceleratorState
    from transformers import Trainer
    from trl import SFTConfig

    from hf_instruct_tune import InstructTrainer
    from hf_instruct_tune.testing.tiny import build_tiny_model, build_tiny_tokenizer

    plugins = []
    build = Trainer.create_accelerator_and_postprocess

    def build_then_pretend_fsdp(self):
        build(self)
        plugins.append(_plugin_as_accelerate_sets_it("bf16"))
        self.accelerator.state.fsdp_plugin = plugins[-1]  # a shared state: restored below
        self.is_fsdp_enabled = len(plugins) == 1

    monkeypatch.setattr(Trainer, "create_accelerator_and_postprocess", build_then_pretend_fsdp)
    tok = build_tiny_tokenizer()
    original = AcceleratorState().fsdp_plugin if AcceleratorState._shared_state else None
    for name in ("fsdp", "plain"):
        args = SFTConfig(output_dir=str(tmp_path / name), use_cpu=True, bf16=False, report_to=[], max_steps=1)
        trainer = InstructTrainer(model=build_tiny_model(tok), args=args, processing_class=tok, template="alpaca",
                                  train_dataset=[{"instruction": "hello", "output": "yes"}] * 4, memory_plan=False)
        trainer.accelerator.state.fsdp_plugin = original
    fsdp_policy, plain_policy = (plugin.mixed_precision_policy for plugin in plugins)
    assert (fsdp_policy.reduce_dtype, fsdp_policy.output_dtype) == (torch.float32, None)
    assert (plain_policy.reduce_dtype, plain_policy.output_dtype) == (torch.bfloat16, torch.bfloat16)
