"""The ``hf-instruct-tune`` command line: one module per command, wired here."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from ..errors import InstructTuneError

# command name -> module under hf_instruct_tune.cli; each module has `add_parser(subparsers)` and `run(args) -> int`.
COMMANDS = {
    "train": "train",
    "generate": "generate",
    "inspect": "inspect_data",
    "templates": "templates",
    "formatters": "formatters",
    "card": "card",
    "upload": "upload",
    "export": "export",
    "hf-extension": "hf_extension",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-instruct-tune",
        description="Instruction fine-tuning with EOS-safe labels, prompt templates and Hub publishing.",
    )
    parser.add_argument("--debug", action="store_true", help="Show full tracebacks on errors.")
    parser.add_argument("--verbose", action="store_true",
                        help="Also log every HTTP request, and show the data-loading progress bars.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMANDS.values():
        try:
            module = importlib.import_module(f".{module_name}", __name__)
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{module_name}":
                raise
            continue
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code: 0 ok, 2 bad input or usage, 1 an unexpected failure."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    quiet_libraries(verbose=args.verbose)
    try:
        return int(args.func(args) or 0)
    except InstructTuneError as error:
        if args.debug:
            raise
        from ..launch import process_rank, report_error_to_launcher

        if process_rank() == 0:  # under a launcher every rank meets the same bad input; one reports it
            print(f"error: {error}", file=sys.stderr, flush=True)
            report_error_to_launcher(error.exit_code)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


# Loggers that narrate each HTTP request at INFO level (including an expected 409 when a repo exists).
HTTP_LOGGERS = ("httpx", "httpcore", "httpx2", "urllib3")


def quiet_libraries(*, verbose: bool = False) -> None:
    """The third-party warnings that the user cannot act on filtered; unless ``verbose``, HTTP request logs off
    (their warnings and errors still show) and no data-loading progress bars."""
    from ..quiet import filter_third_party_warnings

    for name in HTTP_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    filter_third_party_warnings()
    if not verbose:
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # no "Generating train split" bars


if __name__ == "__main__":
    sys.exit(main())
