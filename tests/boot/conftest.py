"""Fixtures for boot tests: tools, small firmware-only images, leak checks.

Harness tests need no kernel: OVMF alone reaches its boot manager in ~15 s under TCG, long
enough to kill things mid-boot, to hang, or to refuse an unsigned image. Full boots of real
builds use the shared session builds from tests/conftest.py.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from builder import disk

pytestmark = pytest.mark.boot

OVMF = Path("/usr/share/OVMF")
CODE_SB = OVMF / "OVMF_CODE_4M.secboot.fd"
CODE_PLAIN = OVMF / "OVMF_CODE_4M.fd"
VARS_EMPTY = OVMF / "OVMF_VARS_4M.fd"
OWNER = uuid.UUID("0b0d0c4a-1b2c-4d3e-8f40-5a6b7c8d9e0f")


def require_tool(name: str) -> str:
    """Path of ``name``; a missing tool FAILS the test (never a silent skip)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail(f"{name} is not installed")
    return found


@pytest.fixture(scope="session")
def boot_tools() -> None:
    for tool in ("qemu-system-x86_64", "swtpm"):
        require_tool(tool)
    for path in (CODE_SB, CODE_PLAIN, VARS_EMPTY):
        if not path.is_file():
            pytest.fail(f"{path} missing (install ovmf)")


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


@pytest.fixture(scope="session")
def firmware_only_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GPT disk whose ESP holds nothing bootable: OVMF ends in its boot manager."""
    img = tmp_path_factory.mktemp("fwdisk") / "disk.img"
    disk.make_disk(
        img,
        disk.DiskLayout(size_mib=40, esp_size_mib=36),
        {"README.TXT": b"nothing to boot\n"},
        seed=b"boot-harness",
        source_date_epoch=1700000000,
    )
    return img


@pytest.fixture(scope="session")
def unsigned_app_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A disk whose \\EFI\\BOOT\\BOOTX64.EFI is an unsigned EFI application."""
    img = tmp_path_factory.mktemp("appdisk") / "disk.img"
    disk.make_disk(
        img,
        disk.DiskLayout(size_mib=40, esp_size_mib=36),
        {"EFI/BOOT/BOOTX64.EFI": tiny_efi_app()},
        seed=b"boot-harness-app",
        source_date_epoch=1700000000,
    )
    return img


@pytest.fixture(scope="session")
def enrolled_varstore(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OVMF_VARS_4M.fd with a throw-away PK/KEK/db enrolled and Secure Boot on."""
    folder = tmp_path_factory.mktemp("sbvars")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "bootchain harness")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(__import__("datetime").datetime(2020, 1, 1))
        .not_valid_after(__import__("datetime").datetime(2040, 1, 1))
        .sign(key, hashes.SHA256())
    )
    pem = folder / "cert.pem"
    pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    out = folder / "vars.fd"
    owner = str(OWNER)
    subprocess.run(
        [
            require_tool("virt-fw-vars"),
            "-i",
            str(VARS_EMPTY),
            "-o",
            str(out),
            "--set-pk",
            owner,
            str(pem),
            "--add-kek",
            owner,
            str(pem),
            "--add-db",
            owner,
            str(pem),
            "--secure-boot",
        ],
        check=True,
        capture_output=True,
    )
    return out


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{proc.name}: {cmdline}")
    return found


@pytest.fixture
def leak_check(tmp_path: Path) -> Iterator[Path]:
    """Route the harness's temp folders into a private dir; after the test, nothing may be
    left there and no process may still mention it."""
    private = tmp_path / "harness-tmp"
    private.mkdir()
    saved = tempfile.tempdir
    tempfile.tempdir = str(private)
    try:
        yield private
    finally:
        tempfile.tempdir = saved
    assert list(private.iterdir()) == [], "harness left temp files behind"
    assert _processes_mentioning(str(private)) == [], "harness left processes behind"
