"""Data loading benchmark: streaming ``DataSource`` + ``tokenize_source`` against a naive in-memory path.

Generates an Alpaca JSON Lines file, then formats and tokenizes it in a fresh subprocess per path, so each
peak RSS (``ru_maxrss``) is that path's own:

* ``streaming``: ``DataSource.open`` + ``tokenize_source`` (rows read one at a time into an Arrow file);
* ``naive``: every row parsed into a Python list of dicts, then tokenized into Python lists.

Run:  python bench/data_load_bench.py [--rows 200000] [--tokenizer smollm2|tiny] [--write]
``--write`` replaces the ``## Data loading`` section of BENCHMARKS.md (other sections are left alone).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks_md import write_section

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Data loading"
WORDS = ("the film was slow but the ending made up for it and I would watch it again with friends on a rainy "
         "evening while the music carried every scene").split()


def write_alpaca_jsonl(path: Path, rows: int) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(rows):
            start = i % 17
            review = " ".join(WORDS[(start + k) % len(WORDS)] for k in range(12 + i % 20))
            row = {"instruction": f"Classify the sentiment of review {i}.", "input": review,
                   "output": ("positive", "negative", "neutral")[i % 3]}
            handle.write(json.dumps(row) + "\n")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _encoder(tokenizer_name: str):
    from hf_instruct_tune import models
    from hf_instruct_tune.templating import get_template
    from hf_instruct_tune.tokenization import ExampleEncoder

    if tokenizer_name == "smollm2":
        tokenizer = models.load_tokenizer(models.resolve_model(models.DEFAULT_MODEL))
    else:
        from hf_instruct_tune.testing.tiny import build_tiny_tokenizer

        tokenizer = build_tiny_tokenizer()
    return ExampleEncoder(tokenizer, get_template("alpaca"), max_length=1024)


def child(mode: str, data: Path, tokenizer_name: str) -> dict:
    """Format and tokenize ``data`` one way; return the numbers as a dict."""
    import logging

    from hf_instruct_tune.formatters import get_formatter

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    encoder = _encoder(tokenizer_name)
    alpaca = get_formatter("alpaca")
    baseline = _peak_rss_mb()
    start = time.perf_counter()
    if mode == "streaming":
        from hf_instruct_tune.data import DataSource, tokenize_source

        import pyarrow.compute as pc

        tokenized = tokenize_source(DataSource.open(data), alpaca, encoder)
        elapsed, peak = time.perf_counter() - start, _peak_rss_mb()
        rows, kept = tokenized.rows, len(tokenized.dataset)
        tokens = pc.sum(pc.list_value_length(tokenized.dataset.data.column("input_ids"))).as_py()
        tokenized.cleanup()
    else:
        with open(data, encoding="utf-8") as handle:
            records = [json.loads(line) for line in handle if line.strip()]  # the whole file as dicts
        encoded = [encoder.encode(alpaca(row)) for row in records]
        examples = [example.as_dict() for example in encoded if example is not None]
        rows, kept = len(records), len(examples)
        elapsed, peak = time.perf_counter() - start, _peak_rss_mb()
        tokens = sum(len(example["input_ids"]) for example in examples)
    return {"mode": mode, "rows": rows, "kept": kept, "tokens": tokens, "seconds": round(elapsed, 2),
            "rows_per_s": round(rows / elapsed), "peak_rss_mb": round(peak),
            "baseline_rss_mb": round(baseline)}


def run_child(mode: str, data: Path, tokenizer_name: str) -> tuple[dict, list[str]]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    result = subprocess.run([sys.executable, __file__, "--child", mode, "--data", str(data), "--tokenizer",
                             tokenizer_name], capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise SystemExit(f"the {mode} run failed:\n{result.stderr[-3000:]}")
    progress = [line for line in result.stderr.splitlines() if line.startswith("Tokenized ")]
    return json.loads(result.stdout.strip().splitlines()[-1]), progress


def report(results: list[dict], progress: list[str], args, small: dict | None) -> str:
    streaming = next(r for r in results if r["mode"] == "streaming")
    naive = next(r for r in results if r["mode"] == "naive")
    growth = lambda r: r["peak_rss_mb"] - r["baseline_rss_mb"]  # noqa: E731
    lines = [
        SECTION, "",
        f"Formatting + tokenizing {args.rows:,} Alpaca rows (JSON Lines, {args.size_mb:.0f} MB) with the "
        f"{'embedded SmolLM2' if args.tokenizer == 'smollm2' else 'tiny test'} tokenizer, one fresh process per path, "
        f"on {os.cpu_count()} CPU cores ({platform.python_implementation()} {platform.python_version()}).", "",
        "| path | rows/s | seconds | peak RSS | RSS above start |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in (streaming, naive):
        name = "`DataSource` + `tokenize_source` (Arrow)" if r["mode"] == "streaming" else "naive (list of dicts, lists)"
        lines.append(f"| {name} | {r['rows_per_s']:,} | {r['seconds']} | {r['peak_rss_mb']:,} MB | {growth(r):,} MB |")
    lines += [
        "",
        f"- Throughput, streaming / naive: **{streaming['rows_per_s'] / naive['rows_per_s']:.2f}x**; memory growth, "
        f"naive / streaming: **{growth(naive) / max(growth(streaming), 1):.1f}x**.",
    ]
    if small:
        lines.append(f"- Bounded memory: streaming {small['rows']:,} rows grows RSS by {growth(small):,} MB, "
                     f"{args.rows:,} rows by {growth(streaming):,} MB.")
    lines += [
        f"- Both paths produce the same {streaming['tokens']:,} tokens from {streaming['kept']:,} kept rows." if
        streaming["tokens"] == naive["tokens"] else
        f"- Token counts differ: streaming {streaming['tokens']:,}, naive {naive['tokens']:,}.",
        f"- Progress is logged every 50,000 rows ({len(progress)} lines, last: \"{progress[-1] if progress else '-'}\").",
        "", "Command:", "", "```", f"python bench/data_load_bench.py --rows {args.rows} --tokenizer {args.tokenizer} --write",
        "```", "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--tokenizer", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument("--write", action="store_true", help="Write the section into BENCHMARKS.md.")
    parser.add_argument("--no-bounded-check", action="store_true", help="Skip the smaller streaming run.")
    parser.add_argument("--child", choices=("streaming", "naive"), help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.data, args.tokenizer)))
        return
    with tempfile.TemporaryDirectory(prefix="data-load-bench-") as scratch:
        data = Path(scratch) / "alpaca.jsonl"
        write_alpaca_jsonl(data, args.rows)
        args.size_mb = data.stat().st_size / 1e6
        results, progress = [], []
        for mode in ("streaming", "naive"):
            result, lines = run_child(mode, data, args.tokenizer)
            results.append(result)
            progress = progress or lines
            print(json.dumps(result), file=sys.stderr)
        small = None
        if not args.no_bounded_check:
            small_data = Path(scratch) / "alpaca-small.jsonl"
            write_alpaca_jsonl(small_data, max(args.rows // 4, 1))
            small, _ = run_child("streaming", small_data, args.tokenizer)
            print(json.dumps(small), file=sys.stderr)
    text = report(results, progress, args, small)
    print(text)
    if args.write:
        write_section(text)


if __name__ == "__main__":
    main()
