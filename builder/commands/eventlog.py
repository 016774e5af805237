"""``bootchain eventlog show|replay LOG``: read a real machine's firmware event log."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from builder.errors import InputFileError
from builder.measure.eventlog import EventLog, render_pcrs, render_table, replay, to_cel


def read_log(path: Path) -> EventLog:
    """Parse a binary log file (errors name the file and offset)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputFileError(f"cannot read event log {path}: {exc.strerror}") from exc
    return EventLog.parse(data, source=str(path))


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("eventlog", help="read a TCG firmware event log")
    verbs = parser.add_subparsers(dest="eventlog_verb", metavar="ACTION", required=True)
    show = verbs.add_parser("show", help="list the events")
    show.add_argument("log", type=Path, help="binary_bios_measurements file")
    fmt = show.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="CEL-JSON records with descriptions")
    fmt.add_argument("--cel", action="store_true", help="CEL-JSON records only")
    show.add_argument("--bank", default="sha256", help="bank shown in the table")
    show.set_defaults(func=show_handler)
    rep = verbs.add_parser("replay", help="PCR values the log produces")
    rep.add_argument("log", type=Path)
    rep.add_argument("--bank", action="append", help="bank (repeatable; default: all)")
    rep.add_argument("--json", action="store_true")
    rep.set_defaults(func=replay_handler)


def show_handler(args: argparse.Namespace) -> int:
    log = read_log(args.log)
    if args.cel or args.json:
        records = to_cel(log.events)
        if args.json:
            from builder.measure.eventlog import describe

            for record, event in zip(records, log.events, strict=True):
                record["description"] = describe(event)
        print(json.dumps(records, indent=2))
    else:
        print(f"banks: {', '.join(log.banks)}")
        print(render_table(log.events, args.bank))
    return 0


def replay_handler(args: argparse.Namespace) -> int:
    log = read_log(args.log)
    banks = args.bank or [b for b in log.banks if b in ("sha1", "sha256", "sha384", "sha512")]
    result = {bank: replay(log.events, bank) for bank in banks}
    if args.json:
        out = {b: {str(k): v.hex() for k, v in sorted(p.items())} for b, p in result.items()}
        print(json.dumps(out, indent=2))
    else:
        print("\n".join(render_pcrs(p, b) for b, p in result.items()))
    return 0
