"""``bootchain publish OUTDIR --store URL --channel C --key RELEASE_KEY``."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from builder.store.base import Progress

DEFAULT_STORE = "./store"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "publish",
        help="upload a build's artifacts and its signed golden manifest to a store",
        description="Blobs first, then the manifest (create-only), then the release index "
        "and the channel pointer (compare-and-swap, never to a lower version). Rerunning "
        "after a crash completes the release; identical content is a no-op.",
    )
    parser.add_argument("outdir", type=Path, metavar="OUTDIR", help="out/<name>/<version>/")
    parser.add_argument(
        "--store", default=DEFAULT_STORE, metavar="URL", help="s3://bucket/prefix or a folder"
    )
    parser.add_argument("--channel", metavar="C", help="channel to move (e.g. stable)")
    parser.add_argument(
        "--key", type=Path, required=True, metavar="RELEASE_KEY", help="release.key (PEM)"
    )
    parser.add_argument(
        "--trust",
        type=Path,
        metavar="TRUST",
        help="keys whose signatures on what the store holds already are accepted (a trust file "
        "or release.pub; default: the publishing key only) — for key rotation",
    )
    parser.add_argument(
        "--allow-example-keys",
        action="store_true",
        help="publish images signed with keys.example/ to a remote store anyway",
    )
    parser.set_defaults(func=handler)


@contextlib.contextmanager
def progress_bar(total: int, label: str) -> Iterator[Progress | None]:
    """A rich progress bar on stderr when it is a terminal; None otherwise."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        TransferSpeedColumn,
    )
    from rich.progress import (
        Progress as RichProgress,
    )

    columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with RichProgress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def handler(args: argparse.Namespace) -> int:
    from builder.dsse import load_release_key, load_trust
    from builder.manifest import manifest_from_build
    from builder.publish import publish
    from builder.store.base import open_store

    store = open_store(args.store)
    key = load_release_key(args.key)
    total = sum(a.size for a in manifest_from_build(args.outdir).artifacts)
    with progress_bar(total, "publish") as progress:
        result = publish(
            args.outdir,
            store,
            key,
            args.channel,
            allow_example_keys=args.allow_example_keys,
            progress=progress,
            trust=load_trust(args.trust) if args.trust is not None else None,
        )
    what = "published" if result.manifest_created else "already published"
    print(f"{result.name} {result.version} {what} to {store.url}")
    print(f"  manifest sha256 {result.manifest_sha256}")
    print(f"  blobs: {len(result.uploaded)} uploaded, {len(result.skipped)} already stored")
    if result.aborted_uploads:
        print(f"  aborted {result.aborted_uploads} unfinished upload(s) from an earlier run")
    if result.channel is not None:
        if result.channel_version == result.version:
            print(
                f"  channel {result.channel} -> {result.version} (sequence "
                f"{result.channel_sequence})"
            )
        else:
            print(f"  channel {result.channel} stays at newer {result.channel_version}")
    return 0
