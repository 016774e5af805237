"""``bootchain inspect FILE [--json]``: a PE image's sections, digests and signature state."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from builder.errors import InputFileError


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="show a PE image's (UKI, EFI binary) sections, Authenticode digest and signature",
        description="Sections with VirtualSize, raw size and the sha256 of their first "
        "VirtualSize bytes (what systemd-stub measures), the Authenticode sha256 (what the "
        "firmware measures into PCR 4), and whether the image carries a signature.",
    )
    parser.add_argument("file", type=Path, metavar="FILE")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    from builder.pe import describe_pe

    try:
        data = args.file.read_bytes()
    except OSError as exc:
        raise InputFileError(f"cannot read {args.file}: {exc.strerror}") from exc
    try:
        desc = describe_pe(data)
    except InputFileError as exc:
        raise InputFileError(f"{args.file}: {exc.message}", hint=exc.hint) from None
    if args.json:
        print(json.dumps(dataclasses.asdict(desc), indent=2, sort_keys=True))
        return 0
    kind = "PE32+" if desc.pe32plus else "PE32"
    print(f"{args.file}: {kind}, {desc.size} bytes, machine {desc.machine:#x}")
    print(f"  timestamp   {desc.timestamp}")
    print(f"  checksum    {desc.checksum:#010x}")
    print(f"  signed      {'yes' if desc.signed else 'no'}")
    print(f"  sha256      {desc.sha256}")
    print(f"  authenticode sha256 {desc.authenticode_sha256}")
    print(f"  {'section':<10} {'vaddr':>10} {'vsize':>10} {'raw':>10}  sha256 (first vsize bytes)")
    for s in desc.sections:
        print(
            f"  {s.name:<10} {s.virtual_address:>#10x} {s.virtual_size:>10} {s.raw_size:>10}"
            f"  {s.sha256}"
        )
    return 0
