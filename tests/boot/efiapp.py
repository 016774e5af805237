"""A minimal unsigned EFI application, made here (no external binary needed)."""

from __future__ import annotations

import struct


def tiny_efi_app() -> bytes:
    """A minimal unsigned PE32+ EFI application whose entry point returns EFI_SUCCESS."""
    dos = b"MZ" + b"\0" * 58 + struct.pack("<I", 0x40)
    coff = struct.pack("<4sHHIIIHH", b"PE\0\0", 0x8664, 1, 0, 0, 0, 240, 0x0022)
    opt = (
        struct.pack(
            "<HBBIIIIIQIIHHHHHHIIIIHHQQQQII",
            0x20B,  # PE32+
            0,
            0,
            0x200,  # SizeOfCode
            0,
            0,
            0x1000,  # AddressOfEntryPoint
            0x1000,  # BaseOfCode
            0,  # ImageBase
            0x1000,  # SectionAlignment
            0x200,  # FileAlignment
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0x2000,  # SizeOfImage
            0x200,  # SizeOfHeaders
            0,  # CheckSum
            10,  # EFI application
            0,
            0x100000,
            0x1000,
            0x100000,
            0x1000,
            0,
            16,
        )
        + b"\0" * 128
    )
    section = struct.pack(
        "<8sIIIIIIHHI", b".text", 0x10, 0x1000, 0x200, 0x200, 0, 0, 0, 0, 0x60000020
    )
    headers = (dos + coff + opt + section).ljust(0x200, b"\0")
    return headers + b"\x31\xc0\xc3".ljust(0x200, b"\0")  # xor eax,eax; ret
