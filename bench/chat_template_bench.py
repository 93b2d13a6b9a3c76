"""Chat template encoding benchmark: the model's own template (``model``) against the built-in ``chatml``.

Both encode the same conversations with the embedded SmolLM2 tokenizer (whose chat template is ChatML with
a default system prompt), in the same process, alternating rounds. ``model`` renders and tokenizes each
assistant turn's prompt on its own (as a server does), so its cost grows with the number of turns; the
table shows by how much.

Run:  python bench/chat_template_bench.py [--conversations 400] [--rounds 3] [--write]
``--write`` replaces the ``## Chat template encoding`` section of BENCHMARKS.md (other sections are left alone).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

from benchmarks_md import write_section

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Chat template encoding"
WORDS = ("the film was slow but the ending made up for it and I would watch it again with friends on a rainy "
         "evening while the music carried every scene").split()


def conversations(count: int, turns: int) -> list[list[dict]]:
    result = []
    for i in range(count):
        messages = []
        for turn in range(turns):
            start = (i + turn) % 17
            messages.append({"role": "user", "content": " ".join(WORDS[(start + k) % len(WORDS)] for k in range(20))})
            messages.append({"role": "assistant", "content": " ".join(WORDS[(start + k) % len(WORDS)]
                                                                       for k in range(8 + turn))})
        result.append(messages)
    return result


def timed(encoder, rows: list[list[dict]]) -> tuple[float, int]:
    start = time.perf_counter()
    tokens = sum(len(encoder.encode({"messages": messages}).input_ids) for messages in rows)
    return time.perf_counter() - start, tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="Write the section into BENCHMARKS.md.")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from hf_instruct_tune.chat_encoding import encoder_for
    from hf_instruct_tune.chat_template import ChatTemplate
    from hf_instruct_tune.models import DEFAULT_MODEL, load_tokenizer, resolve_model
    from hf_instruct_tune.templating import get_template

    tokenizer = load_tokenizer(resolve_model(DEFAULT_MODEL))
    encoders = {"model (the tokenizer's chat_template)": encoder_for(tokenizer, ChatTemplate.from_tokenizer(tokenizer)),
                "chatml (built-in)": encoder_for(tokenizer, get_template("chatml"))}
    lines = [SECTION, "",
             f"Encoding {args.conversations} conversations per row of the table with the embedded SmolLM2 tokenizer, "
             f"best of {args.rounds} alternating rounds, one process, {platform.python_implementation()} "
             f"{platform.python_version()}, {os.cpu_count()} CPU cores (load average {os.getloadavg()[0]:.1f} at the "
             "start: other jobs shared them). The two templates render different text (`model` adds SmolLM2's default "
             "system prompt), so tokens differ a little; the ratio is per conversation.", "",
             "| assistant turns | template | conversations/s | tokens/s | time |", "|---:|---|---:|---:|---:|"]
    ratios = []
    for turns in (1, 4, 8):
        rows = conversations(args.conversations, turns)
        best = {name: (float("inf"), 0) for name in encoders}
        for _ in range(args.rounds):
            for name, encoder in encoders.items():
                seconds, tokens = timed(encoder, rows)
                if seconds < best[name][0]:
                    best[name] = (seconds, tokens)
        for name, (seconds, tokens) in best.items():
            lines.append(f"| {turns} | {name} | {len(rows) / seconds:,.0f} | {tokens / seconds:,.0f} | {seconds:.2f} s |")
        model_seconds, chatml_seconds = (value[0] for value in best.values())
        ratios.append((turns, model_seconds / chatml_seconds))
    lines += ["", "- Time, `model` / `chatml`: " + ", ".join(f"**{ratio:.2f}x** at {turns} turn{'s' * (turns > 1)}"
                                                            for turns, ratio in ratios) + ".",
              "", "Command:", "", "```", f"python bench/chat_template_bench.py --conversations {args.conversations} "
              f"--rounds {args.rounds} --write", "```", ""]
    section = "\n".join(lines)
    print(section)
    if args.write:
        write_section(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
