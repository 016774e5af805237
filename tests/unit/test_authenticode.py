"""builder.secureboot.authenticode: deterministic signing, fail-closed verification, ESL reader.

Independent oracles (sbverify, osslsigncode) are in tests/integration/test_signing_oracles.py.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from asn1crypto import cms
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from builder.errors import InputFileError, VerificationError
from builder.pe import authenticode_digest, is_signed, parse_pe, pe_checksum
from builder.secureboot.authenticode import (
    load_certificates,
    sign_pe,
    strip_signature,
    verify_pe,
)
from builder.secureboot.esl import EFI_CERT_X509_GUID
from builder.secureboot.signer import Signer

DATA = Path(__file__).parent.parent / "data" / "pe"
DER = serialization.Encoding.DER


@dataclass(frozen=True)
class KeyPair:
    key: rsa.RSAPrivateKey
    cert: x509.Certificate

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(DER)


class FileSigner:
    """A test signer holding an in-memory RSA key (the real backends are in signers.py)."""

    def __init__(self, pair: KeyPair) -> None:
        self._pair = pair

    @property
    def certificate(self) -> bytes:
        return self._pair.der

    @property
    def description(self) -> str:
        return "test:in-memory"

    def sign(self, data: bytes) -> bytes:
        return self._pair.key.sign(data, padding.PKCS1v15(), hashes.SHA256())


def make_pair(name: str, issuer: KeyPair | None = None, serial: int = 1) -> KeyPair:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    start = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), True)
    )
    cert = builder.sign(issuer.key if issuer else key, hashes.SHA256())
    return KeyPair(key, cert)


@pytest.fixture(scope="module")
def ca() -> KeyPair:
    return make_pair("bootchain test CA")


@pytest.fixture(scope="module")
def db(ca: KeyPair) -> KeyPair:
    return make_pair("bootchain test db", issuer=ca, serial=2)


@pytest.fixture(scope="module")
def other() -> KeyPair:
    return make_pair("someone else", serial=3)


@pytest.fixture(scope="module")
def signed(db: KeyPair) -> bytes:
    return sign_pe((DATA / "trailing-odd.efi").read_bytes(), FileSigner(db))


def test_test_signer_satisfies_the_protocol(db: KeyPair) -> None:
    assert isinstance(FileSigner(db), Signer)


@pytest.mark.parametrize("name", ["plain.efi", "trailing-odd.efi", "inner-gap.efi", "pe32.efi"])
def test_sign_then_verify(name: str, db: KeyPair, ca: KeyPair) -> None:
    data = (DATA / name).read_bytes()
    out = sign_pe(data, FileSigner(db))
    assert is_signed(out)
    verify_pe(out, [db.der])
    verify_pe(out, [ca.der])  # issued by a trusted certificate
    verify_pe(out, [ca.der, db.der])


def test_signing_is_deterministic(db: KeyPair) -> None:
    data = (DATA / "plain.efi").read_bytes()
    assert sign_pe(data, FileSigner(db)) == sign_pe(data, FileSigner(db))


def test_signed_layout(signed: bytes) -> None:
    original = (DATA / "trailing-odd.efi").read_bytes()
    image = parse_pe(signed)
    padded = len(original) + (-len(original) % 8)
    assert image.cert_table_offset == padded
    assert (
        signed[: len(original)]
        == original[: image.checksum_offset]
        + signed[image.checksum_offset : image.checksum_offset + 4]
        + original[image.checksum_offset + 4 : image.cert_dir_offset]
        + signed[image.cert_dir_offset : image.cert_dir_offset + 8]
        + original[image.cert_dir_offset + 8 :]
    )
    assert signed[len(original) : padded] == bytes(padded - len(original))
    assert len(signed) % 8 == 0
    length, revision, cert_type = struct.unpack_from("<IHH", signed, image.cert_table_offset)
    assert (revision, cert_type) == (0x0200, 0x0002)
    assert image.cert_table_size == length + (-length % 8)
    (checksum,) = struct.unpack_from("<I", signed, image.checksum_offset)
    assert checksum == pe_checksum(signed)
    # the digest inside the signature is the padded image's, as sbsign writes it
    assert authenticode_digest(signed).hex() == (
        "36296a2dcbeacd52edeaef3b42719d29ddd288364759a28e3b8fa9f6a5b6abe9"
    )


def _signature(signed: bytes) -> Any:
    image = parse_pe(signed)
    length = struct.unpack_from("<I", signed, image.cert_table_offset)[0]
    return cms.ContentInfo.load(
        signed[image.cert_table_offset + 8 : image.cert_table_offset + length]
    )


def test_signature_is_canonical_der(signed: bytes) -> None:
    info = _signature(signed)
    raw = info.dump()
    assert info.dump(force=True) == raw


def test_spc_indirect_data_is_sbsigns(signed: bytes) -> None:
    golden = json.loads((DATA / "digests.json").read_text())["trailing-odd.efi"]
    signer_info = _signature(signed)["content"]["signer_infos"][0]
    attrs = {a["type"].dotted: a["values"][0] for a in signer_info["signed_attrs"]}
    assert attrs["1.2.840.113549.1.9.4"].native.hex() == golden["sbsign_spc_message_digest"]
    assert attrs["1.3.6.1.4.1.311.2.1.12"].dump() == b"\x30\x00"  # empty SpcSpOpusInfo
    assert set(attrs) == {"1.2.840.113549.1.9.3", "1.2.840.113549.1.9.4", "1.3.6.1.4.1.311.2.1.12"}


def test_signature_has_no_signing_time(signed: bytes) -> None:
    signing_time_oid = bytes.fromhex("06092a864886f70d010905")  # 1.2.840.113549.1.9.5
    assert signing_time_oid not in signed


def test_other_certificate_is_refused(signed: bytes, other: KeyPair) -> None:
    with pytest.raises(VerificationError, match="not by a trusted certificate"):
        verify_pe(signed, [other.der])


def test_same_name_other_key_is_refused(signed: bytes, ca: KeyPair) -> None:
    impostor = make_pair("bootchain test CA", serial=9)
    with pytest.raises(VerificationError, match="not by a trusted"):
        verify_pe(signed, [impostor.der])


def test_unsigned_image_fails_verification() -> None:
    with pytest.raises(VerificationError, match="not signed"):
        verify_pe((DATA / "plain.efi").read_bytes(), [])


def test_non_pe_is_input_error(db: KeyPair) -> None:
    with pytest.raises(InputFileError):
        verify_pe(b"not a PE file" * 10, [db.der])
    with pytest.raises(InputFileError):
        sign_pe(b"not a PE file" * 10, FileSigner(db))


def test_resigning_needs_replace(signed: bytes, db: KeyPair, other: KeyPair) -> None:
    with pytest.raises(InputFileError, match="already signed"):
        sign_pe(signed, FileSigner(other))
    resigned = sign_pe(signed, FileSigner(other), replace=True)
    verify_pe(resigned, [other.der])
    with pytest.raises(VerificationError):
        verify_pe(resigned, [db.der])
    assert authenticode_digest(resigned) == authenticode_digest(signed)
    assert sign_pe(signed, FileSigner(db), replace=True) == signed


def test_strip_signature_round_trip(signed: bytes) -> None:
    stripped = strip_signature(signed)
    assert not is_signed(stripped)
    original = (DATA / "trailing-odd.efi").read_bytes()
    assert authenticode_digest(stripped) == authenticode_digest(original + b"\0\0\0")


def test_every_signed_byte_matters(signed: bytes, db: KeyPair) -> None:
    image = parse_pe(signed)
    excluded = set(range(image.checksum_offset, image.checksum_offset + 4))
    excluded |= set(range(image.cert_dir_offset, image.cert_dir_offset + 8))
    for offset in range(0, image.cert_table_offset, 97):
        if offset in excluded:
            continue
        tampered = bytearray(signed)
        tampered[offset] ^= 0x01
        with pytest.raises((VerificationError, InputFileError)):
            verify_pe(bytes(tampered), [db.der])


def test_tampered_signature_fails(signed: bytes, db: KeyPair) -> None:
    image = parse_pe(signed)
    tampered = bytearray(signed)
    tampered[image.cert_table_offset + image.cert_table_size - 20] ^= 0x01  # in the RSA value
    with pytest.raises(VerificationError):
        verify_pe(bytes(tampered), [db.der])


@functools.cache
def fuzz_target() -> tuple[bytes, bytes]:
    """(signed image, trusted cert DER) for the fuzz test (no fixtures: hypothesis prints them)."""
    pair = make_pair("fuzz db")
    return sign_pe((DATA / "plain.efi").read_bytes(), FileSigner(pair)), pair.der


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_corrupt_certificate_table_fails_closed(data: st.DataObject) -> None:
    signed, trusted = fuzz_target()
    image = parse_pe(signed)
    # dwLength may legitimately grow into the zero padding: header fields are tested below
    start, end = image.cert_table_offset + 8, len(signed)
    tampered = bytearray(signed)
    for _ in range(data.draw(st.integers(1, 4))):
        offset = data.draw(st.integers(start, end - 1))
        tampered[offset] = data.draw(st.integers(0, 255))
    if tampered == bytearray(signed):
        return
    with pytest.raises(VerificationError):
        verify_pe(bytes(tampered), [trusted])


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("<I", 8, "length"),
        ("<I", 0x100000, "length"),
        ("<I", 100, "not DER|malformed"),
        ("<H@4", 0x0100, "revision"),
        ("<H@6", 0x0001, "revision"),
    ],
    ids=["length-header-only", "length-past-table", "length-short", "revision", "type"],
)
def test_win_certificate_header_fails_closed(
    signed: bytes, db: KeyPair, field: str, value: int, match: str
) -> None:
    fmt, _, at = field.partition("@")
    tampered = bytearray(signed)
    struct.pack_into(fmt, tampered, parse_pe(signed).cert_table_offset + int(at or 0), value)
    with pytest.raises(VerificationError, match=match):
        verify_pe(bytes(tampered), [db.der])


def test_length_covering_the_padding_is_accepted(signed: bytes, db: KeyPair) -> None:
    image = parse_pe(signed)
    tampered = bytearray(signed)
    struct.pack_into("<I", tampered, image.cert_table_offset, image.cert_table_size)
    verify_pe(bytes(tampered), [db.der])


def test_truncated_certificate_table_fails_closed(signed: bytes, db: KeyPair) -> None:
    image = parse_pe(signed)
    for cut in (8, 16, 100, image.cert_table_size - 8):
        short = bytearray(signed[: len(signed) - cut])
        struct.pack_into("<I", short, image.cert_dir_offset + 4, image.cert_table_size - cut)
        with pytest.raises((VerificationError, InputFileError)):
            verify_pe(bytes(short), [db.der])


def test_non_rsa_signer_is_refused() -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ec")])
    start = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ec_key.public_key())
        .serial_number(5)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=1))
        .sign(ec_key, hashes.SHA256())
    )

    class ECSigner:
        certificate = cert.public_bytes(DER)
        description = "test:ec"

        def sign(self, data: bytes) -> bytes:
            return ec_key.sign(data, ec.ECDSA(hashes.SHA256()))

    with pytest.raises(InputFileError, match="not RSA"):
        sign_pe((DATA / "plain.efi").read_bytes(), ECSigner())


def test_signer_certificate_must_be_der(db: KeyPair) -> None:
    class BadSigner(FileSigner):
        @property
        def certificate(self) -> bytes:
            return b"\x30\x03\x02\x01\x01"

    with pytest.raises(InputFileError, match=r"not DER X\.509"):
        sign_pe((DATA / "plain.efi").read_bytes(), BadSigner(db))


def _esl(certs: list[bytes], sig_type: uuid.UUID = EFI_CERT_X509_GUID) -> bytes:
    out = b""
    owner = uuid.UUID("11111111-2222-3333-4444-555555555555").bytes_le
    for der in certs:
        size = 16 + len(der)
        out += sig_type.bytes_le + struct.pack("<III", 28 + size, 0, size) + owner + der
    return out


def test_esl_certificates_are_trusted(db: KeyPair, ca: KeyPair) -> None:
    sha256_list = uuid.UUID("c1c41626-504c-4092-aca9-41f936934328")
    esl = _esl([db.der, ca.der]) + _esl([hashlib.sha256(b"x").digest()], sha256_list)
    assert load_certificates(esl, "db.esl") == [db.der, ca.der]


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        (b"\x00" * 20, "truncated"),
        (EFI_CERT_X509_GUID.bytes_le + struct.pack("<III", 1000, 0, 100), "SignatureListSize"),
        (EFI_CERT_X509_GUID.bytes_le + struct.pack("<III", 28 + 33, 0, 17) + bytes(33), "divide"),
        (_esl([b"not a certificate"]), "not an X.509"),
        (_esl([hashlib.sha256(b"x").digest()], uuid.UUID(int=5)), "no certificate"),
    ],
    ids=["truncated", "list-size-lies", "signature-size-lies", "bad-cert", "no-x509-list"],
)
def test_bad_esl_fails_closed(blob: bytes, match: str) -> None:
    with pytest.raises(InputFileError, match=match):
        load_certificates(blob, "db.esl")


def test_load_certificates_pem_and_der(db: KeyPair, ca: KeyPair) -> None:
    pem = db.cert.public_bytes(serialization.Encoding.PEM) + ca.cert.public_bytes(
        serialization.Encoding.PEM
    )
    assert load_certificates(pem, "x.pem") == [db.der, ca.der]
    assert load_certificates(db.der, "x.der") == [db.der]
    with pytest.raises(InputFileError, match="no certificate"):
        load_certificates(b"\x00" * 3, "junk")


def _with_signature(signed: bytes, der: bytes) -> bytes:
    """``signed`` with its one WIN_CERTIFICATE replaced by one holding ``der``."""
    image = parse_pe(signed)
    length = 8 + len(der)
    table = struct.pack("<IHH", length, 0x0200, 0x0002) + der + bytes(-length % 8)
    out = bytearray(signed[: image.cert_table_offset] + table)
    struct.pack_into("<II", out, image.cert_dir_offset, image.cert_table_offset, len(table))
    return bytes(out)


def test_bug_a_detached_signature_raised_attribute_error(signed: bytes, db: KeyPair) -> None:
    info = _signature(signed)
    info["content"]["encap_content_info"]["content"] = None
    with pytest.raises(VerificationError, match="no SpcIndirectDataContent"):
        verify_pe(_with_signature(signed, info.dump(force=True)), [db.der])


def test_bug_the_unsigned_signature_algorithm_could_name_another_hash(
    signed: bytes, db: KeyPair
) -> None:
    info = _signature(signed)
    info["content"]["signer_infos"][0]["signature_algorithm"] = {
        "algorithm": "sha1_rsa",
        "parameters": None,
    }
    tampered = _with_signature(signed, info.dump(force=True))
    with pytest.raises(VerificationError, match="sha1_rsa disagrees with digest sha256"):
        verify_pe(tampered, [db.der])


def test_bug_a_malformed_signature_error_spanned_several_lines(signed: bytes, db: KeyPair) -> None:
    info = _signature(signed)
    encap = info["content"]["encap_content_info"]
    encap["content"] = cms.ParsableOctetString(b"\x30\x03\x02\x01\x01")
    with pytest.raises(VerificationError, match="malformed") as caught:
        verify_pe(_with_signature(signed, info.dump(force=True)), [db.der])
    assert "\n" not in caught.value.one_line()
