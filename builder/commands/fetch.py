"""``bootchain fetch --store URL NAME --channel C --trust TRUST``: verified download."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from builder.commands.publish import DEFAULT_STORE, progress_bar


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
    parser.add_argument("--channel", required=True, metavar="C")
    parser.add_argument(
        "--trust", type=Path, required=True, metavar="TRUSTFILE",
        help="JSON list of accepted release keys, or one PEM public key",
    )  # fmt: skip
    parser.add_argument("--artifacts", action="store_true", help="download the artifacts too")
    parser.add_argument("--out", type=Path, default=Path(), metavar="DIR")
    parser.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    from builder.dsse import load_trust
    from builder.store.base import open_store
    from builder.store.fetch import fetch, fetch_manifest, fetch_pointer

    store = open_store(args.store)
    trust = load_trust(args.trust)
    total = 0
    if args.artifacts:  # size the progress bar from the verified manifest
        pointer = fetch_pointer(store, args.name, args.channel, trust)
        manifest, _ = fetch_manifest(
            store, args.name, pointer.version, trust, pointer.manifest_sha256
        )
        total = sum(a.size for a in manifest.artifacts)
    with progress_bar(total, "fetch") as progress:
        result = fetch(
            store,
            args.name,
            args.channel,
            trust,
            args.out,
            artifacts=args.artifacts,
            progress=progress if args.artifacts else None,
        )
    m = result.manifest
    print(
        f"{m.name} {m.version} (channel {args.channel}, sequence {result.pointer.sequence}) "
        "verified"
    )
    print(f"  manifest {result.manifest_path}")
    for path in result.artifacts:
        print(f"  {path}")
    return 0
