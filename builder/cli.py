"""The ``bootchain`` command line: verbs only. The one place that prints errors and exits."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from builder import __version__
from builder.commands import MODULES
from builder.errors import BootchainError


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bootchain",
        description="Reproducible OS images with a measured-boot chain of trust.",
    )
    parser.add_argument("--version", action="version", version=f"bootchain {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each step")
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for name in MODULES:
        module = importlib.import_module(f"builder.commands.{name}")
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    # -v shows our own steps, not the chatter of the libraries we call.
    logging.getLogger("builder").setLevel(logging.INFO if args.verbose else logging.WARNING)
    try:
        code: int = args.func(args)
    except BootchainError as exc:
        print(f"bootchain: error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("bootchain: interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
