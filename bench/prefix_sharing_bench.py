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


def child_interleaved(reps: int, report: Path) -> None:
    """In this process: forward + backward of one optimizer step's rows (the 10 seed rows), as 4-row padded
    micro-batches and as one shared-prefix micro-batch, alternating, so that both see the same machine load."""
    import torch
    from peft import LoraConfig, get_peft_model

    from hf_instruct_tune.collator import pad_examples
    from hf_instruct_tune.config import LORA_TARGETS
    from hf_instruct_tune.formatters import get_formatter
    from hf_instruct_tune.models import DEFAULT_MODEL, load_base_model, load_tokenizer, resolve_model
    from hf_instruct_tune.prefix_sharing import share_prefixes, shared_prefix_loss
    from hf_instruct_tune.templating import get_template
    from hf_instruct_tune.tokenization import IGNORE_INDEX, ExampleEncoder

    spec = resolve_model(DEFAULT_MODEL)
    tokenizer = load_tokenizer(spec)
    encoder = ExampleEncoder(tokenizer, get_template("alpaca-zh"))
    rows = [encoder.encode(get_formatter("alpaca")(row)).as_dict()
            for row in json.loads(DATA.read_text(encoding="utf-8"))]
    items = sum(sum(label != IGNORE_INDEX for label in row["labels"][1:]) for row in rows)
    model = get_peft_model(load_base_model(spec), LoraConfig(r=16, lora_alpha=16, target_modules=LORA_TARGETS,
                                                             use_rslora=True)).train()

    def padded() -> float:
        total = 0.0
        for start in range(0, len(rows), 4):
            loss = model(**pad_examples(rows[start:start + 4], pad_token_id=tokenizer.pad_token_id),
                         num_items_in_batch=items).loss
            loss.backward()
            total += loss.item()
        return total

    def shared() -> float:
        loss, _ = shared_prefix_loss(model, share_prefixes(rows), num_items_in_batch=items)
        loss.backward()
        return loss.item()

    times: dict[str, list[float]] = {"padded": [], "shared": []}
    losses: dict[str, float] = {}
    for _ in range(reps):
        for name, step in (("padded", padded), ("shared", shared)):
            model.zero_grad()
            start = time.perf_counter()
            losses[name] = step()
            times[name].append(time.perf_counter() - start)
    report.write_text(json.dumps({"times": times, "losses": losses}), encoding="utf-8")


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
    parser.add_argument("--child-interleaved", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--interleaved", type=int, default=5, help="alternating forward+backward repetitions")
    parser.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child_train(json.loads(args.child), args.report)
        return 0
    if args.child_interleaved is not None:
        child_interleaved(args.child_interleaved, args.report)
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
        report = workdir / "interleaved.json"
        subprocess.run([sys.executable, __file__, "--child-interleaved", str(args.interleaved), "--report",
                        str(report)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        interleaved = json.loads(report.read_text(encoding="utf-8"))
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
    t = interleaved["times"]
    ratio = median(t["padded"]) / median(t["shared"])
    lines += [
        f"Interleaved, one process: forward + backward of one step's rows (the 10 seed rows), {args.interleaved} times "
        "each way, alternating, so both see the same load:", "",
        "| layout | median | min | loss |", "|---|---|---|---|",
        f"| 4-row padded micro-batches (4 + 4 + 2) | {median(t['padded']):.2f} s | {min(t['padded']):.2f} s | "
        f"{interleaved['losses']['padded']:.6f} |",
        f"| one shared-prefix micro-batch | {median(t['shared']):.2f} s | {min(t['shared']):.2f} s | "
        f"{interleaved['losses']['shared']:.6f} |", "",
        f"**{ratio:.2f}x** faster (medians).", "",
    ]
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
