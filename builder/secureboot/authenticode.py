"""Deterministic Authenticode signing and fail-closed verification of PE images.

The signature is PKCS#7 SignedData v1 around SpcIndirectDataContent (SPC_PE_IMAGE_DATAOBJ
plus the image digest), one SignerInfo with authenticated attributes contentType,
SpcSpOpusInfo (empty, as sbsign writes it) and messageDigest, and the signer certificate
embedded. There is no signing time, and RSA PKCS#1 v1.5 is deterministic, so the same image
and key give the same signed bytes. The signature goes into a WIN_CERTIFICATE (revision
0x0200, WIN_CERT_TYPE_PKCS_SIGNED_DATA) appended at an 8-byte aligned offset; the security
directory entry and CheckSum are updated.

Also here: ``load_certificates`` for trusted certificates given as PEM, DER or an EFI
signature list (.esl, parsed with builder.secureboot.esl).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Sequence
from typing import Any, ClassVar

from asn1crypto import algos, cms, core, parser, x509
from cryptography import x509 as cx509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding

from builder.errors import InputFileError, VerificationError
from builder.pe import (
    WIN_CERT_ALIGN,
    PEImage,
    authenticode_digest,
    checksum_from_sum,
    padded_digest,
    parse_pe,
    pe_checksum,
    word_sum,
)
from builder.secureboot import esl
from builder.secureboot.signer import Signer

SPC_INDIRECT_DATA_OBJID = "1.3.6.1.4.1.311.2.1.4"
SPC_PE_IMAGE_DATAOBJ = "1.3.6.1.4.1.311.2.1.15"
SPC_SP_OPUS_INFO_OBJID = "1.3.6.1.4.1.311.2.1.12"
OID_CONTENT_TYPE = "1.2.840.113549.1.9.3"
OID_MESSAGE_DIGEST = "1.2.840.113549.1.9.4"

WIN_CERT_REVISION_2_0 = 0x0200
WIN_CERT_TYPE_PKCS_SIGNED_DATA = 0x0002
WIN_CERTIFICATE_HEADER = 8

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}
# What asn1crypto and cryptography raise on structures that do not parse.
_MALFORMED = (
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    OverflowError,
    UnsupportedAlgorithm,
    cx509.InvalidVersion,
)
_RSA_SIGNATURE_ALGORITHMS = frozenset(
    {"rsassa_pkcs1v15", "sha1_rsa", "sha256_rsa", "sha384_rsa", "sha512_rsa"}
)


# --- ASN.1 of the Microsoft structures (Authenticode PE spec, section "SignedData") --------


class SpcString(core.Choice):  # type: ignore[misc]
    _alternatives: ClassVar[list[tuple[Any, ...]]] = [
        ("unicode", core.BMPString, {"implicit": 0}),
        ("ascii", core.IA5String, {"implicit": 1}),
    ]


class SpcSerializedObject(core.Sequence):  # type: ignore[misc]
    _fields: ClassVar[list[tuple[Any, ...]]] = [
        ("class_id", core.OctetString),
        ("serialized_data", core.OctetString),
    ]


class SpcLink(core.Choice):  # type: ignore[misc]
    _alternatives: ClassVar[list[tuple[Any, ...]]] = [
        ("url", core.IA5String, {"implicit": 0}),
        ("moniker", SpcSerializedObject, {"implicit": 1}),
        ("file", SpcString, {"explicit": 2}),
    ]


class SpcPeImageData(core.Sequence):  # type: ignore[misc]
    _fields: ClassVar[list[tuple[Any, ...]]] = [
        ("flags", core.BitString),
        ("file", SpcLink, {"explicit": 0, "optional": True}),
    ]


class SpcAttributeTypeAndOptionalValue(core.Sequence):  # type: ignore[misc]
    _fields: ClassVar[list[tuple[Any, ...]]] = [
        ("type", core.ObjectIdentifier),
        ("value", core.Any, {"optional": True}),
    ]


class DigestInfo(core.Sequence):  # type: ignore[misc]
    _fields: ClassVar[list[tuple[Any, ...]]] = [
        ("digest_algorithm", algos.DigestAlgorithm),
        ("digest", core.OctetString),
    ]


class SpcIndirectDataContent(core.Sequence):  # type: ignore[misc]
    _fields: ClassVar[list[tuple[Any, ...]]] = [
        ("data", SpcAttributeTypeAndOptionalValue),
        ("message_digest", DigestInfo),
    ]


class SpcSpOpusInfo(core.Sequence):  # type: ignore[misc]
    _fields: ClassVar[list[tuple[Any, ...]]] = [
        ("program_name", SpcString, {"explicit": 0, "optional": True}),
        ("more_info", SpcLink, {"explicit": 1, "optional": True}),
    ]


class _SetOfOID(core.SetOf):  # type: ignore[misc]
    _child_spec = core.ObjectIdentifier


class _SetOfOctetString(core.SetOf):  # type: ignore[misc]
    _child_spec = core.OctetString


class _SetOfOpusInfo(core.SetOf):  # type: ignore[misc]
    _child_spec = SpcSpOpusInfo


class _Attribute(core.Sequence):  # type: ignore[misc]
    _fields: ClassVar[list[tuple[Any, ...]]] = [
        ("type", core.ObjectIdentifier),
        ("values", core.Any),
    ]


# --- signing ------------------------------------------------------------------------------


def _der_set(elements: Sequence[bytes]) -> bytes:
    """DER SET OF: elements sorted by their encodings."""
    body = b"".join(sorted(elements))
    return core.Asn1Value(class_=0, method=1, tag=17, contents=body).dump()  # type: ignore[no-any-return]


def _content_info(oid: str, content_der: bytes) -> bytes:
    """PKCS#7 ContentInfo ``SEQUENCE { oid, [0] EXPLICIT content }`` as DER."""
    explicit = core.Asn1Value(class_=2, method=1, tag=0, contents=content_der).dump()
    body = core.ObjectIdentifier(oid).dump() + explicit
    return core.Asn1Value(class_=0, method=1, tag=16, contents=body).dump()  # type: ignore[no-any-return]


def _spc_indirect_data(digest: bytes, algorithm: str) -> SpcIndirectDataContent:
    image_data = SpcPeImageData(
        {
            "flags": core.BitString(()),
            "file": SpcLink(name="file", value=SpcString(name="unicode", value="<<<Obsolete>>>")),
        }
    )
    return SpcIndirectDataContent(
        {
            "data": SpcAttributeTypeAndOptionalValue(
                {"type": SPC_PE_IMAGE_DATAOBJ, "value": core.Any(image_data)}
            ),
            "message_digest": DigestInfo(
                {
                    "digest_algorithm": algos.DigestAlgorithm(
                        {"algorithm": algorithm, "parameters": core.Null()}
                    ),
                    "digest": digest,
                }
            ),
        }
    )


def _signed_attributes(content_der_contents: bytes) -> bytes:
    """The DER SET OF authenticated attributes (what the RSA signature covers)."""
    attrs = [
        _Attribute(
            {
                "type": OID_CONTENT_TYPE,
                "values": core.Any(_SetOfOID([SPC_INDIRECT_DATA_OBJID])),
            }
        ).dump(),
        _Attribute(
            {
                "type": SPC_SP_OPUS_INFO_OBJID,
                "values": core.Any(_SetOfOpusInfo([SpcSpOpusInfo.load(b"\x30\x00")])),
            }
        ).dump(),
        _Attribute(
            {
                "type": OID_MESSAGE_DIGEST,
                "values": core.Any(
                    _SetOfOctetString([hashlib.sha256(content_der_contents).digest()])
                ),
            }
        ).dump(),
    ]
    return _der_set(attrs)


def make_signature(digest: bytes, signer: Signer) -> bytes:
    """The DER PKCS#7 SignedData for an image whose sha256 Authenticode digest is ``digest``."""
    try:
        cert = x509.Certificate.load(signer.certificate, strict=True)
        _ = cert.issuer.native, cert.serial_number
    except ValueError as exc:
        raise InputFileError(
            f"signer {signer.description}: certificate is not DER X.509: {exc}"
        ) from exc
    content = _spc_indirect_data(digest, "sha256")
    content.dump()
    signed_attrs = _signed_attributes(content.contents)
    signature = signer.sign(signed_attrs)
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
            "signed_attrs": cms.CMSAttributes.load(signed_attrs),
            "signature_algorithm": cms.SignedDigestAlgorithm(
                {"algorithm": "rsassa_pkcs1v15", "parameters": core.Null()}
            ),
            "signature": signature,
        }
    )
    signed_data = cms.SignedData(
        {
            "version": "v1",
            "digest_algorithms": [sha256],
            "encap_content_info": cms.ContentInfo.load(
                _content_info(SPC_INDIRECT_DATA_OBJID, content.dump())
            ),
            "certificates": [cms.CertificateChoices(name="certificate", value=cert)],
            "signer_infos": [signer_info],
        }
    )
    der: bytes = cms.ContentInfo({"content_type": "signed_data", "content": signed_data}).dump()
    return der


def strip_signature(data: bytes) -> bytes:
    """The image without its certificate table (security entry zeroed, CheckSum updated)."""
    image = parse_pe(data)
    if not image.signed:
        return data
    out = bytearray(memoryview(data)[: image.cert_table_offset])
    struct.pack_into("<II", out, image.cert_dir_offset, 0, 0)
    struct.pack_into("<I", out, image.checksum_offset, pe_checksum(out))
    return bytes(out)


def sign_pe(data: bytes, signer: Signer, *, replace: bool = False) -> bytes:
    """Sign a PE image with ``signer``; the same inputs always give the same bytes.

    An already signed image is refused unless ``replace``, which drops the old signatures.
    The image is zero-padded to 8 bytes (the padding is hashed), the WIN_CERTIFICATE is
    appended, and the security directory entry and CheckSum are set.
    """
    image = parse_pe(data)
    if image.signed:
        if not replace:
            raise InputFileError(
                f"PE image is already signed (certificate table at {image.cert_table_offset:#x})",
                hint="pass replace=True (--replace) to drop the old signature",
            )
        data = strip_signature(data)
        image = parse_pe(data)
    pad = -len(data) % WIN_CERT_ALIGN
    der = make_signature(padded_digest(data, pad), signer)
    length = WIN_CERTIFICATE_HEADER + len(der)
    entry = struct.pack("<IHH", length, WIN_CERT_REVISION_2_0, WIN_CERT_TYPE_PKCS_SIGNED_DATA)
    table = entry + der + bytes(-length % WIN_CERT_ALIGN)
    offset = len(data) + pad
    if offset + len(table) >= 1 << 32:
        raise InputFileError(f"PE image too large to sign ({offset} bytes)")
    # Only the headers change: patch a copy of them, and build the CheckSum from the pieces
    # so the 60 MB body is read once for the digest and once for the sum, never copied twice.
    mv = memoryview(data)
    headers = bytearray(mv[: image.size_of_headers])
    struct.pack_into("<II", headers, image.cert_dir_offset, offset, len(table))
    struct.pack_into("<I", headers, image.checksum_offset, 0)
    body = mv[image.size_of_headers :]
    total = word_sum(headers) + word_sum(body, image.size_of_headers) + word_sum(table, offset)
    struct.pack_into(
        "<I", headers, image.checksum_offset, checksum_from_sum(total, offset + len(table))
    )
    return b"".join((headers, body, bytes(pad), table))


# --- verification -------------------------------------------------------------------------


def read_certificate_table(data: bytes, image: PEImage) -> list[tuple[int, bytes]]:
    """(offset, PKCS#7 DER) of each WIN_CERTIFICATE entry; raises VerificationError."""
    entries: list[tuple[int, bytes]] = []
    pos = image.cert_table_offset
    end = pos + image.cert_table_size
    while pos < end:
        if pos + WIN_CERTIFICATE_HEADER > end:
            raise VerificationError(f"truncated WIN_CERTIFICATE header at offset {pos:#x}")
        length, revision, cert_type = struct.unpack_from("<IHH", data, pos)
        if length <= WIN_CERTIFICATE_HEADER or pos + length > end:
            raise VerificationError(
                f"WIN_CERTIFICATE at offset {pos:#x} has length {length:#x} outside the "
                f"certificate table (ends {end:#x})"
            )
        if revision != WIN_CERT_REVISION_2_0 or cert_type != WIN_CERT_TYPE_PKCS_SIGNED_DATA:
            raise VerificationError(
                f"WIN_CERTIFICATE at offset {pos:#x}: revision {revision:#x} type "
                f"{cert_type:#x}, expected 0x200 PKCS_SIGNED_DATA"
            )
        blob = data[pos + WIN_CERTIFICATE_HEADER : pos + length]
        try:
            info = parser.parse(blob)
        except ValueError as exc:
            raise VerificationError(f"signature at offset {pos:#x} is not DER: {exc}") from exc
        used = len(info[3]) + len(info[4]) + len(info[5])
        rest = blob[used:]
        if len(rest) >= WIN_CERT_ALIGN or any(rest):
            raise VerificationError(
                f"signature at offset {pos:#x} has {len(rest)} bytes of trailing data"
            )
        entries.append((pos, blob[:used]))
        next_pos = pos + length + (-length % WIN_CERT_ALIGN)
        if any(data[pos + length : min(next_pos, end)]):
            raise VerificationError(f"WIN_CERTIFICATE padding at {pos + length:#x} is not zero")
        pos = next_pos
    return entries


def _load_certificate(der: bytes, what: str) -> cx509.Certificate:
    try:
        return cx509.load_der_x509_certificate(der)
    except (ValueError, cx509.InvalidVersion) as exc:
        raise VerificationError(f"{what} is not a DER X.509 certificate: {exc}") from exc


def _attribute_values(signed_attrs: Any, oid: str, where: str) -> list[Any]:
    found = [a for a in signed_attrs if a["type"].dotted == oid]
    if len(found) != 1:
        raise VerificationError(f"{where}: {len(found)} authenticated attributes {oid}, want 1")
    values = list(found[0]["values"])
    if len(values) != 1:
        raise VerificationError(f"{where}: attribute {oid} has {len(values)} values, want 1")
    return values


def _verify_entry(
    data: bytes, offset: int, der: bytes, trusted: Sequence[cx509.Certificate]
) -> bool:
    """Check one signature fully; True when trusted, False when valid but not trusted."""
    where = f"signature at offset {offset:#x}"
    info = cms.ContentInfo.load(der, strict=True)
    if info["content_type"].native != "signed_data":
        raise VerificationError(f"{where}: content type {info['content_type'].dotted}")
    signed = info["content"]
    if signed["version"].native != "v1":
        raise VerificationError(f"{where}: SignedData version {signed['version'].native}")
    encap = signed["encap_content_info"]
    if encap["content_type"].dotted != SPC_INDIRECT_DATA_OBJID:
        raise VerificationError(f"{where}: content is not SpcIndirectDataContent")
    content = encap["content"].parse(SpcIndirectDataContent)
    if content["data"]["type"].dotted != SPC_PE_IMAGE_DATAOBJ:
        raise VerificationError(f"{where}: content is not SPC_PE_IMAGE_DATAOBJ")
    image_algorithm = content["message_digest"]["digest_algorithm"]["algorithm"].native
    if image_algorithm not in _HASHES:
        raise VerificationError(f"{where}: unsupported image digest {image_algorithm}")
    expected = content["message_digest"]["digest"].native
    actual = authenticode_digest(data, image_algorithm)
    if not hmac.compare_digest(expected, actual):
        raise VerificationError(
            f"{where}: image digest mismatch (signed {expected.hex()}, image {actual.hex()})",
            hint="the image changed after it was signed",
        )

    signer_infos = list(signed["signer_infos"])
    if len(signer_infos) != 1:
        raise VerificationError(f"{where}: {len(signer_infos)} SignerInfos, want 1")
    signer_info = signer_infos[0]
    if signer_info["version"].native != "v1":
        raise VerificationError(f"{where}: SignerInfo version {signer_info['version'].native}")
    algorithm = signer_info["digest_algorithm"]["algorithm"].native
    if algorithm not in _HASHES:
        raise VerificationError(f"{where}: unsupported signer digest {algorithm}")
    listed = [a["algorithm"].native for a in signed["digest_algorithms"]]
    if listed != [algorithm]:
        raise VerificationError(f"{where}: digestAlgorithms {listed} do not match the signer's")
    for identifier in (
        *signed["digest_algorithms"],
        signer_info["digest_algorithm"],
        signer_info["signature_algorithm"],
        content["message_digest"]["digest_algorithm"],
    ):
        if identifier["parameters"].native is not None:
            raise VerificationError(f"{where}: unexpected algorithm parameters")
    if signer_info["unsigned_attrs"]:
        raise VerificationError(f"{where}: unexpected unauthenticated attributes")
    signed_attrs = signer_info["signed_attrs"]
    if not signed_attrs:
        raise VerificationError(f"{where}: no authenticated attributes")
    (content_type,) = _attribute_values(signed_attrs, OID_CONTENT_TYPE, where)
    if content_type.dotted != SPC_INDIRECT_DATA_OBJID:
        raise VerificationError(f"{where}: contentType attribute is not SPC_INDIRECT_DATA")
    (message_digest,) = _attribute_values(signed_attrs, OID_MESSAGE_DIGEST, where)
    content_hash = hashlib.new(algorithm, content.contents).digest()
    if not hmac.compare_digest(message_digest.native, content_hash):
        raise VerificationError(f"{where}: messageDigest does not match the signed content")

    sid = signer_info["sid"]
    candidates = [c.chosen for c in signed["certificates"] or [] if c.name == "certificate"]
    signer_cert = None
    for cert in candidates:
        if sid.name == "issuer_and_serial_number":
            match = (
                cert.issuer == sid.chosen["issuer"]
                and cert.serial_number == sid.chosen["serial_number"].native
            )
        else:
            match = cert.key_identifier == sid.chosen.native
        if match:
            signer_cert = cert
            break
    if signer_cert is None:
        raise VerificationError(f"{where}: the signer's certificate is not embedded")
    certificate = _load_certificate(signer_cert.dump(), f"{where}: signer certificate")

    sig_algorithm = signer_info["signature_algorithm"]["algorithm"].native
    public_key = certificate.public_key()
    if sig_algorithm not in _RSA_SIGNATURE_ALGORITHMS or not isinstance(
        public_key, rsa.RSAPublicKey
    ):
        raise VerificationError(f"{where}: unsupported signature algorithm {sig_algorithm}")
    attrs_contents = signed_attrs.contents
    to_verify = core.Asn1Value(class_=0, method=1, tag=17, contents=attrs_contents).dump()
    try:
        public_key.verify(
            signer_info["signature"].native, to_verify, padding.PKCS1v15(), _HASHES[algorithm]()
        )
    except InvalidSignature as exc:
        raise VerificationError(f"{where}: RSA signature does not verify") from exc

    signer_der = certificate.public_bytes(Encoding.DER)
    for anchor in trusted:
        if anchor.public_bytes(Encoding.DER) == signer_der:
            return True
        try:
            certificate.verify_directly_issued_by(anchor)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            continue
        return True
    return False


def verify_pe(data: bytes, certs: Sequence[bytes]) -> None:
    """Raise VerificationError unless ``data`` carries a valid signature by one of ``certs``.

    ``certs`` are DER certificates; a signer certificate matches when it is one of them or
    is directly issued (signature checked) by one of them. Every signature in the image must
    be well formed and match the image; one trusted one is enough. A non-PE input raises
    InputFileError.
    """
    image = parse_pe(data)
    if not image.signed:
        raise VerificationError("PE image is not signed (no certificate table)")
    trusted = [_load_certificate(c, f"trusted certificate {i}") for i, c in enumerate(certs)]
    if not trusted:
        raise VerificationError("no trusted certificates given")
    entries = read_certificate_table(data, image)
    if not entries:
        raise VerificationError("certificate table has no signature")
    ok = False
    for offset, der in entries:
        try:
            ok = _verify_entry(data, offset, der, trusted) or ok
        except _MALFORMED as exc:
            raise VerificationError(f"signature at offset {offset:#x} is malformed: {exc}") from exc
    if not ok:
        subjects = "; ".join(c.subject.rfc4514_string() for c in trusted)
        raise VerificationError(
            f"PE signature is valid but not by a trusted certificate (trusted: {subjects})"
        )


# --- certificates from files --------------------------------------------------------------


def load_certificates(data: bytes, source: str) -> list[bytes]:
    """DER certificates from PEM (one or more), DER, or an .esl file's bytes."""
    if b"-----BEGIN CERTIFICATE-----" in data:
        try:
            return [c.public_bytes(Encoding.DER) for c in cx509.load_pem_x509_certificates(data)]
        except ValueError as exc:
            raise InputFileError(f"{source}: bad PEM certificate: {exc}") from exc
    try:
        return [cx509.load_der_x509_certificate(data).public_bytes(Encoding.DER)]
    except ValueError:
        pass
    try:
        certs = [sig.data for sig in esl.SignatureDatabase.parse(data).certificates()]
    except InputFileError as exc:
        raise InputFileError(
            f"{source}: no certificate found: not PEM or DER, and not an .esl ({exc.message})"
        ) from exc
    if not certs:
        raise InputFileError(
            f"{source}: no certificate found (not PEM, DER, or an .esl with X.509 entries)"
        )
    for i, der in enumerate(certs):
        try:
            cx509.load_der_x509_certificate(der)
        except ValueError as exc:
            raise InputFileError(f"{source}: .esl entry {i} is not an X.509 cert") from exc
    return certs
