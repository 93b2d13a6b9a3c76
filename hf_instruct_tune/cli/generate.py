"""``hf-instruct-tune generate``: answer with a trained adapter, in the prompt format it was trained with."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXAMPLES = """examples:
  hf-instruct-tune generate --adapter outputs/sentiment --instruction 分类以下文本的情感。 --input 我不喜欢在雨中踢足球。
  hf-instruct-tune generate --adapter outputs/sentiment --data examples/heldout.json --output predictions.jsonl
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "generate", help="Generate responses with a trained adapter.", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Print only the response (or write JSONL with --data/--output). The prompt is rebuilt from "
                    "the template saved with the adapter; generation stops on its stop token.")
    parser.add_argument("--adapter", required=True, help="Folder written by `train`.")
    parser.add_argument("--instruction", help="The instruction (or user message) to answer.")
    parser.add_argument("--input", default="", help="Optional context for the instruction.")
    parser.add_argument("--data", help="Rows to answer (.json, .jsonl, .csv, .parquet); their outputs are ignored.")
    parser.add_argument("--output", help="JSONL file to write: each row plus 'generated' and 'finish_reason'.")
    parser.add_argument("--formatter", help="Row format of --data; detected from the columns when omitted.")
    parser.add_argument("--model", help="Base model; default: the one recorded with the adapter.")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="Longest response in tokens (default: 256).")
    parser.add_argument("--batch-size", type=int, default=8, help="Prompts per batch (default: 8).")
    parser.add_argument("--trust-remote-code", action="store_true", help="Run code from the base model's repository.")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="Accept pickle (*.bin) weights where a base model or the adapter has no safetensors.")
    parser.add_argument("--prefix-sharing", action=argparse.BooleanOptionalAction, default=None,
                        help="Run the prompt prefix that a batch's rows share once and reuse its KV cache "
                             "(default: on a CPU, off on a GPU).")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..errors import InputError

    if (args.instruction is None) == (args.data is None):
        raise InputError("pass either --instruction TEXT or --data FILE --output FILE.jsonl")
    if args.data and not args.output:
        raise InputError("--data needs --output FILE.jsonl", field="output")
    if args.data and Path(args.output).resolve() == Path(args.data).resolve():
        raise InputError("is the --data file; writing the answers there would replace your rows, so choose another "
                         "--output", source=args.output, field="output")
    if args.max_new_tokens < 1:
        raise InputError(f"`--max-new-tokens` should be at least 1, got {args.max_new_tokens}.", field="max_new_tokens")
    if args.instruction is not None and not args.instruction.strip():
        raise InputError("`--instruction` is empty", field="instruction")
    rows, conversations = _requests(args)
    from ..generation import AdapterGenerator

    generator = AdapterGenerator(args.adapter, model=args.model, trust_remote_code=args.trust_remote_code,
                                 allow_pickle=args.allow_pickle)
    results = generator.generate(conversations, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                 prefix_sharing=args.prefix_sharing)
    if args.instruction is not None:
        print(results[0].text)
        if results[0].finish_reason == "length":
            print(f"note: the response reached --max-new-tokens {args.max_new_tokens} before the stop token, so it "
                  "may be cut off; raise --max-new-tokens for a longer answer.", file=sys.stderr)
        return 0
    from ..metadata import write_text_atomic

    lines = [json.dumps({**row, "generated": result.text, "finish_reason": result.finish_reason},
                        ensure_ascii=False, default=str) for row, result in zip(rows, results)]
    write_text_atomic(Path(args.output), "\n".join(lines) + "\n")
    stopped = sum(result.finish_reason == "eos" for result in results)
    cut = len(results) - stopped
    limit = f", {cut} cut by --max-new-tokens {args.max_new_tokens} (finish_reason 'length')" if cut else ""
    print(f"Wrote {len(results)} responses to {args.output} ({stopped} ended by the stop token{limit}).",
          file=sys.stderr)
    return 0


def _requests(args) -> tuple[list[dict], list[list[dict]]]:
    """The rows and conversations to answer, all checked before the model loads."""
    from ..data import DataSource, row_error
    from ..errors import InputError
    from ..formatters import FieldError, detect_formatter
    from ..generation import prompt_messages

    if args.instruction is not None:
        user = {"role": "user", "content": args.instruction}
        if args.input.strip():
            user["input"] = args.input
        return [{}], [[user]]
    source = DataSource.open(args.data)
    formatter = args.formatter or detect_formatter(source.columns(), source=source.display)
    rows, conversations = [], []
    for location, row in source.rows():
        try:
            conversations.append(prompt_messages(row, formatter))
        except FieldError as error:
            raise row_error(error, source.display, location) from None
        rows.append(dict(row))
    if not rows:
        raise InputError("the dataset is empty: it has no rows", source=source.display)
    return rows, conversations
