"""``hf-instruct-tune export``: merge an adapter into its base model for tools without peft."""

from __future__ import annotations

import argparse

EXAMPLES = """\
examples:
  hf-instruct-tune export --adapter out/ --merged merged/
  hf-instruct-tune export --adapter out/ --merged merged/ --base ./my-local-base   # base trained from a local copy
  hf-instruct-tune upload alice/smollm2-alpaca-merged merged/
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export", help="Merge an adapter into its base model (safetensors + tokenizer + card).",
        description="Load the base model, apply the LoRA adapter, merge it (peft merge_and_unload) and save a "
        "standalone model with its tokenizer, prompt template, metadata and a card (base_model_relation: merge).",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--adapter", required=True, metavar="DIR", help="The adapter folder written by 'train'.")
    parser.add_argument("--merged", required=True, metavar="OUT", help="Folder to write the merged model to.")
    parser.add_argument("--base", default=None, metavar="PATH_OR_ID",
                        help="Base model to merge into. Default: the Hub id recorded at training time.")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (default).")
    parser.add_argument("--overwrite", action="store_true", help="Write into OUT even if it is not empty.")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="Accept pickle (*.bin) weights where a base model or the adapter has no safetensors.")
    parser.add_argument("--no-card", dest="card", action="store_false", help="Do not write README.md.")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..hub.export import export_merged

    print(export_merged(args.adapter, args.merged, base=args.base, dtype=args.dtype, card=args.card,
                        overwrite=args.overwrite, allow_pickle=args.allow_pickle))
    return 0
