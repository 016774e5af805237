"""Signer backends: a PEM key file, a PKCS#11 token, AWS KMS.

Each backend checks at construction that its key matches the certificate it is given
(public key comparison) and raises InputFileError if not. Secrets (passphrase, PIN) come from
an environment variable or a file, never from the command line.

Key specs for ``open_signer``:

- ``file:PATH`` or ``file:PATH?passphrase-env=VAR`` / ``?passphrase-file=PATH``
- ``pkcs11:token=LABEL;object=LABEL?module-path=/usr/lib/softhsm/libsofthsm2.so``
  (RFC 7512; the PIN from ``pin-source=file:PATH`` or ``pin-env=VAR``, default
  ``BOOTCHAIN_PKCS11_PIN``; ``pin-value`` is refused)
- ``kms:KEY-ID-OR-ARN`` or ``kms:KEY?region=eu-west-1``
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from builder.errors import InputFileError, StoreError, UserInputError
from builder.secureboot.signer import Signer

DEFAULT_PASSPHRASE_ENV = "BOOTCHAIN_KEY_PASSPHRASE"  # noqa: S105 - a variable name
DEFAULT_PIN_ENV = "BOOTCHAIN_PKCS11_PIN"


def load_certificate(path: Path) -> x509.Certificate:
    """An X.509 certificate from a PEM or DER file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputFileError(f"{path}: cannot read certificate: {exc.strerror}") from None
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise InputFileError(f"{path}: not an X.509 certificate ({exc})") from None


def _spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _check_rsa_match(
    where: str, cert: x509.Certificate, cert_path: Path, modulus: int, exponent: int
) -> rsa.RSAPublicKey:
    """The certificate's RSA public key; raises unless it is (modulus, exponent)."""
    key = cert.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise InputFileError(f"{cert_path}: certificate key is not RSA")
    numbers = key.public_numbers()
    if (numbers.n, numbers.e) != (modulus, exponent):
        raise InputFileError(
            f"{cert_path}: certificate does not match the key {where}",
            hint="give the certificate issued for this key",
        )
    return key


def read_secret(
    what: str, env: str | None, file: Path | None, *, default_env: str | None = None
) -> str | None:
    """A secret from a file (first line) or an environment variable; None if neither is set.

    An explicitly named variable or file that is missing is an error.
    """
    if file is not None:
        try:
            return file.read_text(encoding="utf-8").splitlines()[0] if file.stat().st_size else ""
        except OSError as exc:
            raise InputFileError(f"{file}: cannot read the {what}: {exc.strerror}") from None
        except UnicodeDecodeError:  # the decoder's message would quote the secret's bytes
            raise InputFileError(f"{file}: the {what} is not UTF-8 text") from None
    if env is not None:
        if env not in os.environ:
            raise UserInputError(f"environment variable {env} (the {what}) is not set")
        return os.environ[env]
    if default_env is not None and default_env in os.environ:
        return os.environ[default_env]
    return None


class FileSigner:
    """An RSA key in a PEM file, optionally encrypted."""

    def __init__(
        self,
        key_path: Path,
        cert_path: Path,
        passphrase_env: str | None = None,
        passphrase_file: Path | None = None,
    ) -> None:
        self._key_path = key_path
        cert = load_certificate(cert_path)
        try:
            pem = key_path.read_bytes()
        except OSError as exc:
            raise InputFileError(f"{key_path}: cannot read key: {exc.strerror}") from None
        encrypted = b"ENCRYPTED" in pem
        secret = (
            read_secret(
                f"passphrase of {key_path}",
                passphrase_env,
                passphrase_file,
                default_env=DEFAULT_PASSPHRASE_ENV,
            )
            if encrypted
            else None
        )
        if encrypted and secret is None:
            raise InputFileError(
                f"{key_path}: key is encrypted and no passphrase was given",
                hint=f"set {DEFAULT_PASSPHRASE_ENV} or give passphrase-env / passphrase-file",
            )
        try:
            # OpenSSL's RSA key check (primality of p and q, CRT parameters) costs ~0.1 s a
            # process. Skipping it is safe here because nothing signed with this key leaves
            # ``sign`` unchecked: the public half must match the certificate (below), and
            # every signature is verified with the certificate's key before it is returned,
            # so an inconsistent private key can neither produce a bad signature nor leak a
            # faulty RSA-CRT result (Bellcore attack) to the output.
            key = serialization.load_pem_private_key(
                pem,
                password=secret.encode("utf-8") if secret is not None else None,
                unsafe_skip_rsa_key_validation=True,
            )
        except (ValueError, TypeError) as exc:
            if encrypted:
                raise InputFileError(f"{key_path}: wrong passphrase for the key") from None
            raise InputFileError(f"{key_path}: not a PEM private key ({exc})") from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise InputFileError(f"{key_path}: key is not RSA")
        numbers = key.public_key().public_numbers()
        self._public = _check_rsa_match(f"in {key_path}", cert, cert_path, numbers.n, numbers.e)
        self._key = key
        self._cert_der = cert.public_bytes(serialization.Encoding.DER)

    @property
    def certificate(self) -> bytes:
        return self._cert_der

    @property
    def description(self) -> str:
        return f"file:{self._key_path}"

    def sign(self, data: bytes) -> bytes:
        signature = self._key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        # The key was loaded without OpenSSL's consistency check: prove each signature.
        try:
            self._public.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            raise InputFileError(
                f"{self._key_path}: the private key makes signatures that do not verify "
                "(inconsistent RSA key parameters)"
            ) from None
        return signature


@dataclass(frozen=True)
class PKCS11Uri:
    """The parts of an RFC 7512 PKCS#11 URI that we use."""

    token: str
    object: str
    module_path: str
    pin_env: str | None = None
    pin_file: Path | None = None

    @classmethod
    def parse(cls, uri: str) -> PKCS11Uri:
        if not uri.startswith("pkcs11:"):
            raise UserInputError(f"not a PKCS#11 URI: {uri!r}")
        path, _, query = uri[len("pkcs11:") :].partition("?")
        # Before anything can echo the URI in an error: a PIN in it, as a path attribute or a
        # query one, is refused (and never printed).
        names = {part.partition("=")[0] for part in re.split("[;&]", f"{path};{query}")}
        if "pin-value" in {urllib.parse.unquote(n) for n in names}:
            raise UserInputError(
                "PKCS#11 URI carries pin-value: secrets never go on the command line",
                hint=f"use pin-source=file:PATH or set {DEFAULT_PIN_ENV}",
            )
        attrs = _uri_attrs(path, ";", uri)
        params = _uri_attrs(query, "&", uri)
        for needed, where in (("token", attrs), ("object", attrs), ("module-path", params)):
            if needed not in where:
                raise UserInputError(f"PKCS#11 URI has no {needed}=: {uri!r}")
        pin_file = None
        if "pin-source" in params:
            source = params["pin-source"]
            pin_file = Path(source[len("file:") :] if source.startswith("file:") else source)
        return cls(
            attrs["token"], attrs["object"], params["module-path"], params.get("pin-env"), pin_file
        )


def _uri_attrs(text: str, sep: str, uri: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in filter(None, text.split(sep)):
        name, eq, value = part.partition("=")
        if not eq:
            raise UserInputError(f"PKCS#11 URI attribute without '=': {part!r} in {uri!r}")
        out[name] = urllib.parse.unquote(value)
    return out


class PKCS11Signer:
    """An RSA private key on a PKCS#11 token, signing with CKM_SHA256_RSA_PKCS.

    Holds a logged-in session until ``close()`` (or the end of a ``with`` block).
    """

    def __init__(
        self,
        module_path: str,
        token_label: str,
        key_label: str,
        cert_path: Path,
        *,
        pin_env: str | None = None,
        pin_file: Path | None = None,
    ) -> None:
        cert = load_certificate(cert_path)
        self._where = f"pkcs11:token={token_label};object={key_label}"
        pin = read_secret(
            f"PIN of token {token_label!r}", pin_env, pin_file, default_env=DEFAULT_PIN_ENV
        )
        if pin is None:
            raise UserInputError(
                f"no PIN for PKCS#11 token {token_label!r}",
                hint=f"set {DEFAULT_PIN_ENV} or give pin-source=file:PATH",
            )
        import pkcs11  # only this backend needs it (its import costs ~0.05 s)

        try:
            # pkcs11.lib keeps one initialised handle per module for the whole process.
            lib = pkcs11.lib(module_path)
        except pkcs11.PKCS11Error as exc:
            raise InputFileError(f"cannot load PKCS#11 module {module_path}: {exc}") from None
        try:
            token = lib.get_token(token_label=token_label)
        except pkcs11.NoSuchToken:
            raise InputFileError(
                f"PKCS#11 token {token_label!r} not found in {module_path}",
                hint="check the token label (softhsm2-util --show-slots / pkcs11-tool -L)",
            ) from None
        try:
            self._session = token.open(user_pin=pin)
        except pkcs11.UserAlreadyLoggedIn:
            # Login state is per process and token: another open session of ours holds it.
            self._session = token.open()
        except (pkcs11.PinIncorrect, pkcs11.PinLenRange):
            raise InputFileError(f"wrong PIN for PKCS#11 token {token_label!r}") from None
        except pkcs11.PinLocked:
            raise InputFileError(f"PIN of PKCS#11 token {token_label!r} is locked") from None
        try:
            self._key = self._find_key(token_label, key_label)
            modulus = int.from_bytes(self._key[pkcs11.Attribute.MODULUS], "big")
            exponent = int.from_bytes(self._key[pkcs11.Attribute.PUBLIC_EXPONENT], "big")
            _check_rsa_match(self._where, cert, cert_path, modulus, exponent)
        except BaseException:
            self._session.close()
            raise
        self._cert_der = cert.public_bytes(serialization.Encoding.DER)

    def _find_key(self, token_label: str, key_label: str) -> Any:
        import pkcs11

        try:
            key = self._session.get_key(
                object_class=pkcs11.ObjectClass.PRIVATE_KEY, label=key_label
            )
        except pkcs11.NoSuchKey:
            raise InputFileError(
                f"no private key labelled {key_label!r} on PKCS#11 token {token_label!r}"
            ) from None
        except pkcs11.MultipleObjectsReturned:
            raise InputFileError(
                f"several private keys labelled {key_label!r} on token {token_label!r}"
            ) from None
        if not isinstance(key, pkcs11.SignMixin):
            raise InputFileError(f"PKCS#11 object {key_label!r} on {token_label!r} cannot sign")
        return key

    def __enter__(self) -> PKCS11Signer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def from_uri(cls, uri: str, cert_path: Path) -> PKCS11Signer:
        parts = PKCS11Uri.parse(uri)
        return cls(
            parts.module_path,
            parts.token,
            parts.object,
            cert_path,
            pin_env=parts.pin_env,
            pin_file=parts.pin_file,
        )

    @property
    def certificate(self) -> bytes:
        return self._cert_der

    @property
    def description(self) -> str:
        return self._where

    def sign(self, data: bytes) -> bytes:
        from pkcs11 import Mechanism

        signature: bytes = self._key.sign(data, mechanism=Mechanism.SHA256_RSA_PKCS)
        return bytes(signature)

    def close(self) -> None:
        """Close the token session."""
        self._session.close()


_T = TypeVar("_T")


def _kms(key_id: str, what: str, call: Callable[[], _T]) -> _T:
    """``call()``, with AWS SDK failures turned into one line naming the key."""
    import botocore.exceptions

    try:
        return call()
    except botocore.exceptions.NoRegionError:
        raise UserInputError(
            f"KMS key {key_id}: no AWS region configured",
            hint="use kms:KEY?region=REGION or set AWS_REGION",
        ) from None
    except botocore.exceptions.NoCredentialsError:
        raise UserInputError(
            f"KMS key {key_id}: no AWS credentials found",
            hint="configure credentials as for the aws CLI (environment, profile or role)",
        ) from None
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        raise StoreError(f"KMS key {key_id}: {what} failed: {exc}") from None


class KMSSigner:
    """An asymmetric RSA key in AWS KMS (kms:Sign, RSASSA_PKCS1_V1_5_SHA_256, DIGEST)."""

    def __init__(self, key_id: str, cert_path: Path, *, client: Any = None) -> None:
        cert = load_certificate(cert_path)
        if client is None:
            import boto3  # only needed for this backend

            client = _kms(key_id, "connecting", lambda: boto3.client("kms"))
        self._client = client
        self._key_id = key_id
        public = _kms(key_id, "GetPublicKey", lambda: client.get_public_key(KeyId=key_id))[
            "PublicKey"
        ]
        if bytes(public) != _spki(cert):
            raise InputFileError(
                f"{cert_path}: certificate does not match KMS key {key_id}",
                hint="give the certificate issued for this key",
            )
        self._cert_der = cert.public_bytes(serialization.Encoding.DER)

    @property
    def certificate(self) -> bytes:
        return self._cert_der

    @property
    def description(self) -> str:
        return f"kms:{self._key_id}"

    def sign(self, data: bytes) -> bytes:
        answer = _kms(
            self._key_id,
            "Sign",
            lambda: self._client.sign(
                KeyId=self._key_id,
                Message=hashlib.sha256(data).digest(),
                MessageType="DIGEST",
                SigningAlgorithm="RSASSA_PKCS1_V1_5_SHA_256",
            ),
        )
        return bytes(answer["Signature"])


def open_signer(spec: str, cert: Path) -> Signer:
    """The signer a key spec names (``file:``, ``pkcs11:``, ``kms:``), checked against ``cert``."""
    scheme, colon, rest = spec.partition(":")
    if not colon or not rest:
        raise UserInputError(
            f"key spec {spec!r} has no scheme", hint="use file:PATH, pkcs11:URI or kms:KEY"
        )
    if scheme == "file":
        path, _, query = rest.partition("?")
        params = _uri_attrs(query, "&", spec)
        unknown = set(params) - {"passphrase-env", "passphrase-file"}
        if unknown:
            raise UserInputError(f"key spec {spec!r}: unknown option {sorted(unknown)[0]!r}")
        pfile = params.get("passphrase-file")
        return FileSigner(
            Path(path),
            cert,
            passphrase_env=params.get("passphrase-env"),
            passphrase_file=Path(pfile) if pfile else None,
        )
    if scheme == "pkcs11":
        return PKCS11Signer.from_uri(spec, cert)
    if scheme == "kms":
        key_id, _, query = rest.partition("?")
        params = _uri_attrs(query, "&", spec)
        client = None
        if "region" in params:
            import boto3

            region = params["region"]
            client = _kms(key_id, "connecting", lambda: boto3.client("kms", region_name=region))
        return KMSSigner(key_id, cert, client=client)
    raise UserInputError(
        f"unknown key scheme {scheme!r} in {spec!r}", hint="use file:PATH, pkcs11:URI or kms:KEY"
    )
