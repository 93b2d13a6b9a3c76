"""Check a `generate --data ... --output FILE.jsonl` run: every answer equals its row's output and ended by the stop token.

    python examples/check_answers.py outputs/sentiment-answers.jsonl
"""

import json
import sys


def main(path: str) -> int:
    rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    exact = [row for row in rows if row["generated"] == row["output"]]
    stopped = [row for row in rows if row["finish_reason"] == "eos"]
    for row in rows:
        mark = "ok  " if row["generated"] == row["output"] and row["finish_reason"] == "eos" else "FAIL"
        print(f"{mark} {row['input']}  expected {row['output']}  got {row['generated']!r} ({row['finish_reason']})")
    print(f"{len(exact)}/{len(rows)} answers reproduced exactly, {len(stopped)}/{len(rows)} ended by the stop token")
    return 0 if len(exact) == len(stopped) == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
