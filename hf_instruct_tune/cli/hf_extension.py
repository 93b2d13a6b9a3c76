"""``hf-instruct-tune hf-extension``: make ``hf instruct-tune ...`` run this CLI."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "hf-extension", help="Register this CLI as `hf instruct-tune` (an extension of the `hf` command).",
        description="Write the manifest that the Hugging Face `hf` command reads for its extensions, so that "
                    "`hf instruct-tune train ...` runs `hf-instruct-tune train ...`. Undo with "
                    "`hf extensions remove instruct-tune`.")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    import sys

    from ..hf_extension import EXTENSION_NAME, register

    manifest = register()
    print(f"Registered: `hf {EXTENSION_NAME} ...` now runs this CLI ({manifest}).", file=sys.stderr)
    return 0
