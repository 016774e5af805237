"""UEFI structures found in TCG event data (pure codecs, no I/O).

GUIDs, UEFI_VARIABLE_DATA, UEFI_IMAGE_LOAD_EVENT, device paths, UEFI_GPT_DATA,
UEFI_PLATFORM_FIRMWARE_BLOB(2) and TCG_PCClientTaggedEvent. Each ``parse`` takes the event
data bytes and raises InputFileError naming the offset; ``bytes(x)`` gives them back.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass

from builder.errors import InputFileError

EFI_GLOBAL_VARIABLE = bytes.fromhex("61dfe48bca93d211aa0d00e098032b8c")
EFI_IMAGE_SECURITY_DATABASE = bytes.fromhex("cbb219d73a3d9645a3bcdad00e67656f")
ESP_TYPE_GUID = bytes.fromhex("28732ac11ff8d211ba4b00a0c93ec93b")

DEVICE_PATH_END = bytes.fromhex("7fff0400")


def guid_text(raw: bytes) -> str:
    """The registry form of a 16-byte EFI_GUID (little-endian first three fields)."""
    return str(uuid.UUID(bytes_le=bytes(raw)))


def guid_bytes(text: str) -> bytes:
    """The 16 on-disk bytes of a GUID written in registry form."""
    try:
        return uuid.UUID(text).bytes_le
    except ValueError as exc:
        raise InputFileError(f"not a GUID: {text!r}") from exc


class Reader:
    """Bounds-checked little-endian reader; every failure names ``what`` and the offset."""

    __slots__ = ("base", "data", "pos", "what")

    def __init__(self, data: bytes, what: str, base: int = 0) -> None:
        self.data = data
        self.pos = 0
        self.what = what
        self.base = base

    def fail(self, message: str, at: int | None = None) -> InputFileError:
        offset = self.base + (self.pos if at is None else at)
        return InputFileError(f"{self.what}: {message} at offset {offset}")

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int, field: str) -> bytes:
        if n < 0 or n > len(self.data) - self.pos:
            raise self.fail(
                f"truncated {field} (needs {n} bytes, {len(self.data) - self.pos} left)"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self, field: str) -> int:
        return self.take(1, field)[0]

    def u16(self, field: str) -> int:
        value: int = struct.unpack("<H", self.take(2, field))[0]
        return value

    def u32(self, field: str) -> int:
        value: int = struct.unpack("<I", self.take(4, field))[0]
        return value

    def u64(self, field: str) -> int:
        value: int = struct.unpack("<Q", self.take(8, field))[0]
        return value

    def end(self) -> None:
        if self.pos != len(self.data):
            raise self.fail(f"{len(self.data) - self.pos} trailing bytes")


def utf16_text(raw: bytes) -> str:
    """UTF-16LE text up to the first NUL (undecodable units replaced)."""
    if len(raw) % 2:
        raw = raw[:-1]
    text = raw.decode("utf-16-le", "replace")
    return text.split("\0", 1)[0]


def utf16z(text: str) -> bytes:
    """UTF-16LE with a terminating NUL, as firmware and systemd write strings."""
    return text.encode("utf-16-le") + b"\0\0"


# --- UEFI_VARIABLE_DATA ---------------------------------------------------------------


@dataclass(frozen=True)
class VariableData:
    """UEFI_VARIABLE_DATA: GUID, UTF-16 name (no NUL), data."""

    guid: bytes
    name: str
    data: bytes

    @classmethod
    def parse(cls, raw: bytes, base: int = 0) -> VariableData:
        r = Reader(raw, "UEFI_VARIABLE_DATA", base)
        guid = r.take(16, "VariableName GUID")
        name_len = r.u64("UnicodeNameLength")
        data_len = r.u64("VariableDataLength")
        name_raw = r.take(name_len * 2, "UnicodeName")
        data = r.take(data_len, "VariableData")
        r.end()
        try:
            name = name_raw.decode("utf-16-le")
        except UnicodeDecodeError as exc:
            raise r.fail("UnicodeName is not UTF-16", 32) from exc
        if name.encode("utf-16-le") != name_raw:
            raise r.fail("UnicodeName does not round-trip", 32)
        return cls(guid, name, data)

    def __bytes__(self) -> bytes:
        name = self.name.encode("utf-16-le")
        return self.guid + struct.pack("<QQ", len(name) // 2, len(self.data)) + name + self.data


# --- TCG_PCClientTaggedEvent ----------------------------------------------------------

TAG_LOAD_OPTIONS = 0x8F3B22ED
TAG_LINUX_INITRD = 0x8F3B22EC


@dataclass(frozen=True)
class TaggedEvent:
    """TCG_PCClientTaggedEvent: u32 id, u32 size, data (Linux uses an ASCII description)."""

    tag_id: int
    data: bytes

    @classmethod
    def parse(cls, raw: bytes, base: int = 0) -> TaggedEvent:
        r = Reader(raw, "TCG_PCClientTaggedEvent", base)
        tag_id = r.u32("taggedEventID")
        size = r.u32("taggedEventDataSize")
        data = r.take(size, "taggedEventData")
        r.end()
        return cls(tag_id, data)

    def __bytes__(self) -> bytes:
        return struct.pack("<II", self.tag_id, len(self.data)) + self.data

    @property
    def text(self) -> str:
        return self.data.split(b"\0", 1)[0].decode("ascii", "replace")


# --- platform firmware blobs ----------------------------------------------------------


@dataclass(frozen=True)
class FirmwareBlob:
    """UEFI_PLATFORM_FIRMWARE_BLOB (description empty) or ..._BLOB2 (with description)."""

    base: int
    length: int
    description: bytes | None = None

    @classmethod
    def parse(cls, raw: bytes, blob2: bool, base: int = 0) -> FirmwareBlob:
        r = Reader(raw, "UEFI_PLATFORM_FIRMWARE_BLOB", base)
        description = None
        if blob2:
            description = r.take(r.u8("BlobDescriptionSize"), "BlobDescription")
        blob_base = r.u64("BlobBase")
        length = r.u64("BlobLength")
        r.end()
        return cls(blob_base, length, description)

    def __bytes__(self) -> bytes:
        head = (
            b"" if self.description is None else bytes([len(self.description)]) + self.description
        )
        return head + struct.pack("<QQ", self.base, self.length)


# --- device paths ---------------------------------------------------------------------


@dataclass(frozen=True)
class DevicePathNode:
    """One EFI_DEVICE_PATH_PROTOCOL node: type, subtype and the bytes after the header."""

    type: int
    subtype: int
    data: bytes

    def __bytes__(self) -> bytes:
        return struct.pack("<BBH", self.type, self.subtype, len(self.data) + 4) + self.data

    def text(self) -> str:
        """The UEFI text form for the nodes a boot disk path uses, else a generic form."""
        t, s, d = self.type, self.subtype, self.data
        try:
            if (t, s) == (2, 1) and len(d) == 8:
                hid, uid = struct.unpack("<II", d)
                if hid == 0x0A0341D0:
                    return f"PciRoot(0x{uid:x})"
                return f"Acpi(0x{hid:08x},0x{uid:x})"
            if (t, s) == (1, 1) and len(d) == 2:
                return f"Pci(0x{d[1]:x},0x{d[0]:x})"
            if (t, s) == (4, 1) and len(d) == 38:
                number, start, size = struct.unpack_from("<IQQ", d)
                sig = d[20:36]
                if d[37] == 2:
                    return f"HD({number},GPT,{guid_text(sig)},0x{start:x},0x{size:x})"
                return f"HD({number},MBR,0x{sig[:4].hex()},0x{start:x},0x{size:x})"
            if (t, s) == (4, 4):
                return utf16_text(d)
            if (t, s) == (4, 6) and len(d) == 16:
                return f"FvFile({guid_text(d)})"
            if (t, s) == (4, 7) and len(d) == 16:
                return f"Fv({guid_text(d)})"
            if (t, s) == (3, 18) and len(d) == 6:
                return f"Sata(0x{d[0] | d[1] << 8:x})"
        except (struct.error, IndexError):
            pass
        return f"Path({t},{s},{d.hex()})"


def parse_device_path(raw: bytes, base: int = 0) -> tuple[DevicePathNode, ...]:
    """Split a device path into nodes up to (excluding) the End node."""
    r = Reader(raw, "device path", base)
    nodes: list[DevicePathNode] = []
    while r.remaining():
        start = r.pos
        node_type = r.u8("node type")
        subtype = r.u8("node subtype")
        length = r.u16("node length")
        if length < 4:
            raise r.fail(f"node length {length} < 4", start)
        data = r.take(length - 4, "node data")
        if node_type == 0x7F and subtype == 0xFF:
            r.end()
            return tuple(nodes)
        nodes.append(DevicePathNode(node_type, subtype, data))
    raise r.fail("no End node")


def device_path_text(raw: bytes) -> str:
    """Readable form, e.g. ``PciRoot(0x0)/Pci(0x1,0x0)/HD(1,GPT,...)/\\EFI\\Linux\\x.efi``."""
    return "/".join(node.text() for node in parse_device_path(raw))


def device_path_file(raw: bytes) -> str | None:
    """The file path part of a device path (``\\EFI\\BOOT\\BOOTX64.EFI``), if any."""
    try:
        nodes = parse_device_path(raw)
    except InputFileError:
        return None
    files = [utf16_text(n.data) for n in nodes if (n.type, n.subtype) == (4, 4)]
    return "".join(files) or None


def device_path_prefix(raw: bytes) -> bytes:
    """The hardware part of a device path: every node before the first media node."""
    out = b""
    for node in parse_device_path(raw):
        if node.type == 4:
            break
        out += bytes(node)
    return out


def hd_node(number: int, start_lba: int, size_lba: int, partition_guid: bytes) -> bytes:
    """A GPT hard-drive media node (MBRType 2, SignatureType 2)."""
    data = struct.pack("<IQQ", number, start_lba, size_lba) + partition_guid + b"\x02\x02"
    return bytes(DevicePathNode(4, 1, data))


def file_path_node(path: str) -> bytes:
    """A media file-path node holding ``path`` as UTF-16LE with NUL."""
    return bytes(DevicePathNode(4, 4, utf16z(path)))


# --- UEFI_IMAGE_LOAD_EVENT ------------------------------------------------------------


@dataclass(frozen=True)
class ImageLoadEvent:
    """UEFI_IMAGE_LOAD_EVENT: where the image was loaded and the device path it came from."""

    location: int
    length: int
    link_time_address: int
    device_path: bytes

    @classmethod
    def parse(cls, raw: bytes, base: int = 0) -> ImageLoadEvent:
        r = Reader(raw, "UEFI_IMAGE_LOAD_EVENT", base)
        location = r.u64("ImageLocationInMemory")
        length = r.u64("ImageLengthInMemory")
        link = r.u64("ImageLinkTimeAddress")
        dp_len = r.u64("LengthOfDevicePath")
        dp = r.take(dp_len, "DevicePath")
        r.end()
        return cls(location, length, link, dp)

    def __bytes__(self) -> bytes:
        return (
            struct.pack(
                "<QQQQ", self.location, self.length, self.link_time_address, len(self.device_path)
            )
            + self.device_path
        )

    @property
    def file_path(self) -> str | None:
        return device_path_file(self.device_path)


# --- UEFI_GPT_DATA --------------------------------------------------------------------


@dataclass(frozen=True)
class GptPartition:
    """One GPT partition entry (the raw entry bytes are kept for exact round trips)."""

    raw: bytes

    @property
    def type_guid(self) -> bytes:
        return self.raw[0:16]

    @property
    def unique_guid(self) -> bytes:
        return self.raw[16:32]

    @property
    def first_lba(self) -> int:
        value: int = struct.unpack_from("<Q", self.raw, 32)[0]
        return value

    @property
    def last_lba(self) -> int:
        value: int = struct.unpack_from("<Q", self.raw, 40)[0]
        return value

    @property
    def name(self) -> str:
        return utf16_text(self.raw[56:128])


@dataclass(frozen=True)
class GptData:
    """UEFI_GPT_DATA: the GPT header (HeaderSize bytes), u64 count, the non-empty entries."""

    header: bytes
    partitions: tuple[GptPartition, ...]

    @classmethod
    def parse(cls, raw: bytes, base: int = 0) -> GptData:
        r = Reader(raw, "UEFI_GPT_DATA", base)
        if r.remaining() < 92:
            raise r.fail("shorter than a GPT header")
        if raw[:8] != b"EFI PART":
            raise r.fail("no 'EFI PART' signature")
        header_size: int = struct.unpack_from("<I", raw, 12)[0]
        entry_size: int = struct.unpack_from("<I", raw, 84)[0]
        if header_size < 92 or entry_size < 128 or entry_size % 8:
            raise r.fail(f"bad HeaderSize {header_size} or SizeOfPartitionEntry {entry_size}")
        header = r.take(header_size, "GPT header")
        count = r.u64("NumberOfPartitions")
        if count > r.remaining() // entry_size:
            raise r.fail(f"NumberOfPartitions {count} exceeds the data")
        parts = tuple(GptPartition(r.take(entry_size, "partition entry")) for _ in range(count))
        r.end()
        return cls(header, parts)

    def __bytes__(self) -> bytes:
        return (
            self.header
            + struct.pack("<Q", len(self.partitions))
            + b"".join(p.raw for p in self.partitions)
        )

    def esp(self) -> tuple[int, GptPartition]:
        """(1-based number, entry) of the EFI system partition."""
        for number, part in enumerate(self.partitions, 1):
            if part.type_guid == ESP_TYPE_GUID:
                return number, part
        raise InputFileError("UEFI_GPT_DATA: no EFI system partition")
