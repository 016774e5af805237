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
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cryptography import x509 as cx509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding

from builder.errors import InputFileError, VerificationError
from builder.pe import (
    WIN_CERT_ALIGN,
    BytesLike,
    PEImage,
    authenticode_digest,
    checksum_from_sum,
    padded_digest,
    parse_pe,
    pe_checksum,
    word_sum,
)
from builder.secureboot.signer import Signer

SPC_INDIRECT_DATA_OBJID = "1.3.6.1.4.1.311.2.1.4"
SPC_PE_IMAGE_DATAOBJ = "1.3.6.1.4.1.311.2.1.15"
SPC_SP_OPUS_INFO_OBJID = "1.3.6.1.4.1.311.2.1.12"
OID_CONTENT_TYPE = "1.2.840.113549.1.9.3"
OID_MESSAGE_DIGEST = "1.2.840.113549.1.9.4"
OID_SIGNED_DATA = "1.2.840.113549.1.7.2"
OID_SHA256 = "2.16.840.1.101.3.4.2.1"
OID_RSA_ENCRYPTION = "1.2.840.113549.1.1.1"

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
    AttributeError,  # asn1crypto: a Void (absent) element where a structure must be
    UnsupportedAlgorithm,
    cx509.InvalidVersion,
)
_RSA_SIGNATURE_ALGORITHMS = frozenset(
    {"rsassa_pkcs1v15", "sha1_rsa", "sha256_rsa", "sha384_rsa", "sha512_rsa"}
)


# --- signing ------------------------------------------------------------------------------


def _der(tag: int, content: bytes) -> bytes:
    """One DER TLV with a definite, minimal length."""
    n = len(content)
    if n < 0x80:
        return bytes((tag, n)) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(size))) + size + content


def _seq(*parts: bytes) -> bytes:
    return _der(0x30, b"".join(parts))


def _set_of(*parts: bytes) -> bytes:
    """DER SET OF: elements sorted by their encodings."""
    return _der(0x31, b"".join(sorted(parts)))


def _oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    body = bytearray()
    for arc in (40 * arcs[0] + arcs[1], *arcs[2:]):
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body += bytes(reversed(chunk))
    return _der(0x06, bytes(body))


def _algorithm(oid: str) -> bytes:
    """AlgorithmIdentifier with NULL parameters."""
    return _seq(_oid(oid), b"\x05\x00")


def _tlv(der: bytes, pos: int, where: str) -> tuple[int, int, int]:
    """(tag, content start, end) of the DER element at ``pos``."""
    if pos + 2 > len(der):
        raise InputFileError(f"{where}: truncated DER at offset {pos}")
    tag, first = der[pos], der[pos + 1]
    start = pos + 2
    if first & 0x80:
        count = first & 0x7F
        length = int.from_bytes(der[start : start + count], "big")
        start += count
    else:
        length = first
    if start + length > len(der):
        raise InputFileError(f"{where}: DER element at offset {pos} runs past the end")
    return tag, start, start + length


def _issuer_and_serial(cert: bytes, where: str) -> bytes:
    """IssuerAndSerialNumber with the certificate's own issuer and serial encodings."""
    try:
        public_key = cx509.load_der_x509_certificate(cert).public_key()
    except (ValueError, cx509.InvalidVersion, UnsupportedAlgorithm) as exc:
        raise InputFileError(f"{where}: certificate is not DER X.509: {exc}") from exc
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise InputFileError(f"{where}: certificate key is not RSA (Authenticode here is RSA)")
    _, tbs, _ = _tlv(cert, 0, where)  # Certificate
    _, pos, _ = _tlv(cert, tbs, where)  # TBSCertificate
    tag, _, end = _tlv(cert, pos, where)
    if tag == 0xA0:  # [0] version
        pos = end
    _, _, serial_end = _tlv(cert, pos, where)
    serial = cert[pos:serial_end]
    _, _, algorithm_end = _tlv(cert, serial_end, where)
    _, _, issuer_end = _tlv(cert, algorithm_end, where)
    return _seq(cert[algorithm_end:issuer_end], serial)


def spc_indirect_data(digest: bytes) -> bytes:
    """SpcIndirectDataContent for a sha256 image digest, byte for byte as sbsign writes it."""
    obsolete = "<<<Obsolete>>>".encode("utf-16-be")
    link = _der(0xA0, _der(0xA2, _der(0x80, obsolete)))  # file [2] { unicode [0] }
    image_data = _seq(b"\x03\x01\x00", link)  # flags: empty BIT STRING
    return _seq(
        _seq(_oid(SPC_PE_IMAGE_DATAOBJ), image_data),
        _seq(_algorithm(OID_SHA256), _der(0x04, digest)),
    )


def signed_attributes(content: bytes) -> bytes:
    """The DER SET OF authenticated attributes (what the RSA signature covers).

    messageDigest is the sha256 of the SpcIndirectDataContent's value octets (without its
    own tag and length), as Authenticode defines it.
    """
    _, start, _ = _tlv(content, 0, "SpcIndirectDataContent")
    return _set_of(
        _seq(_oid(OID_CONTENT_TYPE), _set_of(_oid(SPC_INDIRECT_DATA_OBJID))),
        _seq(_oid(SPC_SP_OPUS_INFO_OBJID), _set_of(_seq())),
        _seq(
            _oid(OID_MESSAGE_DIGEST),
            _set_of(_der(0x04, hashlib.sha256(content[start:]).digest())),
        ),
    )


def make_signature(digest: bytes, signer: Signer) -> bytes:
    """The DER PKCS#7 SignedData for an image whose sha256 Authenticode digest is ``digest``."""
    cert = signer.certificate
    sid = _issuer_and_serial(cert, f"signer {signer.description}")
    content = spc_indirect_data(digest)
    attrs = signed_attributes(content)
    signature = signer.sign(attrs)
    signer_info = _seq(
        b"\x02\x01\x01",  # version 1
        sid,
        _algorithm(OID_SHA256),
        b"\xa0" + attrs[1:],  # [0] IMPLICIT SET OF: the same octets, retagged
        _algorithm(OID_RSA_ENCRYPTION),
        _der(0x04, signature),
    )
    signed_data = _seq(
        b"\x02\x01\x01",  # version 1
        _set_of(_algorithm(OID_SHA256)),
        _seq(_oid(SPC_INDIRECT_DATA_OBJID), _der(0xA0, content)),
        _der(0xA0, cert),  # certificates [0] IMPLICIT
        _set_of(signer_info),
    )
    return _seq(_oid(OID_SIGNED_DATA), _der(0xA0, signed_data))


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
    return b"".join(signed_pe_parts(data, signer, replace=replace))


def signed_pe_parts(
    data: bytes, signer: Signer, *, replace: bool = False
) -> tuple[bytes, BytesLike, bytes, bytes]:
    """:func:`sign_pe` as the pieces of the signed file, in order, without copying the body.

    (patched headers, the rest of ``data`` as a view, zero padding, certificate table): what
    ``sign_pe`` joins, or what a writer can hand to ``os.writev`` as they are.
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
    body = memoryview(data)[image.size_of_headers :]
    with ThreadPoolExecutor(max_workers=1) as pool:
        # hashlib releases the GIL on large updates: hash in a thread while this one adds
        # up the CheckSum words of the body (the two passes over the image overlap).
        digest = pool.submit(padded_digest, data, pad)
        body_sum = word_sum(body, image.size_of_headers)
        der = make_signature(digest.result(), signer)
    length = WIN_CERTIFICATE_HEADER + len(der)
    entry = struct.pack("<IHH", length, WIN_CERT_REVISION_2_0, WIN_CERT_TYPE_PKCS_SIGNED_DATA)
    table = entry + der + bytes(-length % WIN_CERT_ALIGN)
    offset = len(data) + pad
    if offset + len(table) >= 1 << 32:
        raise InputFileError(f"PE image too large to sign ({offset} bytes)")
    # Only the headers change: patch a copy of them and build the CheckSum from the pieces,
    # so the body is never copied here.
    headers = bytearray(data[: image.size_of_headers])
    struct.pack_into("<II", headers, image.cert_dir_offset, offset, len(table))
    struct.pack_into("<I", headers, image.checksum_offset, 0)
    total = word_sum(headers) + body_sum + word_sum(table, offset)
    struct.pack_into(
        "<I", headers, image.checksum_offset, checksum_from_sum(total, offset + len(table))
    )
    return bytes(headers), body, bytes(pad), table


# --- verification -------------------------------------------------------------------------


def read_certificate_table(data: bytes, image: PEImage) -> list[tuple[int, bytes]]:
    """(offset, PKCS#7 DER) of each WIN_CERTIFICATE entry; raises VerificationError."""
    from asn1crypto import parser

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
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise VerificationError(f"signature at offset {pos:#x} is not DER: {first}") from exc
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
    from asn1crypto import cms, core

    from builder.secureboot import authenticode_asn1 as asn1

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
    if isinstance(encap["content"], core.Void):
        raise VerificationError(f"{where}: no SpcIndirectDataContent (detached signature)")
    content = encap["content"].parse(asn1.SpcIndirectDataContent)
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
    if sig_algorithm not in ("rsassa_pkcs1v15", f"{algorithm}_rsa"):
        # The field is outside what the signature covers: it must at least agree with it.
        raise VerificationError(
            f"{where}: signature algorithm {sig_algorithm} disagrees with digest {algorithm}"
        )
    attrs_contents = signed_attrs.contents
    to_verify = _der(0x31, attrs_contents)
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
            # asn1crypto appends "while parsing ..." lines: keep the message one line
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise VerificationError(
                f"signature at offset {offset:#x} is malformed: {first}"
            ) from exc
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
    from builder.secureboot import esl

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
