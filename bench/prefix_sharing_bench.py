"""CPU step time and loss with and without prefix sharing on the seed data, and generation rows/s.

    python bench/prefix_sharing_bench.py --steps 60 --markdown BENCHMARKS.md

Trains the main job (SmolLM2-135M-Instruct, ``examples/dataset.json``, ``alpaca-zh``, the defaults) once with
prefix sharing (the default) and once with ``--no-prefix-sharing``, each in a child process, timing every
optimizer step; then answers the 10 training rows with ``generate --data`` with and without the shared
prompt prefix's KV cache. Prints a table and, with ``--markdown FILE``, writes it into FILE's
``## Prefix sharing`` section with this command.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "dataset.json"
DEMO_FLAGS = ["--data", str(DATA), "--template", "alpaca-zh"]
SECTION = "## Prefix sharing"


def child_train(flags: list[str], report: Path) -> None:
    """In this process: train with ``flags``, recording each optimizer step's wall time, loss and tokens."""
    from transformers import TrainerCallback

    from hf_instruct_tune import training
    from hf_instruct_tune.cli import main

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.start)

    timer = StepTimer()
    built = {}
    build = training._build_trainer

    def build_timed(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.add_callback(timer)
        built["trainer"] = trainer
        return trainer

    training._build_trainer = build_timed
    if main(["train", *DEMO_FLAGS, *flags]) != 0:
        raise SystemExit("training failed")
    trainer = built["trainer"]
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    stats = trainer.sharing_stats
    report.write_text(json.dumps({
        "step_s": timer.times, "losses": losses, "batch_size": trainer.args.per_device_train_batch_size,
        "grad_accum": trainer.args.gradient_accumulation_steps, "row_tokens": stats.row_tokens,
        "computed_tokens": stats.computed_tokens}), encoding="utf-8")


def run_child(flags: list[str], workdir: Path, name: str) -> dict:
    report = workdir / f"{name}.json"
    start = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--child", json.dumps(flags), "--report", str(report)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    result = json.loads(report.read_text(encoding="utf-8"))
    result["wall_s"] = time.perf_counter() - start
    return result


def child_generate(adapter: Path, report: Path) -> None:
    """In this process: answer the training rows with and without the shared prefix's KV cache, timed."""
    from hf_instruct_tune.generation import AdapterGenerator, prompt_messages

    rows = json.loads(DATA.read_text(encoding="utf-8"))
    conversations = [prompt_messages(row, "alpaca") for row in rows]
    generator = AdapterGenerator(adapter)
    generator.generate(conversations[:2], max_new_tokens=2)  # warm-up
    results = {}
    for name, sharing in (("plain", False), ("shared", True)):
        start = time.perf_counter()
        answers = generator.generate(conversations, max_new_tokens=16, prefix_sharing=sharing)
        results[name] = {"seconds": time.perf_counter() - start, "answers": [a.text for a in answers],
                         "eos": sum(a.finish_reason == "eos" for a in answers)}
    report.write_text(json.dumps(results, ensure_ascii=False), encoding="utf-8")


def generation_rates(adapter: Path, workdir: Path) -> dict:
    """Rows/s of ``generate`` over the 10 training rows, shared and not, after a warm-up."""
    report = workdir / "generate.json"
    subprocess.run([sys.executable, __file__, "--child-generate", str(adapter), "--report", str(report)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs = json.loads(report.read_text(encoding="utf-8"))
    rates = {}
    for name in ("plain", "shared"):
        rates[name] = {**runs[name], "rows_per_s": len(runs[name]["answers"]) / runs[name]["seconds"]}
    return rates


def median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-generate", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child_train(json.loads(args.child), args.report)
        return 0
    if args.child_generate is not None:
        child_generate(args.child_generate, args.report)
        return 0

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        common = ["--max-steps", str(args.steps), "--overwrite"]
        plain = run_child([*common, "--no-prefix-sharing", "--output-dir", str(workdir / "plain")], workdir, "plain")
        shared = run_child([*common, "--output-dir", str(workdir / "shared")], workdir, "shared")
        relative = [abs(a - b) / abs(b) for a, b in zip(shared["losses"], plain["losses"])]
        rates = generation_rates(workdir / "shared", workdir)
        gen_shared, gen_plain = rates["shared"], rates["plain"]
    load_after = os.getloadavg()[0]

    command = "python bench/prefix_sharing_bench.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [
        SECTION, "",
        f"`{command}` (2-core CPU, SmolLM2-135M-Instruct, the seed data, defaults otherwise; one run each, "
        f"each training in its own process; 1-minute load average {load_before:.1f} at the start, {load_after:.1f} at "
        "the end, other work sharing the cores):", "",
        "| training | micro-batches per step | median step | mean step | training wall (incl. loading) | "
        "tokens computed / in the rows |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in (("`--no-prefix-sharing`", plain), ("prefix sharing (default)", shared)):
        tokens = (f"{r['computed_tokens']:,} / {r['row_tokens']:,}" if r["row_tokens"] else "all")
        lines.append(f"| {name} | {r['grad_accum']} x {r['batch_size']} rows | {median(r['step_s']):.2f} s | "
                     f"{sum(r['step_s']) / len(r['step_s']):.2f} s | {r['wall_s']:.0f} s | {tokens} |")
    speedup = sum(plain["step_s"]) / sum(shared["step_s"])
    lines += ["", f"Step time: **{speedup:.2f}x** faster with sharing. Loss at every one of the {len(relative)} "
              f"steps: largest relative difference **{max(relative):.1e}** (first step {relative[0]:.1e}).", ""]
    same = sum(a == b for a, b in zip(gen_shared["answers"], gen_plain["answers"]))
    lines += [
        "| `generate --data` (10 rows, batches of 8, 16 new tokens, greedy) | rows/s | seconds (model "
        "loaded) | ended by EOS |",
        "|---|---|---|---|",
        f"| shared prompt prefix KV cache (default) | {gen_shared['rows_per_s']:.2f} | {gen_shared['seconds']:.1f} | "
        f"{gen_shared['eos']}/10 |",
        f"| `--no-prefix-sharing` | {gen_plain['rows_per_s']:.2f} | {gen_plain['seconds']:.1f} | {gen_plain['eos']}/10 |",
        "", f"The same answers for {same}/10 rows.", "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        write_section(args.markdown, text)
    return 0


def write_section(path: Path, text: str) -> None:
    """Replace (or append) the ``## Prefix sharing`` section of ``path``."""
    current = path.read_text(encoding="utf-8") if path.exists() else ""
    if SECTION in current:
        before, _, rest = current.partition(SECTION)
        after = rest[rest.find("\n## "):] if "\n## " in rest else ""
        current = before.rstrip("\n") + "\n\n" + text + after
    else:
        current = current.rstrip("\n") + "\n\n" + text
    path.write_text(current if current.endswith("\n") else current + "\n", encoding="utf-8")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
