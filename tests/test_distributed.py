"""Two CPU processes (gloo) train what one process trains with the same global batch, and write one adapter.

Each pair of runs trains a tiny Llama for 4 steps on 8 rows: one process x batch 4 against two processes x
batch 2 (``--num-processes 2``, i.e. ``accelerate launch``; and ``torchrun`` with packing). Equal losses at
every step and equal adapters are only meaningful if they would differ when the ranks went wrong, so
``test_step_one_loss_covers_the_global_batch`` recomputes the first step's loss from the base model: it is
the token-weighted loss over 4 distinct rows, and no loss a faulty run would log (2 rows, as when both ranks
read the same shard or only rank 0's loss is logged; the plain mean of two per-rank means) comes close.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import write_jsonl
from torch.testing import assert_close

from hf_instruct_tune import backends, launch
from hf_instruct_tune.errors import InputError
from hf_instruct_tune.metadata import METADATA_FILE_NAME, TrainingMetadata

# Responses of very different lengths, so that any two rows weigh differently in a token-weighted loss.
ROWS = [
    {"instruction": "hello", "output": "yes"},
    {"instruction": "classify the sentiment of this text", "input": "I like football", "output": "positive"},
    {"instruction": "Paris is the capital of", "output": "France. The quick brown fox jumps over the lazy dog."},
    {"instruction": "hello world", "output": "no"},
    {"instruction": "user assistant", "output": "maybe yes no maybe"},
    {"instruction": "天气", "output": "下雨"},
    {"instruction": "Answer: yes or no", "output": "Answer: no. Below is an instruction that describes a task."},
    {"instruction": "classify", "input": "我不喜欢足球", "output": "消极"},
]
STEPS = 4
TRAIN = ["--max-steps", str(STEPS), "--grad-accum", "1", "--lr", "0.01", "--warmup-steps", "0", "--lora-r", "4",
         "--lora-alpha", "8", "--max-length", "128", "--seed", "0", "--logging-steps", "1"]
LOSS_TOLERANCE = 2e-6  # relative: the runs agree to ~1e-7; what a faulty run would log is off by >1e-3


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Output folders and logs of the four runs, by name: ref, ddp (accelerate), ref_packed, ddp_packed (torchrun)."""
    root = tmp_path_factory.mktemp("distributed")
    model = _sharp_tiny_model(root / "model")
    data = write_jsonl(root / "train.jsonl", ROWS)
    config = root / "ddp.yaml"
    config.write_text("num_processes: 2\n", encoding="utf-8")  # the workers must not launch again
    env = {key: value for key, value in os.environ.items()
           if key not in {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "RANK", "WORLD_SIZE", "LOCAL_RANK"}}
    env.update(HF_HOME=str(root / "hf_home"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    common = ["--model", str(model), "--data", str(data), "--output-dir", "adapter", *TRAIN]
    cli = [sys.executable, "-m", "hf_instruct_tune", "train"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "hf_instruct_tune", "train"]
    commands = {
        "ref": [*cli, *common, "--batch-size", "4"],
        "ddp": [*cli, str(config), *common, "--batch-size", "2"],
        "ref_packed": [*cli, *common, "--batch-size", "4", "--packing"],
        "ddp_packed": [*torchrun, *common, "--batch-size", "2", "--packing"],
    }
    results = {}
    for name, command in commands.items():
        folder = root / name
        folder.mkdir()
        done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{name} failed:\n{done.stderr[-5000:]}"
        results[name] = {"folder": folder, "out": folder / "adapter", "log": done.stderr}
    results["model"], results["data"] = model, data
    return results


def _sharp_tiny_model(path: Path) -> Path:
    """The tiny random Llama with a sharper output layer, so that rows have clearly different losses."""
    from hf_instruct_tune.testing.tiny import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(50)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _losses(out: Path) -> list[tuple[int, float]]:
    history = TrainingMetadata.load(out).results["loss_history"]
    return [(entry["step"], entry["loss"]) for entry in history]


@pytest.mark.parametrize("single, multi", [("ref", "ddp"), ("ref_packed", "ddp_packed")])
def test_loss_at_every_step_matches_one_process(runs, single, multi):
    ref, ddp = _losses(runs[single]["out"]), _losses(runs[multi]["out"])
    assert [step for step, _ in ref] == [step for step, _ in ddp] == list(range(1, STEPS + 1))
    assert_close(torch.tensor([loss for _, loss in ddp], dtype=torch.float64),
                 torch.tensor([loss for _, loss in ref], dtype=torch.float64), rtol=LOSS_TOLERANCE, atol=0)


@pytest.mark.parametrize("single, multi", [("ref", "ddp"), ("ref_packed", "ddp_packed")])
def test_adapter_weights_match_one_process(runs, single, multi):
    from safetensors.torch import load_file

    ref = load_file(runs[single]["out"] / "adapter_model.safetensors")
    ddp = load_file(runs[multi]["out"] / "adapter_model.safetensors")
    assert sorted(ref) == sorted(ddp)
    assert_close(ddp, ref)
    lora_b = [tensor for name, tensor in ref.items() if "lora_B" in name]
    assert lora_b and all(tensor.abs().max() > 0 for tensor in lora_b)  # trained: B starts at zero


def test_step_one_loss_covers_the_global_batch(runs):
    """Step 1 runs the base model (LoRA's B is zero): its loss is computable from per-row token losses."""
    sums, counts = _row_token_losses(runs["model"], runs["data"])
    loss = {name: _losses(runs[name]["out"])[0][1] for name in ("ref", "ddp", "ddp_packed")}

    def rows_loss(rows):
        return sum(sums[i] for i in rows) / sum(counts[i] for i in rows)

    quartets = {rows: rows_loss(rows) for rows in itertools.combinations(range(len(ROWS)), 4)}
    global_batch = min(quartets, key=lambda rows: abs(quartets[rows] - loss["ref"]))
    tolerance = LOSS_TOLERANCE * loss["ref"]
    for name in loss:
        assert abs(quartets[global_batch] - loss[name]) < tolerance, name
    faulty = [rows_loss(pair) for pair in itertools.combinations(range(len(ROWS)), 2)]
    for half in itertools.combinations(global_batch, 2):
        other = tuple(sorted(set(global_batch) - set(half)))
        if sum(counts[i] for i in half) != sum(counts[i] for i in other):  # else both means are the same number
            faulty.append((rows_loss(half) + rows_loss(other)) / 2)
    margin = min(abs(value - loss["ref"]) for value in faulty)
    assert margin > 100 * tolerance, f"the test cannot tell a faulty run from a good one (margin {margin:.2e})"


def _row_token_losses(model_path: Path, data: Path) -> tuple[list[float], list[int]]:
    """Each row's summed token loss and supervised-token count under the base model, encoded as training does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_instruct_tune.formatters import get_formatter
    from hf_instruct_tune.templating import get_template
    from hf_instruct_tune.tokenization import IGNORE_INDEX, ExampleEncoder

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    encoder = ExampleEncoder(tokenizer, get_template("alpaca"), max_length=128)
    sums, counts = [], []
    for row in json.loads("[" + ",".join(data.read_text(encoding="utf-8").splitlines()) + "]"):
        example = encoder.encode(get_formatter("alpaca")(row))
        ids, labels = torch.tensor([example.input_ids]), torch.tensor(example.labels[1:])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1]
        sums.append(torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX,
                                                      reduction="sum").item())
        counts.append(int((labels != IGNORE_INDEX).sum()))
    return sums, counts


@pytest.mark.parametrize("name", ["ddp", "ddp_packed"])
def test_one_set_of_output_files(runs, name):
    ref, ddp = runs["ref"], runs[name]
    assert sorted(os.listdir(ddp["folder"])) == ["adapter"]  # no staged or set-aside copies, nothing else
    assert sorted(p.name for p in ddp["out"].iterdir()) == sorted(p.name for p in ref["out"].iterdir())
    assert [p.name for p in ddp["folder"].rglob(METADATA_FILE_NAME)] == [METADATA_FILE_NAME]
    assert not list(ddp["out"].rglob("*.staged")) and not list(ddp["out"].rglob(".*"))
    training = TrainingMetadata.load(ddp["out"]).training
    assert (training["world_size"], training["batch_size"]) == (2, 2)
    assert TrainingMetadata.load(ref["out"]).training["world_size"] == 1


@pytest.mark.parametrize("name", ["ddp", "ddp_packed"])
def test_messages_appear_once(runs, name):
    log, ref_log = runs[name]["log"], runs["ref"]["log"]
    for message in ("Formatter: 'alpaca'", "Adapter saved to adapter",
                    f"Trained {STEPS} steps, final loss"):
        assert ref_log.count(message) == 1, message
        assert log.count(message) == 1, (message, log[-3000:])
    assert log.count("Warning") == ref_log.count("Warning") + log.count("find_unused_parameters")


def test_relaunch_runs_accelerate_without_the_flag(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # no accelerate config there
    import accelerate.commands.config as accelerate_config

    monkeypatch.setattr(accelerate_config, "default_config_file", str(tmp_path / "accelerate" / "default_config.yaml"))
    for flag in (["--num-processes", "2"], ["--num-processes=2"], ["--num-proc", "2"]):
        command = launch.accelerate_command(["--debug", "train", "c.yaml", *flag, "--max-steps", "3"], 2)
        assert command[:5] == [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2"]
        assert "--multi_gpu" in command and command[command.index("--main_process_port") + 1] == "0"
        assert command[command.index("-m", 3):] == ["-m", "hf_instruct_tune", "--debug", "train", "c.yaml",
                                                    "--max-steps", "3", "--num-processes", "1"]


def test_relaunch_keeps_an_accelerate_config(tmp_path, monkeypatch):
    import accelerate.commands.config as accelerate_config

    config = tmp_path / "default_config.yaml"
    config.write_text("distributed_type: FSDP\n", encoding="utf-8")
    monkeypatch.setattr(accelerate_config, "default_config_file", str(config))
    command = launch.accelerate_command(["train", "--num-processes", "4"], 4)
    assert command[3:5] == ["--num_processes", "4"] and "--multi_gpu" not in command


def test_relaunch_returns_the_exit_code(monkeypatch):
    monkeypatch.setattr(launch, "accelerate_command", lambda argv, n, **kwargs: [sys.executable, "-c", "import sys; sys.exit(3)"])
    assert launch.relaunch_with_accelerate(["train"], 2) == 3


def test_relaunch_refused_inside_a_launched_process(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InputError, match="already one of 2 started by a launcher; drop --num-processes"):
        launch.relaunch_with_accelerate(["train", "--num-processes", "2"], 2)


def test_auto_backend_is_transformers_with_several_processes(monkeypatch):
    monkeypatch.setattr(backends, "_cuda", lambda: True)
    monkeypatch.setattr(backends, "_installed", lambda module: True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert backends.resolve_backend("auto") == "transformers"


def test_fsdp_without_a_full_state_dict_is_refused_before_training():
    """With FSDP's default sharded state dict the Trainer would save no adapter at the end of the run."""
    from types import SimpleNamespace

    from accelerate.utils import FullyShardedDataParallelPlugin

    from hf_instruct_tune.training import _check_fsdp_saves_an_adapter

    def trainer(**plugin):
        state = SimpleNamespace(fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2, **plugin))
        return SimpleNamespace(is_fsdp_enabled=True, accelerator=SimpleNamespace(state=state))

    with pytest.raises(InputError, match="set `fsdp_state_dict_type: FULL_STATE_DICT` in the accelerate config"):
        _check_fsdp_saves_an_adapter(trainer())
    _check_fsdp_saves_an_adapter(trainer(state_dict_type="FULL_STATE_DICT"))
    _check_fsdp_saves_an_adapter(SimpleNamespace(is_fsdp_enabled=False))


def test_train_ends_the_process_group_it_ran_in(tmp_path, monkeypatch):
    """A launched rank that exits with its process group up can abort at interpreter exit and fail the launch."""
    import torch.distributed as dist

    from hf_instruct_tune import training
    from hf_instruct_tune.cli import main

    def train_in_a_process_group(config):
        dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
        return training.TrainResult(tmp_path / "adapter", global_step=1, final_loss=1.0)

    monkeypatch.setattr(training, "run_training", train_in_a_process_group)
    data = write_jsonl(tmp_path / "train.jsonl", [{"instruction": "Say hi.", "output": "Hi."}])
    try:
        assert main(["train", "--data", str(data), "--output-dir", str(tmp_path / "adapter")]) == 0
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
