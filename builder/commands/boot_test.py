"""``bootchain boot-test OUTDIR [--negative]``: boot a build and judge its measurements."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console

from builder import boottest
from builder.errors import VerificationError


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "boot-test",
        help="boot a build in QEMU+OVMF+swtpm and compare the PCRs with measurements.json",
    )
    parser.add_argument("outdir", type=Path, help="a build's output folder (out/NAME/VERSION)")
    parser.add_argument(
        "--negative",
        action="store_true",
        help="also boot the cases the firmware must refuse (tampered UKI, foreign key, ...)",
    )
    parser.add_argument("--only-negative", action="store_true", help="run the negative cases only")
    parser.add_argument(
        "--case",
        action="append",
        choices=[*boottest.NEGATIVE_CASES, boottest.EDITED_MEASUREMENTS],
        help="run only this negative case (repeatable; skips the positive boot)",
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per boot")
    parser.add_argument(
        "--firmware-code", type=Path, help="OVMF CODE file (default: from the pinned package)"
    )
    parser.add_argument("--offline", action="store_true", help="use only the package cache")
    parser.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    out = Console()
    failed: list[str] = []
    if not (args.only_negative or args.case):
        with console.status("booting: firmware") as status:

            def progress(phase: str, seconds: float) -> None:
                status.update(f"booting: {phase} (+{seconds:.0f} s)")

            result = boottest.run_boot_test(
                args.outdir,
                timeout=args.timeout,
                firmware_code=args.firmware_code,
                offline=args.offline,
                progress=progress,
            )
        phases = ", ".join(f"{k} {v:.1f}s" for k, v in result.boot.phases.items())
        out.print(f"boot: {result.boot.outcome} in {result.boot.duration:.1f} s ({phases})")
        out.print(
            f"guest: SecureBoot={int(result.probe.secure_boot)} "
            f"SetupMode={int(result.probe.setup_mode)} lockdown={result.probe.lockdown}"
        )
        out.print(result.verdict.render_table(), markup=False, highlight=False)
        out.print(f"report: {result.report_path}")
        if not result.verdict.ok:
            first = result.verdict.mismatches[0].one_line() if result.verdict.mismatches else ""
            failed.append(f"measurements differ: {first}")
    if args.negative or args.only_negative or args.case:
        with console.status("negative cases") as status:

            def step(case: str, phase: str, seconds: float) -> None:
                status.update(f"negative {case}: {phase} (+{seconds:.0f} s)")

            results = boottest.run_negative(
                args.outdir,
                cases=args.case,
                timeout=args.timeout,
                firmware_code=args.firmware_code,
                offline=args.offline,
                progress=step,
            )
        for r in results:
            out.print(r.one_line(), markup=False, highlight=False)
            if not r.ok:
                failed.append(f"negative case {r.name} not refused: {r.detail}")
    if failed:
        more = f" (+{len(failed) - 1} more)" if len(failed) > 1 else ""
        raise VerificationError(f"boot test failed: {failed[0]}{more}")
    return 0
