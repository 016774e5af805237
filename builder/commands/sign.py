"""``bootchain sign --key KEY --cert CERT [--replace] IN OUT``: Authenticode-sign a PE image.

The same signing the build's sign stage does (deterministic PKCS#7, 8-byte padding, CheckSum),
on one file; OUT is written atomically. Imports stay inside the handler so that the verb
starts fast (see bench/sign.py).
"""

from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from builder.errors import InputFileError

_KEY_SCHEMES = ("file", "pkcs11", "kms")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "sign",
        help="Authenticode-sign a PE image (UKI, EFI binary) with a db key",
        description="Signs IN with the key and writes OUT atomically; the same image and key "
        "always give the same bytes. An already signed image is refused unless --replace.",
    )
    parser.add_argument(
        "--key",
        required=True,
        metavar="KEY",
        help="a PEM key file, or a key spec: file:PATH[?passphrase-env=VAR|passphrase-file="
        "PATH], pkcs11:URI, kms:KEY-ID (passphrase from BOOTCHAIN_KEY_PASSPHRASE by default)",
    )
    parser.add_argument(
        "--cert", required=True, type=Path, metavar="CERT", help="the key's X.509 certificate"
    )
    parser.add_argument(
        "--replace", action="store_true", help="drop an existing signature and sign again"
    )
    parser.add_argument("input", type=Path, metavar="IN", help="PE image to sign")
    parser.add_argument("output", type=Path, metavar="OUT", help="where to write the signed image")
    parser.set_defaults(func=handler)


def _read_image(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputFileError(f"cannot read PE image {path}: {exc.strerror}") from exc


def handler(args: argparse.Namespace) -> int:
    with ThreadPoolExecutor(max_workers=1) as pool:
        # Reading a large image releases the GIL: read it while this thread imports the
        # signing code (cryptography) and loads the key.
        image = pool.submit(_read_image, args.input)
        from builder.fsutil import write_atomic
        from builder.secureboot.authenticode import signed_pe_parts
        from builder.secureboot.signers import FileSigner, open_signer

        key: str = args.key
        if key.partition(":")[0] in _KEY_SCHEMES:
            signer = open_signer(key, args.cert)
        else:  # a plain path, as sbsign takes it (may contain '?' or ':')
            signer = FileSigner(Path(key), args.cert)
        try:
            data = image.result()
            try:
                signed = signed_pe_parts(data, signer, replace=args.replace)
            except InputFileError as exc:  # name the file: the codec only sees bytes
                raise InputFileError(f"{args.input}: {exc.message}", hint=exc.hint) from exc
        finally:
            close = getattr(signer, "close", None)  # PKCS#11 sessions
            if close is not None:
                close()
    write_atomic(args.output, signed)
    return 0
