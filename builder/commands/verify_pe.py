"""``bootchain verify-pe --cert CERT FILE``: check a PE image's Authenticode signature."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from builder.errors import InputFileError


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "verify-pe",
        help="verify a PE image's Authenticode signature against trusted certificates",
        description="Recomputes the Authenticode digest and checks the signature; the signer "
        "must be one of the certificates or be issued by one. Exit 0 when it verifies, 4 when "
        "it does not.",
    )
    parser.add_argument(
        "--cert",
        type=Path,
        action="append",
        required=True,
        metavar="CERT",
        help="trusted certificate: PEM, DER, or an EFI signature list (.esl); repeatable",
    )
    parser.add_argument("file", type=Path, metavar="FILE")
    parser.set_defaults(func=handler)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputFileError(f"cannot read {what} {path}: {exc.strerror}") from exc


def handler(args: argparse.Namespace) -> int:
    from builder.pe import authenticode_digest
    from builder.secureboot.authenticode import load_certificates, verify_pe

    certs: list[bytes] = []
    for path in args.cert:
        certs.extend(load_certificates(_read(path, "certificate"), str(path)))
    data = _read(args.file, "PE image")
    verify_pe(data, certs)
    print(f"{args.file}: signature OK (authenticode sha256 {authenticode_digest(data).hex()})")
    return 0
