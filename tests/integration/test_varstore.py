"""Enrolled OVMF varstores: reproducible bytes, virt-fw-vars as the oracle, a real OVMF boot."""

from __future__ import annotations

import datetime
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from builder.errors import InputFileError, VerificationError
from builder.secureboot import esl
from builder.secureboot.keys import KeySet, load_keyset
from builder.secureboot.varstore import db_entry_for, make_varstore, read_secureboot_variables

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "keys.example"
OVMF = Path("/usr/share/OVMF")
TEMPLATE = OVMF / "OVMF_VARS_4M.fd"
SDE = 1764115200
VIRT_FW_VARS = str(Path(sys.executable).with_name("virt-fw-vars"))
HELLO = Path("/usr/lib/efitools/x86_64-linux-gnu/HelloWorld.efi")  # Debian efitools


@pytest.fixture(scope="module")
def keyset() -> KeySet:
    return load_keyset(EXAMPLE, at=datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC))


@pytest.fixture(scope="module")
def varstore(keyset: KeySet) -> bytes:
    return make_varstore(TEMPLATE.read_bytes(), keyset, source_date_epoch=SDE)


def _dump(tmp_path: Path, data: bytes) -> dict[str, dict[str, object]]:
    """virt-fw-vars' own reading of a varstore, as JSON keyed by variable name."""
    image = tmp_path / "vars.fd"
    image.write_bytes(data)
    out = tmp_path / "vars.json"
    subprocess.run(
        [VIRT_FW_VARS, "-i", image, "--output-json", out], check=True, capture_output=True
    )
    return {v["name"]: v for v in json.loads(out.read_text())["variables"]}


def test_reproducible(keyset: KeySet, varstore: bytes) -> None:
    template = TEMPLATE.read_bytes()
    assert make_varstore(template, keyset, source_date_epoch=SDE) == varstore
    assert len(varstore) == len(template)
    later = make_varstore(template, keyset, source_date_epoch=SDE + 86400)
    assert later != varstore
    assert read_secureboot_variables(later) == read_secureboot_variables(varstore)


def test_virt_fw_vars_reads_it(tmp_path: Path, keyset: KeySet, varstore: bytes) -> None:
    found = _dump(tmp_path, varstore)
    assert sorted(found) == ["CustomMode", "KEK", "PK", "SecureBootEnable", "db", "dbx"]
    for role in ("PK", "KEK", "db"):
        assert found[role]["attr"] == 0x27
        assert found[role]["guid"] == str(esl.VENDOR_GUIDS[role])
        assert bytes.fromhex(str(found[role]["data"])) == (EXAMPLE / f"{role}.esl").read_bytes()
        assert found[role]["time"] == bytes(esl.EfiTime(2025, 11, 26, 0, 0, 0)).hex()
    assert found["SecureBootEnable"]["data"] == "01"
    assert found["CustomMode"]["data"] == "00"


def test_same_pcr7_data_as_virt_fw_vars(tmp_path: Path, varstore: bytes) -> None:
    """A varstore made by the CLI (the shared reference boot's way) measures the same."""
    guid = json.loads((EXAMPLE / "keyset.json").read_text())["owner_guid"]
    ref = tmp_path / "ref.fd"
    subprocess.run(
        [VIRT_FW_VARS, "-i", TEMPLATE, "-o", ref, "--no-microsoft", "--secure-boot",
         "--set-pk", guid, EXAMPLE / "PK.crt", "--add-kek", guid, EXAMPLE / "KEK.crt",
         "--add-db", guid, EXAMPLE / "db.crt"],
        check=True, capture_output=True,
    )  # fmt: skip
    ours = read_secureboot_variables(varstore)
    assert read_secureboot_variables(ref.read_bytes()) == ours
    assert list(ours) == ["SecureBoot", "PK", "KEK", "db", "dbx"]
    assert ours["SecureBoot"] == (esl.EFI_GLOBAL_VARIABLE.bytes_le, b"\x01")


def test_empty_template_reads_secure_boot_off() -> None:
    found = read_secureboot_variables(TEMPLATE.read_bytes())
    assert found["SecureBoot"][1] == b"\x00"
    assert all(found[n][1] == b"" for n in ("PK", "KEK", "db", "dbx"))


def _ca_and_leaf() -> tuple[bytes, bytes]:
    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    start = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    leaf_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def cert(subject: str, key: rsa.RSAPrivateKey, issuer: str, ca: bool) -> bytes:
        c = (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(name(issuer))
            .public_key(key.public_key())
            .serial_number(1)
            .not_valid_before(start)
            .not_valid_after(start + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        return c.public_bytes(serialization.Encoding.DER)

    return cert("vendor CA", ca_key, "vendor CA", True), cert("leaf", leaf_key, "vendor CA", False)


def test_extra_db_dbx_and_db_entry_for(keyset: KeySet) -> None:
    ca, leaf = _ca_and_leaf()
    dbx = [hashlib.sha256(b"revoked").digest()]
    store = make_varstore(
        TEMPLATE.read_bytes(),
        keyset,
        extra_db=[ca, keyset.db],
        dbx_sha256=dbx,
        source_date_epoch=SDE,
    )
    found = read_secureboot_variables(store)
    db = esl.SignatureDatabase.parse(found["db"][1])
    assert [s.data for s in db.certificates()] == [keyset.db, ca]  # duplicate dropped
    assert bytes(esl.SignatureDatabase.parse(found["dbx"][1])) == bytes(
        esl.sha256_list(keyset.owner_guid, dbx)
    )
    owner = keyset.owner_guid.bytes_le
    assert db_entry_for(store, keyset.db) == (owner, keyset.db)
    assert db_entry_for(store, leaf) == (owner, ca)
    with pytest.raises(VerificationError, match="no db entry validates certificate 'CN="):
        db_entry_for(store, keyset.pk)


def test_bad_templates(keyset: KeySet) -> None:
    with pytest.raises(InputFileError, match="no edk2 NvData firmware volume"):
        make_varstore(b"\xff" * 65536, keyset, source_date_epoch=SDE)
    with pytest.raises(InputFileError, match="already holds CustomMode, KEK, PK, SecureBootEnable"):
        make_varstore((OVMF / "OVMF_VARS_4M.ms.fd").read_bytes(), keyset, source_date_epoch=SDE)
    with pytest.raises(InputFileError, match="not a SHA-256 digest"):
        make_varstore(TEMPLATE.read_bytes(), keyset, dbx_sha256=[b"x"], source_date_epoch=SDE)


def _boot(tmp_path: Path, varstore: bytes, efi: Path, timeout: float = 120) -> str:
    """Boot OVMF (Secure Boot build) with ``efi`` as the default loader; return serial text."""
    esp = tmp_path / "esp.img"
    subprocess.run(["mkfs.fat", "-C", esp, "4096"], check=True, capture_output=True)
    subprocess.run(["mmd", "-i", esp, "::/EFI", "::/EFI/BOOT"], check=True)
    subprocess.run(["mcopy", "-i", esp, efi, "::/EFI/BOOT/BOOTX64.EFI"], check=True)
    vars_copy = tmp_path / "vars.fd"
    vars_copy.write_bytes(varstore)
    serial = tmp_path / "serial.txt"
    code = OVMF / "OVMF_CODE_4M.secboot.fd"
    qemu = subprocess.Popen(
        ["qemu-system-x86_64", "-machine", "q35,smm=on,accel=tcg", "-m", "512", "-nodefaults",
         "-display", "none", "-global", "driver=cfi.pflash01,property=secure,value=on",
         "-global", "ICH9-LPC.disable_s3=1",
         "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
         "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}",
         "-drive", f"file={esp},format=raw,if=none,id=d0", "-device", "virtio-blk-pci,drive=d0",
         "-serial", f"file:{serial}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + timeout
    text = ""
    try:
        while time.monotonic() < deadline and qemu.poll() is None:
            time.sleep(0.5)
            text = serial.read_text(errors="replace") if serial.exists() else ""
            if "HelloWorld" in text or "No bootable option" in text:
                break
    finally:
        qemu.kill()
        qemu.wait()
    return text


@pytest.mark.boot
def test_ovmf_enforces_secure_boot_with_it(tmp_path: Path, varstore: bytes) -> None:
    """db-signed HelloWorld.efi runs; the unsigned one is refused (Access Denied)."""
    signed = tmp_path / "hello.signed.efi"
    subprocess.run(
        ["sbsign", "--key", EXAMPLE / "db.key", "--cert", EXAMPLE / "db.crt",
         "--output", signed, HELLO],
        check=True, capture_output=True,
    )  # fmt: skip
    (tmp_path / "a").mkdir()
    ok = _boot(tmp_path / "a", varstore, signed)
    assert "HelloWorld" in ok, ok[-2000:]
    assert "Access Denied" not in ok
    (tmp_path / "b").mkdir()
    unsigned = tmp_path / "hello.efi"
    shutil.copy(HELLO, unsigned)
    denied = _boot(tmp_path / "b", varstore, unsigned)
    assert "Access Denied" in denied, denied[-2000:]
    assert "HelloWorld" not in denied
