"""builder.uki: the section plan and the PE writer (synthetic stub; the real stub is in
tests/integration/test_signing_oracles.py with systemd-measure and objcopy as oracles)."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest

from builder.errors import InputFileError, UserInputError
from builder.pe import parse_pe, pe_checksum
from builder.uki import (
    SECTION_CHARACTERISTICS,
    STUB_252_MEASURED_ORDER,
    UKISection,
    make_uki,
    read_uki_sections,
)

DATA = Path(__file__).parent.parent / "data" / "pe"
SDE = 1_700_000_000


def stub() -> bytes:
    return (DATA / "plain.efi").read_bytes()


def kernel() -> bytes:
    return (DATA / "unsorted.efi").read_bytes()


def plan() -> list[UKISection]:
    rng = random.Random(7)
    return [
        UKISection(".osrel", b"ID=debian\nVERSION_ID=12\n", True),
        UKISection(".cmdline", b"console=ttyS0 quiet", True),
        UKISection(".initrd", rng.randbytes(5000), True),
        UKISection(".linux", kernel(), True),
        UKISection(".pcrsig", b'{"sha256":[]}', False),
    ]


def test_make_uki_is_byte_identical_twice() -> None:
    assert make_uki(stub(), plan(), SDE) == make_uki(stub(), plan(), SDE)


def test_sections_read_back_from_final_bytes() -> None:
    uki = make_uki(stub(), plan(), SDE)
    assert read_uki_sections(uki) == {s.name: s.data for s in plan()}


def test_layout_follows_the_stub() -> None:
    base = parse_pe(stub())
    uki = make_uki(stub(), plan(), SDE)
    image = parse_pe(uki)
    old, new = image.sections[: len(base.sections)], image.sections[len(base.sections) :]
    assert old == base.sections
    assert [s.name for s in new] == [s.name for s in plan()]
    prev_end = max(s.virtual_address + max(s.virtual_size, s.raw_size) for s in old)
    raw = base.data_end
    for section, planned in zip(new, plan(), strict=True):
        assert section.virtual_size == len(planned.data)
        assert section.virtual_address % base.section_alignment == 0
        assert section.virtual_address >= prev_end
        assert section.raw_offset == raw
        assert section.raw_size % base.file_alignment == 0
        assert section.characteristics == SECTION_CHARACTERISTICS
        prev_end = section.virtual_address + section.virtual_size
        raw = section.raw_end
    assert image.size_of_image % base.section_alignment == 0
    assert image.size_of_image >= prev_end
    (timestamp,) = struct.unpack_from("<I", uki, image.timestamp_offset)
    assert timestamp == SDE
    (checksum,) = struct.unpack_from("<I", uki, image.checksum_offset)
    assert checksum == pe_checksum(uki)
    opt = image.optional_offset
    (init_old,) = struct.unpack_from("<I", stub(), opt + 8)
    (init_new,) = struct.unpack_from("<I", uki, opt + 8)
    assert init_new - init_old == sum(s.raw_size for s in new)


def test_source_date_epoch_changes_only_timestamp_and_checksum() -> None:
    a = make_uki(stub(), plan(), SDE)
    b = make_uki(stub(), plan(), SDE + 1)
    image = parse_pe(a)
    diff = {i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y}
    allowed = set(range(image.timestamp_offset, image.timestamp_offset + 4))
    allowed |= set(range(image.checksum_offset, image.checksum_offset + 4))
    assert diff and diff <= allowed


def test_measured_order_is_the_stub_252_order() -> None:
    assert STUB_252_MEASURED_ORDER == (
        ".linux",
        ".osrel",
        ".cmdline",
        ".initrd",
        ".splash",
        ".dtb",
        ".pcrpkey",
    )


def _signed(data: bytes) -> bytes:
    out = bytearray(data + bytes(-len(data) % 8))
    image = parse_pe(out)
    struct.pack_into("<II", out, image.cert_dir_offset, len(out), 16)
    return bytes(out) + struct.pack("<IHH", 16, 0x200, 2) + bytes(8)


def _no_room(data: bytes) -> bytes:
    out = bytearray(data)
    image = parse_pe(out)
    struct.pack_into("<I", out, image.optional_offset + 60, 0x200)
    return bytes(out)


REFUSED: list[tuple[str, bytes, list[UKISection], type[Exception], str]] = [
    ("uname", stub(), [UKISection(".uname", b"6.1", True)], UserInputError, "'.uname'"),
    ("sbat", stub(), [UKISection(".sbat", b"sbat,1", False)], UserInputError, "'.sbat'"),
    ("ucode", stub(), [UKISection(".ucode", b"x", True)], UserInputError, "'.ucode'"),
    ("twice", stub(), [UKISection(".osrel", b"a", True)] * 2, UserInputError, "twice"),
    ("measure-flag", stub(), [UKISection(".osrel", b"a", False)], UserInputError, "measure"),
    ("pcrsig-measured", stub(), [UKISection(".pcrsig", b"{}", True)], UserInputError, "measure"),
    ("empty", stub(), [UKISection(".cmdline", b"", True)], UserInputError, "empty"),
    ("linux-not-pe", stub(), [UKISection(".linux", b"\x1f\x8b" * 64, True)], InputFileError, "PE"),
    ("signed-stub", _signed(stub()), plan(), InputFileError, "already signed"),
    ("no-header-room", _no_room(stub()), plan(), InputFileError, "header room"),
    ("pe32-stub", (DATA / "pe32.efi").read_bytes(), plan(), InputFileError, "PE32\\+"),
    ("stub-not-pe", b"\x7fELF" + bytes(100), plan(), InputFileError, "MZ"),
]


@pytest.mark.parametrize(
    ("stub_bytes", "sections", "error", "match"),
    [r[1:] for r in REFUSED],
    ids=[r[0] for r in REFUSED],
)
def test_refused(
    stub_bytes: bytes, sections: list[UKISection], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        make_uki(stub_bytes, sections, SDE)


def test_timestamp_out_of_range_is_refused() -> None:
    with pytest.raises(UserInputError, match="SOURCE_DATE_EPOCH"):
        make_uki(stub(), plan(), 1 << 32)


def test_read_uki_sections_refuses_duplicates() -> None:
    uki = bytearray(make_uki(stub(), plan(), SDE))
    image = parse_pe(uki)
    cmdline = next(s for s in image.sections if s.name == ".cmdline")
    uki[cmdline.header_offset : cmdline.header_offset + 8] = b".osrel\0\0"
    with pytest.raises(InputFileError, match="twice"):
        read_uki_sections(bytes(uki))
