"""EFI signature lists and .auth payloads: round trips and efitools golden files."""

from __future__ import annotations

import hashlib
import struct
import uuid
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from builder.errors import InputFileError, VerificationError
from builder.secureboot import esl
from builder.secureboot.signers import FileSigner

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "keys.example"
GOLDEN = ROOT / "tests" / "data" / "secureboot"
EXAMPLE_SDE = 1764115200  # 2025-11-26 00:00:00 UTC, see tests/data/secureboot/NOTE.md
OWNER = uuid.UUID("93fbfa33-1af0-4344-ae61-700c61a5f85a")  # keys.example/keyset.json
SIGNED_BY = {"PK": "PK", "KEK": "PK", "db": "KEK"}


@pytest.mark.parametrize("role", ["PK", "KEK", "db"])
def test_esl_matches_cert_to_efi_sig_list(role: str) -> None:
    golden = (GOLDEN / f"{role}.efitools.esl").read_bytes()
    der = (EXAMPLE / f"{role}.der").read_bytes()
    assert bytes(esl.x509_list(OWNER, der)) == golden
    parsed = esl.SignatureList.parse(golden)
    assert parsed.type == esl.EFI_CERT_X509_GUID
    assert parsed.signatures == (esl.SignatureData(OWNER, der),)
    assert bytes(parsed) == golden


@pytest.mark.parametrize("role", ["PK", "KEK", "db"])
def test_auth_matches_sign_efi_sig_list(role: str) -> None:
    golden = (GOLDEN / f"{role}.efitools.auth").read_bytes()
    signer = FileSigner(EXAMPLE / f"{SIGNED_BY[role]}.key", EXAMPLE / f"{SIGNED_BY[role]}.crt")
    data = (EXAMPLE / f"{role}.esl").read_bytes()
    auth = esl.sign_variable(role, data, signer, esl.EfiTime.from_epoch(EXAMPLE_SDE))
    assert bytes(auth) == golden
    parsed = esl.AuthenticatedVariable.parse(golden)
    assert parsed == auth
    assert bytes(parsed) == golden
    esl.verify_variable(role, parsed, signer.certificate)


def test_auth_signed_by_wrong_key_fails() -> None:
    auth = esl.AuthenticatedVariable.parse((GOLDEN / "db.efitools.auth").read_bytes())
    with pytest.raises(VerificationError, match="does not verify"):
        esl.verify_variable("db", auth, (EXAMPLE / "PK.der").read_bytes())
    with pytest.raises(VerificationError, match="does not verify"):
        esl.verify_variable("KEK", auth, (EXAMPLE / "KEK.der").read_bytes())


def test_efi_time_from_epoch() -> None:
    t = esl.EfiTime.from_epoch(EXAMPLE_SDE)
    assert (t.year, t.month, t.day, t.hour, t.minute, t.second) == (2025, 11, 26, 0, 0, 0)
    assert bytes(t) == struct.pack("<HBBBBBBLhBB", 2025, 11, 26, 0, 0, 0, 0, 0, 0, 0, 0)
    assert esl.EfiTime.parse(bytes(t)) == t


def test_database_with_hashes_round_trips() -> None:
    digests = [hashlib.sha256(bytes([i])).digest() for i in range(3)]
    db = esl.SignatureDatabase(
        (
            esl.x509_list(OWNER, (EXAMPLE / "db.der").read_bytes()),
            esl.sha256_list(OWNER, digests),
        )
    )
    blob = bytes(db)
    again = esl.SignatureDatabase.parse(blob)
    assert again == db
    assert bytes(again) == blob
    assert [s.data for k, s in again.entries() if k == esl.EFI_CERT_SHA256_GUID] == digests
    assert len(again.certificates()) == 1


@given(
    owners=st.lists(st.uuids(), min_size=1, max_size=5),
    size=st.integers(min_value=0, max_value=40),
    header=st.binary(max_size=8),
    kind=st.uuids(),
)
def test_any_list_round_trips(
    owners: list[uuid.UUID], size: int, header: bytes, kind: uuid.UUID
) -> None:
    if kind in (esl.EFI_CERT_X509_GUID, esl.EFI_CERT_SHA256_GUID):
        return
    sigs = tuple(esl.SignatureData(o, bytes([i]) * size) for i, o in enumerate(owners))
    blob = bytes(esl.SignatureList(kind, sigs, header))
    assert bytes(esl.SignatureList.parse(blob)) == blob
    assert bytes(esl.SignatureDatabase.parse(blob + blob)) == blob + blob


def _list_header(size: int, header_size: int, sig_size: int) -> bytes:
    return struct.pack("<16sLLL", esl.EFI_CERT_SHA256_GUID.bytes_le, size, header_size, sig_size)


BAD_LISTS = {
    "truncated-header": b"\x00" * 20,
    "size-past-end": _list_header(28 + 48, 0, 48),
    "size-smaller-than-header": _list_header(10, 0, 48),
    "signature-size-too-small": _list_header(28 + 8, 0, 8) + b"\x00" * 8,
    "signature-size-not-dividing": _list_header(28 + 50, 0, 48) + b"\x00" * 50,
    "no-signatures": _list_header(28, 0, 48),
    "sha256-of-wrong-size": _list_header(28 + 40, 0, 40) + b"\x00" * 40,
}


@pytest.mark.parametrize("blob", BAD_LISTS.values(), ids=BAD_LISTS.keys())
def test_bad_lists_raise_one_line(blob: bytes) -> None:
    with pytest.raises(InputFileError, match="EFI_SIGNATURE_LIST at offset 0x0") as info:
        esl.SignatureDatabase.parse(blob)
    assert "\n" not in str(info.value)


def test_trailing_bytes_after_single_list() -> None:
    blob = bytes(esl.sha256_list(OWNER, [b"\x01" * 32]))
    with pytest.raises(InputFileError, match="trailing bytes"):
        esl.SignatureList.parse(blob + b"\x00")


BAD_AUTH = {
    "truncated": b"\x00" * 30,
    "wrong-cert-type": bytes(esl.EfiTime.from_epoch(0))
    + struct.pack("<LHH16s", 24, 0x200, 0x0002, esl.EFI_CERT_TYPE_PKCS7_GUID.bytes_le),
    "wrong-cert-guid": bytes(esl.EfiTime.from_epoch(0))
    + struct.pack("<LHH16s", 24, 0x200, 0x0EF1, esl.EFI_CERT_X509_GUID.bytes_le),
    "length-past-end": bytes(esl.EfiTime.from_epoch(0))
    + struct.pack("<LHH16s", 999, 0x200, 0x0EF1, esl.EFI_CERT_TYPE_PKCS7_GUID.bytes_le),
}


@pytest.mark.parametrize("blob", BAD_AUTH.values(), ids=BAD_AUTH.keys())
def test_bad_auth_raises(blob: bytes) -> None:
    with pytest.raises(InputFileError):
        esl.AuthenticatedVariable.parse(blob)


def test_x509_list_holds_one_certificate() -> None:
    sig = esl.SignatureData(OWNER, b"x" * 10)
    with pytest.raises(ValueError, match="exactly one"):
        esl.SignatureList(esl.EFI_CERT_X509_GUID, (sig, sig))
