"""The customer's Secure Boot key sets: PK, KEK and db, generated or loaded and checked.

A key set is a folder holding, for each of ``PK``, ``KEK`` and ``db``:
``<n>.key`` (PEM, mode 0600), ``<n>.crt`` (PEM), ``<n>.der``, ``<n>.esl`` (one
EFI_CERT_X509 signature list with the owner GUID) and ``<n>.auth`` (a time-based
authenticated write: PK signed by itself, KEK by PK, db by KEK), plus ``keyset.json``.
``load_keyset`` checks all of it and returns a ``KeySet`` holding certificates and paths,
never private keys.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from builder.errors import InputFileError, UserInputError, VerificationError
from builder.fsutil import staging_dir, write_atomic
from builder.secureboot import esl
from builder.secureboot.signers import FileSigner

ROLES: tuple[str, ...] = ("PK", "KEK", "db")
# Who signs each role's .auth: PK itself, KEK by PK, db by KEK.
AUTH_SIGNER: dict[str, str] = {"PK": "PK", "KEK": "PK", "db": "KEK"}
ALGORITHMS: dict[str, int] = {"rsa2048": 2048, "rsa3072": 3072, "rsa4096": 4096}
SCHEMA = "bootchain.keyset/v1"
KEYSET_FILE = "keyset.json"
DEFAULT_DAYS = 3650


@dataclass(frozen=True)
class KeyPaths:
    """The files of one role in a key set."""

    key: Path
    crt: Path
    der: Path
    esl: Path
    auth: Path

    @classmethod
    def of(cls, directory: Path, role: str) -> KeyPaths:
        return cls(*(directory / f"{role}.{ext}" for ext in ("key", "crt", "der", "esl", "auth")))


@dataclass(frozen=True)
class KeySet:
    """A checked key set: owner GUID, certificates (DER), fingerprints and file paths."""

    directory: Path
    owner_guid: uuid.UUID
    algorithm: str
    pk: bytes
    kek: bytes
    db: bytes
    fingerprints: dict[str, str]
    example: bool
    paths: dict[str, KeyPaths]

    def certificate(self, role: str) -> bytes:
        """DER of the certificate of ``role`` (PK, KEK or db)."""
        return {"PK": self.pk, "KEK": self.kek, "db": self.db}[role]

    def signer(self, role: str, **passphrase: Any) -> FileSigner:
        """A FileSigner for ``role``'s key (passphrase_env / passphrase_file pass through)."""
        return FileSigner(self.paths[role].key, self.paths[role].crt, **passphrase)


def fingerprint(cert_der: bytes) -> str:
    """Hex sha256 of a certificate's DER."""
    return hashlib.sha256(cert_der).hexdigest()


def default_owner_guid(pk_cert_der: bytes) -> uuid.UUID:
    """An owner GUID derived from the PK certificate (random keys, but no extra randomness)."""
    digest = hashlib.sha256(b"bootchain owner guid\0" + pk_cert_der).digest()
    return uuid.UUID(bytes=digest[:16], version=4)


def _make_certificate(
    role: str,
    key: rsa.RSAPrivateKey,
    subject_prefix: str,
    not_before: datetime.datetime,
    days: int,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{subject_prefix} {role}")])
    public = key.public_key()
    spki = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # Serial from the public key: unique per key, no extra randomness.
    serial = int.from_bytes(hashlib.sha256(spki).digest()[:16], "big") >> 1
    ski = x509.SubjectKeyIdentifier.from_public_key(public)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_before + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
    )
    if role == "db":
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False
        )
    return builder.sign(key, hashes.SHA256())


def generate_keyset(
    directory: Path,
    *,
    source_date_epoch: int,
    owner_guid: uuid.UUID | None = None,
    algorithm: str = "rsa2048",
    subject_prefix: str = "bootchain",
    example: bool = False,
    days: int = DEFAULT_DAYS,
) -> KeySet:
    """Generate PK, KEK and db into ``directory`` (which must not hold a key set yet).

    Certificates start at ``source_date_epoch`` and last ``days``; the ``.auth`` files carry
    that time too. Written into a staging folder and moved in place only when complete.
    """
    if algorithm not in ALGORITHMS:
        raise UserInputError(
            f"unknown key algorithm {algorithm!r}", hint=f"use one of {', '.join(ALGORITHMS)}"
        )
    longest = max(len(f"{subject_prefix} {role}") for role in ROLES)
    if longest > 64:
        raise UserInputError(
            f"subject prefix {subject_prefix[:20]!r}... makes a {longest}-character common "
            "name; X.509 allows 64",
            hint=f"use at most {64 - 4} characters",
        )
    last = 253402300799  # 9999-12-31T23:59:59Z: X.509 and EFI_TIME end there
    if not 0 <= source_date_epoch <= last - days * 86400:
        raise UserInputError(
            f"SOURCE_DATE_EPOCH {source_date_epoch}: certificates valid for {days} days from "
            "then would not fit 1970..9999"
        )
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise UserInputError(
            f"{directory}: exists and is not empty; refusing to overwrite a key set",
            hint="choose a new folder or remove the old key set yourself",
        )
    not_before = datetime.datetime.fromtimestamp(source_date_epoch, tz=datetime.UTC)
    timestamp = esl.EfiTime.from_epoch(source_date_epoch)
    keys = {
        role: rsa.generate_private_key(public_exponent=65537, key_size=ALGORITHMS[algorithm])
        for role in ROLES
    }
    certs = {
        role: _make_certificate(role, keys[role], subject_prefix, not_before, days)
        for role in ROLES
    }
    ders = {role: certs[role].public_bytes(serialization.Encoding.DER) for role in ROLES}
    owner = owner_guid if owner_guid is not None else default_owner_guid(ders["PK"])
    staging = contextlib.ExitStack()
    try:
        stage = staging.enter_context(staging_dir(directory))
    except OSError as exc:
        raise UserInputError(
            f"{exc.filename or directory}: cannot make the key set folder: {exc.strerror}"
        ) from None
    with staging:
        for role in ROLES:
            paths = KeyPaths.of(stage, role)
            pem_key = keys[role].private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            write_atomic(paths.key, pem_key, mode=0o600)
            write_atomic(paths.crt, certs[role].public_bytes(serialization.Encoding.PEM))
            write_atomic(paths.der, ders[role])
            write_atomic(paths.esl, bytes(esl.x509_list(owner, ders[role])))
        for role in ROLES:
            paths = KeyPaths.of(stage, role)
            by = KeyPaths.of(stage, AUTH_SIGNER[role])
            signer = FileSigner(by.key, by.crt)
            auth = esl.sign_variable(role, paths.esl.read_bytes(), signer, timestamp)
            write_atomic(paths.auth, bytes(auth))
        meta = {
            "schema": SCHEMA,
            "owner_guid": str(owner),
            "algorithm": algorithm,
            "example": example,
            "certificates": {
                role: {
                    "subject": certs[role].subject.rfc4514_string(),
                    "sha256": fingerprint(ders[role]),
                }
                for role in ROLES
            },
        }
        text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
        write_atomic(stage / KEYSET_FILE, text.encode("utf-8"))
    return load_keyset(directory, at=not_before)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise InputFileError(f"{path}: {what} is missing") from None
    except OSError as exc:
        raise InputFileError(f"{path}: cannot read {what}: {exc.strerror}") from None


def _load_meta(directory: Path) -> dict[str, Any]:
    path = directory / KEYSET_FILE
    try:
        meta = json.loads(_read(path, "key set description"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputFileError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("schema") != SCHEMA:
        raise InputFileError(f"{path}: schema is not {SCHEMA!r}")
    for field, kind in (
        ("owner_guid", str),
        ("algorithm", str),
        ("example", bool),
        ("certificates", dict),
    ):
        if not isinstance(meta.get(field), kind):
            raise InputFileError(f"{path}: field {field!r} missing or not a {kind.__name__}")
    return meta


def _check_certificate(
    role: str, cert: x509.Certificate, crt_path: Path, at: datetime.datetime
) -> None:
    if cert.not_valid_after_utc < at:
        raise InputFileError(
            f"{crt_path}: {role} certificate expired on {cert.not_valid_after_utc:%Y-%m-%d}"
        )
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and not usage.digital_signature:
        raise InputFileError(f"{crt_path}: {role} certificate key usage lacks digitalSignature")
    if role == "db":
        try:
            eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            raise InputFileError(
                f"{crt_path}: db certificate has no extended key usage; codeSigning is required"
            ) from None
        if ExtendedKeyUsageOID.CODE_SIGNING not in eku:
            raise InputFileError(f"{crt_path}: db certificate extended key usage lacks codeSigning")


def _check_key_matches(key_path: Path, cert: x509.Certificate, crt_path: Path) -> None:
    pem = _read(key_path, "private key")
    if b"ENCRYPTED" in pem:
        return  # checked by the signer once it has the passphrase
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise InputFileError(f"{key_path}: not a PEM private key ({exc})") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, public) != (
        cert.public_key().public_bytes(serialization.Encoding.DER, public)
    ):
        raise InputFileError(f"{crt_path}: certificate does not match its key {key_path.name}")


def load_keyset(directory: Path, *, at: datetime.datetime | None = None) -> KeySet:
    """Load and check a key set; one InputFileError per problem, naming the file.

    ``at`` is the time certificates must still be valid at (default: now).
    """
    if not directory.is_dir():
        raise InputFileError(f"{directory}: key set folder not found")
    when = at if at is not None else datetime.datetime.now(tz=datetime.UTC)
    meta = _load_meta(directory)
    meta_path = directory / KEYSET_FILE
    try:
        owner = uuid.UUID(meta["owner_guid"])
    except ValueError:
        raise InputFileError(f"{meta_path}: owner_guid {meta['owner_guid']!r} is no GUID") from None
    if meta["algorithm"] not in ALGORITHMS:
        raise InputFileError(f"{meta_path}: unknown algorithm {meta['algorithm']!r}")
    paths = {role: KeyPaths.of(directory, role) for role in ROLES}
    ders: dict[str, bytes] = {}
    prints: dict[str, str] = {}
    for role in ROLES:
        p = paths[role]
        pem = _read(p.crt, f"{role} certificate")
        if b"PRIVATE KEY" in pem:
            # A combined cert+key PEM: the .crt is published with every build.
            raise InputFileError(
                f"{p.crt}: holds a private key; a .crt must hold only the certificate",
                hint=f"keep the private key in {p.key.name} only",
            )
        try:
            cert = x509.load_pem_x509_certificate(pem)
        except ValueError as exc:
            raise InputFileError(f"{p.crt}: not a PEM certificate ({exc})") from None
        der = cert.public_bytes(serialization.Encoding.DER)
        if _read(p.der, f"{role} certificate (DER)") != der:
            raise InputFileError(f"{p.der}: differs from {p.crt.name}")
        key = cert.public_key()
        if not isinstance(key, rsa.RSAPublicKey) or f"rsa{key.key_size}" != meta["algorithm"]:
            raise InputFileError(f"{p.crt}: key is not {meta['algorithm']} as keyset.json says")
        _check_key_matches(p.key, cert, p.crt)
        _check_certificate(role, cert, p.crt, when)
        recorded = meta["certificates"].get(role, {})
        if not isinstance(recorded, dict) or recorded.get("sha256") != fingerprint(der):
            raise InputFileError(f"{meta_path}: sha256 of {role} does not match {p.crt.name}")
        expected_esl = bytes(esl.x509_list(owner, der))
        if _read(p.esl, f"{role} signature list") != expected_esl:
            raise InputFileError(
                f"{p.esl}: is not one EFI_CERT_X509 list of {p.der.name} owned by {owner}"
            )
        ders[role] = der
        prints[role] = fingerprint(der)
    for role in ROLES:
        p = paths[role]
        try:
            auth = esl.AuthenticatedVariable.parse(_read(p.auth, f"{role} authenticated update"))
        except InputFileError as exc:
            raise InputFileError(f"{p.auth}: {exc.message}", hint=exc.hint) from None
        if auth.data != p.esl.read_bytes():
            raise InputFileError(f"{p.auth}: data differs from {p.esl.name}")
        try:
            esl.verify_variable(role, auth, ders[AUTH_SIGNER[role]])
        except VerificationError as exc:
            raise InputFileError(
                f"{p.auth}: not signed by {AUTH_SIGNER[role]} ({exc.message})"
            ) from None
        except InputFileError as exc:
            raise InputFileError(f"{p.auth}: {exc.message}", hint=exc.hint) from None
    return KeySet(
        directory=directory,
        owner_guid=owner,
        algorithm=meta["algorithm"],
        pk=ders["PK"],
        kek=ders["KEK"],
        db=ders["db"],
        fingerprints=prints,
        example=meta["example"],
        paths=paths,
    )
