"""``bootchain sign`` as a process, against sign_pe and sbverify; FileSigner's own check of
each signature (its key is loaded without OpenSSL's RSA consistency check)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from builder.errors import InputFileError
from builder.secureboot.authenticode import sign_pe
from builder.secureboot.signers import FileSigner

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "keys.example"
PLAIN = ROOT / "tests/data/pe/plain.efi"


def bootchain(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "builder.cli", *map(str, argv)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )


def test_sign_verb_writes_sign_pe_bytes_and_sbverify_accepts(tmp_path: Path) -> None:
    out = tmp_path / "signed.efi"
    done = bootchain("sign", "--key", EXAMPLE / "db.key", "--cert", EXAMPLE / "db.crt", PLAIN, out)
    assert done.returncode == 0, done.stderr
    signer = FileSigner(EXAMPLE / "db.key", EXAMPLE / "db.crt")
    assert out.read_bytes() == sign_pe(PLAIN.read_bytes(), signer)
    assert shutil.which("sbverify"), "sbverify (sbsigntool) is not installed"
    subprocess.run(["sbverify", "--cert", EXAMPLE / "db.crt", out], check=True, timeout=60)


def test_sign_verb_key_spec_and_replace(tmp_path: Path) -> None:
    first, second = tmp_path / "a.efi", tmp_path / "b.efi"
    spec = f"file:{EXAMPLE / 'db.key'}"
    assert (
        bootchain("sign", "--key", spec, "--cert", EXAMPLE / "db.crt", PLAIN, first).returncode == 0
    )
    again = bootchain("sign", "--key", spec, "--cert", EXAMPLE / "db.crt", first, second)
    assert again.returncode == 2
    assert "already signed" in again.stderr
    assert not second.exists()
    args = ("sign", "--key", spec, "--cert", EXAMPLE / "db.crt", "--replace", first, second)
    assert bootchain(*args).returncode == 0
    assert second.read_bytes() == first.read_bytes()


def test_sign_verb_wrong_certificate(tmp_path: Path) -> None:
    out = tmp_path / "signed.efi"
    done = bootchain("sign", "--key", EXAMPLE / "db.key", "--cert", EXAMPLE / "KEK.crt", PLAIN, out)
    assert done.returncode == 2
    assert "does not match" in done.stderr
    assert not out.exists()


def test_inconsistent_private_key_never_signs(tmp_path: Path) -> None:
    """Right public half (so it matches the certificate), wrong private exponents."""
    good = serialization.load_pem_private_key((EXAMPLE / "db.key").read_bytes(), None)
    assert isinstance(good, rsa.RSAPrivateKey)
    n = good.private_numbers()
    bad = rsa.RSAPrivateNumbers(
        p=n.p,
        q=n.q,
        d=n.d + 2,
        dmp1=(n.dmp1 + 2) % (n.p - 1),
        dmq1=(n.dmq1 + 2) % (n.q - 1),
        iqmp=n.iqmp,
        public_numbers=n.public_numbers,
    ).private_key(unsafe_skip_rsa_key_validation=True)
    key = tmp_path / "bad.key"
    key.write_bytes(
        bad.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    signer = FileSigner(key, EXAMPLE / "db.crt")  # the public half matches
    with pytest.raises(InputFileError, match="do not verify"):
        signer.sign(b"data")
    with pytest.raises(InputFileError, match="do not verify"):
        sign_pe(PLAIN.read_bytes(), signer)


HEAVY = ("pkcs11", "boto3", "botocore", "jinja2", "rich", "yaml", "asn1crypto")


def test_sign_verb_imports_only_what_signing_needs(tmp_path: Path) -> None:
    """The verb's start-up cost is its imports: no other verb's or backend's libraries."""
    out = tmp_path / "signed.efi"
    argv = ["sign", "--key", str(EXAMPLE / "db.key"), "--cert", str(EXAMPLE / "db.crt")]
    argv += [str(PLAIN), str(out)]
    script = (
        "import sys\nfrom builder.cli import main\n"
        f"assert main({argv!r}) == 0\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        timeout=120,
        check=True,
    )
    assert done.stdout.strip() == "[]"
    assert out.exists()


@pytest.mark.parametrize(
    ("argv", "module"),
    [
        (["sign", "--key", "k"], "sign"),
        (["-v", "verify-pe", "--cert", "c", "f"], "verify_pe"),
        (["boot-test", "out"], "boot_test"),
        (["--version"], None),
        (["nosuch"], None),
        ([], None),
    ],
    ids=["sign", "after-option", "dashed", "no-verb", "unknown", "empty"],
)
def test_verb_module(argv: list[str], module: str | None) -> None:
    from builder.cli import verb_module

    assert verb_module(argv) == module


def test_sign_verb_names_the_bad_input(tmp_path: Path) -> None:
    out = tmp_path / "signed.efi"
    bad = EXAMPLE / "db.crt"
    done = bootchain("sign", "--key", EXAMPLE / "db.key", "--cert", EXAMPLE / "db.crt", bad, out)
    assert done.returncode == 2
    assert f"{bad}: not a PE image" in done.stderr
    assert not out.exists()
