"""``hf-instruct-tune upload``: push an adapter folder to the Hub, with a regenerated model card.

Same arguments, order and defaults as ``hf upload``: ``REPO_ID [LOCAL_PATH] [PATH_IN_REPO]``.
"""

from __future__ import annotations

import argparse

EXAMPLES = """\
examples:
  hf-instruct-tune upload alice/smollm2-alpaca-lora out/
  hf-instruct-tune upload alice/smollm2-alpaca-lora out/ --private
  hf-instruct-tune upload alice/smollm2-alpaca-lora out/ --revision experiment-2
  hf-instruct-tune upload bob/shared-adapter out/ --create-pr --commit-message "Retrained on v2 data"
  hf-instruct-tune upload alice/test out/ --endpoint http://127.0.0.1:8765   # a local Hub server, offline too
"""


def add_hub_options(parser: argparse.ArgumentParser) -> None:
    """--token and --endpoint, shared by every command that talks to the Hub."""
    parser.add_argument("--token", default=None,
                        help="Hub token with write access. Default: HF_TOKEN, then the token saved by 'hf auth login'.")
    parser.add_argument("--endpoint", default=None, help="Hub endpoint URL. Default: HF_ENDPOINT, then https://huggingface.co.")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "upload", help="Upload an adapter folder to the Hub, with its model card.",
        description="Upload an adapter folder (or one file) to a Hub model repo in a single commit. The repo is "
        "created if needed; README.md and loss_curve.png are regenerated from hf_instruct_tune.json.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("repo_id", metavar="REPO_ID", help="The repo to upload to, e.g. 'alice/my-adapter'.")
    parser.add_argument("local_path", metavar="LOCAL_PATH", nargs="?", default=".",
                        help="Adapter folder or file to upload. Default: the current directory.")
    parser.add_argument("path_in_repo", metavar="PATH_IN_REPO", nargs="?", default=None,
                        help="Where to put it in the repo. Default: the repo root (a file keeps its name).")
    parser.add_argument("--private", action="store_true", help="Create the repo private (no effect if it exists).")
    parser.add_argument("--revision", default=None, help="Branch to commit to; created from main if missing.")
    parser.add_argument("--create-pr", action="store_true", help="Open a pull request instead of committing to main.")
    parser.add_argument("--commit-message", default=None, help="The commit message.")
    parser.add_argument("--include", nargs="*", default=None, metavar="PATTERN",
                        help="Only upload files matching these globs. From a folder 'train' wrote, the default is "
                             "the files the run wrote; name any other file here to publish it.")
    parser.add_argument("--exclude", nargs="*", default=None, metavar="PATTERN", help="Skip files matching these globs.")
    add_hub_options(parser)
    parser.add_argument("--no-card", dest="card", action="store_false",
                        help="Upload the folder as it is, without regenerating README.md.")
    parser.add_argument("--force", action="store_true",
                        help="Upload an adapter even when its LoRA weights never moved from their initialization.")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..hub.push import push_adapter

    info = push_adapter(
        args.local_path, args.repo_id, token=args.token, endpoint=args.endpoint, private=args.private,
        revision=args.revision, create_pr=args.create_pr, commit_message=args.commit_message,
        include=args.include, exclude=args.exclude, path_in_repo=args.path_in_repo, card=args.card, force=args.force,
    )
    if info is not None:  # None: the repo already held these files, and the log said so
        print(info.pr_url or info.commit_url)
    return 0
