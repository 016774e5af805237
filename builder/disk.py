"""GPT disk images with a FAT32 EFI System Partition, written in Python.

Everything on the disk derives from the inputs: GUIDs and the FAT volume id come from ``seed``
(the recipe digest), every timestamp from SOURCE_DATE_EPOCH, directories are sorted. The image
is written sparse (seek over the zeros) into a temp file beside the target, then renamed.

Sector size is 512 bytes. Partitions start on 1 MiB boundaries.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import itertools
import os
import struct
import tempfile
import uuid
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from builder.errors import InputFileError, UserInputError

SECTOR = 512
MIB_SECTORS = (1 << 20) // SECTOR
GPT_ENTRIES = 128
GPT_ENTRY_SIZE = 128
GPT_HEADER_SIZE = 92
GPT_ENTRY_SECTORS = GPT_ENTRIES * GPT_ENTRY_SIZE // SECTOR  # 32
GPT_SIGNATURE = b"EFI PART"
GPT_REVISION = 0x00010000

ESP_TYPE = uuid.UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b")
LINUX_DATA_TYPE = uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4")
ZERO_GUID = uuid.UUID(int=0)

FAT32_MIN_CLUSTERS = 65525
_CLUSTER_MARGIN = 16  # stay clear of the FAT16/FAT32 boundary, as Microsoft advises
_RESERVED_SECTORS = 32
_NUM_FATS = 2
_BACKUP_BOOT_SECTOR = 6
_FSINFO_SECTOR = 1
_EOC = 0x0FFFFFFF
_ATTR_READ_ONLY = 0x01
_ATTR_VOLUME_ID = 0x08
_ATTR_DIRECTORY = 0x10
_ATTR_ARCHIVE = 0x20
_ATTR_LFN = 0x0F
_DIRENT = 32
_LFN_CHARS = 13
_SFN_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'()-@^_`{}~")
_LFN_FORBIDDEN = set('\\/:*?"<>|')


# --------------------------------------------------------------------------------------------
# Layout


@dataclass(frozen=True)
class Partition:
    """An extra partition after the ESP. ``content`` is written at its start when given."""

    name: str
    type_guid: uuid.UUID
    size_mib: int
    content: bytes | None = None
    attributes: int = 0


@dataclass(frozen=True)
class DiskLayout:
    """Disk size, ESP size and the partitions that follow the ESP, in table order."""

    size_mib: int
    esp_size_mib: int
    partitions: tuple[Partition, ...] = ()
    esp_name: str = "EFI System Partition"


def derive_guid(seed: bytes, label: str) -> uuid.UUID:
    """A version-4-shaped GUID from sha256(seed || label): stable for a given recipe digest."""
    digest = hashlib.sha256(seed + label.encode()).digest()
    return uuid.UUID(bytes=digest[:16], version=4)


# --------------------------------------------------------------------------------------------
# GPT codec (pure)


@dataclass(frozen=True)
class GptHeader:
    """A GPT header (``HeaderSize`` bytes as on disk; the CRC is computed when serialized)."""

    my_lba: int
    alternate_lba: int
    first_usable_lba: int
    last_usable_lba: int
    disk_guid: uuid.UUID
    entries_lba: int
    num_entries: int
    entry_size: int
    entries_crc32: int
    revision: int = GPT_REVISION
    header_size: int = GPT_HEADER_SIZE
    header_crc32: int | None = None

    _FMT = "<8sIIIIQQQQ16sQIII"

    @classmethod
    def parse(cls, data: bytes, where: str = "GPT header") -> GptHeader:
        """Parse and check signature, size and header CRC32."""
        if len(data) < GPT_HEADER_SIZE or data[:8] != GPT_SIGNATURE:
            raise InputFileError(f"{where}: no 'EFI PART' signature")
        fields = struct.unpack_from(cls._FMT, data)
        header_size = fields[2]
        if not GPT_HEADER_SIZE <= header_size <= len(data):
            raise InputFileError(f"{where}: bad HeaderSize {header_size}")
        crc = fields[3]
        raw = bytearray(data[:header_size])
        raw[16:20] = b"\0\0\0\0"
        if zlib.crc32(raw) != crc:
            raise InputFileError(f"{where}: header CRC32 mismatch")
        return cls(
            revision=fields[1],
            header_size=header_size,
            header_crc32=crc,
            my_lba=fields[5],
            alternate_lba=fields[6],
            first_usable_lba=fields[7],
            last_usable_lba=fields[8],
            disk_guid=uuid.UUID(bytes_le=fields[9]),
            entries_lba=fields[10],
            num_entries=fields[11],
            entry_size=fields[12],
            entries_crc32=fields[13],
        )

    def __bytes__(self) -> bytes:
        def pack(crc: int) -> bytes:
            return struct.pack(
                self._FMT,
                GPT_SIGNATURE,
                self.revision,
                self.header_size,
                crc,
                0,
                self.my_lba,
                self.alternate_lba,
                self.first_usable_lba,
                self.last_usable_lba,
                self.disk_guid.bytes_le,
                self.entries_lba,
                self.num_entries,
                self.entry_size,
                self.entries_crc32,
            ).ljust(self.header_size, b"\0")

        return pack(zlib.crc32(pack(0)))


@dataclass(frozen=True)
class GptEntry:
    """One GPT partition entry (128 bytes)."""

    type_guid: uuid.UUID
    unique_guid: uuid.UUID
    first_lba: int
    last_lba: int
    attributes: int
    name: str

    _FMT = "<16s16sQQQ72s"

    @classmethod
    def parse(cls, data: bytes) -> GptEntry:
        t, u, first, last, attrs, name = struct.unpack_from(cls._FMT, data)
        return cls(
            type_guid=uuid.UUID(bytes_le=t),
            unique_guid=uuid.UUID(bytes_le=u),
            first_lba=first,
            last_lba=last,
            attributes=attrs,
            name=name.decode("utf-16-le").split("\0", 1)[0],
        )

    def __bytes__(self) -> bytes:
        name = self.name.encode("utf-16-le")
        if len(name) > 72:
            raise UserInputError(f"GPT partition name {self.name!r} longer than 36 characters")
        return struct.pack(
            self._FMT,
            self.type_guid.bytes_le,
            self.unique_guid.bytes_le,
            self.first_lba,
            self.last_lba,
            self.attributes,
            name,
        )

    @property
    def empty(self) -> bool:
        return self.type_guid == ZERO_GUID


@dataclass(frozen=True)
class GptTable:
    """The primary GPT of a disk: header, all entries in table order, disk size in sectors."""

    header: GptHeader
    entries: tuple[GptEntry, ...]
    total_sectors: int

    @property
    def partitions(self) -> tuple[GptEntry, ...]:
        return tuple(e for e in self.entries if not e.empty)

    def entries_bytes(self) -> bytes:
        return b"".join(bytes(e) for e in self.entries)


def _protective_mbr(total_sectors: int) -> bytes:
    mbr = bytearray(SECTOR)
    size = min(total_sectors - 1, 0xFFFFFFFF)
    mbr[446:462] = struct.pack("<B3sB3sII", 0, b"\x00\x02\x00", 0xEE, b"\xff\xff\xff", 1, size)
    mbr[510:512] = b"\x55\xaa"
    return bytes(mbr)


def read_gpt(path: Path) -> GptTable:
    """Read and check the primary GPT of an image (and that the backup header agrees)."""
    try:
        with path.open("rb") as f:
            total = os.fstat(f.fileno()).st_size // SECTOR
            f.seek(SECTOR)
            header = GptHeader.parse(f.read(SECTOR), f"{path}: primary GPT header at LBA 1")
            if header.entry_size < GPT_ENTRY_SIZE or header.num_entries > 4096:
                raise InputFileError(f"{path}: GPT entry size/count out of range")
            f.seek(header.entries_lba * SECTOR)
            raw = f.read(header.num_entries * header.entry_size)
            f.seek((total - 1) * SECTOR)
            backup_raw = f.read(SECTOR)
    except OSError as exc:
        raise InputFileError(f"{path}: cannot read disk image: {exc.strerror}") from exc
    if zlib.crc32(raw) != header.entries_crc32:
        raise InputFileError(f"{path}: GPT partition entries CRC32 mismatch")
    backup = GptHeader.parse(backup_raw, f"{path}: backup GPT header at LBA {total - 1}")
    if backup.disk_guid != header.disk_guid or backup.entries_crc32 != header.entries_crc32:
        raise InputFileError(f"{path}: backup GPT header disagrees with the primary")
    entries = tuple(
        GptEntry.parse(raw[i * header.entry_size : (i + 1) * header.entry_size])
        for i in range(header.num_entries)
    )
    return GptTable(header=header, entries=entries, total_sectors=total)


def gpt_event_data(path: Path) -> bytes:
    """UEFI_GPT_DATA as OVMF measures it into PCR 5 (EV_EFI_GPT_EVENT).

    The primary header (HeaderSize bytes as on disk), a u64 count of non-empty entries, then
    those entries (SizeOfPartitionEntry bytes each) in table order.
    """
    table = read_gpt(path)
    with path.open("rb") as f:
        f.seek(SECTOR)
        header = f.read(table.header.header_size)
        f.seek(table.header.entries_lba * SECTOR)
        raw = f.read(table.header.num_entries * table.header.entry_size)
    size = table.header.entry_size
    chunks = [raw[i * size : (i + 1) * size] for i in range(table.header.num_entries)]
    used = [c for c in chunks if c[:16] != b"\0" * 16]
    return header + struct.pack("<Q", len(used)) + b"".join(used)


# --------------------------------------------------------------------------------------------
# FAT32 (pure: the image is a list of (offset, bytes) writes over zeros)


@dataclass(frozen=True)
class Fat32Geometry:
    """Where things are inside the FAT32 volume, in sectors from its start."""

    total_sectors: int
    sectors_per_cluster: int
    fat_sectors: int
    clusters: int

    @property
    def data_start(self) -> int:
        return _RESERVED_SECTORS + _NUM_FATS * self.fat_sectors

    @property
    def cluster_bytes(self) -> int:
        return self.sectors_per_cluster * SECTOR

    def cluster_offset(self, cluster: int) -> int:
        """Byte offset of ``cluster`` from the start of the volume."""
        return (self.data_start + (cluster - 2) * self.sectors_per_cluster) * SECTOR


def fat32_geometry(total_sectors: int) -> Fat32Geometry:
    """The largest cluster size (up to 4 KiB) that still makes a valid FAT32 volume."""
    for spc in (8, 4, 2, 1):
        upper = (total_sectors - _RESERVED_SECTORS) // spc
        fat_sectors = -(-((upper + 2) * 4) // SECTOR)
        clusters = (total_sectors - _RESERVED_SECTORS - _NUM_FATS * fat_sectors) // spc
        if clusters >= FAT32_MIN_CLUSTERS + _CLUSTER_MARGIN:
            return Fat32Geometry(total_sectors, spc, fat_sectors, clusters)
    need = (FAT32_MIN_CLUSTERS + _CLUSTER_MARGIN) * SECTOR // (1 << 20) + 2
    raise UserInputError(
        f"ESP of {total_sectors * SECTOR >> 20} MiB is too small for FAT32",
        hint=f"use esp_size_mib >= {need}",
    )


def fat_datetime(source_date_epoch: int) -> tuple[int, int, int]:
    """(date, time, tenths) in FAT encoding, UTC, clamped to 1980-01-01..2107-12-31."""
    low = int(dt.datetime(1980, 1, 1, tzinfo=dt.UTC).timestamp())
    high = int(dt.datetime(2107, 12, 31, 23, 59, 58, tzinfo=dt.UTC).timestamp())
    t = dt.datetime.fromtimestamp(min(max(source_date_epoch, low), high), dt.UTC)
    date = ((t.year - 1980) << 9) | (t.month << 5) | t.day
    time = (t.hour << 11) | (t.minute << 5) | (t.second // 2)
    return date, time, (t.second % 2) * 100


def lfn_checksum(short_name: bytes) -> int:
    """The checksum of an 11-byte short name that each VFAT long-name entry carries."""
    total = 0
    for c in short_name:
        total = (((total & 1) << 7) + (total >> 1) + c) & 0xFF
    return total


def _plain_short_name(name: str) -> bytes | None:
    """The 11-byte short name if ``name`` is already a valid upper-case 8.3 name."""
    base, dot, ext = name.partition(".")
    if not base or len(base) > 8 or len(ext) > 3 or (dot and not ext) or "." in ext:
        return None
    if not all(c in _SFN_CHARS for c in base + ext):
        return None
    return base.ljust(8).encode("ascii") + ext.ljust(3).encode("ascii")


def _short_basis(name: str) -> tuple[str, str, bool]:
    """Upper-cased basis (base, ext) for a long name and whether it lost anything."""
    stripped = name.lstrip(".").replace(" ", "")
    base, _, ext = stripped.rpartition(".") if "." in stripped else (stripped, "", "")
    lossy = stripped != name or name.count(".") > 1

    def clean(part: str) -> str:
        nonlocal lossy
        out = []
        for c in part.upper().replace(".", ""):
            if c in _SFN_CHARS:
                out.append(c)
            else:
                out.append("_")
                lossy = True
        return "".join(out)

    b, e = clean(base), clean(ext)
    if len(b) > 8 or len(e) > 3:
        lossy = True
    return b or "_", e[:3], lossy


def _short_name(name: str, taken: set[bytes]) -> tuple[bytes, bool]:
    """(11-byte short name, needs LFN) for ``name`` in a directory whose names are ``taken``."""
    plain = _plain_short_name(name)
    if plain is not None and plain not in taken:
        return plain, False
    base, ext, lossy = _short_basis(name)
    if not lossy and len(base) <= 8:
        candidate = base.ljust(8).encode() + ext.ljust(3).encode()
        if candidate not in taken:
            return candidate, True
    for n in range(1, 1000000):
        tail = f"~{n}"
        candidate = (base[: 8 - len(tail)] + tail).ljust(8).encode() + ext.ljust(3).encode()
        if candidate not in taken:
            return candidate, True
    raise UserInputError(f"ESP: no free short name for {name!r}")


def _lfn_entries(name: str, checksum: int) -> list[bytes]:
    """VFAT long-name entries for ``name``, in on-disk order (last part first)."""
    units = name.encode("utf-16-le")
    chars = [units[i : i + 2] for i in range(0, len(units), 2)]
    if len(chars) % _LFN_CHARS:
        chars.append(b"\0\0")
    while len(chars) % _LFN_CHARS:
        chars.append(b"\xff\xff")
    parts = [b"".join(chars[i : i + _LFN_CHARS]) for i in range(0, len(chars), _LFN_CHARS)]
    out = []
    for index, part in enumerate(parts, start=1):
        order = index | (0x40 if index == len(parts) else 0)
        entry = (
            bytes([order])
            + part[0:10]
            + bytes([_ATTR_LFN, 0, checksum])
            + part[10:22]
            + b"\0\0"
            + part[22:26]
        )
        out.append(entry)
    return out[::-1]


def _dirent(short: bytes, attr: int, cluster: int, size: int, stamp: tuple[int, int, int]) -> bytes:
    date, time, tenth = stamp
    return struct.pack(
        "<11sBBBHHHHHHHI",
        short,
        attr,
        0,
        tenth,
        time,
        date,
        date,
        cluster >> 16,
        time,
        date,
        cluster & 0xFFFF,
        size,
    )


@dataclass
class _Node:
    name: str
    data: bytes | None = None  # None for a directory
    children: dict[str, _Node] = field(default_factory=dict)
    cluster: int = 0
    clusters: int = 0
    short: bytes = b""
    lfn: bool = False

    @property
    def is_dir(self) -> bool:
        return self.data is None


def _check_component(component: str, path: str) -> None:
    if component in ("", ".", ".."):
        raise UserInputError(f"ESP path {path!r}: empty, '.' or '..' component")
    if len(component) > 255:
        raise UserInputError(f"ESP path {path!r}: component longer than 255 characters")
    bad = [c for c in component if c in _LFN_FORBIDDEN or ord(c) < 0x20]
    if bad or component != component.rstrip(" ."):
        raise UserInputError(f"ESP path {path!r}: character not allowed in a FAT name")


def _make_tree(files: Mapping[str, bytes]) -> _Node:
    root = _Node("")
    for path in sorted(files):
        parts = path.split("/")
        for c in parts:
            _check_component(c, path)
        node = root
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            clash = next((k for k in node.children if k.upper() == part.upper()), None)
            if clash is not None:
                child = node.children[clash]
                if clash != part or last or not child.is_dir:
                    raise UserInputError(f"ESP path {path!r} clashes with an existing entry")
                node = child
                continue
            child = _Node(part, data=bytes(files[path]) if last else None)
            node.children[part] = child
            node = child
    return root


def _sorted_children(node: _Node) -> list[_Node]:
    return sorted(node.children.values(), key=lambda n: (n.name.upper(), n.name))


def _lfn_count(name: str) -> int:
    units = len(name.encode("utf-16-le")) // 2
    return -(-units // _LFN_CHARS)


def _dir_entry_count(node: _Node, is_root: bool) -> int:
    count = 1 if is_root else 2  # volume label, or "." and ".."
    taken: set[bytes] = set()
    for child in _sorted_children(node):
        child.short, child.lfn = _short_name(child.name, taken)
        taken.add(child.short)
        count += 1 + (_lfn_count(child.name) if child.lfn else 0)
    return count + 1  # room for the end-of-directory marker


@dataclass(frozen=True)
class FatVolume:
    """A FAT32 volume as a sparse list of writes (offsets from the volume start)."""

    geometry: Fat32Geometry
    writes: tuple[tuple[int, bytes], ...]
    used_clusters: int


def make_fat32(
    total_sectors: int,
    files: Mapping[str, bytes],
    *,
    volume_id: int,
    label: str,
    source_date_epoch: int,
    hidden_sectors: int = 0,
) -> FatVolume:
    """Lay out a FAT32 volume holding ``files`` (paths with '/'), sorted, contiguous."""
    geo = fat32_geometry(total_sectors)
    label_bytes = label.upper().encode("ascii", "replace").ljust(11)
    if len(label_bytes) > 11 or not all(chr(c) in _SFN_CHARS | {" "} for c in label_bytes):
        raise UserInputError(f"FAT volume label {label!r}: at most 11 characters A-Z 0-9 _ -")
    root = _make_tree(files)
    stamp = fat_datetime(source_date_epoch)
    cb = geo.cluster_bytes

    # Allocate clusters: depth-first, sorted, each directory before its contents.
    next_cluster = 2
    order: list[tuple[_Node, _Node | None]] = []

    def allocate(node: _Node, parent: _Node | None) -> None:
        nonlocal next_cluster
        if node.is_dir:
            size = _dir_entry_count(node, parent is None) * _DIRENT
        else:
            assert node.data is not None
            size = len(node.data)
        node.clusters = -(-size // cb)
        if node.clusters:
            node.cluster = next_cluster
            next_cluster += node.clusters
        order.append((node, parent))
        for child in _sorted_children(node):
            allocate(child, node)

    allocate(root, None)
    used = next_cluster - 2
    if used > geo.clusters:
        raise UserInputError(
            f"ESP files need {used * cb} bytes, more than the {geo.clusters * cb} bytes "
            f"a {total_sectors * SECTOR >> 20} MiB FAT32 ESP holds",
            hint="raise esp_size_mib or ship smaller files",
        )

    writes: list[tuple[int, bytes]] = []
    for node, parent in order:
        if node.is_dir:
            entries: list[bytes] = []
            if parent is None:
                entries.append(_dirent(label_bytes, _ATTR_VOLUME_ID, 0, 0, stamp))
            else:
                up = parent.cluster if parent is not root else 0
                entries.append(_dirent(b".          ", _ATTR_DIRECTORY, node.cluster, 0, stamp))
                entries.append(_dirent(b"..         ", _ATTR_DIRECTORY, up, 0, stamp))
            for child in _sorted_children(node):
                if child.lfn:
                    entries.extend(_lfn_entries(child.name, lfn_checksum(child.short)))
                attr = _ATTR_DIRECTORY if child.is_dir else _ATTR_ARCHIVE
                size = 0 if child.is_dir else len(child.data or b"")
                entries.append(_dirent(child.short, attr, child.cluster, size, stamp))
            data = b"".join(entries)
        else:
            data = node.data or b""
        if data:
            writes.append((geo.cluster_offset(node.cluster), data))

    # The FAT: one contiguous chain per node.
    fat = bytearray((next_cluster) * 4)
    struct.pack_into("<II", fat, 0, 0x0FFFFFF8, _EOC)
    for node, _ in order:
        for i in range(node.clusters):
            c = node.cluster + i
            nxt = _EOC if i == node.clusters - 1 else c + 1
            struct.pack_into("<I", fat, c * 4, nxt)
    for n in range(_NUM_FATS):
        writes.append(((_RESERVED_SECTORS + n * geo.fat_sectors) * SECTOR, bytes(fat)))

    boot = _boot_sector(geo, volume_id, label_bytes, hidden_sectors)
    fsinfo = _fsinfo(free=geo.clusters - used, next_free=next_cluster)
    for base in (0, _BACKUP_BOOT_SECTOR):
        writes.append((base * SECTOR, boot))
        writes.append(((base + _FSINFO_SECTOR) * SECTOR, fsinfo))
        writes.append(((base + 2) * SECTOR, b"\0" * 510 + b"\x55\xaa"))
    return FatVolume(geometry=geo, writes=tuple(sorted(writes)), used_clusters=used)


def _boot_sector(geo: Fat32Geometry, volume_id: int, label: bytes, hidden: int) -> bytes:
    bs = bytearray(SECTOR)
    bs[0:3] = b"\xeb\x58\x90"
    bs[3:11] = b"BOOTCHN "
    struct.pack_into(
        "<HBHBHHBHHHII",
        bs,
        11,
        SECTOR,
        geo.sectors_per_cluster,
        _RESERVED_SECTORS,
        _NUM_FATS,
        0,  # root entries (FAT32: 0)
        0,  # total sectors 16
        0xF8,
        0,  # FAT size 16
        63,
        255,
        hidden,
        geo.total_sectors,
    )
    struct.pack_into(
        "<IHHIHH12sBBBI11s8s",
        bs,
        36,
        geo.fat_sectors,
        0,  # ext flags: FATs mirrored
        0,  # version 0.0
        2,  # root cluster
        _FSINFO_SECTOR,
        _BACKUP_BOOT_SECTOR,
        b"\0" * 12,
        0x80,
        0,
        0x29,
        volume_id & 0xFFFFFFFF,
        label,
        b"FAT32   ",
    )
    # Non-bootable stub: "int 0x18" style halt loop, so a legacy BIOS does nothing harmful.
    bs[90:93] = b"\xf4\xeb\xfd"
    bs[510:512] = b"\x55\xaa"
    return bytes(bs)


def _fsinfo(free: int, next_free: int) -> bytes:
    fs = bytearray(SECTOR)
    struct.pack_into("<I", fs, 0, 0x41615252)
    struct.pack_into("<III", fs, 484, 0x61417272, free, next_free)
    struct.pack_into("<I", fs, 508, 0xAA550000)
    return bytes(fs)


# --------------------------------------------------------------------------------------------
# The disk image (I/O)


def plan_gpt(layout: DiskLayout, *, seed: bytes) -> GptTable:
    """The primary GPT for ``layout``: ESP first, then the extra partitions, 1 MiB aligned."""
    if layout.size_mib <= 0 or layout.esp_size_mib <= 0:
        raise UserInputError("disk layout: size_mib and esp_size_mib must be positive")
    if len(layout.partitions) + 1 > GPT_ENTRIES:
        raise UserInputError(f"disk layout: more than {GPT_ENTRIES} partitions")
    total = layout.size_mib * MIB_SECTORS
    last_usable = total - 1 - GPT_ENTRY_SECTORS - 1
    first_usable = 2 + GPT_ENTRY_SECTORS
    entries: list[GptEntry] = []
    start = MIB_SECTORS
    specs: list[tuple[str, uuid.UUID, int, int]] = [
        (layout.esp_name, ESP_TYPE, layout.esp_size_mib, 0)
    ]
    specs += [(p.name, p.type_guid, p.size_mib, p.attributes) for p in layout.partitions]
    names: set[str] = set()
    for name, type_guid, size_mib, attrs in specs:
        if size_mib <= 0:
            raise UserInputError(f"disk layout: partition {name!r} has size_mib {size_mib}")
        if name in names:
            raise UserInputError(f"disk layout: partition name {name!r} used twice")
        names.add(name)
        end = start + size_mib * MIB_SECTORS - 1
        if end > last_usable:
            raise UserInputError(
                f"disk layout: partition {name!r} ({size_mib} MiB) does not fit in a "
                f"{layout.size_mib} MiB disk",
                hint="raise size_mib (1 MiB goes to the GPT and alignment, and the backup "
                "GPT needs the tail of the last MiB)",
            )
        entries.append(
            GptEntry(type_guid, derive_guid(seed, f"partition:{name}"), start, end, attrs, name)
        )
        start = end + 1
    empty = GptEntry(ZERO_GUID, ZERO_GUID, 0, 0, 0, "")
    entries += [empty] * (GPT_ENTRIES - len(entries))
    raw = b"".join(bytes(e) for e in entries)
    header = GptHeader(
        my_lba=1,
        alternate_lba=total - 1,
        first_usable_lba=first_usable,
        last_usable_lba=last_usable,
        disk_guid=derive_guid(seed, "disk"),
        entries_lba=2,
        num_entries=GPT_ENTRIES,
        entry_size=GPT_ENTRY_SIZE,
        entries_crc32=zlib.crc32(raw),
    )
    header = GptHeader.parse(bytes(header))  # fills header_crc32
    return GptTable(header=header, entries=tuple(entries), total_sectors=total)


def _backup_header(primary: GptHeader, total: int) -> GptHeader:
    return GptHeader(
        my_lba=total - 1,
        alternate_lba=1,
        first_usable_lba=primary.first_usable_lba,
        last_usable_lba=primary.last_usable_lba,
        disk_guid=primary.disk_guid,
        entries_lba=total - 1 - GPT_ENTRY_SECTORS,
        num_entries=primary.num_entries,
        entry_size=primary.entry_size,
        entries_crc32=primary.entries_crc32,
    )


def make_disk(
    path: Path,
    layout: DiskLayout,
    esp_files: Mapping[str, bytes],
    *,
    seed: bytes,
    source_date_epoch: int,
    volume_id: int | None = None,
    label: str = "ESP",
) -> GptTable:
    """Write a GPT disk image with a FAT32 ESP holding ``esp_files`` to ``path`` atomically.

    ``esp_files`` maps ESP paths ("EFI/BOOT/BOOTX64.EFI") to contents. GUIDs and (unless
    given) the FAT volume id derive from ``seed``. Returns the primary GPT written.
    """
    table = plan_gpt(layout, seed=seed)
    esp = table.entries[0]
    if volume_id is None:
        volume_id = int.from_bytes(hashlib.sha256(seed + b"fat-volume-id").digest()[:4], "little")
    fat = make_fat32(
        esp.last_lba - esp.first_lba + 1,
        esp_files,
        volume_id=volume_id,
        label=label,
        source_date_epoch=source_date_epoch,
        hidden_sectors=esp.first_lba,
    )
    total = table.total_sectors
    entries = table.entries_bytes()
    writes: list[tuple[int, bytes]] = [
        (0, _protective_mbr(total)),
        (SECTOR, bytes(table.header)),
        (2 * SECTOR, entries),
        ((total - 1 - GPT_ENTRY_SECTORS) * SECTOR, entries),
        ((total - 1) * SECTOR, bytes(_backup_header(table.header, total))),
    ]
    writes += [(esp.first_lba * SECTOR + off, data) for off, data in fat.writes]
    for part, entry in zip(layout.partitions, table.entries[1:], strict=False):
        if part.content:
            room = (entry.last_lba - entry.first_lba + 1) * SECTOR
            if len(part.content) > room:
                raise UserInputError(
                    f"disk layout: content of partition {part.name!r} ({len(part.content)} "
                    f"bytes) exceeds its {part.size_mib} MiB"
                )
            writes.append((entry.first_lba * SECTOR, part.content))
    _write_sparse(path, total * SECTOR, writes)
    return table


def _write_sparse(path: Path, size: int, writes: Sequence[tuple[int, bytes]]) -> None:
    """Create ``path`` of ``size`` bytes (zeros as holes) with ``writes`` applied, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:
            os.ftruncate(fd, size)
            for offset, data in writes:
                os.pwrite(fd, data, offset)
            os.fsync(fd)
        except (OSError, OverflowError) as exc:  # EFBIG, ENOSPC, beyond off_t
            reason = exc.strerror if isinstance(exc, OSError) else "too large"
            raise UserInputError(
                f"{path}: cannot write a {size >> 20} MiB disk image: {reason}",
                hint="lower disk.size_mib or write elsewhere",
            ) from None
        os.close(fd)
        fd = -1
        Path(tmp).chmod(0o644)
        Path(tmp).replace(path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            Path(tmp).unlink()
        raise


# --------------------------------------------------------------------------------------------
# Reading an ESP back (our own images; for patching, negative tests and inspection)


@dataclass(frozen=True)
class EspFile:
    """A file found in the ESP: its path, byte offset in the disk image and size."""

    path: str
    offset: int
    size: int
    contiguous: bool


def _read_exact(f: BinaryIO, offset: int, size: int) -> bytes:
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise InputFileError(f"disk image truncated at offset {offset}")
    return data


def list_esp_files(path: Path) -> list[EspFile]:
    """Every file in the image's ESP (first partition of type ESP), sorted by path."""
    table = read_gpt(path)
    esp = next((e for e in table.partitions if e.type_guid == ESP_TYPE), None)
    if esp is None:
        raise InputFileError(f"{path}: no EFI System Partition in the GPT")
    base = esp.first_lba * SECTOR
    found: list[EspFile] = []
    with path.open("rb") as f:
        bs = _read_exact(f, base, SECTOR)
        (bps, spc, reserved, nfats) = struct.unpack_from("<HBHB", bs, 11)
        fat_sectors, _, _, root_cluster = struct.unpack_from("<IHHI", bs, 36)
        if bps != SECTOR or bs[82:90] != b"FAT32   " or spc == 0:
            raise InputFileError(f"{path}: ESP at offset {base} is not a FAT32 volume")
        fat_raw = _read_exact(f, base + reserved * SECTOR, fat_sectors * SECTOR)
        data_start = base + (reserved + nfats * fat_sectors) * SECTOR
        cb = spc * SECTOR

        def chain(first: int) -> list[int]:
            out: list[int] = []
            c = first
            while 2 <= c < 0x0FFFFFF8:
                if len(out) > len(fat_raw) // 4:
                    raise InputFileError(f"{path}: FAT cluster chain loops at cluster {c}")
                out.append(c)
                c = struct.unpack_from("<I", fat_raw, c * 4)[0] & 0x0FFFFFFF
            return out

        def walk(cluster: int, prefix: str) -> None:
            raw = b"".join(_read_exact(f, data_start + (c - 2) * cb, cb) for c in chain(cluster))
            long_parts: list[str] = []
            for i in range(0, len(raw), _DIRENT):
                ent = raw[i : i + _DIRENT]
                if ent[0] == 0:
                    break
                if ent[0] == 0xE5:
                    long_parts = []
                    continue
                if ent[11] == _ATTR_LFN:
                    units = ent[1:11] + ent[14:26] + ent[28:32]
                    text = units.decode("utf-16-le", "replace").split("\0", 1)[0]
                    long_parts.insert(0, text.replace("\uffff", ""))
                    continue
                if ent[11] & _ATTR_VOLUME_ID:
                    long_parts = []
                    continue
                short = ent[0:8].decode("ascii", "replace").rstrip()
                ext = ent[8:11].decode("ascii", "replace").rstrip()
                name = "".join(long_parts) or (short + ("." + ext if ext else ""))
                long_parts = []
                if name in (".", ".."):
                    continue
                first = (struct.unpack_from("<H", ent, 20)[0] << 16) | struct.unpack_from(
                    "<H", ent, 26
                )[0]
                if ent[11] & _ATTR_DIRECTORY:
                    walk(first, f"{prefix}{name}/")
                    continue
                size = struct.unpack_from("<I", ent, 28)[0]
                clusters = chain(first) if first else []
                contiguous = all(b == a + 1 for a, b in itertools.pairwise(clusters))
                offset = data_start + (first - 2) * cb if first else 0
                found.append(EspFile(f"{prefix}{name}", offset, size, contiguous))

        walk(root_cluster, "")
    return sorted(found, key=lambda e: e.path)


def read_esp_files(path: Path) -> dict[str, bytes]:
    """The contents of every file in the image's ESP, by ESP path."""
    out: dict[str, bytes] = {}
    with path.open("rb") as f:
        for ent in list_esp_files(path):
            if not ent.contiguous:
                raise InputFileError(f"{path}: ESP file {ent.path} is fragmented")
            out[ent.path] = _read_exact(f, ent.offset, ent.size) if ent.size else b""
    return out


def patch_esp_file(path: Path, esp_path: str, offset: int, data: bytes) -> None:
    """Overwrite ``data`` at ``offset`` inside ESP file ``esp_path`` in place (same size)."""
    ent = next((e for e in list_esp_files(path) if e.path == esp_path), None)
    if ent is None:
        raise UserInputError(f"{path}: no file {esp_path!r} in the ESP")
    if not ent.contiguous or offset < 0 or offset + len(data) > ent.size:
        raise UserInputError(f"{path}: cannot patch {esp_path!r} at offset {offset}")
    with path.open("r+b") as f:
        f.seek(ent.offset + offset)
        f.write(data)


def rewrite_esp(
    src: Path, dst: Path, changes: Mapping[str, bytes | None], *, source_date_epoch: int
) -> None:
    """Copy image ``src`` to ``dst`` with ESP files replaced, added or (None) removed.

    The GPT (both copies), the FAT volume id and label and every other partition are kept
    byte for byte, so the copy measures the same into PCR 5; only the ESP's FAT is rewritten.
    """
    table = read_gpt(src)
    esp = next((e for e in table.partitions if e.type_guid == ESP_TYPE), None)
    if esp is None:
        raise InputFileError(f"{src}: no EFI System Partition in the GPT")
    files = read_esp_files(src)
    for name, data in changes.items():
        if data is None:
            if files.pop(name, None) is None:
                raise UserInputError(f"{src}: no file {name!r} in the ESP to remove")
        else:
            files[name] = data
    total = table.total_sectors
    tail_start = (total - 1 - GPT_ENTRY_SECTORS) * SECTOR
    writes: list[tuple[int, bytes]] = []
    with src.open("rb") as f:
        writes.append((0, _read_exact(f, 0, (2 + GPT_ENTRY_SECTORS) * SECTOR)))
        writes.append((tail_start, _read_exact(f, tail_start, (GPT_ENTRY_SECTORS + 1) * SECTOR)))
        boot = _read_exact(f, esp.first_lba * SECTOR, SECTOR)
        for part in table.partitions:
            if part is esp:
                continue
            for lba in range(part.first_lba, part.last_lba + 1, MIB_SECTORS):
                count = min(MIB_SECTORS, part.last_lba + 1 - lba)
                chunk = _read_exact(f, lba * SECTOR, count * SECTOR)
                if chunk.count(0) != len(chunk):
                    writes.append((lba * SECTOR, chunk))
    (volume_id,) = struct.unpack_from("<I", boot, 67)
    fat = make_fat32(
        esp.last_lba - esp.first_lba + 1,
        files,
        volume_id=volume_id,
        label=boot[71:82].decode("ascii", "replace").rstrip() or "NO NAME",
        source_date_epoch=source_date_epoch,
        hidden_sectors=esp.first_lba,
    )
    writes += [(esp.first_lba * SECTOR + off, data) for off, data in fat.writes]
    _write_sparse(dst, total * SECTOR, writes)
