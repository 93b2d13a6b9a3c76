"""Compiled decoder layers on the GPU: one graph for every layer and step, and the auto decision (issue 10).

Three checks on a tiny random Llama (2 layers, 4-bit on a GPU as `--load-in-4bit` loads it), one RESULT line each:
  one_graph   `train --compile-layers`, 6 steps through `run_training`: dynamo's unique graphs (1 expected: the
              first layer's input requires grad like the others', so no recompilation), the run's wall time
  auto_short  `train` with default flags, 6 steps: not compiled, the reason and token counts in hf_instruct_tune.json
  auto_long   an `InstructTrainer` planned for 10M steps (built, not trained): compiled on a GPU, not on CPU

usage: python bench/compile_auto_check.py    (about a minute on a GPU; on CPU it checks the script, ~2 min)
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path


def result(**fields) -> None:
    print("RESULT " + json.dumps(fields), flush=True)


def main() -> int:
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    import torch
    from torch._dynamo.utils import counters

    from hf_instruct_tune.config import TrainConfig
    from hf_instruct_tune.testing.tiny import save_tiny_checkpoint
    from hf_instruct_tune.training import run_training

    cuda = torch.cuda.is_available()
    work = Path(tempfile.mkdtemp(prefix="compile_auto_"))
    model_dir = save_tiny_checkpoint(work / "tiny")
    data = work / "rows.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"classify text {i}" + " hello" * (i % 7),
                                        "output": ["yes", "no"][i % 2]}) + "\n" for i in range(64)))
    common = dict(model=str(model_dir), data=str(data), template="alpaca", max_steps=6, batch_size=4, grad_accum=1,
                  load_in_4bit=cuda, logging_steps=1, warmup_steps=0)
    failed = 0

    torch._dynamo.reset()
    counters.clear()
    start = time.perf_counter()
    try:
        run_training(TrainConfig(**common, output_dir=str(work / "compiled"), compile_layers=True))
        graphs = counters["stats"]["unique_graphs"]
        metadata = json.loads((work / "compiled" / "hf_instruct_tune.json").read_text())
        passed = graphs == 1 and metadata["training"]["compile_layers"]["compiled"]
        result(check="one_graph", device="cuda" if cuda else "cpu", load_in_4bit=cuda, unique_graphs=graphs,
               wall_s=round(time.perf_counter() - start, 1), passed=passed)
    except Exception as error:  # each check reports on its own
        passed = False
        result(check="one_graph", error=repr(error)[:300], passed=False)
    failed += not passed

    try:
        run_training(TrainConfig(**common, output_dir=str(work / "auto_short")))
        decision = json.loads((work / "auto_short" / "hf_instruct_tune.json").read_text())["training"]["compile_layers"]
        passed = decision["compiled"] is False and decision["threshold_tokens"] is not None
        result(check="auto_short", **decision, passed=passed)
    except Exception as error:
        passed = False
        result(check="auto_short", error=repr(error)[:300], passed=False)
    failed += not passed

    try:
        decision = _long_run_decision(model_dir, data, work / "auto_long")
        result(check="auto_long", **decision, passed=decision["compiled"] is cuda)
        failed += decision["compiled"] is not cuda
    except Exception as error:
        result(check="auto_long", error=repr(error)[:300], passed=False)
        failed += 1
    return 1 if failed else 0


def _long_run_decision(model_dir: Path, data: Path, output_dir: Path) -> dict:
    """The decision of a trainer planned for 10M steps of 4 rows (far above the threshold), built but not trained."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    from hf_instruct_tune import InstructTrainer

    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(model_dir).to("cuda" if cuda else "cpu")
    args = SFTConfig(output_dir=str(output_dir), max_steps=10_000_000, per_device_train_batch_size=4,
                     use_cpu=not cuda, bf16=cuda, report_to=[], max_length=64)
    trainer = InstructTrainer(model=model, args=args, train_dataset=str(data),
                              processing_class=AutoTokenizer.from_pretrained(model_dir), template="alpaca",
                              peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    return trainer.compilation.as_metadata()


if __name__ == "__main__":
    sys.exit(main())
