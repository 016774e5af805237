"""Write the small synthetic PE images in this folder (see NOTE.md). Deterministic.

Run: .venv/bin/python tests/data/pe/make_fixtures.py
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

HERE = Path(__file__).parent


def make_pe(
    sections: list[tuple[str, int, int, int]],
    *,
    pe32: bool = False,
    size_of_headers: int = 0x400,
    file_alignment: int = 0x200,
    section_alignment: int = 0x1000,
    seed: int = 0,
    trailing: bytes = b"",
) -> bytes:
    """A minimal PE image. ``sections``: (name, raw offset, raw size, virtual size)."""
    rng = random.Random(seed)
    e_lfanew = 0x80
    opt_size = (96 if pe32 else 112) + 16 * 8
    end = max(off + size for _, off, size, _ in sections)
    data = bytearray(end)
    data[0:2] = b"MZ"
    struct.pack_into("<I", data, 0x3C, e_lfanew)
    data[0x40:0x80] = rng.randbytes(0x40)  # a DOS stub's worth of noise
    data[e_lfanew : e_lfanew + 4] = b"PE\0\0"
    coff = e_lfanew + 4
    struct.pack_into(
        "<HHIIIHH", data, coff, 0x14C if pe32 else 0x8664, len(sections), 0, 0, 0, opt_size, 0x22
    )
    opt = coff + 20
    va = section_alignment
    size_of_image = va
    for _, _, _, vsize in sections:
        size_of_image += -(-vsize // section_alignment) * section_alignment
    struct.pack_into("<H", data, opt, 0x10B if pe32 else 0x20B)
    struct.pack_into("<III", data, opt + 4, 0x1000, 0x2000, 0)  # code, init data, uninit
    struct.pack_into("<II", data, opt + 16, section_alignment, section_alignment)
    if pe32:
        struct.pack_into("<I", data, opt + 28, 0x400000)
    struct.pack_into("<II", data, opt + 32, section_alignment, file_alignment)
    struct.pack_into("<II", data, opt + 56, size_of_image, size_of_headers)
    struct.pack_into("<H", data, opt + 68, 10)  # EFI application
    struct.pack_into("<I", data, opt + (92 if pe32 else 108), 16)
    table = opt + opt_size
    for i, (name, off, size, vsize) in enumerate(sections):
        struct.pack_into(
            "<8sIIIIIIHHI",
            data,
            table + 40 * i,
            name.encode(),
            vsize,
            va,
            size,
            off,
            0,
            0,
            0,
            0,
            0x40000040,
        )
        va += -(-vsize // section_alignment) * section_alignment
        data[off : off + size] = rng.randbytes(size)
    return bytes(data) + trailing


FIXTURES: dict[str, bytes] = {
    # three contiguous sections, length a multiple of 8
    "plain.efi": make_pe(
        [
            (".text", 0x400, 0x600, 0x5F0),
            (".data", 0xA00, 0x200, 0x1F8),
            (".sbat", 0xC00, 0x200, 0x40),
        ]
    ),
    # 13 bytes after the last section: trailing data, odd file length (no padding is hashed)
    "trailing-odd.efi": make_pe(
        [(".text", 0x400, 0x600, 0x5F0), (".data", 0xA00, 0x200, 0x1F8)],
        seed=1,
        trailing=bytes(range(1, 14)),
    ),
    # a 0x200 hole between .text and .data: hashing restarts at SUM_OF_BYTES_HASHED
    "inner-gap.efi": make_pe(
        [(".text", 0x400, 0x400, 0x400), (".data", 0xA00, 0x200, 0x200)],
        seed=2,
        trailing=b"\x5a" * 0x30,
    ),
    # PE32 (ia32) layout
    "pe32.efi": make_pe([(".text", 0x400, 0x400, 0x3F0)], pe32=True, seed=3),
    # sections listed out of file order
    "unsorted.efi": make_pe(
        [(".data", 0x800, 0x200, 0x200), (".text", 0x400, 0x400, 0x400)], seed=4
    ),
}


def main() -> None:
    for name, data in FIXTURES.items():
        (HERE / name).write_bytes(data)


if __name__ == "__main__":
    main()
