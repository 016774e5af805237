"""The UKI section plan and the PE writer that turns it into a unified kernel image.

One plan (a sequence of :class:`UKISection`) feeds both the image writer here and the PCR 11
prediction, which reads the sections back from the FINAL bytes with
:func:`read_uki_sections`. The writer appends the sections to the pinned systemd-stub 252
``linuxx64.efi.stub`` itself (no objcopy: objcopy stamps the wall clock into TimeDateStamp,
which is inside the Authenticode hash and so in PCR 4).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from builder.errors import InputFileError, UserInputError
from builder.pe import (
    SECTION_HEADER_SIZE,
    PEImage,
    parse_pe,
    pe_checksum,
    section_data,
)

# The order systemd-stub 252 measures present sections into PCR 11 (src/boot/efi/stub.c),
# whatever their order in the PE. .pcrsig is never measured.
STUB_252_MEASURED_ORDER = (".linux", ".osrel", ".cmdline", ".initrd", ".splash", ".dtb", ".pcrpkey")
# Every section systemd-stub 252 knows; it has no .uname, .sbat merging, .ucode or profiles.
STUB_252_SECTIONS = frozenset({*STUB_252_MEASURED_ORDER, ".pcrsig"})

# IMAGE_SCN_CNT_INITIALIZED_DATA | IMAGE_SCN_MEM_READ, as ukify marks its sections.
SECTION_CHARACTERISTICS = 0x40000040

_OPT_SIZE_OF_INITIALIZED_DATA = 8
_OPT_SIZE_OF_IMAGE = 56


@dataclass(frozen=True)
class UKISection:
    """One section of the plan. ``measure`` says whether systemd-stub extends it into PCR 11."""

    name: str
    data: bytes
    measure: bool


def _align(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment if alignment > 1 else value


def _check_plan(sections: Sequence[UKISection]) -> None:
    seen: set[str] = set()
    for section in sections:
        name = section.name
        if name not in STUB_252_SECTIONS:
            raise UserInputError(
                f"UKI section {name!r} is not supported by systemd-stub 252",
                hint=f"use only {', '.join(sorted(STUB_252_SECTIONS))}",
            )
        if name in seen:
            raise UserInputError(f"UKI section {name!r} is given twice")
        seen.add(name)
        if section.measure != (name in STUB_252_MEASURED_ORDER):
            raise UserInputError(
                f"UKI section {name!r} has measure={section.measure}, but systemd-stub 252 "
                f"{'measures' if name in STUB_252_MEASURED_ORDER else 'does not measure'} it"
            )
        if not section.data:
            raise UserInputError(f"UKI section {name!r} is empty", hint="leave it out instead")
        if name == ".linux":
            try:
                parse_pe(section.data)
            except InputFileError as exc:
                raise InputFileError(
                    f".linux payload is not a PE image: {exc.message}",
                    hint="pass the EFI-stub kernel (vmlinuz), not a compressed or ELF one",
                ) from exc


def _check_stub(stub: bytes, image: PEImage, count: int) -> None:
    if not image.is_pe32plus:
        raise InputFileError("UKI stub is not a PE32+ image (optional header magic 0x10b)")
    if image.signed:
        raise InputFileError(
            f"UKI stub is already signed (certificate table at {image.cert_table_offset:#x})",
            hint="use the unsigned linuxx64.efi.stub from systemd-boot-efi",
        )
    if image.file_alignment == 0 or image.section_alignment == 0:
        raise InputFileError("UKI stub has a zero FileAlignment or SectionAlignment")
    names = {s.name for s in image.sections} & STUB_252_SECTIONS
    if names:
        raise InputFileError(f"UKI stub already has UKI sections {sorted(names)}")
    table_end = image.section_table_offset + SECTION_HEADER_SIZE * len(image.sections)
    first_raw = min([image.size_of_headers, *(s.raw_offset for s in image.sections if s.raw_size)])
    room = (first_raw - table_end) // SECTION_HEADER_SIZE
    if count > room:
        raise InputFileError(
            f"UKI stub has header room for {room} more section headers (table ends at "
            f"{table_end:#x}, first data at {first_raw:#x}), {count} needed"
        )
    spare = stub[table_end : table_end + SECTION_HEADER_SIZE * count]
    if any(spare):
        raise InputFileError(
            f"UKI stub header space at {table_end:#x} after the section table is not empty"
        )


def make_uki(stub: bytes, sections: Sequence[UKISection], source_date_epoch: int) -> bytes:
    """Append ``sections`` to ``stub`` and return the (unsigned) UKI bytes.

    New sections follow the stub's last section: VirtualAddress aligned up to
    SectionAlignment, raw data to FileAlignment, VirtualSize the true length, marked
    initialized read-only data. TimeDateStamp is ``source_date_epoch``; SizeOfImage,
    SizeOfInitializedData and CheckSum are recomputed. The stub's COFF symbol table (data
    after its last section) is not carried over. Same inputs give the same bytes.
    """
    if not 0 <= source_date_epoch < 1 << 32:
        raise UserInputError(f"SOURCE_DATE_EPOCH {source_date_epoch} does not fit a PE timestamp")
    _check_plan(sections)
    image = parse_pe(stub)
    _check_stub(stub, image, len(sections))

    file_align = image.file_alignment
    sect_align = image.section_alignment
    va = _align(
        max(
            [
                image.size_of_image,
                *(s.virtual_address + max(s.virtual_size, s.raw_size) for s in image.sections),
            ]
        ),
        sect_align,
    )
    offset = _align(image.data_end, file_align)
    layout: list[tuple[UKISection, int, int, int]] = []  # section, va, raw offset, raw size
    for section in sections:
        raw_size = _align(len(section.data), file_align)
        layout.append((section, va, offset, raw_size))
        offset += raw_size
        va = _align(va + len(section.data), sect_align)

    out = bytearray(offset)
    out[: image.data_end] = stub[: image.data_end]
    header = image.section_table_offset + SECTION_HEADER_SIZE * len(image.sections)
    added_raw = 0
    for section, sva, soff, ssize in layout:
        out[soff : soff + len(section.data)] = section.data
        struct.pack_into(
            "<8sIIIIIIHHI",
            out,
            header,
            section.name.encode("ascii"),
            len(section.data),
            sva,
            ssize,
            soff,
            0,
            0,
            0,
            0,
            SECTION_CHARACTERISTICS,
        )
        header += SECTION_HEADER_SIZE
        added_raw += ssize

    coff = image.coff_offset
    opt = image.optional_offset
    struct.pack_into("<H", out, coff + 2, len(image.sections) + len(sections))
    struct.pack_into("<I", out, image.timestamp_offset, source_date_epoch)
    if image.symbol_table_offset >= image.data_end or image.symbol_table_offset == 0:
        struct.pack_into("<II", out, coff + 8, 0, 0)
    (initialized,) = struct.unpack_from("<I", out, opt + _OPT_SIZE_OF_INITIALIZED_DATA)
    struct.pack_into(
        "<I", out, opt + _OPT_SIZE_OF_INITIALIZED_DATA, (initialized + added_raw) & 0xFFFFFFFF
    )
    last_va, last = (layout[-1][1], layout[-1][0]) if layout else (0, None)
    size_of_image = (
        _align(last_va + len(last.data), sect_align) if last is not None else image.size_of_image
    )
    struct.pack_into("<I", out, opt + _OPT_SIZE_OF_IMAGE, size_of_image)
    struct.pack_into("<I", out, image.checksum_offset, 0)
    struct.pack_into("<I", out, image.checksum_offset, pe_checksum(out))
    return bytes(out)


def read_uki_sections(data: bytes) -> dict[str, bytes]:
    """Each UKI section of a built image (signed or not): its first VirtualSize bytes.

    Only the sections systemd-stub 252 knows are returned, in PE order. These are the bytes
    the stub measures, so PCR 11 must be predicted from them.
    """
    image = parse_pe(data)
    found: dict[str, bytes] = {}
    for section in image.sections:
        if section.name not in STUB_252_SECTIONS:
            continue
        if section.name in found:
            raise InputFileError(
                f"UKI has section {section.name!r} twice (header at {section.header_offset:#x})"
            )
        found[section.name] = section_data(data, section)
    return found
