"""TCG PC Client firmware event log: parse, serialize, decode, replay, CEL-JSON (pure).

The log starts with a SHA-1 format header event (TCG_PCClientPCREvent) whose data is the
Spec ID Event03 naming the digest algorithms; every other record is a crypto-agile
TCG_PCR_EVENT2. ``bytes(EventLog.parse(data)) == data`` for every log that parses.
Every defect of the input raises InputFileError naming the byte offset.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from builder.errors import InputFileError
from builder.measure.efi import (
    FirmwareBlob,
    GptData,
    ImageLoadEvent,
    Reader,
    TaggedEvent,
    VariableData,
    device_path_text,
    utf16_text,
)

# --- event types -----------------------------------------------------------------------

EV_PREBOOT_CERT = 0x0
EV_POST_CODE = 0x1
EV_NO_ACTION = 0x3
EV_SEPARATOR = 0x4
EV_ACTION = 0x5
EV_EVENT_TAG = 0x6
EV_S_CRTM_CONTENTS = 0x7
EV_S_CRTM_VERSION = 0x8
EV_CPU_MICROCODE = 0x9
EV_PLATFORM_CONFIG_FLAGS = 0xA
EV_TABLE_OF_DEVICES = 0xB
EV_COMPACT_HASH = 0xC
EV_IPL = 0xD
EV_IPL_PARTITION_DATA = 0xE
EV_NONHOST_CODE = 0xF
EV_NONHOST_CONFIG = 0x10
EV_NONHOST_INFO = 0x11
EV_OMIT_BOOT_DEVICE_EVENTS = 0x12
EV_POST_CODE2 = 0x13
EV_EFI_VARIABLE_DRIVER_CONFIG = 0x80000001
EV_EFI_VARIABLE_BOOT = 0x80000002
EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
EV_EFI_BOOT_SERVICES_DRIVER = 0x80000004
EV_EFI_RUNTIME_SERVICES_DRIVER = 0x80000005
EV_EFI_GPT_EVENT = 0x80000006
EV_EFI_ACTION = 0x80000007
EV_EFI_PLATFORM_FIRMWARE_BLOB = 0x80000008
EV_EFI_HANDOFF_TABLES = 0x80000009
EV_EFI_PLATFORM_FIRMWARE_BLOB2 = 0x8000000A
EV_EFI_HANDOFF_TABLES2 = 0x8000000B
EV_EFI_VARIABLE_BOOT2 = 0x8000000C
EV_EFI_GPT_EVENT2 = 0x8000000D
EV_EFI_HCRTM_EVENT = 0x80000010
EV_EFI_VARIABLE_AUTHORITY = 0x800000E0
EV_EFI_SPDM_FIRMWARE_BLOB = 0x800000E1
EV_EFI_SPDM_FIRMWARE_CONFIG = 0x800000E2

EVENT_TYPE_NAMES: dict[int, str] = {
    value: name for name, value in globals().items() if name.startswith("EV_")
}
EVENT_TYPES: dict[str, int] = {name: value for value, name in EVENT_TYPE_NAMES.items()}


def event_type_name(event_type: int) -> str:
    """``EV_IPL`` for 0xD; ``EV_0x12345678`` for a type we do not know."""
    return EVENT_TYPE_NAMES.get(event_type, f"EV_0x{event_type:08x}")


def event_type_value(name: str) -> int:
    """Inverse of :func:`event_type_name`."""
    if name in EVENT_TYPES:
        return EVENT_TYPES[name]
    match = re.fullmatch(r"EV_0x([0-9a-fA-F]{1,8})", name)
    if match is None:
        raise InputFileError(f"unknown event type {name!r}")
    return int(match.group(1), 16)


# --- digest algorithms -----------------------------------------------------------------

# TPM_ALG_ID -> (bank name, digest size)
ALGORITHMS: dict[int, tuple[str, int]] = {
    0x0004: ("sha1", 20),
    0x000B: ("sha256", 32),
    0x000C: ("sha384", 48),
    0x000D: ("sha512", 64),
    0x0012: ("sm3_256", 32),
}
BANK_IDS: dict[str, int] = {name: alg for alg, (name, _) in ALGORITHMS.items()}
HASHLIB = {"sha1", "sha256", "sha384", "sha512"}
MAX_DIGEST_SIZE = 512


def bank_name(alg_id: int) -> str:
    """Bank name of a TPM_ALG_ID (``sha256``); ``alg_0x1234`` for an unknown one."""
    known = ALGORITHMS.get(alg_id)
    return known[0] if known else f"alg_0x{alg_id:04x}"


def bank_id(name: str) -> int:
    """TPM_ALG_ID of a bank name."""
    if name in BANK_IDS:
        return BANK_IDS[name]
    match = re.fullmatch(r"alg_0x([0-9a-fA-F]{1,4})", name)
    if match is None:
        raise InputFileError(f"unknown hash algorithm {name!r}")
    return int(match.group(1), 16)


def hash_bytes(bank: str, data: bytes) -> bytes:
    """The digest of ``data`` in ``bank`` (sha1, sha256, sha384, sha512)."""
    if bank not in HASHLIB:
        raise InputFileError(f"cannot compute digests in bank {bank!r}")
    return hashlib.new(bank, data).digest()


# --- records ---------------------------------------------------------------------------

SPEC_ID_SIGNATURE = b"Spec ID Event03\0"
STARTUP_LOCALITY_SIGNATURE = b"StartupLocality\0"


@dataclass(frozen=True)
class SpecIdEvent:
    """TCG_EfiSpecIdEvent: the algorithms (id, digest size) every TCG_PCR_EVENT2 may carry."""

    algorithms: tuple[tuple[int, int], ...]
    platform_class: int = 0
    spec_version_minor: int = 0
    spec_version_major: int = 2
    spec_errata: int = 0
    uintn_size: int = 2
    vendor_info: bytes = b""

    @classmethod
    def parse(cls, raw: bytes, base: int = 0, source: str = "event log") -> SpecIdEvent:
        r = Reader(raw, f"{source}: Spec ID event", base)
        if r.take(16, "signature") != SPEC_ID_SIGNATURE:
            raise r.fail("signature is not 'Spec ID Event03'", 0)
        platform_class = r.u32("platformClass")
        minor, major, errata, uintn = r.take(4, "spec version")
        count = r.u32("numberOfAlgorithms")
        if count == 0 or count * 4 > r.remaining():
            raise r.fail(f"numberOfAlgorithms {count} does not fit the event", 24)
        algorithms: list[tuple[int, int]] = []
        for _ in range(count):
            at = r.pos
            alg, size = r.u16("algorithmId"), r.u16("digestSize")
            known = ALGORITHMS.get(alg)
            if known and known[1] != size:
                raise r.fail(f"{known[0]} declared with digest size {size}", at)
            if not 0 < size <= MAX_DIGEST_SIZE:
                raise r.fail(f"algorithm 0x{alg:04x} has digest size {size}", at)
            if any(a == alg for a, _ in algorithms):
                raise r.fail(f"algorithm 0x{alg:04x} listed twice", at)
            algorithms.append((alg, size))
        vendor = r.take(r.u8("vendorInfoSize"), "vendorInfo")
        r.end()
        return cls(tuple(algorithms), platform_class, minor, major, errata, uintn, vendor)

    def __bytes__(self) -> bytes:
        return (
            SPEC_ID_SIGNATURE
            + struct.pack(
                "<IBBBBI",
                self.platform_class,
                self.spec_version_minor,
                self.spec_version_major,
                self.spec_errata,
                self.uintn_size,
                len(self.algorithms),
            )
            + b"".join(struct.pack("<HH", a, s) for a, s in self.algorithms)
            + bytes([len(self.vendor_info)])
            + self.vendor_info
        )

    @property
    def banks(self) -> tuple[str, ...]:
        return tuple(bank_name(a) for a, _ in self.algorithms)


@dataclass(frozen=True)
class StartupLocality:
    """The EV_NO_ACTION StartupLocality event: PCR 0 starts at this value, not zero."""

    locality: int


@dataclass(frozen=True)
class Event:
    """One TCG_PCR_EVENT2. ``digests`` keeps the log's (TPM_ALG_ID, digest) order."""

    pcr: int
    event_type: int
    digests: tuple[tuple[int, bytes], ...]
    data: bytes
    offset: int = field(default=-1, compare=False)

    @property
    def type_name(self) -> str:
        return event_type_name(self.event_type)

    def digest(self, bank: str) -> bytes | None:
        """The digest for ``bank`` (``sha256``), or None when the event has none."""
        alg = bank_id(bank)
        for a, value in self.digests:
            if a == alg:
                return value
        return None

    def __bytes__(self) -> bytes:
        return (
            struct.pack("<III", self.pcr, self.event_type, len(self.digests))
            + b"".join(struct.pack("<H", a) + d for a, d in self.digests)
            + struct.pack("<I", len(self.data))
            + self.data
        )


def make_event(
    pcr: int, event_type: int, data: bytes, banks: Sequence[str], *, hashed: bytes | None = None
) -> Event:
    """An event whose digests are H(``hashed``) (default: H(data)) in each bank.

    EV_NO_ACTION events carry all-zero digests, as firmware writes them.
    """
    if event_type == EV_NO_ACTION:
        digests = tuple((bank_id(b), bytes(_size(b))) for b in banks)
    else:
        content = data if hashed is None else hashed
        digests = tuple((bank_id(b), hash_bytes(b, content)) for b in banks)
    return Event(pcr, event_type, digests, data)


def event_with_digests(
    pcr: int, event_type: int, data: bytes, digests: Mapping[str, bytes]
) -> Event:
    """An event carrying given per-bank digests (in the order of ``digests``)."""
    return Event(pcr, event_type, tuple((bank_id(b), d) for b, d in digests.items()), data)


def _size(bank: str) -> int:
    alg = bank_id(bank)
    if alg not in ALGORITHMS:
        raise InputFileError(f"unknown digest size for bank {bank!r}")
    return ALGORITHMS[alg][1]


@dataclass(frozen=True)
class EventLog:
    """A parsed firmware log: the header event, its Spec ID, the TCG_PCR_EVENT2 records.

    ``padding`` keeps trailing all-zero or all-0xFF bytes some firmware tables carry, so the
    round trip stays exact.
    """

    spec_id: SpecIdEvent
    events: tuple[Event, ...]
    header_pcr: int = 0
    header_digest: bytes = bytes(20)
    header_data: bytes | None = None
    padding: bytes = b""

    @property
    def banks(self) -> tuple[str, ...]:
        return self.spec_id.banks

    @classmethod
    def build(cls, events: Iterable[Event], banks: Sequence[str]) -> EventLog:
        """A log with a fresh Spec ID header for ``banks`` (standard sizes)."""
        spec = SpecIdEvent(tuple((bank_id(b), _size(b)) for b in banks))
        return cls(spec, tuple(events))

    @classmethod
    def parse(cls, data: bytes, source: str = "event log") -> EventLog:
        """Parse a binary log; ``source`` names it in errors (a path, usually)."""
        data = bytes(data)
        size = len(data)
        if size < 32:
            raise InputFileError(f"{source}: truncated header event at offset 0 ({size} bytes)")
        pcr, etype = struct.unpack_from("<II", data, 0)
        header_digest = data[8:28]
        (hsize,) = struct.unpack_from("<I", data, 28)
        if etype != EV_NO_ACTION:
            raise InputFileError(
                f"{source}: header event at offset 0 is {event_type_name(etype)}, not EV_NO_ACTION",
                hint="only crypto-agile (TCG2) logs are supported",
            )
        if hsize > size - 32:
            raise InputFileError(
                f"{source}: header event at offset 0 declares {hsize} bytes of data, "
                f"{size - 32} left"
            )
        header_data = data[32 : 32 + hsize]
        spec = SpecIdEvent.parse(header_data, 32, source)
        sizes = dict(spec.algorithms)
        max_count = len(sizes)
        events: list[Event] = []
        pos = 32 + hsize
        unpack = struct.unpack_from
        while pos < size:
            lead = data[pos : pos + 8]
            if lead in (bytes(len(lead)), b"\xff" * len(lead)):
                rest = data[pos:]
                if rest.count(lead[0]) == len(rest):
                    return cls(spec, tuple(events), pcr, header_digest, header_data, rest)
            start = pos
            if size - pos < 12:
                raise InputFileError(f"{source}: truncated event header at offset {start}")
            e_pcr, e_type, count = unpack("<III", data, pos)
            pos += 12
            if count > max_count:
                raise InputFileError(
                    f"{source}: event at offset {start} has {count} digests, "
                    f"the Spec ID lists {max_count} algorithms"
                )
            digests: list[tuple[int, bytes]] = []
            for _ in range(count):
                if size - pos < 2:
                    raise InputFileError(f"{source}: truncated digest at offset {pos}")
                (alg,) = unpack("<H", data, pos)
                dsize = sizes.get(alg)
                if dsize is None:
                    raise InputFileError(
                        f"{source}: event at offset {start} uses algorithm 0x{alg:04x} "
                        f"not in the Spec ID (offset {pos})"
                    )
                if any(a == alg for a, _ in digests):
                    # Which of two digests the TPM got is a guess: refuse, never pick one.
                    raise InputFileError(
                        f"{source}: event at offset {start} has two {bank_name(alg)} digests "
                        f"(offset {pos})"
                    )
                if size - pos - 2 < dsize:
                    raise InputFileError(
                        f"{source}: truncated {bank_name(alg)} digest at offset {pos + 2}"
                    )
                digests.append((alg, data[pos + 2 : pos + 2 + dsize]))
                pos += 2 + dsize
            if size - pos < 4:
                raise InputFileError(f"{source}: truncated event size at offset {pos}")
            (esize,) = unpack("<I", data, pos)
            pos += 4
            if esize > size - pos:
                raise InputFileError(
                    f"{source}: event at offset {start} declares {esize} bytes of data, "
                    f"{size - pos} left"
                )
            events.append(Event(e_pcr, e_type, tuple(digests), data[pos : pos + esize], start))
            pos += esize
        return cls(spec, tuple(events), pcr, header_digest, header_data)

    def __bytes__(self) -> bytes:
        header_data = bytes(self.spec_id) if self.header_data is None else self.header_data
        head = (
            struct.pack("<II", self.header_pcr, EV_NO_ACTION)
            + self.header_digest
            + struct.pack("<I", len(header_data))
            + header_data
        )
        return head + b"".join(bytes(e) for e in self.events) + self.padding


# --- decoding --------------------------------------------------------------------------

EventData = (
    SpecIdEvent
    | StartupLocality
    | VariableData
    | ImageLoadEvent
    | GptData
    | FirmwareBlob
    | TaggedEvent
    | str
    | int
    | bytes
)

_VARIABLE_TYPES = {
    EV_EFI_VARIABLE_DRIVER_CONFIG,
    EV_EFI_VARIABLE_BOOT,
    EV_EFI_VARIABLE_BOOT2,
    EV_EFI_VARIABLE_AUTHORITY,
}
_IMAGE_TYPES = {
    EV_EFI_BOOT_SERVICES_APPLICATION,
    EV_EFI_BOOT_SERVICES_DRIVER,
    EV_EFI_RUNTIME_SERVICES_DRIVER,
}


def _text(raw: bytes) -> str:
    """EV_IPL-style data: UTF-16LE when it looks like it (systemd), else ASCII/UTF-8."""
    if len(raw) >= 2 and len(raw) % 2 == 0 and raw[1::2].count(0) == len(raw) // 2:
        return utf16_text(raw)
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def decode(event: Event) -> EventData:
    """The decoded event data: a typed value for the known types, the raw bytes otherwise.

    Raises InputFileError (naming the log offset) when a known type's data is malformed.
    """
    t, raw = event.event_type, event.data
    base = event.offset + 12 + sum(2 + len(d) for _, d in event.digests) + 4
    if t == EV_NO_ACTION:
        if raw.startswith(SPEC_ID_SIGNATURE):
            return SpecIdEvent.parse(raw, base)
        if raw.startswith(STARTUP_LOCALITY_SIGNATURE) and len(raw) == 17:
            return StartupLocality(raw[16])
        return raw
    if t in _VARIABLE_TYPES:
        return VariableData.parse(raw, base)
    if t in _IMAGE_TYPES:
        return ImageLoadEvent.parse(raw, base)
    if t in (EV_EFI_GPT_EVENT, EV_EFI_GPT_EVENT2):
        return GptData.parse(raw, base)
    if t == EV_EFI_PLATFORM_FIRMWARE_BLOB:
        return FirmwareBlob.parse(raw, False, base)
    if t == EV_EFI_PLATFORM_FIRMWARE_BLOB2:
        return FirmwareBlob.parse(raw, True, base)
    if t == EV_EVENT_TAG:
        return TaggedEvent.parse(raw, base)
    if t == EV_SEPARATOR and len(raw) == 4:
        value: int = struct.unpack("<I", raw)[0]
        return value
    if t == EV_S_CRTM_VERSION:
        return utf16_text(raw)
    if t in (EV_EFI_ACTION, EV_ACTION):
        return raw.decode("ascii", "replace")
    if t == EV_IPL:
        return _text(raw)
    return raw


def describe(event: Event) -> str:
    """One line for people: type, then what it is (``EV_EFI_ACTION Exit Boot Services ...``)."""
    name = event.type_name
    try:
        value = decode(event)
    except InputFileError:
        return f"{name} (malformed data)"
    detail: str
    if isinstance(value, SpecIdEvent):
        detail = "Spec ID Event03 " + ",".join(value.banks)
    elif isinstance(value, StartupLocality):
        detail = f"StartupLocality {value.locality}"
    elif isinstance(value, VariableData):
        detail = value.name
    elif isinstance(value, ImageLoadEvent):
        detail = value.file_path or _safe_device_path(value.device_path)
    elif isinstance(value, GptData):
        detail = f"{len(value.partitions)} partition(s)"
    elif isinstance(value, FirmwareBlob):
        detail = f"base 0x{value.base:x} length 0x{value.length:x}"
    elif isinstance(value, TaggedEvent):
        detail = value.text
    elif isinstance(value, int):
        detail = "" if value == 0 else f"error 0x{value:x}"
    elif isinstance(value, str):
        detail = value
    else:
        detail = value[:16].hex() + ("..." if len(value) > 16 else "")
    detail = "".join(c if c.isprintable() else "?" for c in detail)
    return f"{name} {detail}".rstrip()


def _safe_device_path(raw: bytes) -> str:
    try:
        return device_path_text(raw)
    except InputFileError:
        return raw.hex()


# --- replay ----------------------------------------------------------------------------


def replay(events: Iterable[Event], bank: str) -> dict[int, bytes]:
    """PCR values after extending every event (EV_NO_ACTION never) from all-zero.

    Only PCRs that some event extends appear. A StartupLocality event sets PCR 0's start.
    Raises InputFileError when an event has no digest for ``bank``.
    """
    alg = bank_id(bank)
    if bank not in HASHLIB:
        raise InputFileError(f"cannot replay bank {bank!r}")
    size = ALGORITHMS[alg][1]
    new = getattr(hashlib, bank)
    pcrs: dict[int, bytes] = {}
    start0 = bytes(size)
    for event in events:
        if event.event_type == EV_NO_ACTION:
            data = event.data
            if event.pcr == 0 and data.startswith(STARTUP_LOCALITY_SIGNATURE) and len(data) == 17:
                start0 = bytes(size - 1) + data[16:17]
            continue
        for a, value in event.digests:
            if a == alg:
                digest = value
                break
        else:
            raise InputFileError(
                f"event at offset {event.offset} (PCR {event.pcr} {event.type_name}) "
                f"has no {bank} digest"
            )
        old = pcrs.get(event.pcr)
        if old is None:
            old = start0 if event.pcr == 0 else bytes(size)
        pcrs[event.pcr] = new(old + digest).digest()
    return pcrs


# --- CEL-JSON --------------------------------------------------------------------------


def to_cel(events: Iterable[Event]) -> list[dict[str, Any]]:
    """CEL-JSON records as systemd-pcrlock writes them (content_type ``pcclient_std``)."""
    return [
        {
            "recnum": n,
            "pcr": e.pcr,
            "digests": [{"hashAlg": bank_name(a), "digest": d.hex()} for a, d in e.digests],
            "content_type": "pcclient_std",
            "content": {"event_type": e.type_name, "event_data": e.data.hex()},
        }
        for n, e in enumerate(events)
    ]


def from_cel(records: object, source: str = "CEL-JSON") -> tuple[Event, ...]:
    """Events from CEL-JSON records; any malformed record raises naming its index."""
    if not isinstance(records, list):
        raise InputFileError(f"{source}: expected a list of records")
    events: list[Event] = []
    for n, rec in enumerate(records):
        where = f"{source}: record {n}"
        try:
            if not isinstance(rec, dict) or rec.get("content_type") != "pcclient_std":
                raise InputFileError(f"{where}: not a pcclient_std record")
            pcr = rec["pcr"]
            content = rec["content"]
            if not isinstance(pcr, int) or not 0 <= pcr < 1 << 32 or isinstance(pcr, bool):
                raise InputFileError(f"{where}: bad pcr {pcr!r}")
            digests: list[tuple[int, bytes]] = []
            for d in rec["digests"]:
                alg = bank_id(str(d["hashAlg"]))
                value = bytes.fromhex(str(d["digest"]))
                known = ALGORITHMS.get(alg)
                if known and len(value) != known[1]:
                    raise InputFileError(f"{where}: {known[0]} digest of {len(value)} bytes")
                digests.append((alg, value))
            etype = content["event_type"]
            etype_value = etype if isinstance(etype, int) else event_type_value(str(etype))
            data = bytes.fromhex(str(content.get("event_data", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputFileError(f"{where}: malformed ({exc.__class__.__name__}: {exc})") from exc
        except InputFileError as exc:
            if exc.message.startswith(where):
                raise
            raise InputFileError(f"{where}: {exc.message}") from exc
        events.append(Event(pcr, etype_value, tuple(digests), data))
    return tuple(events)


# --- table -----------------------------------------------------------------------------


def render_table(events: Sequence[Event], bank: str = "sha256") -> str:
    """A readable table: index, PCR, short digest in ``bank``, description."""
    lines = [f"{'#':>4}  {'PCR':>3}  {bank + ' digest':<18}  event"]
    for n, e in enumerate(events):
        d = e.digest(bank)
        short = "-" if d is None else d.hex()[:16]
        lines.append(f"{n:>4}  {e.pcr:>3}  {short:<18}  {describe(e)}")
    return "\n".join(lines)


def render_pcrs(pcrs: Mapping[int, bytes], bank: str) -> str:
    """``<bank> <pcr> <HEX>`` lines, as in the vectors' pcrs.txt."""
    return "\n".join(f"{bank} {n} {v.hex().upper()}" for n, v in sorted(pcrs.items()))
