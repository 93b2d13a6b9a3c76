"""CPU step time and loss with and without prefix sharing on the seed data, and generation rows/s.

    python bench/prefix_sharing_bench.py --steps 60 --markdown BENCHMARKS.md

Trains the main job (SmolLM2-135M-Instruct, ``examples/dataset.json``, ``alpaca-zh``, the defaults) with
prefix sharing (the default) and with ``--no-prefix-sharing``, in two processes that take turns step by step
(one runs an optimizer step while the other waits), so both see the same machine load. Each step is timed
whole (collation, forward, backward, optimizer, logging) and in parts. Then answers the 10 training rows as the
main job does (``generate --data``, 16 new tokens at most) with the shared run's adapter, with and without the
shared prompt prefix's KV cache, alternating. Prints a table and, with ``--markdown FILE``, writes it into
FILE's ``## Prefix sharing`` section, between the markers of :data:`BEGIN` and :data:`END`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "dataset.json"
DEMO_FLAGS = ["--data", str(DATA), "--template", "alpaca-zh"]
SECTION = "## Prefix sharing"
BEGIN = "<!-- prefix_sharing_bench.py: begin -->"
END = "<!-- prefix_sharing_bench.py: end -->"
PARTS = ("collate", "forward", "backward", "rest")


class Baton:
    """Turn-taking with the parent over two pipes: wait for ``go``, say ``done``."""

    def __init__(self, go_fd: int, done_fd: int):
        self.go, self.done = os.fdopen(go_fd, "rb", buffering=0), os.fdopen(done_fd, "wb", buffering=0)

    def wait(self) -> None:
        if not self.go.read(1):
            raise SystemExit("the benchmark's parent went away")

    def pass_on(self) -> None:
        self.done.write(b".")


def child_train(flags: list[str], report: Path, baton: Baton) -> None:
    """In this process: train with ``flags``, one optimizer step per turn, timing each step whole and in parts."""
    from transformers import TrainerCallback

    from hf_instruct_tune import training
    from hf_instruct_tune.cli import main

    steps: list[dict[str, float]] = []
    parts: dict[str, float] = {}

    class Turns(TrainerCallback):
        def start(self):
            parts.clear()
            self.wall, self.cpu = time.perf_counter(), time.process_time()

        def on_train_begin(self, args, state, control, **kwargs):
            baton.wait()
            self.start()

        def on_step_end(self, args, state, control, **kwargs):
            step = {"wall": time.perf_counter() - self.wall, "cpu": time.process_time() - self.cpu, **parts}
            step["backward"] = step.pop("train_step", 0.0) - step.get("forward", 0.0)
            step["rest"] = step["wall"] - step["backward"] - step.get("forward", 0.0) - step.get("collate", 0.0)
            steps.append(step)
            baton.pass_on()
            baton.wait()
            self.start()

    def timed(function, part: str):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                parts[part] = parts.get(part, 0.0) + time.perf_counter() - start
        return run

    built = {}
    build = training._build_trainer

    def build_timed(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.add_callback(Turns())
        trainer.compute_loss = timed(trainer.compute_loss, "forward")
        trainer.training_step = timed(trainer.training_step, "train_step")
        trainer.data_collator = timed(trainer.data_collator, "collate")
        built["trainer"] = trainer
        return trainer

    training._build_trainer = build_timed
    if main(["train", *DEMO_FLAGS, *flags]) != 0:
        raise SystemExit("training failed")
    trainer = built["trainer"]
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    stats = trainer.sharing_stats
    import torch

    report.write_text(json.dumps({
        "steps": steps, "losses": losses, "batch_size": trainer.args.per_device_train_batch_size,
        "grad_accum": trainer.args.gradient_accumulation_steps, "row_tokens": stats.row_tokens,
        "computed_tokens": stats.computed_tokens, "threads": torch.get_num_threads()}), encoding="utf-8")


def train_in_turns(runs: dict[str, list[str]], steps: int, workdir: Path) -> tuple[dict[str, dict], list[float]]:
    """Start one training process per run and let them take turns, one optimizer step each, ``steps`` times."""
    children, loads = {}, []
    for name, flags in runs.items():
        go_read, go_write = os.pipe()
        done_read, done_write = os.pipe()
        log = (workdir / f"{name}.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, __file__, "--child", json.dumps(flags), "--report", str(workdir / f"{name}.json"),
             "--baton", f"{go_read},{done_write}"], pass_fds=(go_read, done_write), stdout=log, stderr=log)
        os.close(go_read)
        os.close(done_write)
        children[name] = (process, os.fdopen(go_write, "wb", buffering=0), os.fdopen(done_read, "rb", buffering=0))
    try:
        for _ in range(steps):
            for name, (process, go, done) in children.items():
                loads.append(os.getloadavg()[0])
                go.write(b".")
                if not done.read(1):
                    raise SystemExit(f"the {name} run stopped; see {workdir / (name + '.log')}:\n"
                                     + (workdir / f"{name}.log").read_text(errors="replace")[-3000:])
        for _, go, _ in children.values():
            go.write(b".")
        for name, (process, _, _) in children.items():
            if process.wait() != 0:
                raise SystemExit(f"the {name} run failed:\n" + (workdir / f"{name}.log").read_text(errors="replace")[-3000:])
    finally:
        for process, go, done in children.values():
            go.close()
            done.close()
            if process.poll() is None:
                process.kill()
    return {name: json.loads((workdir / f"{name}.json").read_text(encoding="utf-8")) for name in runs}, loads


def child_generate(adapter: Path, reps: int, report: Path) -> None:
    """In this process: answer the training rows with and without the shared prefix's KV cache, alternating."""
    from hf_instruct_tune.generation import AdapterGenerator, prompt_messages

    rows = json.loads(DATA.read_text(encoding="utf-8"))
    conversations = [prompt_messages(row, "alpaca") for row in rows]
    generator = AdapterGenerator(adapter)
    generator.generate(conversations[:2], max_new_tokens=2)  # warm-up
    results: dict[str, dict] = {"plain": {"seconds": []}, "shared": {"seconds": []}}
    for rep in range(reps):
        order = (("plain", False), ("shared", True)) if rep % 2 == 0 else (("shared", True), ("plain", False))
        for name, sharing in order:
            start = time.perf_counter()
            answers = generator.generate(conversations, max_new_tokens=16, prefix_sharing=sharing)
            results[name]["seconds"].append(time.perf_counter() - start)
            results[name]["answers"] = [a.text for a in answers]
            results[name]["eos"] = sum(a.finish_reason == "eos" for a in answers)
    report.write_text(json.dumps(results, ensure_ascii=False), encoding="utf-8")


def generation_rates(adapter: Path, reps: int, workdir: Path) -> dict:
    """Rows/s of ``generate`` over the 10 training rows, shared and not, by the median of ``reps`` each."""
    report = workdir / "generate.json"
    subprocess.run([sys.executable, __file__, "--child-generate", str(adapter), "--reps", str(reps), "--report",
                    str(report)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs = json.loads(report.read_text(encoding="utf-8"))
    for run in runs.values():
        run["median_s"] = statistics.median(run["seconds"])
        run["rows_per_s"] = len(run["answers"]) / run["median_s"]
    return runs


def median_of(run: dict, key: str) -> float:
    return statistics.median(step.get(key, 0.0) for step in run["steps"])


def markdown(command: str, plain: dict, shared: dict, loads: list[float], gen: dict) -> str:
    relative = [abs(a - b) / abs(b) for a, b in zip(shared["losses"], plain["losses"])]
    speedup = median_of(plain, "wall") / median_of(shared, "wall")
    total = sum(s["wall"] for s in plain["steps"]) / sum(s["wall"] for s in shared["steps"])
    lines = [
        f"`{command}` (2-core CPU, {shared['threads']} torch threads, SmolLM2-135M-Instruct, the seed data, the "
        "main job's defaults: 16 rows a step). The two runs take turns step by step in two processes, so both see "
        f"the same load: 1-minute load average {min(loads):.1f} to {max(loads):.1f} (median "
        f"{statistics.median(loads):.1f}; 2 means both cores busy).", "",
        "| training | micro-batches per step | median step | total of the steps | median CPU time per step | "
        "collation | forward | backward | optimizer, logging | tokens computed / in the rows |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, run in (("`--no-prefix-sharing`", plain), ("prefix sharing (default)", shared)):
        tokens = f"{run['computed_tokens']:,} / {run['row_tokens']:,}" if run["row_tokens"] else "all"
        parts = " | ".join(f"{median_of(run, part):.2f} s" for part in PARTS)
        lines.append(f"| {name} | {run['grad_accum']} x {run['batch_size']} rows | {median_of(run, 'wall'):.2f} s | "
                     f"{sum(s['wall'] for s in run['steps']):.0f} s | {median_of(run, 'cpu'):.2f} s | {parts} | "
                     f"{tokens} |")
    lines += ["", f"Step time: **{speedup:.2f}x** faster with sharing by the medians ({total:.2f}x by the totals) over "
              f"{len(shared['steps'])} steps each. Loss at every one of the {len(relative)} steps: largest relative "
              f"difference **{max(relative):.1e}** (first step {relative[0]:.1e}, last {relative[-1]:.1e}).", ""]
    same = sum(a == b for a, b in zip(gen["shared"]["answers"], gen["plain"]["answers"]))
    reps = len(gen["shared"]["seconds"])
    lines += [
        f"`generate --data` over the 10 training rows, as the main job runs it (batches of 8, 16 new tokens at "
        f"most, greedy) with the shared run's adapter, {reps} times each way, alternating:", "",
        "| `generate --data` | rows/s | median seconds (model loaded) | each repetition | ended by EOS |",
        "|---|---|---|---|---|",
    ]
    for name, run in (("shared prompt prefix KV cache (default)", gen["shared"]), ("`--no-prefix-sharing`", gen["plain"])):
        each = ", ".join(f"{s:.1f}" for s in run["seconds"])
        lines.append(f"| {name} | {run['rows_per_s']:.2f} | {run['median_s']:.2f} | {each} | {run['eos']}/10 |")
    rate = gen["shared"]["rows_per_s"] / gen["plain"]["rows_per_s"]
    lines += ["", f"**{rate:.2f}x** the rows/s with the shared prefix; the same answers for {same}/10 rows."]
    return "\n".join(lines)


def write_section(path: Path, text: str) -> None:
    """Put ``text`` between the markers in ``path``'s ``## Prefix sharing`` section (added when missing)."""
    current = path.read_text(encoding="utf-8") if path.exists() else ""
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in current and END in current:
        before, _, rest = current.partition(BEGIN)
        current = before + block + rest.partition(END)[2]
    elif SECTION in current:
        before, _, rest = current.partition(SECTION)
        current = before + SECTION + "\n\n" + block + "\n" + rest
    else:
        current = current.rstrip("\n") + f"\n\n{SECTION}\n\n{block}\n"
    path.write_text(current, encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps of each run (default: 60)")
    parser.add_argument("--reps", type=int, default=5, help="generate repetitions each way (default: 5)")
    parser.add_argument("--markdown", type=Path, help="write the result into this file's Prefix sharing section")
    parser.add_argument("--json", type=Path, help="write every measurement to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--baton", help=argparse.SUPPRESS)
    parser.add_argument("--child-generate", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        go_fd, done_fd = map(int, args.baton.split(","))
        child_train(json.loads(args.child), args.report, Baton(go_fd, done_fd))
        return 0
    if args.child_generate is not None:
        child_generate(args.child_generate, args.reps, args.report)
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        common = ["--max-steps", str(args.steps), "--overwrite"]
        runs, loads = train_in_turns({
            "plain": [*common, "--no-prefix-sharing", "--output-dir", str(workdir / "plain")],
            "shared": [*common, "--output-dir", str(workdir / "shared")]}, args.steps, workdir)
        gen = generation_rates(workdir / "shared", args.reps, workdir)
    command = "python bench/prefix_sharing_bench.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    text = markdown(command, runs["plain"], runs["shared"], loads, gen)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"training": runs, "loads": loads, "generate": gen}, ensure_ascii=False),
                             encoding="utf-8")
    if args.markdown:
        write_section(args.markdown, text)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
