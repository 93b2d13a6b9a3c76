"""``hf-instruct-tune formatters list``."""

from __future__ import annotations

import argparse
import re


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("formatters", help="List dataset formatters.",
                                   description="Built-in and plugin dataset formatters.")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("list", help="Names and the row shape each expects.")
    parser.set_defaults(func=run)
    return parser


def plain_text(docstring_line: str) -> str:
    """A docstring line for a terminal: ````name```` and ``:role:`name``` markup become ``name``."""
    return re.sub(r"(?::\w+:)?`+([^`]+)`+", r"\1", docstring_line)


def run(args: argparse.Namespace) -> int:
    from ..formatters import FORMATTERS

    for name in FORMATTERS.names():
        doc = (FORMATTERS.get(name).__doc__ or "").strip().splitlines()
        print(f"{name:18} {plain_text(doc[0]) if doc else ''}")
    return 0
