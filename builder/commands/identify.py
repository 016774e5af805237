"""``bootchain identify --store URL --trust T --eventlog LOG``: which releases booted."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from builder.commands.publish import DEFAULT_STORE
from builder.errors import InputFileError, VerificationError
from builder.measure.eventlog import EV_EFI_BOOT_SERVICES_APPLICATION, EventLog


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "identify",
        help="name the published releases whose boot loader / UKI a machine's event log ran",
        description="Matches the Authenticode digests of the EV_EFI_BOOT_SERVICES_APPLICATION "
        "events in PCR 4 against the signed release index of the store.",
    )
    parser.add_argument(
        "--store", default=DEFAULT_STORE, metavar="URL", help="s3://bucket/prefix or a folder"
    )
    parser.add_argument("--trust", type=Path, required=True, metavar="T", help="trust file")
    parser.add_argument("--eventlog", type=Path, required=True, metavar="LOG")
    parser.add_argument(
        "--name", action="append", metavar="NAME",
        help="release name to look in (repeatable; default: every index in the store)",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(func=handler)


def boot_application_digests(log: EventLog) -> list[str]:
    """Hex sha256 digests of the PCR 4 EV_EFI_BOOT_SERVICES_APPLICATION events, in order."""
    found = []
    for event in log.events:
        if event.pcr == 4 and event.event_type == EV_EFI_BOOT_SERVICES_APPLICATION:
            digest = event.digest("sha256")
            if digest is None:
                raise InputFileError("event log has no sha256 bank to identify releases by")
            found.append(digest.hex())
    return found


def handler(args: argparse.Namespace) -> int:
    from builder.dsse import load_trust
    from builder.store.base import open_store
    from builder.store.fetch import fetch_index, list_names

    store = open_store(args.store)
    trust = load_trust(args.trust)
    try:
        data = args.eventlog.read_bytes()
    except OSError as exc:
        raise InputFileError(f"cannot read event log {args.eventlog}: {exc.strerror}") from exc
    digests = boot_application_digests(EventLog.parse(data, source=str(args.eventlog)))
    if not digests:
        raise InputFileError(f"{args.eventlog}: no EV_EFI_BOOT_SERVICES_APPLICATION in PCR 4")
    matches: dict[str, list[dict[str, str]]] = {d: [] for d in digests}
    for name in args.name or list_names(store):
        index = fetch_index(store, name, trust)
        for entry in index.releases:
            for artifact, auth in sorted(entry.authenticode.items()):
                if auth in matches:
                    matches[auth].append(
                        {"name": name, "version": entry.version, "artifact": artifact}
                    )
    if args.json:
        print(json.dumps([{"digest": d, "releases": matches[d]} for d in digests], indent=2))
    else:
        for i, d in enumerate(digests):
            found = ", ".join(f"{m['name']} {m['version']} ({m['artifact']})" for m in matches[d])
            print(f"image {i + 1} sha256 {d}: {found or 'NOT a published release'}")
    if not all(matches.values()):
        raise VerificationError(
            f"{sum(1 for m in matches.values() if not m)} of {len(digests)} booted image(s) "
            f"belong to no release published in {store.url}"
        )
    return 0
