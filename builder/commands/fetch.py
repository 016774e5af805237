"""``bootchain fetch --store URL NAME --channel C --trust TRUST``: verified download."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from builder.commands.publish import DEFAULT_STORE, progress_bar
from builder.dsse import load_trust
from builder.errors import StoreError
from builder.store.base import open_store
from builder.store.fetch import fetch, fetch_index, fetch_manifest, fetch_pointer, fetch_version


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "fetch",
        help="download a release's golden manifest (and artifacts), verifying everything",
        description="The channel pointer and the manifest must be signed by a key in the "
        "trust file; every artifact byte is checked against its digest; a channel pointer "
        "older than one seen before is refused ($BOOTCHAIN_STATE or ~/.local/state/bootchain).",
    )
    parser.add_argument("name", metavar="NAME", help="release name, e.g. debian-minimal")
    parser.add_argument(
        "--store", default=DEFAULT_STORE, metavar="URL", help="s3://bucket/prefix or a folder"
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--channel", metavar="C", help="the release a channel points to")
    which.add_argument(
        "--version", metavar="V", help="one pinned release (listed in the signed index)"
    )
    parser.add_argument(
        "--trust", type=Path, required=True, metavar="TRUSTFILE",
        help="JSON list of accepted release keys, or one PEM public key",
    )  # fmt: skip
    parser.add_argument("--artifacts", action="store_true", help="download the artifacts too")
    parser.add_argument("--out", type=Path, default=Path(), metavar="DIR")
    parser.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    store = open_store(args.store)
    trust = load_trust(args.trust)
    # Resolve and verify the manifest first, so the progress bar knows the total.
    if args.version is not None:
        entry = fetch_index(store, args.name, trust).entry(args.version)
        if entry is None:
            raise StoreError(f"{store.url}: no release {args.version!r} of {args.name!r}")
        expected = entry.manifest_sha256
        version = args.version
    else:
        pointer = fetch_pointer(store, args.name, args.channel, trust)
        expected, version = pointer.manifest_sha256, pointer.version
    manifest, _ = fetch_manifest(store, args.name, version, trust, expected)
    total = sum(a.size for a in manifest.artifacts) if args.artifacts else 0
    with progress_bar(total, "fetch") as progress:
        if args.version is not None:
            manifest, manifest_path, written = fetch_version(
                store, args.name, args.version, trust, args.out,
                artifacts=args.artifacts, progress=progress,
            )  # fmt: skip
            what = ""
        else:
            result = fetch(
                store, args.name, args.channel, trust, args.out,
                artifacts=args.artifacts, progress=progress,
            )  # fmt: skip
            manifest, manifest_path, written = (
                result.manifest,
                result.manifest_path,
                result.artifacts,
            )
            what = f" (channel {args.channel}, sequence {result.pointer.sequence})"
    print(f"{manifest.name} {manifest.version}{what} verified")
    print(f"  manifest {manifest_path}")
    for path in written:
        print(f"  {path}")
    return 0
