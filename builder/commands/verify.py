"""``bootchain verify --manifest M --trust T --eventlog LOG``: a machine against its manifest."""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from builder.errors import InputFileError

_LINE = re.compile(
    r"\s*(sha1|sha256|sha384|sha512)\s*[: ]\s*(\d+)\s*[:= ]\s*(?:0x)?([0-9A-Fa-f]+)\s*"
)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "verify",
        help="check a machine's firmware event log (and PCRs) against a signed golden manifest",
        description="Exit status 0 when every expected PCR matches; otherwise the first "
        "differing event of each PCR is named with its expected and actual digest.",
    )
    parser.add_argument("--manifest", type=Path, required=True, metavar="M",
                        help="manifest.dsse.json (from bootchain fetch)")  # fmt: skip
    parser.add_argument("--trust", type=Path, required=True, metavar="T", help="trust file")
    parser.add_argument("--eventlog", type=Path, required=True, metavar="LOG",
                        help="binary_bios_measurements of the machine")  # fmt: skip
    parser.add_argument(
        "--pcrs", type=Path, metavar="FILE",
        help="PCR values the TPM reported: lines 'BANK INDEX HEX' or JSON {bank: {index: hex}}",
    )  # fmt: skip
    parser.add_argument("--platform", metavar="NAME", help="platform reference in the manifest")
    parser.add_argument("--json", action="store_true", help="machine-readable verdict")
    parser.set_defaults(func=handler)


def read_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputFileError(f"cannot read {what} {path}: {exc.strerror}") from exc


def parse_pcrs(data: bytes, where: str) -> dict[str, dict[int, bytes]]:
    """PCR values from JSON {bank: {index: hex}} or text lines 'bank index hex'."""
    out: dict[str, dict[int, bytes]] = {}
    text = data.decode("utf-8", "replace")
    if text.lstrip().startswith("{"):
        try:
            doc = json.loads(text)
            banks = list(doc.items())
        except (ValueError, AttributeError) as exc:
            raise InputFileError(f"{where}: not a JSON object of banks ({exc})") from exc
        items: list[tuple[str, str, str]] = []
        for bank, values in banks:
            if not isinstance(values, Mapping):
                # skipping it would read as "the TPM reported nothing for this bank"
                raise InputFileError(f"{where}: bank {bank!r} is not an object of PCR values")
            items += [(bank, str(i), str(v)) for i, v in values.items()]
    else:
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            m = _LINE.fullmatch(line)
            if m is None:
                raise InputFileError(f"{where}:{n}: expected 'BANK INDEX HEX', got {line!r}")
            items.append((m[1], m[2], m[3]))
    for bank, index, value in items:
        try:
            pcr, raw = int(index), bytes.fromhex(value.removeprefix("0x"))
        except ValueError as exc:
            raise InputFileError(f"{where}: bad value for {bank} PCR {index}") from exc
        if pcr in out.setdefault(bank, {}):
            # Two readings of one PCR: which one the TPM quoted is a guess; refuse to make it.
            raise InputFileError(f"{where}: {bank} PCR {pcr} is given twice")
        out[bank][pcr] = raw
    return out


def handler(args: argparse.Namespace) -> int:
    from builder.dsse import load_trust
    from builder.manifest import Manifest
    from builder.measure.compare import compare
    from builder.measure.eventlog import EventLog

    trust = load_trust(args.trust)
    manifest = Manifest.verify(read_file(args.manifest, "manifest"), trust)
    expected = manifest.platform(args.platform)
    log = EventLog.parse(read_file(args.eventlog, "event log"), source=str(args.eventlog))
    pcrs = parse_pcrs(read_file(args.pcrs, "PCR file"), str(args.pcrs)) if args.pcrs else None
    verdict = compare(expected, log, pcrs)
    if args.json:
        doc = {"release": {"name": manifest.name, "version": manifest.version},
               **verdict.to_json()}  # fmt: skip
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        print(f"{manifest.name} {manifest.version} against {args.eventlog}")
        print(verdict.render_table())
    return 0 if verdict.ok else 4
