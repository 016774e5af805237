"""``bootchain predict OUTDIR``: write OUTDIR/measurements.json from a build's final artifacts."""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from builder.disk import gpt_event_data
from builder.errors import InputFileError
from builder.fsutil import sha256_file
from builder.measure.chain import load_chain
from builder.measure.platform import DEFAULT_PLATFORM, load_platform
from builder.measure.predict import DEFAULT_BANKS, predict, write_measurements
from builder.secureboot import esl
from builder.secureboot.authenticode import load_certificates
from builder.secureboot.varstore import read_secureboot_variables


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "predict", help="predict PCR 0-9, 11, 12 of a build (writes measurements.json)"
    )
    parser.add_argument("outdir", type=Path, help="build output folder (with build.json)")
    parser.add_argument("--platform", help="platform reference (default: build.json's)")
    parser.add_argument("--chain", help="chain profile (default: the platform's)")
    parser.add_argument(
        "--db-cert",
        type=Path,
        help="db certificate that signed the images (default: the "
        "db entry of the varstore matching build.json's signer)",
    )
    parser.add_argument(
        "--bank", action="append", help=f"bank (repeatable; default {','.join(DEFAULT_BANKS)})"
    )
    parser.set_defaults(func=handler)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputFileError(f"{what} {path}: {exc.strerror}") from exc


def _build_json(outdir: Path) -> dict[str, Any]:
    path = outdir / "build.json"
    if not path.exists():
        return {}
    try:
        doc = json.loads(_read(path, "build record"))
    except ValueError as exc:
        raise InputFileError(f"{path}: not JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise InputFileError(f"{path}: not a JSON object")
    return doc


def _uki_name(outdir: Path, build: dict[str, Any]) -> str:
    if "name" in build and "version" in build:
        return f"{build['name']}-{build['version']}.efi"
    found = sorted(p.name for p in outdir.glob("*.efi") if p.name != "BOOTX64.EFI")
    if len(found) != 1:
        raise InputFileError(f"{outdir}: expected one UKI (*.efi), found {found or 'none'}")
    return found[0]


def _db_cert(args: argparse.Namespace, build: dict[str, Any], varstore: bytes) -> bytes:
    if args.db_cert is not None:
        certs = load_certificates(_read(args.db_cert, "certificate"), str(args.db_cert))
        return certs[0]
    wanted = build.get("signer", {}).get("certificate_sha256")
    if not wanted:
        raise InputFileError(
            f"{args.outdir}/build.json names no signer certificate", hint="pass --db-cert"
        )
    db = esl.SignatureDatabase.parse(read_secureboot_variables(varstore)["db"][1])
    for entry in db.certificates():
        if hashlib.sha256(entry.data).hexdigest() == wanted:
            return bytes(entry.data)
    raise InputFileError(
        f"{args.outdir}/ovmf-vars.fd: no db certificate with sha256 {wanted[:16]}...",
        hint="pass --db-cert",
    )


def handler(args: argparse.Namespace) -> int:
    outdir: Path = args.outdir
    build = _build_json(outdir)
    platform = load_platform(args.platform or build.get("platform") or DEFAULT_PLATFORM)
    chain = load_chain(args.chain or platform.chain)
    uki_name = _uki_name(outdir, build)
    varstore = _read(outdir / "ovmf-vars.fd", "varstore")
    disk = outdir / "disk.img"
    measurements = predict(
        platform=platform,
        chain=chain,
        bootloader=_read(outdir / "BOOTX64.EFI", "boot loader"),
        uki=_read(outdir / uki_name, "UKI"),
        uki_path_on_esp=f"\\EFI\\Linux\\{uki_name}",
        gpt_event_data=gpt_event_data(disk),
        varstore=varstore,
        db_cert=_db_cert(args, build, varstore) if chain.secure_boot else b"",
        loader_cmdline=None,
        banks=tuple(args.bank or DEFAULT_BANKS),
    )
    artifacts = dict(measurements.artifacts)
    artifacts["disk.img"] = {"sha256": sha256_file(disk)}
    measurements = replace(measurements, artifacts=artifacts)
    path = outdir / "measurements.json"
    write_measurements(path, measurements)
    for bank in measurements.banks:
        for pcr, value in sorted(measurements.pcrs[bank].items()):
            print(f"{bank} {pcr} {value.hex()}")
    print(path)
    return 0
