"""PE, UKI and Authenticode code against independent tools: sbverify, osslsigncode, pesign,
systemd-measure and objcopy, on the pinned systemd-boot-efi 252 binaries.

The binaries come from `apt-get download systemd-boot-efi` (one download per session). A
missing tool fails the test (no skip).
"""

from __future__ import annotations

import datetime
import random
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from builder.errors import VerificationError
from builder.pe import authenticode_digest, parse_pe
from builder.secureboot.authenticode import load_certificates, sign_pe, verify_pe
from builder.secureboot.signers import FileSigner
from builder.uki import UKISection, make_uki, read_uki_sections

pytestmark = pytest.mark.network

SDE = 1_700_000_000
EFI_DIR = "usr/lib/systemd/boot/efi"
SYSTEMD_MEASURE = "/usr/lib/systemd/systemd-measure"


def der(pem: Path) -> list[bytes]:
    return load_certificates(pem.read_bytes(), str(pem))


def tool(*argv: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        check=check,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )


@dataclass(frozen=True)
class Binaries:
    stub: Path
    boot: Path


@pytest.fixture(scope="session")
def binaries(tmp_path_factory: pytest.TempPathFactory) -> Binaries:
    """linuxx64.efi.stub and systemd-bootx64.efi from the systemd-boot-efi package."""
    base = tmp_path_factory.mktemp("systemd-boot-efi")
    subprocess.run(
        ["apt-get", "download", "systemd-boot-efi"],
        cwd=base,
        check=True,
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )
    (deb,) = base.glob("systemd-boot-efi_*.deb")
    tool("dpkg-deb", "-x", deb, base / "root")
    efi = base / "root" / EFI_DIR
    return Binaries(stub=efi / "linuxx64.efi.stub", boot=efi / "systemd-bootx64.efi")


@dataclass(frozen=True)
class Keys:
    ca_pem: Path
    db_pem: Path
    db_key: Path
    other_pem: Path

    def signer(self) -> FileSigner:
        return FileSigner(self.db_key, self.db_pem)


def _write_pair(
    folder: Path, name: str, issuer: tuple[rsa.RSAPrivateKey, x509.Certificate] | None
) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"bootchain test {name}")])
    start = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[1].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(random.Random(name).getrandbits(63))
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=36500))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), True)
        .sign(issuer[0] if issuer else key, hashes.SHA256())
    )
    (folder / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return key, cert


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    folder = tmp_path_factory.mktemp("keys")
    ca = _write_pair(folder, "ca", None)
    _write_pair(folder, "db", ca)
    _write_pair(folder, "other", None)
    return Keys(folder / "ca.pem", folder / "db.pem", folder / "db.key", folder / "other.pem")


def uki_plan(binaries: Binaries) -> list[UKISection]:
    rng = random.Random(252)
    return [
        UKISection(".osrel", b'ID=debian\nVERSION_ID="12"\nPRETTY_NAME="bootchain test"\n', True),
        UKISection(".cmdline", b"console=ttyS0 quiet panic=-1", True),
        UKISection(".initrd", rng.randbytes(3 * 1024 * 1024 + 17), True),
        # any PE stands in for the kernel here; the Debian vmlinuz is 8 MB more of the same
        UKISection(".linux", binaries.boot.read_bytes(), True),
    ]


@pytest.fixture(scope="session")
def uki(binaries: Binaries) -> bytes:
    return make_uki(binaries.stub.read_bytes(), uki_plan(binaries), SDE)


@pytest.fixture(scope="session")
def signed_files(
    tmp_path_factory: pytest.TempPathFactory, binaries: Binaries, keys: Keys, uki: bytes
) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("signed")
    out = {}
    with_gap = uki + b"\x5a" * 13  # trailing data after the last section, odd length
    for name, data in (("boot", binaries.boot.read_bytes()), ("uki", uki), ("uki-gap", with_gap)):
        path = folder / f"{name}.efi"
        path.write_bytes(sign_pe(data, keys.signer()))
        out[name] = path
    return out


# --- UKI against systemd-measure and objcopy -----------------------------------------------


def measure(folder: Path) -> str:
    proc = tool(
        SYSTEMD_MEASURE,
        "calculate",
        *(f"--{name}={folder / name}" for name in ("linux", "osrel", "cmdline", "initrd")),
        "--bank=sha256",
    )
    return proc.stdout


def test_pcr11_from_uki_sections_equals_from_inputs(
    tmp_path: Path, binaries: Binaries, uki: bytes
) -> None:
    inputs, ours, objcopy = tmp_path / "in", tmp_path / "ours", tmp_path / "objcopy"
    for folder in (inputs, ours, objcopy):
        folder.mkdir()
    for section in uki_plan(binaries):
        (inputs / section.name[1:]).write_bytes(section.data)
    for name, data in read_uki_sections(uki).items():
        (ours / name[1:]).write_bytes(data)
    uki_path = tmp_path / "uki.efi"
    uki_path.write_bytes(uki)
    dumps = [f"--dump-section=.{n}={objcopy / n}" for n in ("linux", "osrel", "cmdline", "initrd")]
    tool("objcopy", *dumps, uki_path, tmp_path / "scratch.efi")
    expected = measure(inputs)
    assert re.search(r"^11:sha256=[0-9a-f]{64}$", expected, re.MULTILINE)
    assert measure(ours) == expected
    assert measure(objcopy) == expected


def test_make_uki_twice_is_byte_identical(binaries: Binaries, uki: bytes) -> None:
    assert make_uki(binaries.stub.read_bytes(), uki_plan(binaries), SDE) == uki


def test_objdump_reads_the_uki(tmp_path: Path, uki: bytes) -> None:
    path = tmp_path / "uki.efi"
    path.write_bytes(uki)
    headers = tool("objdump", "-h", path).stdout
    for name in (".osrel", ".cmdline", ".initrd", ".linux"):
        assert re.search(rf"\s{re.escape(name)}\s", headers), name
    private = tool("objdump", "-p", path).stdout
    assert re.search(r"Time/Date\s+Tue Nov 14 22:13:20 2023", private), private[:400]


# --- digests against pesign and osslsigncode -----------------------------------------------


def pesign_hash(path: Path) -> str:
    match = re.search(r"hash:\s*([0-9a-f]{64})", tool("pesign", "-h", "-i", path).stdout)
    assert match, "pesign printed no hash"
    return match.group(1)


@pytest.mark.parametrize("trailing", [b"", b"\x01" * 13], ids=["uki", "uki-with-trailing-gap"])
def test_digest_equals_pesign(tmp_path: Path, uki: bytes, trailing: bytes) -> None:
    path = tmp_path / "uki.efi"
    path.write_bytes(uki + trailing)
    assert pesign_hash(path) == authenticode_digest(uki + trailing).hex()


def test_stub_with_symbol_table_gap_digest_equals_pesign(binaries: Binaries) -> None:
    data = binaries.stub.read_bytes()
    assert parse_pe(data).data_end < len(data)  # the COFF symbol table follows the sections
    assert pesign_hash(binaries.stub) == authenticode_digest(data).hex()


def osslsigncode_verify(path: Path, ca: Path) -> subprocess.CompletedProcess[str]:
    return tool("osslsigncode", "verify", "-in", path, "-CAfile", ca, check=False)


@pytest.mark.parametrize("name", ["boot", "uki", "uki-gap"])
def test_osslsigncode_accepts_and_computes_our_digest(
    signed_files: dict[str, Path], keys: Keys, name: str
) -> None:
    proc = osslsigncode_verify(signed_files[name], keys.ca_pem)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    current = re.search(r"Current message digest\s*:\s*([0-9A-F]+)", out)
    calculated = re.search(r"Calculated message digest\s*:\s*([0-9A-F]+)", out)
    assert current and calculated, out
    ours = authenticode_digest(signed_files[name].read_bytes()).hex().upper()
    assert current.group(1) == calculated.group(1) == ours
    assert "MISMATCH" not in out


def test_osslsigncode_rejects_another_ca(signed_files: dict[str, Path], keys: Keys) -> None:
    assert osslsigncode_verify(signed_files["uki"], keys.other_pem).returncode != 0


# --- signatures against sbverify -----------------------------------------------------------


@pytest.mark.parametrize("name", ["boot", "uki", "uki-gap"])
@pytest.mark.parametrize("cert", ["db", "ca"])
def test_sbverify_accepts(signed_files: dict[str, Path], keys: Keys, name: str, cert: str) -> None:
    pem = keys.db_pem if cert == "db" else keys.ca_pem
    proc = tool("sbverify", "--cert", pem, signed_files[name], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    verify_pe(signed_files[name].read_bytes(), der(pem))


def test_sbverify_rejects_another_cert(signed_files: dict[str, Path], keys: Keys) -> None:
    proc = tool("sbverify", "--cert", keys.other_pem, signed_files["uki"], check=False)
    assert proc.returncode != 0
    with pytest.raises(VerificationError):
        verify_pe(signed_files["uki"].read_bytes(), der(keys.other_pem))


@pytest.mark.parametrize("where", [".linux", ".cmdline", "headers"])
def test_flipped_byte_is_rejected_by_all(
    tmp_path: Path, signed_files: dict[str, Path], keys: Keys, where: str
) -> None:
    data = bytearray(signed_files["uki"].read_bytes())
    image = parse_pe(data)
    if where == "headers":
        offset = image.optional_offset + 4  # SizeOfCode: hashed, not checked by loaders
    else:
        offset = next(s for s in image.sections if s.name == where).raw_offset + 3
    data[offset] ^= 0x40
    path = tmp_path / "tampered.efi"
    path.write_bytes(data)
    assert tool("sbverify", "--cert", keys.db_pem, path, check=False).returncode != 0
    assert osslsigncode_verify(path, keys.ca_pem).returncode != 0
    with pytest.raises(VerificationError, match="digest mismatch"):
        verify_pe(bytes(data), der(keys.db_pem))


def test_signing_twice_is_byte_identical(
    keys: Keys, uki: bytes, signed_files: dict[str, Path]
) -> None:
    assert sign_pe(uki, keys.signer()) == signed_files["uki"].read_bytes()


def test_we_verify_what_sbsign_signs(tmp_path: Path, binaries: Binaries, keys: Keys) -> None:
    out = tmp_path / "sbsigned.efi"
    tool("sbsign", "--key", keys.db_key, "--cert", keys.db_pem, "--output", out, binaries.boot)
    verify_pe(out.read_bytes(), der(keys.ca_pem))


def test_verify_pe_cli_with_esl(tmp_path: Path, signed_files: dict[str, Path], keys: Keys) -> None:
    from tests.conftest import bootchain

    esl = tmp_path / "db.esl"
    tool("cert-to-efi-sig-list", keys.db_pem, esl)
    ok = bootchain("verify-pe", "--cert", esl, signed_files["uki"])
    assert "signature OK" in ok.stdout
    bad = bootchain("verify-pe", "--cert", keys.other_pem, signed_files["uki"], check=False)
    assert bad.returncode == 4, bad.stderr
    assert "not by a trusted certificate" in bad.stderr


def test_inspect_cli_json(signed_files: dict[str, Path]) -> None:
    import json

    from tests.conftest import bootchain

    report = json.loads(bootchain("inspect", "--json", signed_files["uki"]).stdout)
    data = signed_files["uki"].read_bytes()
    assert report["signed"] is True
    assert report["authenticode_sha256"] == authenticode_digest(data).hex()
    sections = {s["name"]: s for s in report["sections"]}
    assert {".osrel", ".cmdline", ".initrd", ".linux"} <= set(sections)
    initrd = read_uki_sections(data)[".initrd"]
    assert sections[".initrd"]["virtual_size"] == len(initrd)
    assert pesign_hash(signed_files["uki"]) == report["authenticode_sha256"]
