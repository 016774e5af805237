"""``bootchain repro RECIPE``: build twice under different conditions and compare."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "repro", help="build a recipe twice under different conditions; all artifacts must match"
    )
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--keys", type=Path, help="key set (default: the recipe's)")
    parser.set_defaults(func=run_repro)


def run_repro(args: argparse.Namespace) -> int:
    from builder.recipe import load_recipe
    from builder.repro import check_reproducible

    keys = args.keys if args.keys is not None else load_recipe(args.recipe).keys
    report = check_reproducible(args.recipe, keys)
    print(report.render())
    print(f"reproducible: {len(report.digests)} artifacts identical")
    return 0
