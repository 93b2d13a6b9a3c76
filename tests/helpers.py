"""Shared helpers for the core tests: cached tiny tokenizers, sample rows, and the label invariants."""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path

from hf_instruct_tune.testing.tiny import build_tiny_tokenizer
from hf_instruct_tune.tokenization import IGNORE_INDEX

# One sample row per built-in formatter; test_formatters checks this covers every registered one.
SAMPLE_ROWS: dict[str, dict] = {
    "alpaca": {"instruction": "Classify the sentiment.", "input": "I like football", "output": "positive"},
    "sharegpt": {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "hello"},
                                   {"from": "gpt", "value": "yes"}]},
    "messages": {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "yes"}]},
    "prompt_completion": {"prompt": "Paris is the capital of", "completion": "France"},
    "text": {"text": "The quick brown fox jumps over the lazy dog."},
}

SINGLE_TURN = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "yes"}]
MULTI_TURN = [
    {"role": "system", "content": "Answer: yes or no"},
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": "yes"},
    {"role": "user", "content": "classify the sentiment"},
    {"role": "assistant", "content": "no maybe"},
]


@functools.lru_cache(maxsize=None)
def tiny_tokenizer(*, pad_is_eos: bool = True, adds_bos: bool = True):
    """A tiny byte-level BPE tokenizer, built once per process per option set (tests must not mutate it)."""
    return build_tiny_tokenizer(pad_is_eos=pad_is_eos, adds_bos=adds_bos)


def supervised_runs(labels: Sequence[int]) -> list[list[int]]:
    """The maximal runs of labels that are not -100, in order."""
    runs: list[list[int]] = []
    current: list[int] = []
    for label in labels:
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    if current:
        runs.append(current)
    return runs


def assert_single_turn_invariants(input_ids: Sequence[int], labels: Sequence[int], *, stop_id: int,
                                  bos_id: int | None = None, ends_with_stop: bool = True) -> None:
    """-100 on a prompt prefix only, labels == input_ids after it, the stop token exactly once at the end."""
    input_ids, labels = list(input_ids), list(labels)
    assert len(input_ids) == len(labels)
    prompt_length = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert all(label == IGNORE_INDEX for label in labels[:prompt_length])
    assert labels[prompt_length:] == input_ids[prompt_length:]
    response = labels[prompt_length:]
    if ends_with_stop:
        assert response[-1] == stop_id
        assert response.count(stop_id) == 1, response
    else:
        assert stop_id not in response, response
    if bos_id is not None:
        assert bos_id not in input_ids[1:], input_ids


def write_jsonl(path: Path, rows: Sequence[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def sentiment_rows(count: int) -> list[dict]:
    """``count`` short alpaca rows of a few lengths, answered yes or no."""
    return [{"instruction": f"classify the sentiment of text {i}" + " hello" * (i % 5), "output": ["yes", "no"][i % 2]}
            for i in range(count)]


def tiny_lora_trainer(output_dir: Path, rows: Sequence[dict], *, num_layers: int, max_steps: int,
                      config: dict | None = None, **trainer_kwargs):
    """An ``InstructTrainer`` of a tiny random Llama with LoRA on q/v, on CPU: 4 rows a step, a constant learning
    rate, a loss logged every step, seeded (two trainers built alike train alike), no checkpointing unless
    ``config`` (``SFTConfig`` fields) or ``trainer_kwargs`` ask for it."""
    from peft import LoraConfig
    from trl import SFTConfig

    from hf_instruct_tune import InstructTrainer
    from hf_instruct_tune.testing.tiny import build_tiny_model

    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, num_layers=num_layers)
    args = SFTConfig(output_dir=str(output_dir), per_device_train_batch_size=4, gradient_accumulation_steps=1,
                     max_steps=max_steps, learning_rate=1e-2, lr_scheduler_type="constant", warmup_steps=0,
                     logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0,
                     dataloader_num_workers=0, max_length=64,
                     **{"gradient_checkpointing": False, "bf16": False, **(config or {})})
    return InstructTrainer(model=model, args=args, train_dataset=list(rows), processing_class=tok, template="alpaca",
                           peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  task_type="CAUSAL_LM"),
                           **{"prefix_sharing": False, **trainer_kwargs})


def logged_losses(trainer) -> list[float]:
    """The training loss of every logged step."""
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def slow_cli_script(delay: float) -> str:
    """``python -c`` source that runs the CLI with every optimizer step slowed by ``delay`` seconds, so that a
    signal or a second process reliably lands mid-training (sleeping changes no number)."""
    return f"""
import sys, time
import hf_instruct_tune.checkpoints as checkpoints
step_end = checkpoints.SaveOnInterrupt.on_step_end
def slow(self, *args, **kwargs):
    time.sleep({float(delay)!r})
    return step_end(self, *args, **kwargs)
checkpoints.SaveOnInterrupt.on_step_end = slow
from hf_instruct_tune.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_two_cpu_processes(worker: Path, *args: str | Path, home: Path) -> None:
    """Run ``worker`` in two CPU processes under ``torchrun`` (gloo), offline, with ``home`` as ``HF_HOME`` and
    no launcher variables inherited from the test's own environment; fail with the workers' stderr if they fail."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(home)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "ACCELERATE_USE_FSDP"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(worker), *map(str, args)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-5000:]
