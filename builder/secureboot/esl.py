"""EFI signature lists and time-based authenticated variable payloads (pure codec).

- ``SignatureList`` / ``SignatureDatabase``: EFI_SIGNATURE_LIST and EFI_SIGNATURE_DATA (UEFI
  2.10 section 32.4.1), the value of PK, KEK, db and dbx and the content of ``.esl`` files.
- ``EfiTime`` and ``AuthenticatedVariable``: EFI_VARIABLE_AUTHENTICATION_2 followed by the
  new variable data, the content of ``.auth`` files (section 8.2.2). ``sign_variable`` makes
  one with a ``Signer``: a detached PKCS#7 SignedData without signed attributes over
  VariableName || VendorGuid || Attributes || TimeStamp || Data, as edk2 checks it.

Every ``parse`` accepts exactly what ``__bytes__`` writes, so bytes -> object -> bytes is
the identity.
"""

from __future__ import annotations

import datetime
import struct
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from asn1crypto import algos, cms, core, x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509 import load_der_x509_certificate

from builder.errors import InputFileError, VerificationError
from builder.secureboot.signer import Signer

EFI_CERT_X509_GUID = uuid.UUID("a5c059a1-94e4-4aa7-87b5-ab155c2bf072")
EFI_CERT_SHA256_GUID = uuid.UUID("c1c41626-504c-4092-aca9-41f936934328")
EFI_CERT_TYPE_PKCS7_GUID = uuid.UUID("4aafd29d-68df-49ee-8aa9-347d375665a7")
EFI_GLOBAL_VARIABLE = uuid.UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c")
EFI_IMAGE_SECURITY_DATABASE = uuid.UUID("d719b2cb-3d3a-4596-a3bc-dad00e67656f")

EFI_VARIABLE_NON_VOLATILE = 0x01
EFI_VARIABLE_BOOTSERVICE_ACCESS = 0x02
EFI_VARIABLE_RUNTIME_ACCESS = 0x04
EFI_VARIABLE_TIME_BASED_AUTHENTICATED_WRITE_ACCESS = 0x20
EFI_VARIABLE_APPEND_WRITE = 0x40
# NV | BS | RT | TIME_BASED_AUTHENTICATED_WRITE_ACCESS: how PK, KEK, db and dbx are stored.
SECURE_VARIABLE_ATTRIBUTES = (
    EFI_VARIABLE_NON_VOLATILE
    | EFI_VARIABLE_BOOTSERVICE_ACCESS
    | EFI_VARIABLE_RUNTIME_ACCESS
    | EFI_VARIABLE_TIME_BASED_AUTHENTICATED_WRITE_ACCESS
)

WIN_CERT_REVISION = 0x0200
WIN_CERT_TYPE_EFI_GUID = 0x0EF1

_LIST_HEADER = struct.Struct("<16sLLL")
_WIN_CERT = struct.Struct("<LHH16s")
_EFI_TIME = struct.Struct("<HBBBBBBLhBB")

# Where each secure variable lives.
VENDOR_GUIDS: dict[str, uuid.UUID] = {
    "PK": EFI_GLOBAL_VARIABLE,
    "KEK": EFI_GLOBAL_VARIABLE,
    "db": EFI_IMAGE_SECURITY_DATABASE,
    "dbx": EFI_IMAGE_SECURITY_DATABASE,
}


def _bad(what: str, offset: int, problem: str) -> InputFileError:
    return InputFileError(f"{what} at offset {offset:#x}: {problem}")


@dataclass(frozen=True)
class SignatureData:
    """One EFI_SIGNATURE_DATA: the owner GUID and the signature (a certificate or a hash)."""

    owner: uuid.UUID
    data: bytes

    def __bytes__(self) -> bytes:
        return self.owner.bytes_le + self.data


@dataclass(frozen=True)
class SignatureList:
    """One EFI_SIGNATURE_LIST: a type, an optional header, equally sized signatures."""

    type: uuid.UUID
    signatures: tuple[SignatureData, ...]
    header: bytes = b""

    def __post_init__(self) -> None:
        sizes = {len(s.data) for s in self.signatures}
        if len(sizes) > 1:
            raise ValueError("signatures in one EFI_SIGNATURE_LIST must have equal sizes")
        if self.type == EFI_CERT_SHA256_GUID and sizes - {32}:
            raise ValueError("EFI_CERT_SHA256 signatures must be 32 bytes")
        if self.type == EFI_CERT_X509_GUID and len(self.signatures) > 1:
            raise ValueError("an EFI_CERT_X509 list holds exactly one certificate")

    @property
    def signature_size(self) -> int:
        """SignatureSize: owner GUID plus data."""
        return 16 + (len(self.signatures[0].data) if self.signatures else 0)

    @classmethod
    def parse_from(cls, data: bytes, offset: int = 0) -> tuple[SignatureList, int]:
        """Parse the list at ``offset``; return it and the offset just past it."""
        if len(data) - offset < _LIST_HEADER.size:
            raise _bad("EFI_SIGNATURE_LIST", offset, "truncated header")
        type_le, list_size, header_size, sig_size = _LIST_HEADER.unpack_from(data, offset)
        end = offset + list_size
        body = offset + _LIST_HEADER.size + header_size
        if list_size < _LIST_HEADER.size or end > len(data) or body > end:
            raise _bad("EFI_SIGNATURE_LIST", offset, f"SignatureListSize {list_size} out of range")
        if sig_size < 16 or (end - body) % sig_size:
            raise _bad(
                "EFI_SIGNATURE_LIST", offset, f"SignatureSize {sig_size} does not divide the list"
            )
        sigs = tuple(
            SignatureData(uuid.UUID(bytes_le=data[p : p + 16]), data[p + 16 : p + sig_size])
            for p in range(body, end, sig_size)
        )
        if not sigs:
            raise _bad("EFI_SIGNATURE_LIST", offset, "no signatures")
        header = data[offset + _LIST_HEADER.size : body]
        try:
            return cls(uuid.UUID(bytes_le=type_le), sigs, header), end
        except ValueError as exc:
            raise _bad("EFI_SIGNATURE_LIST", offset, str(exc)) from None

    @classmethod
    def parse(cls, data: bytes) -> SignatureList:
        """Parse exactly one list."""
        result, end = cls.parse_from(data)
        if end != len(data):
            raise _bad("EFI_SIGNATURE_LIST", end, "trailing bytes after the list")
        return result

    def __bytes__(self) -> bytes:
        size = _LIST_HEADER.size + len(self.header) + self.signature_size * len(self.signatures)
        head = _LIST_HEADER.pack(self.type.bytes_le, size, len(self.header), self.signature_size)
        return head + self.header + b"".join(bytes(s) for s in self.signatures)


@dataclass(frozen=True)
class SignatureDatabase:
    """A sequence of EFI_SIGNATURE_LISTs: the data of PK, KEK, db, dbx, or an ``.esl`` file."""

    lists: tuple[SignatureList, ...] = ()

    @classmethod
    def parse(cls, data: bytes) -> SignatureDatabase:
        lists: list[SignatureList] = []
        offset = 0
        while offset < len(data):
            item, offset = SignatureList.parse_from(data, offset)
            lists.append(item)
        return cls(tuple(lists))

    def __bytes__(self) -> bytes:
        return b"".join(bytes(item) for item in self.lists)

    def entries(self) -> Iterator[tuple[uuid.UUID, SignatureData]]:
        """Every (list type, signature) pair in order."""
        for item in self.lists:
            for sig in item.signatures:
                yield item.type, sig

    def certificates(self) -> list[SignatureData]:
        """The EFI_CERT_X509 entries: owner GUID and certificate DER."""
        return [sig for kind, sig in self.entries() if kind == EFI_CERT_X509_GUID]


def x509_list(owner: uuid.UUID, cert_der: bytes) -> SignatureList:
    """An EFI_CERT_X509 list holding one certificate."""
    return SignatureList(EFI_CERT_X509_GUID, (SignatureData(owner, cert_der),))


def sha256_list(owner: uuid.UUID, digests: Sequence[bytes]) -> SignatureList:
    """An EFI_CERT_SHA256 list holding the given 32-byte digests."""
    return SignatureList(EFI_CERT_SHA256_GUID, tuple(SignatureData(owner, d) for d in digests))


@dataclass(frozen=True)
class EfiTime:
    """EFI_TIME. Authenticated variables require nanosecond, zone and daylight to be zero."""

    year: int
    month: int
    day: int
    hour: int
    minute: int
    second: int
    nanosecond: int = 0
    timezone: int = 0
    daylight: int = 0

    SIZE = _EFI_TIME.size

    @classmethod
    def from_epoch(cls, seconds: int) -> EfiTime:
        """The UTC time of ``seconds`` since 1970 (e.g. SOURCE_DATE_EPOCH)."""
        t = datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)
        return cls(t.year, t.month, t.day, t.hour, t.minute, t.second)

    @classmethod
    def parse(cls, data: bytes) -> EfiTime:
        if len(data) != _EFI_TIME.size:
            raise InputFileError(f"EFI_TIME must be {_EFI_TIME.size} bytes, got {len(data)}")
        year, month, day, hour, minute, second, pad1, ns, tz, dl, pad2 = _EFI_TIME.unpack(data)
        if pad1 or pad2:
            raise InputFileError("EFI_TIME: pad bytes must be zero")
        return cls(year, month, day, hour, minute, second, ns, tz, dl)

    def __bytes__(self) -> bytes:
        return _EFI_TIME.pack(
            self.year,
            self.month,
            self.day,
            self.hour,
            self.minute,
            self.second,
            0,
            self.nanosecond,
            self.timezone,
            self.daylight,
            0,
        )


def ucs2(name: str) -> bytes:
    """A variable name as UEFI stores it (UTF-16LE), without the terminating NUL."""
    return name.encode("utf-16-le")


def auth_payload(
    name: str, vendor_guid: uuid.UUID, attributes: int, timestamp: EfiTime, data: bytes
) -> bytes:
    """The bytes a time-based authenticated write signs (UEFI 2.10, 8.2.2)."""
    return (
        ucs2(name) + vendor_guid.bytes_le + struct.pack("<L", attributes) + bytes(timestamp) + data
    )


def make_signed_data(signature: bytes, cert_der: bytes) -> bytes:
    """DER PKCS#7 SignedData (no encapsulated content, no signed attributes) for one signer.

    This is the bare SignedData, not wrapped in a ContentInfo: what sign-efi-sig-list writes
    and what the UEFI spec asks for in EFI_VARIABLE_AUTHENTICATION_2.
    """
    cert = x509.Certificate.load(cert_der)
    sha256 = algos.DigestAlgorithm({"algorithm": "sha256", "parameters": core.Null()})
    signer_info = cms.SignerInfo(
        {
            "version": "v1",
            "sid": cms.SignerIdentifier(
                name="issuer_and_serial_number",
                value=cms.IssuerAndSerialNumber(
                    {"issuer": cert.issuer, "serial_number": cert.serial_number}
                ),
            ),
            "digest_algorithm": sha256,
            "signature_algorithm": algos.SignedDigestAlgorithm(
                {"algorithm": "rsassa_pkcs1v15", "parameters": core.Null()}
            ),
            "signature": signature,
        }
    )
    signed_data = cms.SignedData(
        {
            "version": "v1",
            "digest_algorithms": [sha256],
            "encap_content_info": {"content_type": "data"},
            "certificates": [cms.CertificateChoices(name="certificate", value=cert)],
            "signer_infos": [signer_info],
        }
    )
    return bytes(signed_data.dump())


@dataclass(frozen=True)
class AuthenticatedVariable:
    """An ``.auth`` file: EFI_VARIABLE_AUTHENTICATION_2 then the new variable data."""

    timestamp: EfiTime
    cert_data: bytes
    data: bytes

    @classmethod
    def parse(cls, blob: bytes) -> AuthenticatedVariable:
        head = EfiTime.SIZE + _WIN_CERT.size
        if len(blob) < head:
            raise _bad("EFI_VARIABLE_AUTHENTICATION_2", 0, "truncated header")
        timestamp = EfiTime.parse(blob[: EfiTime.SIZE])
        length, revision, cert_type, guid_le = _WIN_CERT.unpack_from(blob, EfiTime.SIZE)
        if revision != WIN_CERT_REVISION or cert_type != WIN_CERT_TYPE_EFI_GUID:
            raise _bad(
                "WIN_CERTIFICATE",
                EfiTime.SIZE,
                f"revision {revision:#x} type {cert_type:#x}, expected 0x200 0xef1",
            )
        if uuid.UUID(bytes_le=guid_le) != EFI_CERT_TYPE_PKCS7_GUID:
            raise _bad("WIN_CERTIFICATE_UEFI_GUID", EfiTime.SIZE + 8, "CertType is not PKCS7")
        end = EfiTime.SIZE + length
        if length < _WIN_CERT.size or end > len(blob):
            raise _bad("WIN_CERTIFICATE", EfiTime.SIZE, f"dwLength {length} out of range")
        return cls(timestamp, blob[EfiTime.SIZE + _WIN_CERT.size : end], blob[end:])

    def __bytes__(self) -> bytes:
        win_cert = _WIN_CERT.pack(
            _WIN_CERT.size + len(self.cert_data),
            WIN_CERT_REVISION,
            WIN_CERT_TYPE_EFI_GUID,
            EFI_CERT_TYPE_PKCS7_GUID.bytes_le,
        )
        return bytes(self.timestamp) + win_cert + self.cert_data + self.data

    def signed_data(self) -> cms.SignedData:
        """The PKCS#7 SignedData, accepting the bare form and one wrapped in ContentInfo."""
        try:
            info = cms.ContentInfo.load(self.cert_data)
            if info["content_type"].native == "signed_data":
                return info["content"]
        except ValueError:
            pass
        try:
            sd = cms.SignedData.load(self.cert_data)
            sd.native  # noqa: B018 - forces a full parse so garbage is caught here
        except ValueError as exc:
            raise InputFileError(f"EFI_VARIABLE_AUTHENTICATION_2: bad PKCS#7: {exc}") from None
        return sd


def sign_variable(
    name: str,
    data: bytes,
    signer: Signer,
    timestamp: EfiTime,
    *,
    vendor_guid: uuid.UUID | None = None,
    attributes: int = SECURE_VARIABLE_ATTRIBUTES,
) -> AuthenticatedVariable:
    """A time-based authenticated write of ``data`` to ``name``, signed by ``signer``."""
    guid = vendor_guid if vendor_guid is not None else VENDOR_GUIDS[name]
    payload = auth_payload(name, guid, attributes, timestamp, data)
    signature = signer.sign(payload)
    return AuthenticatedVariable(timestamp, make_signed_data(signature, signer.certificate), data)


def verify_variable(
    name: str, auth: AuthenticatedVariable, cert_der: bytes, *, vendor_guid: uuid.UUID | None = None
) -> None:
    """Check that ``auth`` is a write of ``name`` signed by the key of ``cert_der``.

    Raises VerificationError; the attributes are the ones PK, KEK, db and dbx are stored with.
    """
    guid = vendor_guid if vendor_guid is not None else VENDOR_GUIDS[name]
    payload = auth_payload(name, guid, SECURE_VARIABLE_ATTRIBUTES, auth.timestamp, auth.data)
    infos = auth.signed_data()["signer_infos"]
    if len(infos) != 1:
        raise VerificationError(f"{name}: .auth has {len(infos)} signers, expected 1")
    info = infos[0]
    if len(info["signed_attrs"]):
        raise VerificationError(f"{name}: .auth signer has signed attributes (not supported)")
    key = load_der_x509_certificate(cert_der).public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise VerificationError(f"{name}: certificate key is not RSA")
    try:
        key.verify(info["signature"].native, payload, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        raise VerificationError(
            f"{name}: .auth signature does not verify with the given certificate"
        ) from None
