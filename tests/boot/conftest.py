"""Fixtures for boot tests: tools, small firmware-only images, leak checks.

Harness tests need no kernel: OVMF alone reaches its boot manager in ~15 s under TCG, long
enough to kill things mid-boot, to hang, or to refuse an unsigned image. Full boots of real
builds use the shared session builds from tests/conftest.py.
"""

from __future__ import annotations

import shutil
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

from .efiapp import tiny_efi_app

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
