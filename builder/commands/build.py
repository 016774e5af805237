"""``bootchain build RECIPE``: the whole pipeline, with a live progress line."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console

from builder.recipe import parse_variables


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "build", help="build a recipe into signed artifacts, a disk image and golden PCRs"
    )
    parser.add_argument("recipe", type=Path, help="recipes/<name>.yaml")
    parser.add_argument(
        "--set",
        dest="variables",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="recipe variable (repeatable)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("out"),
        help="output root; the build goes to OUT/<name>/<version>/",
    )
    parser.add_argument("--keys", type=Path, help="key set folder (overrides the recipe's)")
    parser.add_argument(
        "--signer",
        metavar="SPEC",
        help="db signer: file:PATH or a pkcs11: URI (default: the key set's db.key)",
    )
    parser.add_argument("--offline", action="store_true", help="use the package cache only")
    parser.set_defaults(func=run_build)


def _terminate(signum: int, _frame: FrameType | None) -> None:
    # Unwinds like Ctrl-C, so the staging folder is removed instead of left in --out.
    raise SystemExit(128 + signum)


def run_build(args: argparse.Namespace) -> int:
    from builder.pipeline import build

    console = Console(stderr=True, highlight=False)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        with console.status("build") as status:

            def progress(stage: str) -> None:
                status.update(f"build: {stage}")
                console.log(stage)

            result = build(
                args.recipe,
                variables=parse_variables(args.variables),
                out_root=args.out,
                keys=args.keys,
                signer_spec=args.signer,
                offline=args.offline,
                progress=progress,
            )
    finally:
        signal.signal(signal.SIGTERM, previous)
    for record in result.artifacts:
        print(f"{record['sha256']}  {record['size']:>11}  {result.outdir / record['path']}")
    print(f"built {result.recipe.name} {result.recipe.version} in {result.outdir}", file=sys.stderr)
    return 0
