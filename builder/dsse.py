"""DSSE envelopes (as in-toto uses) signed with a release key, and the trust file.

The release key (Ed25519 by default, ECDSA P-256 supported) is separate from the Secure Boot
keys. A signature's ``keyid`` is the hex sha256 of the public key's SubjectPublicKeyInfo DER,
so keys can rotate: a trust file lists every accepted key.

Envelope (canonical JSON, sorted keys, no whitespace)::

    {"payload": b64, "payloadType": "...", "signatures": [{"keyid": hex, "sig": b64}]}

The signature covers PAE(payloadType, payload) = "DSSEv1" SP len(type) SP type SP
len(payload) SP payload, lengths in ASCII decimal.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from builder.errors import InputFileError, VerificationError
from builder.fsutil import write_atomic

PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey

ALGORITHMS = ("ed25519", "ecdsa-p256")


def canonical_json(value: Any) -> bytes:
    """UTF-8 JSON with sorted keys and no insignificant whitespace; NaN/Infinity refused."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 Pre-Authentication Encoding of a payload and its type."""
    ptype = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(ptype), ptype, len(payload), payload)


def keyid_of(public_key: PublicKey) -> str:
    """Hex sha256 of the public key's SubjectPublicKeyInfo DER."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def public_pem(public_key: PublicKey) -> str:
    """The SubjectPublicKeyInfo PEM text of a public key."""
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def _check_public(key: object, where: str) -> PublicKey:
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    raise InputFileError(
        f"{where}: release keys must be Ed25519 or ECDSA P-256, not {type(key).__name__}"
    )


def load_public_key(pem: bytes, where: str) -> PublicKey:
    """Parse a PEM public key (Ed25519 or ECDSA P-256); ``where`` names it in errors."""
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise InputFileError(f"{where}: not a PEM public key ({exc})") from exc
    return _check_public(key, where)


@dataclass(frozen=True)
class ReleaseKey:
    """A private release key that signs envelopes."""

    private_key: PrivateKey

    @property
    def public_key(self) -> PublicKey:
        return self.private_key.public_key()

    @property
    def keyid(self) -> str:
        return keyid_of(self.public_key)

    def sign(self, message: bytes) -> bytes:
        """Raw signature: Ed25519, or ECDSA P-256 with SHA-256 (DER-encoded, as in-toto)."""
        if isinstance(self.private_key, ed25519.Ed25519PrivateKey):
            return self.private_key.sign(message)
        return self.private_key.sign(message, ec.ECDSA(hashes.SHA256()))


def load_release_key(path: Path) -> ReleaseKey:
    """Read an unencrypted PEM private release key (Ed25519 or ECDSA P-256)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputFileError(f"{path}: cannot read release key ({exc.strerror})") from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise InputFileError(
            f"{path}: not an unencrypted PEM private key ({exc})",
            hint="make one with `bootchain keys generate-release`",
        ) from exc
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return ReleaseKey(key)
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return ReleaseKey(key)
    raise InputFileError(f"{path}: release keys must be Ed25519 or ECDSA P-256")


def generate_release_key(directory: Path, algorithm: str = "ed25519") -> None:
    """Write ``release.key`` (PEM, mode 0600) and ``release.pub`` into ``directory``."""
    private: PrivateKey
    if algorithm == "ed25519":
        private = ed25519.Ed25519PrivateKey.generate()
    elif algorithm == "ecdsa-p256":
        private = ec.generate_private_key(ec.SECP256R1())
    else:
        raise InputFileError(f"unknown release key algorithm {algorithm!r}: use {ALGORITHMS}")
    directory.mkdir(parents=True, exist_ok=True)
    key_path = directory / "release.key"
    if key_path.exists():
        raise InputFileError(f"{key_path}: exists already; refusing to overwrite a release key")
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_atomic(key_path, pem, mode=0o600)
    write_atomic(directory / "release.pub", public_pem(private.public_key()).encode("ascii"))


@dataclass(frozen=True)
class TrustedKey:
    """One accepted release public key."""

    keyid: str
    public_key: PublicKey
    name: str | None = None

    def verify(self, signature: bytes, message: bytes) -> bool:
        """True when ``signature`` is this key's over ``message``."""
        try:
            if isinstance(self.public_key, ed25519.Ed25519PublicKey):
                self.public_key.verify(signature, message)
            else:
                self.public_key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True)
class Trust:
    """The accepted release keys, by keyid."""

    keys: Mapping[str, TrustedKey]

    @classmethod
    def of(cls, public_keys: Iterable[PublicKey]) -> Trust:
        """Trust exactly these public keys."""
        found = {}
        for key in public_keys:
            found[keyid_of(key)] = TrustedKey(keyid_of(key), key)
        return cls(found)


def make_trust_file(entries: Iterable[tuple[PublicKey, str | None]]) -> bytes:
    """Trust file bytes: a JSON list of {keyid, public_key (PEM), name?}, sorted by keyid."""
    records = []
    for key, name in entries:
        record: dict[str, str] = {"keyid": keyid_of(key), "public_key": public_pem(key)}
        if name:
            record["name"] = name
        records.append(record)
    records.sort(key=lambda r: r["keyid"])
    return json.dumps(records, indent=2, sort_keys=True).encode("utf-8") + b"\n"


def parse_trust(data: bytes, where: str) -> Trust:
    """Parse a trust file: the JSON list above, or a single PEM public key."""
    if data.lstrip().startswith(b"-----BEGIN PUBLIC KEY-----"):
        return Trust.of([load_public_key(data, where)])
    try:
        records = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputFileError(f"{where}: trust file is not JSON ({exc})") from exc
    if not isinstance(records, list) or not records:
        raise InputFileError(f"{where}: trust file must be a non-empty JSON list of keys")
    keys: dict[str, TrustedKey] = {}
    for i, record in enumerate(records):
        at = f"{where}: entry {i}"
        if not isinstance(record, dict) or not isinstance(record.get("public_key"), str):
            raise InputFileError(f"{at}: needs a 'public_key' PEM string")
        key = load_public_key(record["public_key"].encode("utf-8"), at)
        keyid = keyid_of(key)
        if record.get("keyid", keyid) != keyid:
            raise InputFileError(
                f"{at}: keyid {record['keyid']!r} is not sha256(SPKI) of its key ({keyid})"
            )
        name = record.get("name")
        if name is not None and not isinstance(name, str):
            raise InputFileError(f"{at}: 'name' must be a string")
        keys[keyid] = TrustedKey(keyid, key, name)
    return Trust(keys)


def load_trust(path: Path) -> Trust:
    """Read a trust file (see :func:`parse_trust`)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputFileError(f"{path}: cannot read trust file ({exc.strerror})") from exc
    return parse_trust(data, os.fspath(path))


def sign_envelope(payload: bytes, payload_type: str, keys: Iterable[ReleaseKey]) -> bytes:
    """Canonical DSSE envelope bytes with one signature per key (sorted by keyid)."""
    message = pae(payload_type, payload)
    signatures = sorted(
        ({"keyid": k.keyid, "sig": base64.b64encode(k.sign(message)).decode()} for k in keys),
        key=lambda s: s["keyid"],
    )
    if not signatures:
        raise InputFileError("an envelope needs at least one release key to sign it")
    return canonical_json(
        {
            "payload": base64.b64encode(payload).decode("ascii"),
            "payloadType": payload_type,
            "signatures": signatures,
        }
    )


def _b64(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise VerificationError(f"envelope {what} is not a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise VerificationError(f"envelope {what} is not valid base64") from exc


def read_envelope_unverified(envelope: bytes) -> tuple[str, bytes]:
    """(payloadType, payload) of an envelope WITHOUT checking signatures (for publishers)."""
    try:
        doc = json.loads(envelope)
    except (ValueError, UnicodeDecodeError) as exc:
        raise VerificationError(f"envelope is not JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise VerificationError("envelope is not a JSON object")
    ptype = doc.get("payloadType")
    if not isinstance(ptype, str):
        raise VerificationError("envelope has no payloadType string")
    return ptype, _b64(doc.get("payload"), "payload")


def verify_envelope_bytes(envelope: bytes, trust: Trust, payload_type: str) -> bytes:
    """The payload of ``envelope`` once a trusted key's signature verifies; raises otherwise.

    Fails closed: wrong payloadType, malformed envelope, a bad signature by a trusted keyid,
    or no signature at all by a trusted key. Signatures by keyids not in the trust file are
    ignored when a trusted one verifies (so a release may be signed by old and new keys
    while fleets rotate); alone they fail.
    """
    ptype, payload = read_envelope_unverified(envelope)
    if ptype != payload_type:
        raise VerificationError(f"envelope payloadType is {ptype!r}, expected {payload_type!r}")
    doc = json.loads(envelope)
    sigs = doc.get("signatures")
    if not isinstance(sigs, list) or not sigs:
        raise VerificationError("envelope has no signatures")
    message = pae(ptype, payload)
    good: list[str] = []
    unknown: list[str] = []
    for i, sig in enumerate(sigs):
        if not isinstance(sig, dict) or not isinstance(sig.get("keyid"), str):
            raise VerificationError(f"envelope signature {i} has no keyid")
        keyid = sig["keyid"]
        raw = _b64(sig.get("sig"), f"signature {i}")
        trusted = trust.keys.get(keyid)
        if trusted is None:
            unknown.append(keyid)
            continue
        if not trusted.verify(raw, message):
            raise VerificationError(f"envelope signature {i} by trusted key {keyid} is invalid")
        good.append(keyid)
    if not good:
        # keyids are the sender's text: quoted, so a newline in one cannot split the message
        shown = ", ".join(repr(k[:64]) for k in unknown[:4]) + (", ..." if len(unknown) > 4 else "")
        raise VerificationError(
            f"envelope is not signed by a trusted key (signed by {shown})",
            hint="add the release public key to the trust file if you accept it",
        )
    return payload
