"""Train the sentiment demo with one or more recipes and score each on the training rows and a held-out set.

    python bench/demo_recipe.py --recipe ours= --recipe notebook="--train-on-prompt --max-steps 60"

Each recipe is extra ``train`` flags on top of the demo command. For every recipe the script reports
wall time and peak memory of training, exact matches on the 10 training rows, held-out accuracy
(answer exactly one of 积极/中性/消极 and right), answers that were one of the labels, and answers that
ended by the stop token. ``--markdown FILE`` writes the table (with this command) into FILE's
``## CPU demo`` section.
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

from benchmarks_md import write_section

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "examples" / "dataset.json"
HELDOUT = ROOT / "examples" / "heldout.json"
LABELS = {"积极", "中性", "消极"}
DEMO_FLAGS = ["--data", str(TRAIN), "--template", "alpaca-zh"]


def cli(*args: str) -> tuple[float, float]:
    """Run the CLI in a child process; return its wall time (s) and its own peak RSS (MiB)."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "hf_instruct_tune", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise subprocess.CalledProcessError(child.returncode, child.args)
    return time.perf_counter() - start, usage.ru_maxrss / 1024


def score(predictions: Path, *, exact: bool) -> dict:
    rows = [json.loads(line) for line in predictions.read_text(encoding="utf-8").splitlines()]
    answers = [row["generated"].strip() for row in rows]
    return {
        "correct": sum(answer == row["output"] for answer, row in zip(answers, rows)),
        "is_label": sum(answer in LABELS for answer in answers),
        "eos": sum(row["finish_reason"] == "eos" for row in rows),
        "total": len(rows),
        "answers": answers,
    }


def run_recipe(name: str, flags: list[str], workdir: Path) -> dict:
    adapter = workdir / name
    seconds, peak_mib = cli("train", *DEMO_FLAGS, "--output-dir", str(adapter), *flags)
    results = {"name": name, "flags": " ".join(flags) or "(defaults)", "train_s": seconds, "peak_mib": peak_mib}
    for split, data in (("train", TRAIN), ("heldout", HELDOUT)):
        out = workdir / f"{name}-{split}.jsonl"
        cli("generate", "--adapter", str(adapter), "--data", str(data), "--output", str(out), "--max-new-tokens", "16")
        results[split] = score(out, exact=True)
    metadata = json.loads((adapter / "hf_instruct_tune.json").read_text(encoding="utf-8"))
    results["steps"] = metadata["results"]["global_step"]
    results["final_loss"] = metadata["results"]["final_loss"]
    return results


def table(results: list[dict]) -> str:
    lines = ["| recipe | train flags | steps | train time | peak RSS | training rows exact | held-out correct | "
             "held-out answers a label | ended by EOS (train + held-out) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        tr, ho = r["train"], r["heldout"]
        lines.append(f"| {r['name']} | `{r['flags']}` | {r['steps']} | {r['train_s']:.0f} s | {r['peak_mib']:.0f} MiB | "
                     f"{tr['correct']}/{tr['total']} | {ho['correct']}/{ho['total']} | {ho['is_label']}/{ho['total']} | "
                     f"{tr['eos'] + ho['eos']}/{tr['total'] + ho['total']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", action="append", required=True, help="NAME=FLAGS, e.g. notebook='--max-steps 60'")
    parser.add_argument("--markdown", type=Path, help="Write the table into this file's '## CPU demo' section.")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in args.recipe:
            name, _, flags = recipe.partition("=")
            results.append(run_recipe(name, shlex.split(flags), Path(tmp)))
            print(json.dumps({k: v for k, v in results[-1].items()}, ensure_ascii=False), flush=True)
    rendered = table(results)
    print(rendered)
    if args.markdown:
        command = "python bench/demo_recipe.py " + " ".join(f"--recipe {shlex.quote(r)}" for r in args.recipe)
        body = (f"Command: `{command} --markdown BENCHMARKS.md`\n\nSmolLM2-135M-Instruct (embedded GGUF, float32) "
                "on CPU, `alpaca-zh`, the 10-row `examples/dataset.json`; held-out: the 30 rows of "
                f"`examples/heldout.json`, greedy decoding.\n\n{rendered}")
        write_section(f"## CPU demo\n\n{body}", args.markdown)


if __name__ == "__main__":
    main()
