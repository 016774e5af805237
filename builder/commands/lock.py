"""``bootchain lock RECIPE``: fetch and verify every pinned input and write the lock file.

With ``--update`` the pins are first moved to what apt's mirror has now (the kernel also to the
newest ABI) and rewritten in the recipe source where they are written.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from builder.errors import InputFileError, UserInputError
from builder.fsutil import write_atomic
from builder.inputs import Lock, make_lock, update_pins


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "lock",
        help="fetch and verify pinned inputs; write recipes/<recipe>.lock.json",
        description=__doc__,
    )
    parser.add_argument("recipe", type=Path, help="the recipe file")
    parser.add_argument("--set", dest="variables", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--update", action="store_true", help="re-pin to the mirror's current versions first"
    )
    parser.add_argument("--offline", action="store_true", help="use the cache only")
    parser.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    from builder.recipe import load_recipe, parse_variables

    if args.update and args.offline:
        raise UserInputError("--update needs the mirror: drop --offline")
    variables = parse_variables(args.variables)
    recipe = load_recipe(args.recipe, variables)
    if args.update:
        changes = update_pins(recipe.files, recipe.packages)
        for change in changes:
            print(change)
        if not changes:
            print("all pins are current")
        recipe = load_recipe(args.recipe, variables)
    target = recipe.lock_file
    previous = None
    if target.exists():
        try:
            data = target.read_bytes()
        except OSError as exc:
            raise InputFileError(f"{target}: cannot read the lock file: {exc.strerror}") from None
        previous = Lock.from_json(data, str(target))
    lock = make_lock(recipe.packages, recipe.locked_files, offline=args.offline, previous=previous)
    try:
        write_atomic(target, lock.to_json())
    except OSError as exc:
        raise InputFileError(f"{target}: cannot write the lock file: {exc.strerror}") from None
    print(f"wrote {target}")
    return 0
