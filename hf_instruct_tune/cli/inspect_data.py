"""``hf-instruct-tune inspect``: show what will be trained, token by token, and check the labels rules."""

from __future__ import annotations

import argparse
import json

EXAMPLES = """examples:
  hf-instruct-tune inspect --data examples/dataset.json --template alpaca-zh --rows 2
  hf-instruct-tune inspect --data chats.jsonl --model meta-llama/Llama-3.1-8B-Instruct --json
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "inspect", help="Show trained and masked tokens and check the labels rules.", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Encode the data as `train` would and show, per example, the text with trained tokens in ⟦…⟧, "
                    "the EOS/BOS checks and the length statistics. Exit code 1 when a check fails.")
    parser.add_argument("--data", required=True, help="Data file or saved dataset folder.")
    parser.add_argument("--template", help="'model' (the tokenizer's chat_template), a template name or a .jinja "
                                           "path (default as in `train`).")
    parser.add_argument("--formatter", help="Row format; detected from the columns when omitted.")
    parser.add_argument("--model", help="Model whose tokenizer to use (default: the embedded SmolLM2).")
    parser.add_argument("--rows", type=int, default=3, help="Examples to show (default: 3); all are checked.")
    parser.add_argument("--max-length", type=int, default=1024, help="As in `train` (default: 1024).")
    parser.add_argument("--overlong", choices=("drop", "truncate"), default="drop", help="As in `train`.")
    parser.add_argument("--train-on-prompt", action="store_true", help="As in `train`.")
    parser.add_argument("--json", action="store_true", help="Write one JSON object per row to stdout instead.")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..chat_encoding import encoder_for
    from ..data import DataSource, row_error
    from ..errors import InputError
    from ..formatters import FieldError, detect_formatter, get_formatter
    from ..inspection import inspect_rows, length_stats, render_tokens
    from ..models import DEFAULT_MODEL, load_tokenizer, resolve_model
    from ..recipe import check_template_name, resolve_template
    from ..tokenization import ExampleError

    source = DataSource.open(args.data)
    formatter_name = args.formatter or detect_formatter(source.columns(), source=source.display)
    format_row = get_formatter(formatter_name)
    check_template_name(args.template)
    tokenizer = load_tokenizer(resolve_model(args.model or DEFAULT_MODEL))
    template = resolve_template(args.template, formatter_name, tokenizer)
    encoder = encoder_for(tokenizer, template, max_length=args.max_length, train_on_prompt=args.train_on_prompt,
                          overlong=args.overlong)
    reports, lengths, failed, dropped = [], [], 0, 0
    for location, row in source.rows():
        try:
            row_reports = inspect_rows(encoder, format_row(row), location)
        except (FieldError, ExampleError) as error:
            raise row_error(error, source.display, location) from None
        for report in row_reports:
            dropped += report.dropped
            failed += not report.ok
            lengths.append(len(report.input_ids))
            if args.json:
                print(json.dumps({"location": report.location, "input_ids": report.input_ids, "labels": report.labels,
                                  "trained_text": report.trained_text(tokenizer), "checks": report.checks,
                                  "dropped": report.dropped}, ensure_ascii=False))
            elif len(reports) < args.rows:
                reports.append(report)
    if not lengths:
        raise InputError("the dataset is empty: it has no rows", source=source.display)
    if not args.json:
        print(f"formatter: {formatter_name}   template: {template.name}   stop token: {encoder.stop_text!r} "
              f"(id {encoder.stop_token_id})   pad id: {tokenizer.pad_token_id}   BOS added: {encoder.adds_bos}")
        for report in reports:
            marks = "  ".join(f"{'ok' if passed else 'FAIL'} {name}" for name, passed in report.checks.items())
            print(f"\n--- {report.location} ({len(report.input_ids)} tokens, "
                  f"{sum(label != -100 for label in report.labels)} trained)\n{render_tokens(tokenizer, report)}\n"
                  f"checks: {marks}")
        stats = length_stats([length for length in lengths if length])
        print(f"\nlengths: {json.dumps(stats)}")
        print(f"{len(lengths)} rows: {len(lengths) - failed} pass every check, {dropped} longer than max_length "
              f"({args.overlong}), {failed - dropped} fail a check.")
    return 1 if failed - dropped else 0
