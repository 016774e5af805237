"""GPT + FAT32 writer: codecs, layout rules, reproducibility, read-back."""

from __future__ import annotations

import hashlib
import struct
import uuid
import zlib
from pathlib import Path

import pytest

from builder import disk
from builder.errors import InputFileError, UserInputError

# The repo copy of shared/vectors/ovmf-2022.11-q35-secboot/eventlog.bin (see its NOTE.md).
VECTOR_LOG = Path(__file__).resolve().parents[1] / "data" / "eventlog" / "eventlog.bin"
SDE = 1700000000
FILES = {
    "EFI/BOOT/BOOTX64.EFI": b"MZ" + bytes(range(256)) * 300,
    "EFI/Linux/debian-minimal-1.0.0.efi": b"MZ" + b"\x5a" * 2_000_001,
    "loader/loader.conf": b"timeout 0\n",
    "loader/entries/a-long-name-spanning-several-lfn-slots.conf": b"",
}
LAYOUT = disk.DiskLayout(size_mib=40, esp_size_mib=36)


def _vector_gpt_event() -> bytes:
    """The EV_EFI_GPT_EVENT data of the reference boot (recorded by OVMF, see its README)."""
    log = VECTOR_LOG.read_bytes()
    at = log.find(b"EFI PART")
    size = struct.unpack_from("<I", log, at - 4)[0]
    return log[at : at + size]


def test_vector_gpt_event_round_trips_through_our_codec() -> None:
    data = _vector_gpt_event()
    header = disk.GptHeader.parse(data)
    assert bytes(header) == data[: header.header_size]
    (count,) = struct.unpack_from("<Q", data, header.header_size)
    entries = data[header.header_size + 8 :]
    assert len(entries) == count * header.entry_size
    entry = disk.GptEntry.parse(entries[: header.entry_size])
    assert entry.type_guid == disk.ESP_TYPE
    assert bytes(entry) == entries[: header.entry_size]


def test_lfn_checksum_known_value() -> None:
    # Recorded from mtools 4.0.32: mcopy of debian-minimal-1.0.0.efi onto a mkfs.fat volume
    # wrote short name DEBIAN~1EFI and LFN entries with checksum 0x79.
    assert disk.lfn_checksum(b"DEBIAN~1EFI") == 0x79


@pytest.mark.parametrize(
    ("name", "short", "lfn"),
    [
        ("BOOTX64.EFI", b"BOOTX64 EFI", False),
        ("EFI", b"EFI        ", False),
        ("Linux", b"LINUX      ", True),
        ("loader.conf", b"LOADER~1CON", True),
        ("debian-minimal-1.0.0.efi", b"DEBIAN~1EFI", True),
        ("a b.txt", b"AB~1    TXT", True),
    ],
    ids=["plain-83", "plain-dir", "mixed-case", "long-ext", "dots", "space"],
)
def test_short_names(name: str, short: bytes, lfn: bool) -> None:
    assert disk._short_name(name, set()) == (short, lfn)


def test_short_name_collision_gets_next_tail() -> None:
    assert disk._short_name("debian-other.efi", {b"DEBIAN~1EFI"}) == (b"DEBIAN~2EFI", True)
    assert disk._short_name("Boot.efi", {b"BOOT    EFI"}) == (b"BOOT~1  EFI", True)


def test_fat_datetime_utc() -> None:
    # 2023-11-14 22:13:20 UTC
    date, time, tenth = disk.fat_datetime(SDE)
    assert (date >> 9) + 1980 == 2023 and (date >> 5) & 15 == 11 and date & 31 == 14
    assert time >> 11 == 22 and (time >> 5) & 63 == 13 and (time & 31) * 2 == 20
    assert tenth == 0
    assert disk.fat_datetime(0)[0] == (0 << 9) | (1 << 5) | 1  # clamped to 1980-01-01


@pytest.mark.parametrize(
    ("mib", "spc"), [(36, 1), (100, 2), (200, 4), (300, 8)], ids=["36M", "100M", "200M", "300M"]
)
def test_geometry_is_fat32(mib: int, spc: int) -> None:
    geo = disk.fat32_geometry(mib * 2048)
    assert geo.sectors_per_cluster == spc
    assert geo.clusters >= disk.FAT32_MIN_CLUSTERS
    assert geo.fat_sectors * 512 // 4 >= geo.clusters + 2


def test_make_disk_gpt_and_files(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    table = disk.make_disk(img, LAYOUT, FILES, seed=b"recipe", source_date_epoch=SDE)
    assert img.stat().st_size == 40 << 20
    again = disk.read_gpt(img)
    assert again == table
    esp = table.partitions[0]
    assert (esp.first_lba, esp.last_lba) == (2048, 2048 + 36 * 2048 - 1)
    assert table.header.disk_guid == disk.derive_guid(b"recipe", "disk")
    assert table.header.disk_guid.version == 4
    assert disk.read_esp_files(img) == FILES
    raw = img.read_bytes()
    assert raw[510:512] == b"\x55\xaa" and raw[450] == 0xEE
    backup = disk.GptHeader.parse(raw[-512:])
    assert backup.my_lba == table.total_sectors - 1 and backup.alternate_lba == 1
    entries_at = backup.entries_lba * 512
    assert zlib.crc32(raw[entries_at : entries_at + 128 * 128]) == backup.entries_crc32


def test_gpt_event_data_layout(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    part = disk.Partition("data", disk.LINUX_DATA_TYPE, 2, content=b"payload")
    layout = disk.DiskLayout(size_mib=40, esp_size_mib=36, partitions=(part,))
    disk.make_disk(img, layout, FILES, seed=b"r", source_date_epoch=SDE)
    data = disk.gpt_event_data(img)
    raw = img.read_bytes()
    assert data[:92] == raw[512 : 512 + 92]
    assert struct.unpack_from("<Q", data, 92)[0] == 2
    assert data[100:] == raw[1024 : 1024 + 256]
    start = disk.read_gpt(img).partitions[1].first_lba * 512
    assert raw[start : start + 7] == b"payload"


def test_two_builds_identical_and_seed_matters(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.img", tmp_path / "b.img", tmp_path / "c.img"
    disk.make_disk(a, LAYOUT, FILES, seed=b"x", source_date_epoch=SDE)
    disk.make_disk(b, LAYOUT, dict(reversed(FILES.items())), seed=b"x", source_date_epoch=SDE)
    disk.make_disk(c, LAYOUT, FILES, seed=b"y", source_date_epoch=SDE)
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (a, b, c)]
    assert digest[0] == digest[1] != digest[2]


def test_patch_esp_file(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    disk.make_disk(img, LAYOUT, FILES, seed=b"x", source_date_epoch=SDE)
    disk.patch_esp_file(img, "EFI/BOOT/BOOTX64.EFI", 10, b"\xff")
    got = disk.read_esp_files(img)["EFI/BOOT/BOOTX64.EFI"]
    want = bytearray(FILES["EFI/BOOT/BOOTX64.EFI"])
    want[10] = 0xFF
    assert got == bytes(want)
    with pytest.raises(UserInputError, match="cannot patch"):
        disk.patch_esp_file(img, "loader/loader.conf", 9, b"ab")


@pytest.mark.parametrize(
    ("layout", "files", "match"),
    [
        (disk.DiskLayout(40, 40), FILES, "does not fit"),
        (disk.DiskLayout(40, 20), FILES, "too small for FAT32"),
        (disk.DiskLayout(40, 36), {"big.bin": b"\0" * (37 << 20)}, "more than"),
        (
            disk.DiskLayout(
                40, 36, (disk.Partition("d", disk.LINUX_DATA_TYPE, 1, b"x" * (2 << 20)),)
            ),
            FILES,
            "exceeds",
        ),
        (disk.DiskLayout(40, 36), {"EFI/a": b"", "efi/b": b""}, "clashes"),
        (disk.DiskLayout(40, 36), {"EFI/../x": b""}, "component"),
        (disk.DiskLayout(40, 36), {"a:b": b""}, "not allowed"),
        (disk.DiskLayout(40, 36), {"EFI": b"", "EFI/x": b""}, "clashes"),
    ],
    ids=[
        "esp-bigger-than-disk",
        "esp-too-small",
        "file-too-big",
        "content-too-big",
        "case-clash",
        "dotdot",
        "bad-char",
        "file-vs-dir",
    ],
)
def test_bad_layouts(
    tmp_path: Path, layout: disk.DiskLayout, files: dict[str, bytes], match: str
) -> None:
    img = tmp_path / "disk.img"
    with pytest.raises(UserInputError, match=match):
        disk.make_disk(img, layout, files, seed=b"x", source_date_epoch=SDE)
    assert list(tmp_path.iterdir()) == []  # no temp file left behind


def test_read_gpt_rejects_corruption(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    disk.make_disk(img, LAYOUT, FILES, seed=b"x", source_date_epoch=SDE)
    with img.open("r+b") as f:
        f.seek(1024 + 40)
        f.write(b"\x01")
    with pytest.raises(InputFileError, match="entries CRC32"):
        disk.read_gpt(img)


def test_derive_guid_is_stable() -> None:
    g = disk.derive_guid(b"seed", "disk")
    assert g == uuid.UUID(bytes=hashlib.sha256(b"seeddisk").digest()[:16], version=4)
    assert g.variant == uuid.RFC_4122


def test_rewrite_esp_keeps_gpt_and_changes_files(tmp_path: Path) -> None:
    src, dst = tmp_path / "a.img", tmp_path / "b.img"
    part = disk.Partition("data", disk.LINUX_DATA_TYPE, 2, content=b"payload")
    layout = disk.DiskLayout(size_mib=40, esp_size_mib=36, partitions=(part,))
    disk.make_disk(src, layout, FILES, seed=b"x", source_date_epoch=SDE, label="BOOTCHAIN")
    changes: dict[str, bytes | None] = {
        "EFI/BOOT/BOOTX64.EFI": b"MZ-other",
        "loader/loader.conf": None,
        "EFI/new.txt": b"new",
    }
    disk.rewrite_esp(src, dst, changes, source_date_epoch=SDE)
    assert disk.gpt_event_data(dst) == disk.gpt_event_data(src)
    want = {k: v for k, v in {**FILES, **changes}.items() if v is not None}
    assert disk.read_esp_files(dst) == want
    a, b = src.read_bytes(), dst.read_bytes()
    assert a[-33 * 512 :] == b[-33 * 512 :]
    esp_at = 2048 * 512
    assert a[esp_at + 67 : esp_at + 82] == b[esp_at + 67 : esp_at + 82]  # volume id + label
    data_at = disk.read_gpt(dst).partitions[1].first_lba * 512
    assert b[data_at : data_at + 7] == b"payload"
    disk.make_disk(
        tmp_path / "c.img", layout, want, seed=b"x", source_date_epoch=SDE, label="BOOTCHAIN"
    )
    assert (tmp_path / "c.img").read_bytes() == b  # same as building it that way
    with pytest.raises(UserInputError, match="no file"):
        disk.rewrite_esp(src, dst, {"nope": None}, source_date_epoch=SDE)


# Regression: a disk larger than the file system allows (EFBIG from ftruncate) was an OSError
# traceback, and the partial temp file had to be cleaned by hand.
def test_disk_too_large_for_the_file_system_is_one_line(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    for size_mib in (1 << 40, 1 << 44):  # EFBIG on ext4/tmpfs; beyond off_t everywhere
        layout = disk.DiskLayout(size_mib=size_mib, esp_size_mib=36, partitions=())
        with pytest.raises(UserInputError, match=r"disk\.img: cannot write a \d+ MiB disk"):
            disk.make_disk(img, layout, FILES, seed=b"r", source_date_epoch=SDE)
        assert list(tmp_path.iterdir()) == []
