"""``hf-instruct-tune card``: render or refresh an adapter's model card (README.md)."""

from __future__ import annotations

import argparse

EXAMPLES = """\
examples:
  hf-instruct-tune card out/
  hf-instruct-tune card out/ --license apache-2.0 --language en fr
  hf-instruct-tune card out/ --base-model HuggingFaceTB/SmolLM2-135M-Instruct   # trained from a local copy
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "card", help="Write DIR/README.md, the model card, from the training metadata.",
        description="Render the model card of an adapter folder from its hf_instruct_tune.json, and the loss "
        "curve (loss_curve.png) when matplotlib is installed. A license, language or base model set in an "
        "existing README.md header is kept unless given again.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dir", metavar="DIR", help="The adapter folder written by 'hf-instruct-tune train'.")
    parser.add_argument("--license", default=None, help="License id for the card, e.g. apache-2.0. Never guessed.")
    parser.add_argument("--language", nargs="+", default=None, help="Language codes, e.g. en zh.")
    parser.add_argument("--base-model", default=None, help="Hub id of the base model, when training used a local copy.")
    parser.add_argument("--repo-id", default=None, help="Repo id used in the usage snippets. Default: a placeholder.")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..hub.card import write_card

    path = write_card(args.dir, repo_id=args.repo_id, license=args.license, language=args.language,
                      base_model=args.base_model)
    print(path)
    return 0
