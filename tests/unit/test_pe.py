"""builder.pe: header parsing fails closed; Authenticode digests match pesign/sbsign vectors."""

from __future__ import annotations

import hashlib
import json
import random
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from builder.errors import InputFileError
from builder.pe import (
    authenticode_digest,
    describe_pe,
    is_signed,
    parse_pe,
    pe_checksum,
    word_sum,
)

DATA = Path(__file__).parent.parent / "data" / "pe"
GOLDEN: dict[str, dict[str, str]] = json.loads((DATA / "digests.json").read_text())


def load(name: str) -> bytes:
    return (DATA / name).read_bytes()


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_digest_matches_recorded_tools(name: str) -> None:
    data = load(name)
    assert authenticode_digest(data).hex() == GOLDEN[name]["sha256"]
    assert authenticode_digest(data, "sha1").hex() == GOLDEN[name]["sha1"]


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_checksum_matches_pefile_vector(name: str) -> None:
    assert pe_checksum(load(name)) == int(GOLDEN[name]["checksum"], 16)


def test_checksum_ignores_its_own_field() -> None:
    data = bytearray(load("plain.efi"))
    field = parse_pe(data).checksum_offset
    struct.pack_into("<I", data, field, 0xDEADBEEF)
    assert pe_checksum(data) == int(GOLDEN["plain.efi"]["checksum"], 16)


def test_padding_to_8_is_hashed_once_it_is_in_the_file() -> None:
    data = load("trailing-odd.efi")
    padded = data + bytes(-len(data) % 8)
    assert authenticode_digest(padded).hex() == GOLDEN["trailing-odd.efi"]["sha256_padded_to_8"]


def test_digest_excludes_checksum_and_security_entry_only() -> None:
    data = bytearray(load("plain.efi"))
    image = parse_pe(data)
    before = authenticode_digest(data)
    struct.pack_into("<I", data, image.checksum_offset, 0x12345678)
    assert authenticode_digest(data) == before
    for hashed in (image.checksum_offset + 4, image.cert_dir_offset - 1, image.cert_dir_offset + 8):
        flipped = bytearray(data)
        flipped[hashed] ^= 1  # Subsystem, the entry before and the entry after the cert entry
        assert authenticode_digest(flipped) != before, hex(hashed)


def test_digest_covers_every_section_byte() -> None:
    data = bytearray(load("unsorted.efi"))
    before = authenticode_digest(data)
    for section in parse_pe(data).sections:
        flipped = bytearray(data)
        flipped[section.raw_end - 1] ^= 0xFF
        assert authenticode_digest(flipped) != before, section.name


def test_unknown_algorithm_is_refused() -> None:
    with pytest.raises(InputFileError, match="md5"):
        authenticode_digest(load("plain.efi"), "md5")


def test_describe_pe_reports_sections_and_digests() -> None:
    data = load("plain.efi")
    desc = describe_pe(data)
    assert [s.name for s in desc.sections] == [".text", ".data", ".sbat"]
    text = desc.sections[0]
    assert (text.virtual_size, text.raw_size) == (0x5F0, 0x600)
    assert text.sha256 == hashlib.sha256(data[0x400 : 0x400 + 0x5F0]).hexdigest()
    assert desc.authenticode_sha256 == GOLDEN["plain.efi"]["sha256"]
    assert desc.sha256 == hashlib.sha256(data).hexdigest()
    assert desc.pe32plus and not desc.signed


def test_unsigned_fixture_is_not_signed() -> None:
    assert not is_signed(load("plain.efi"))


def _set(data: bytes, fmt: str, offset: int, *values: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, *values)
    return bytes(out)


def _bad_inputs() -> list[tuple[str, bytes, str]]:
    plain = load("plain.efi")
    image = parse_pe(plain)
    opt = image.optional_offset
    text = image.sections[0]
    return [
        ("empty", b"", "DOS header"),
        ("not-mz", b"ZM" + plain[2:], "no 'MZ'"),
        ("truncated-dos", plain[:0x30], "DOS header"),
        ("e_lfanew-past-end", _set(plain, "<I", 0x3C, 0x10000), "0x10000"),
        ("no-pe-signature", _set(plain, "<I", 0x80, 0), "no 'PE"),
        ("truncated-optional", plain[: opt + 40], "optional header"),
        ("bad-magic", _set(plain, "<H", opt, 0x107), "magic 0x107"),
        ("too-many-sections", _set(plain, "<H", image.coff_offset + 2, 200), "200 sections"),
        ("section-past-end", _set(plain, "<I", text.header_offset + 16, 0x100000), "runs past"),
        ("raw-offset-in-headers", _set(plain, "<I", text.header_offset + 20, 0x200), "overlaps"),
        ("overlapping-sections", _set(plain, "<I", text.header_offset + 16, 0x800), "overlap"),
        ("size-of-headers-lies", _set(plain, "<I", opt + 60, 0x100000), "SizeOfHeaders"),
        ("headers-before-table", _set(plain, "<I", opt + 60, 0x100), "SizeOfHeaders"),
        ("few-directories", _set(plain, "<I", opt + 108, 4), "NumberOfRvaAndSizes"),
        ("many-directories", _set(plain, "<I", opt + 108, 0x1000), "NumberOfRvaAndSizes"),
        (
            "cert-table-past-end",
            _set(plain, "<II", image.cert_dir_offset, len(plain), 0x100),
            "certificate table",
        ),
        (
            "cert-table-not-at-end",
            _set(plain, "<II", image.cert_dir_offset, len(plain) - 0x200, 0x100),
            "certificate table",
        ),
        (
            "cert-table-in-sections",
            _set(plain, "<II", image.cert_dir_offset, 0xC00 - 8, len(plain) - 0xC00 + 8),
            "overlaps section",
        ),
        ("cert-address-size-0", _set(plain, "<II", image.cert_dir_offset, 0x200, 0), "size 0"),
    ]


@pytest.mark.parametrize(
    ("data", "match"), [c[1:] for c in _bad_inputs()], ids=[c[0] for c in _bad_inputs()]
)
def test_malformed_images_fail_closed(data: bytes, match: str) -> None:
    with pytest.raises(InputFileError, match=match):
        authenticode_digest(data)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 0x3FF), st.integers(0, 255)), min_size=1, max_size=8))
def test_mutated_headers_parse_or_raise_input_file_error(edits: list[tuple[int, int]]) -> None:
    data = bytearray(load("plain.efi"))
    for offset, value in edits:
        data[offset] = value
    try:
        digest = authenticode_digest(bytes(data))
    except InputFileError:
        return
    assert len(digest) == 32


@settings(max_examples=100, deadline=None)
@given(st.integers(1, len((DATA / "plain.efi").read_bytes()) - 1))
def test_every_truncation_fails_closed(length: int) -> None:
    with pytest.raises(InputFileError):
        authenticode_digest(load("plain.efi")[:length])


def _reference_checksum(data: bytes, field: int) -> int:
    """The textbook loop: 16-bit words with end-around carry, CheckSum counted as 0, + size."""
    padded = data + b"\0" * (len(data) % 2)
    total = 0
    for i in range(0, len(padded), 2):
        word = 0 if field <= i < field + 4 else padded[i] | padded[i + 1] << 8
        total += word
        total = (total & 0xFFFF) + (total >> 16)
    return total + len(data)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 3 * 65536 + 7), st.randoms(use_true_random=False))
def test_checksum_matches_the_textbook_loop(extra: int, rng: random.Random) -> None:
    data = load("plain.efi") + rng.randbytes(extra)
    field = parse_pe(data).checksum_offset
    assert pe_checksum(data) == _reference_checksum(data, field)


@pytest.mark.parametrize("split", [1, 2, 3, 0x401, 65536 + 1])
def test_word_sums_of_pieces_add_up(split: int) -> None:
    data = load("trailing-odd.efi") + bytes(range(256)) * 300
    whole = word_sum(data)
    assert (word_sum(data[:split]) + word_sum(data[split:], split)) % 0xFFFF == whole
