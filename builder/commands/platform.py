"""``bootchain platform capture|show``: platform references in qemu/platforms/."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from builder.commands.eventlog import read_log
from builder.fsutil import write_atomic
from builder.measure.platform import capture_platform, load_platform, platform_path


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("platform", help="platform references (recorded firmware)")
    verbs = parser.add_subparsers(dest="platform_verb", metavar="ACTION", required=True)
    cap = verbs.add_parser(
        "capture", help="make a reference from a real firmware event log or a real boot"
    )
    source = cap.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-eventlog", dest="log", type=Path, metavar="LOG")
    source.add_argument(
        "--boot",
        type=Path,
        metavar="OUTDIR",
        help="boot this build (QEMU + OVMF + swtpm, --machine-from's machine or the build's) "
        "and record the reference from the guest's log",
    )
    cap.add_argument("name", help="reference name (qemu/platforms/NAME.yaml)")
    cap.add_argument("--output", type=Path, help="write here instead of qemu/platforms/")
    cap.add_argument("--firmware", help="firmware build, e.g. 'Debian ovmf 2022.11-6+deb12u2 ...'")
    cap.add_argument("--qemu", help="QEMU version (for QEMU platforms)")
    cap.add_argument("--machine-type", help="machine type, e.g. q35")
    cap.add_argument("--machine-from", metavar="PLATFORM", help="copy the machine definition")
    cap.add_argument("--notes", default="", help="free text kept in the reference")
    cap.set_defaults(func=capture_handler)
    show = verbs.add_parser("show", help="print a reference")
    show.add_argument("name")
    show.set_defaults(func=show_handler)


def capture_handler(args: argparse.Namespace) -> int:
    identity: dict[str, Any] = {}
    for key in ("firmware", "qemu", "machine_type"):
        value = getattr(args, key)
        if value:
            identity[key] = value
    machine = load_platform(args.machine_from).machine if args.machine_from else None
    if args.boot is not None:
        from builder.boottest import capture_by_boot

        platform = capture_by_boot(
            args.boot, args.name, machine=machine, identity=identity or None, notes=args.notes
        )
    else:
        platform = capture_platform(
            read_log(args.log), args.name, identity=identity, machine=machine, notes=args.notes
        )
    out = args.output or platform_path(args.name)
    write_atomic(out, platform.to_yaml())
    print(out)
    return 0


def show_handler(args: argparse.Namespace) -> int:
    platform = load_platform(args.name)
    print(f"name: {platform.name}\ndigest: {platform.digest}")
    print(json.dumps(platform.reference(), indent=2))
    if platform.machine is not None:
        print(json.dumps(platform.machine.to_json(), indent=2))
    placeholders = sum(1 for _ in platform.log) - len(platform.events)
    print(f"{len(platform.events)} recorded events, {placeholders} placeholders")
    return 0
