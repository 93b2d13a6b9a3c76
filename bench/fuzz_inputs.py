"""The long fuzzing run: ``tests/test_fuzz_inputs.py`` under the ``fuzz-long`` hypothesis profile, with counts.

Every input surface (data files in each format, YAML configs, user templates, adapter folders) is tried
with many more generated cases than CI runs; each case must be accepted or refused with one line naming
the file. The table counts the cases tried per surface, how many were accepted and refused, and the
failures found (cases that ended in a traceback or a wrong message).

    python bench/fuzz_inputs.py --examples 400 --write

``--write`` replaces the ``## Input fuzzing`` section of BENCHMARKS.md (other sections are left alone).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks_md import write_section

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Input fuzzing"


def run(examples: int) -> tuple[dict[str, collections.Counter], int, str, float]:
    with tempfile.TemporaryDirectory(prefix="fuzz-inputs-") as scratch:
        report = Path(scratch) / "outcomes.jsonl"
        env = {**os.environ, "FUZZ_PROFILE": "fuzz-long", "FUZZ_REPORT": str(report),
               "FUZZ_LONG_EXAMPLES": str(examples), "HF_HUB_OFFLINE": "1"}
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                 "tests/test_fuzz_inputs.py"], cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        if report.exists():
            for line in report.read_text(encoding="utf-8").splitlines():
                entry = json.loads(line)
                counts[entry["surface"]][entry["outcome"]] += 1
    failed = len(re.findall(r"^FAILED ", result.stdout, re.MULTILINE))
    summary = (result.stdout.strip().splitlines() or [""])[-1]
    return counts, failed, summary, seconds


def section(counts, failed: int, summary: str, seconds: float, examples: int) -> str:
    lines = [SECTION, "",
             f"Hypothesis, `fuzz-long` profile ({examples} examples per test), {seconds:.0f} s on 2 CPU cores. "
             "A case is accepted, or refused with exit 2 and one `error:` line naming the file; anything else "
             "(a traceback, a second line, a file written) is a failure.", "",
             "| surface | cases | accepted | refused (one line) |", "|---|---:|---:|---:|"]
    for surface in sorted(counts):
        count = counts[surface]
        total = count["accepted"] + count["refused"]
        lines.append(f"| {surface} | {total:,} | {count['accepted']:,} | {count['refused']:,} |")
    total = sum(sum(count.values()) for count in counts.values())
    lines += ["", f"- {total:,} cases in all; tests failed: **{failed}** (pytest: {summary}).",
              "- CI runs the same tests under the `fuzz-ci` profile (25 examples per test).", "",
              "Command:", "", "```", f"python bench/fuzz_inputs.py --examples {examples} --write", "```"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=400, help="Hypothesis examples per test (default: 400).")
    parser.add_argument("--write", action="store_true", help="Write the section into BENCHMARKS.md.")
    args = parser.parse_args()
    counts, failed, summary, seconds = run(args.examples)
    text = section(counts, failed, summary, seconds, args.examples)
    print(text)
    if args.write:
        write_section(text)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
