"""PE/COFF image reading and the Authenticode digest (pure: bytes in, values out, no I/O).

The parser is strict: every size and offset is checked against the data before it is used,
and anything that does not add up raises :class:`InputFileError` naming the offset. The
Authenticode digest follows the Microsoft Authenticode PE specification the way sbsign and
pesign compute it: CheckSum, the certificate-table directory entry and the certificate
table are excluded; headers, then sections by PointerToRawData, then any data after the
last section up to the certificate table (counted from SUM_OF_BYTES_HASHED, as edk2 and
pesign do). The digest is of the bytes as they are: an unsigned file whose length is not a
multiple of 8 is hashed without padding (edk2 measures it so, ``pesign -h`` agrees); signing
pads the file to 8 bytes first, as sbsign and pesign do, so the padding lands inside the
signed image and is hashed there.
"""

from __future__ import annotations

import hashlib
import itertools
import struct
from dataclasses import dataclass

from builder.errors import InputFileError

BytesLike = bytes | bytearray | memoryview

PE32_MAGIC = 0x10B
PE32PLUS_MAGIC = 0x20B
SECTION_HEADER_SIZE = 40
COFF_HEADER_SIZE = 20
DIRECTORY_SECURITY = 4
WIN_CERT_ALIGN = 8
DIGEST_ALGORITHMS = ("sha1", "sha256", "sha384", "sha512")

_CHECKSUM_CHUNK = 1 << 16  # even, so every chunk starts on a word
_MAX_SECTIONS = 96  # the PE/COFF spec's loader limit


@dataclass(frozen=True)
class Section:
    """One section header, with the offset of that header in the file."""

    name: str
    virtual_address: int
    virtual_size: int
    raw_offset: int
    raw_size: int
    characteristics: int
    header_offset: int

    @property
    def raw_end(self) -> int:
        """File offset just past the section's raw data."""
        return self.raw_offset + self.raw_size


@dataclass(frozen=True)
class PEImage:
    """The parsed, checked layout of a PE image. Offsets are file offsets."""

    size: int
    magic: int
    machine: int
    coff_offset: int
    optional_offset: int
    size_of_optional_header: int
    section_table_offset: int
    timestamp_offset: int
    checksum_offset: int
    size_of_headers: int
    section_alignment: int
    file_alignment: int
    size_of_image: int
    image_base: int
    number_of_rva_and_sizes: int
    directory_offset: int
    cert_dir_offset: int
    cert_table_offset: int
    cert_table_size: int
    symbol_table_offset: int
    number_of_symbols: int
    sections: tuple[Section, ...]

    @property
    def is_pe32plus(self) -> bool:
        return self.magic == PE32PLUS_MAGIC

    @property
    def signed(self) -> bool:
        return self.cert_table_size != 0

    @property
    def data_end(self) -> int:
        """File offset where section data ends (headers if no section has raw data)."""
        return max([self.size_of_headers, *(s.raw_end for s in self.sections if s.raw_size)])

    @property
    def hashed_end(self) -> int:
        """File offset where the hashed data ends: the certificate table or end of file."""
        return self.cert_table_offset if self.signed else self.size


def _u16(data: BytesLike, off: int) -> int:
    return int.from_bytes(data[off : off + 2], "little")


def _u32(data: BytesLike, off: int) -> int:
    return int.from_bytes(data[off : off + 4], "little")


def _u64(data: BytesLike, off: int) -> int:
    return int.from_bytes(data[off : off + 8], "little")


def _need(size: int, off: int, length: int, what: str) -> None:
    if off < 0 or length < 0 or off + length > size:
        raise InputFileError(
            f"not a valid PE image: {what} at offset {off:#x} (+{length:#x}) runs past "
            f"end of file ({size:#x} bytes)"
        )


def parse_pe(data: BytesLike) -> PEImage:
    """Parse and check the headers of a PE32 or PE32+ image. Fails closed on anything odd."""
    size = len(data)
    _need(size, 0, 0x40, "DOS header")
    if data[0:2] != b"MZ":
        raise InputFileError("not a PE image: no 'MZ' signature at offset 0x0")
    pe_offset = _u32(data, 0x3C)
    _need(size, pe_offset, 4 + COFF_HEADER_SIZE, "PE signature and COFF header")
    if data[pe_offset : pe_offset + 4] != b"PE\0\0":
        raise InputFileError(f"not a PE image: no 'PE\\0\\0' signature at offset {pe_offset:#x}")
    coff = pe_offset + 4
    machine = _u16(data, coff)
    nsections = _u16(data, coff + 2)
    symbol_table_offset = _u32(data, coff + 8)
    number_of_symbols = _u32(data, coff + 12)
    size_of_optional_header = _u16(data, coff + 16)
    if nsections > _MAX_SECTIONS:
        raise InputFileError(
            f"not a valid PE image: {nsections} sections at offset {coff + 2:#x} "
            f"(at most {_MAX_SECTIONS})"
        )
    opt = coff + COFF_HEADER_SIZE
    _need(size, opt, size_of_optional_header, "optional header")
    if size_of_optional_header < 2:
        raise InputFileError(f"not a valid PE image: no optional header at offset {opt:#x}")
    magic = _u16(data, opt)
    if magic == PE32PLUS_MAGIC:
        fixed, rva_count_off, image_base = 112, opt + 108, _u64(data, opt + 24)
    elif magic == PE32_MAGIC:
        fixed, rva_count_off, image_base = 96, opt + 92, _u32(data, opt + 28)
    else:
        raise InputFileError(
            f"not a valid PE image: optional header magic {magic:#x} at offset {opt:#x}"
        )
    if size_of_optional_header < fixed:
        raise InputFileError(
            f"not a valid PE image: SizeOfOptionalHeader {size_of_optional_header} at offset "
            f"{coff + 16:#x} is smaller than the fixed part ({fixed})"
        )
    nrva = _u32(data, rva_count_off)
    if nrva <= DIRECTORY_SECURITY or fixed + 8 * nrva > size_of_optional_header:
        raise InputFileError(
            f"not a valid PE image: NumberOfRvaAndSizes {nrva} at offset {rva_count_off:#x} "
            f"does not fit SizeOfOptionalHeader {size_of_optional_header} or lacks the "
            "certificate table entry"
        )
    section_alignment = _u32(data, opt + 32)
    file_alignment = _u32(data, opt + 36)
    size_of_image = _u32(data, opt + 56)
    size_of_headers = _u32(data, opt + 60)
    checksum_offset = opt + 64
    directory_offset = opt + fixed
    cert_dir_offset = directory_offset + 8 * DIRECTORY_SECURITY
    section_table = opt + size_of_optional_header
    table_end = section_table + SECTION_HEADER_SIZE * nsections
    if not table_end <= size_of_headers <= size:
        raise InputFileError(
            f"not a valid PE image: SizeOfHeaders {size_of_headers:#x} at offset "
            f"{opt + 60:#x} must cover the section table (ends {table_end:#x}) and fit the "
            f"file ({size:#x} bytes)"
        )
    sections: list[Section] = []
    for i in range(nsections):
        h = section_table + i * SECTION_HEADER_SIZE
        raw_name = bytes(data[h : h + 8])
        name = raw_name.rstrip(b"\0").decode("utf-8", "replace")
        vsize, vaddr, raw_size, raw_off = struct.unpack_from("<IIII", data, h + 8)
        chars = _u32(data, h + 36)
        if raw_size:
            _need(size, raw_off, raw_size, f"raw data of section {i} {name!r}")
            if raw_off < size_of_headers:
                raise InputFileError(
                    f"not a valid PE image: section {i} {name!r} raw data at {raw_off:#x} "
                    f"overlaps the headers (SizeOfHeaders {size_of_headers:#x}); header at "
                    f"offset {h:#x}"
                )
        sections.append(Section(name, vaddr, vsize, raw_off, raw_size, chars, h))
    by_offset = sorted((s for s in sections if s.raw_size), key=lambda s: s.raw_offset)
    for a, b in itertools.pairwise(by_offset):
        if b.raw_offset < a.raw_end:
            raise InputFileError(
                f"not a valid PE image: raw data of sections {a.name!r} and {b.name!r} "
                f"overlap at offset {b.raw_offset:#x} (headers at {a.header_offset:#x}, "
                f"{b.header_offset:#x})"
            )
    cert_off = _u32(data, cert_dir_offset)
    cert_size = _u32(data, cert_dir_offset + 4)
    image = PEImage(
        size=size,
        magic=magic,
        machine=machine,
        coff_offset=coff,
        optional_offset=opt,
        size_of_optional_header=size_of_optional_header,
        section_table_offset=section_table,
        timestamp_offset=coff + 4,
        checksum_offset=checksum_offset,
        size_of_headers=size_of_headers,
        section_alignment=section_alignment,
        file_alignment=file_alignment,
        size_of_image=size_of_image,
        image_base=image_base,
        number_of_rva_and_sizes=nrva,
        directory_offset=directory_offset,
        cert_dir_offset=cert_dir_offset,
        cert_table_offset=cert_off if cert_size else 0,
        cert_table_size=cert_size,
        symbol_table_offset=symbol_table_offset,
        number_of_symbols=number_of_symbols,
        sections=tuple(sections),
    )
    if cert_size:
        if cert_off % WIN_CERT_ALIGN or cert_off + cert_size != size:
            raise InputFileError(
                f"not a valid PE image: certificate table at {cert_off:#x} (+{cert_size:#x}) "
                f"named at offset {cert_dir_offset:#x} must be 8-byte aligned and end the "
                f"file ({size:#x} bytes)"
            )
        if cert_off < image.data_end:
            raise InputFileError(
                f"not a valid PE image: certificate table at {cert_off:#x} overlaps section "
                f"data (ends {image.data_end:#x})"
            )
    elif cert_off:
        raise InputFileError(
            f"not a valid PE image: certificate table entry at offset {cert_dir_offset:#x} "
            f"has address {cert_off:#x} but size 0"
        )
    return image


def read_directory(data: BytesLike, image: PEImage, index: int) -> tuple[int, int]:
    """(VirtualAddress, Size) of data directory ``index``; (0, 0) when the image has none."""
    if index >= image.number_of_rva_and_sizes:
        return (0, 0)
    off = image.directory_offset + 8 * index
    return (_u32(data, off), _u32(data, off + 4))


def is_signed(data: BytesLike) -> bool:
    """True when the image has a certificate table (says nothing about its validity)."""
    return parse_pe(data).signed


def authenticode_digest(data: BytesLike, algorithm: str = "sha256") -> bytes:
    """The Authenticode digest of a PE image, as sbsign, pesign and UEFI firmware compute it."""
    if algorithm not in DIGEST_ALGORITHMS:
        raise InputFileError(
            f"unsupported Authenticode digest algorithm {algorithm!r}",
            hint=f"use one of {', '.join(DIGEST_ALGORITHMS)}",
        )
    image = parse_pe(data)
    return _digest(memoryview(data), image, algorithm)


def _digest(mv: memoryview, image: PEImage, algorithm: str, zero_pad: int = 0) -> bytes:
    """The digest of ``mv``, as if ``zero_pad`` zero bytes followed it (signing pads to 8)."""
    h = hashlib.new(algorithm)
    h.update(mv[: image.checksum_offset])
    h.update(mv[image.checksum_offset + 4 : image.cert_dir_offset])
    h.update(mv[image.cert_dir_offset + 8 : image.size_of_headers])
    hashed = image.size_of_headers
    for s in sorted((s for s in image.sections if s.raw_size), key=lambda s: s.raw_offset):
        h.update(mv[s.raw_offset : s.raw_end])
        hashed += s.raw_size
    # The spec (and edk2, pesign) hash the rest from SUM_OF_BYTES_HASHED, not from the end
    # of the last section: the two differ only for images with holes between sections.
    end = image.hashed_end
    if end > hashed:
        h.update(mv[hashed:end])
    if zero_pad:
        h.update(bytes(zero_pad))
    return h.digest()


def padded_digest(data: BytesLike, zero_pad: int, algorithm: str = "sha256") -> bytes:
    """authenticode_digest(data + zero_pad zero bytes) without copying ``data``."""
    image = parse_pe(data)
    if image.signed and zero_pad:
        raise InputFileError("cannot pad a signed PE image: the certificate table ends it")
    return _digest(memoryview(data), image, algorithm, zero_pad)


def word_sum(data: BytesLike, offset: int = 0) -> int:
    """Sum of the 16-bit little-endian words of ``data`` placed at file ``offset``, mod 0xffff.

    Since 2**16 == 1 (mod 0xffff), that is the bytes read as one little-endian integer,
    modulo 0xffff (times 256 when the run starts at an odd offset). Sums of runs add, so a
    file's sum can be built from its pieces.
    """
    mv = memoryview(data)
    # Each chunk is an even number of bytes, so 2**(8 * chunk) == 1 (mod 0xffff) and the
    # chunks' values can simply be added (cheaper than a modulo per chunk). int.from_bytes
    # runs at ~1 GB/s; summing memoryview.cast("H") or an array("H") makes a Python int per
    # word and is 10x slower (measured: 9 ms against 100-120 ms per 8 MiB).
    total = sum(
        int.from_bytes(mv[start : start + _CHECKSUM_CHUNK], "little")
        for start in range(0, len(mv), _CHECKSUM_CHUNK)
    )
    return (total << (8 * (offset & 1))) % 0xFFFF


def checksum_from_sum(total: int, size: int) -> int:
    """The CheckSum field from a file's word sum (CheckSum counted as zero) and its size."""
    # End-around carry never yields 0 for a non-zero sum (a PE starts with "MZ").
    return ((total % 0xFFFF or 0xFFFF) + size) & 0xFFFFFFFF


def pe_checksum(data: BytesLike) -> int:
    """The PE optional-header CheckSum of ``data`` (its own CheckSum field counted as zero).

    The classic algorithm adds 16-bit little-endian words with end-around carry, then the
    file length; see :func:`word_sum` for how the words are added here.
    """
    image = parse_pe(data)
    off = image.checksum_offset
    field = word_sum(memoryview(data)[off : off + 4], off)
    return checksum_from_sum(word_sum(data) - field, len(data))


@dataclass(frozen=True)
class SectionInfo:
    """A section as ``describe_pe`` reports it."""

    name: str
    virtual_address: int
    virtual_size: int
    raw_size: int
    sha256: str


@dataclass(frozen=True)
class PEDescription:
    """What ``bootchain inspect`` shows: sections, digests, signed or not."""

    size: int
    pe32plus: bool
    machine: int
    timestamp: int
    checksum: int
    signed: bool
    sections: tuple[SectionInfo, ...]
    sha256: str
    authenticode_sha256: str


def section_data(data: BytesLike, section: Section) -> bytes:
    """The first VirtualSize bytes of a section as loaded (zero-filled past its raw data)."""
    body = bytes(
        memoryview(data)[
            section.raw_offset : section.raw_offset + min(section.raw_size, section.virtual_size)
        ]
    )
    if section.virtual_size > len(body):
        body += bytes(section.virtual_size - len(body))
    return body


def describe_pe(data: BytesLike) -> PEDescription:
    """Sections (with the sha256 of their first VirtualSize bytes) and the image digests."""
    image = parse_pe(data)
    mv = memoryview(data)
    sections = tuple(
        SectionInfo(
            name=s.name,
            virtual_address=s.virtual_address,
            virtual_size=s.virtual_size,
            raw_size=s.raw_size,
            sha256=hashlib.sha256(section_data(mv, s)).hexdigest(),
        )
        for s in image.sections
    )
    return PEDescription(
        size=image.size,
        pe32plus=image.is_pe32plus,
        machine=image.machine,
        timestamp=_u32(mv, image.timestamp_offset),
        checksum=_u32(mv, image.checksum_offset),
        signed=image.signed,
        sections=sections,
        sha256=hashlib.sha256(mv).hexdigest(),
        authenticode_sha256=_digest(mv, image, "sha256").hex(),
    )
