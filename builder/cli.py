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


def verb_module(argv: Sequence[str]) -> str | None:
    """The module of the verb named in ``argv``, if it is one of ours.

    The verb is the first word not starting with ``-`` (the top-level options take no value).
    """
    for arg in argv:
        if not arg.startswith("-"):
            name = arg.replace("-", "_")
            return name if name in MODULES else None
    return None


def make_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser for every verb, or for verb module ``only`` (the others are not imported)."""
    parser = argparse.ArgumentParser(
        prog="bootchain",
        description="Reproducible OS images with a measured-boot chain of trust.",
    )
    parser.add_argument("--version", action="version", version=f"bootchain {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each step")
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for name in MODULES if only is None else (only,):
        module = importlib.import_module(f"builder.commands.{name}")
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Import only the named verb's module: the others pull in jinja2, rich, boto3... and a
    # one-file command like ``sign`` would pay for all of them at every start.
    words = sys.argv[1:] if argv is None else argv
    parser = make_parser(verb_module(words))
    args = parser.parse_args(words)
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
