"""``bootchain keys``: generate Secure Boot key sets and the release signing key."""

from __future__ import annotations

import argparse
import os
import time
import uuid
from pathlib import Path
from typing import Any

from builder.errors import UserInputError
from builder.secureboot.keys import ALGORITHMS, ROLES, generate_keyset


def _guid(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a GUID: {text!r}") from None


def _source_date_epoch() -> int:
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if value is None:
        return int(time.time())
    try:
        return int(value)
    except ValueError:
        raise UserInputError(f"SOURCE_DATE_EPOCH={value!r} is not an integer") from None


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("keys", help="generate Secure Boot and release keys")
    verbs = parser.add_subparsers(dest="keys_verb", metavar="ACTION", required=True)

    gen = verbs.add_parser(
        "generate",
        help="generate PK, KEK and db (key, certificate, ESL, .auth) into a new folder",
        description="Certificates start at SOURCE_DATE_EPOCH (now if unset); the .auth "
        "timestamps use the same time.",
    )
    gen.add_argument("directory", type=Path, metavar="DIR")
    gen.add_argument("--owner-guid", type=_guid, help="signature owner GUID (default: derived)")
    gen.add_argument("--algorithm", choices=sorted(ALGORITHMS), default="rsa2048")
    gen.add_argument("--subject", default="bootchain", metavar="PREFIX", help="CN prefix")
    gen.add_argument(
        "--example", action="store_true", help="mark the set as public test keys (keyset.json)"
    )
    gen.set_defaults(func=_generate)

    rel = verbs.add_parser("generate-release", help="generate the manifest release signing key")
    rel.add_argument("directory", type=Path, metavar="DIR")
    rel.set_defaults(func=_generate_release)


def _generate(args: argparse.Namespace) -> int:
    keyset = generate_keyset(
        args.directory,
        source_date_epoch=_source_date_epoch(),
        owner_guid=args.owner_guid,
        algorithm=args.algorithm,
        subject_prefix=args.subject,
        example=args.example,
    )
    print(f"key set written to {keyset.directory} (owner GUID {keyset.owner_guid})")
    for role in ROLES:
        print(f"  {role:4} sha256 {keyset.fingerprints[role]}")
    return 0


def _generate_release(args: argparse.Namespace) -> int:
    from builder.manifest import generate_release_key

    generate_release_key(args.directory)
    print(f"release key written to {args.directory}")
    return 0
