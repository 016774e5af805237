"""Signer backends against real keys: PEM files and a SoftHSM2 token.

RSA PKCS#1 v1.5 is deterministic, so the token's signature must equal the file signer's on
the same data, and an .auth signed through the token must equal the efitools golden file.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from builder.errors import InputFileError, StoreError, UserInputError
from builder.secureboot import esl
from builder.secureboot.signer import Signer
from builder.secureboot.signers import FileSigner, KMSSigner, PKCS11Signer, open_signer

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "keys.example"
GOLDEN = ROOT / "tests" / "data" / "secureboot"
MODULE = "/usr/lib/softhsm/libsofthsm2.so"
TOKEN = "bootchain-test"
PIN = "246810"
DATA = b"bootchain signer test\n" * 10


@pytest.fixture(scope="module")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A SoftHSM2 token holding the example db and KEK keys; yields the PIN file."""
    base = tmp_path_factory.mktemp("softhsm")
    (base / "tokens").mkdir()
    conf = base / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {base / 'tokens'}\nobjectstore.backend = file\n")
    old = os.environ.get("SOFTHSM2_CONF")
    # SoftHSM reads its configuration once per process, at C_Initialize.
    os.environ["SOFTHSM2_CONF"] = str(conf)
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}

    def util(*args: str) -> None:
        subprocess.run(["softhsm2-util", *args], check=True, env=env, capture_output=True)

    util("--init-token", "--free", "--label", TOKEN, "--pin", PIN, "--so-pin", "13579")
    for ident, role in (("01", "db"), ("02", "KEK")):
        util(
            "--import", str(EXAMPLE / f"{role}.key"), "--token", TOKEN,
            "--label", role, "--id", ident, "--pin", PIN,
        )  # fmt: skip
    pin_file = base / "pin"
    pin_file.write_text(PIN + "\n")
    yield pin_file
    if old is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = old


def _uri(obj: str, pin_file: Path, token: str = TOKEN) -> str:
    return f"pkcs11:token={token};object={obj}?module-path={MODULE}&pin-source=file:{pin_file}"


def test_pkcs11_signature_equals_file_signature(softhsm: Path) -> None:
    token = open_signer(_uri("db", softhsm), EXAMPLE / "db.crt")
    assert isinstance(token, PKCS11Signer)
    with token:
        file = open_signer(f"file:{EXAMPLE / 'db.key'}", EXAMPLE / "db.crt")
        assert isinstance(token, Signer) and isinstance(file, Signer)
        assert token.sign(DATA) == file.sign(DATA)
        assert token.certificate == file.certificate == (EXAMPLE / "db.der").read_bytes()
        assert token.description == f"pkcs11:token={TOKEN};object=db"
        assert PIN not in token.description


def test_pkcs11_auth_equals_efitools(softhsm: Path) -> None:
    data = (EXAMPLE / "db.esl").read_bytes()
    with PKCS11Signer(MODULE, TOKEN, "KEK", EXAMPLE / "KEK.crt", pin_file=softhsm) as kek:
        auth = esl.sign_variable("db", data, kek, esl.EfiTime.from_epoch(1764115200))
    assert bytes(auth) == (GOLDEN / "db.efitools.auth").read_bytes()


def test_pkcs11_pin_from_environment(softhsm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BOOTCHAIN_PKCS11_PIN", PIN)
    signer = open_signer(f"pkcs11:token={TOKEN};object=db?module-path={MODULE}", EXAMPLE / "db.crt")
    assert isinstance(signer, PKCS11Signer)
    with signer:
        assert signer.sign(b"x")


def test_pkcs11_wrong_pin(softhsm: Path, tmp_path: Path) -> None:
    wrong = tmp_path / "pin"
    wrong.write_text("000000\n")
    with pytest.raises(InputFileError) as info:
        open_signer(_uri("db", wrong), EXAMPLE / "db.crt")
    assert info.value.one_line() == f"wrong PIN for PKCS#11 token '{TOKEN}'"


def test_pkcs11_missing_token(softhsm: Path) -> None:
    with pytest.raises(InputFileError) as info:
        open_signer(_uri("db", softhsm, token="absent"), EXAMPLE / "db.crt")
    assert info.value.message == f"PKCS#11 token 'absent' not found in {MODULE}"
    assert "\n" not in info.value.one_line()


def test_pkcs11_missing_key(softhsm: Path) -> None:
    with pytest.raises(InputFileError, match="no private key labelled 'PK'"):
        open_signer(_uri("PK", softhsm), EXAMPLE / "PK.crt")


def test_pkcs11_certificate_mismatch(softhsm: Path) -> None:
    with pytest.raises(InputFileError, match=r"PK\.crt: certificate does not match the key"):
        open_signer(_uri("db", softhsm), EXAMPLE / "PK.crt")


def test_pkcs11_pin_value_refused() -> None:
    with pytest.raises(UserInputError, match="pin-value"):
        open_signer(f"pkcs11:token=t;object=o?module-path={MODULE}&pin-value=1", EXAMPLE / "db.crt")


# Regression: pin-value as a path attribute was silently accepted, and a URI with another
# mistake was echoed whole, PIN included, in the error line.
PIN_IN_URI = {
    "path-attribute": f"pkcs11:token=t;object=o;pin-value=98765?module-path={MODULE}",
    "path-attribute-encoded": f"pkcs11:token=t;object=o;pin%2Dvalue=98765?module-path={MODULE}",
    "beside-a-malformed-attribute": "pkcs11:token=t;object=o;oops?pin-value=98765&module-path=/x",
    "with-a-missing-attribute": "pkcs11:token=t;pin-value=98765",
}


@pytest.mark.parametrize("uri", PIN_IN_URI.values(), ids=PIN_IN_URI.keys())
def test_pkcs11_pin_value_refused_and_never_echoed(uri: str) -> None:
    with pytest.raises(UserInputError, match="pin-value") as info:
        open_signer(uri, EXAMPLE / "db.crt")
    assert "98765" not in info.value.one_line()


# Regression: a passphrase file that is not UTF-8 escaped as a UnicodeDecodeError traceback
# whose message quoted the secret's bytes.
def test_passphrase_file_not_utf8(tmp_path: Path) -> None:
    key = serialization.load_pem_private_key((EXAMPLE / "db.key").read_bytes(), password=None)
    secret = b"\xffpass\xfe"
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(secret),
    )
    (tmp_path / "db.key").write_bytes(pem)
    (tmp_path / "pass").write_bytes(secret + b"\n")
    spec = f"file:{tmp_path / 'db.key'}?passphrase-file={tmp_path / 'pass'}"
    with pytest.raises(InputFileError, match=r"pass: the passphrase of .* is not UTF-8") as info:
        open_signer(spec, EXAMPLE / "db.crt")
    assert "0xff" not in info.value.one_line()


@pytest.fixture
def encrypted_key(tmp_path: Path) -> Path:
    key = serialization.load_pem_private_key((EXAMPLE / "db.key").read_bytes(), password=None)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"correct horse"),
    )
    path = tmp_path / "db.key"
    path.write_bytes(pem)
    return path


def test_file_encrypted_key(
    encrypted_key: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = FileSigner(EXAMPLE / "db.key", EXAMPLE / "db.crt")
    monkeypatch.setenv("MY_PASS", "correct horse")
    by_env = FileSigner(encrypted_key, EXAMPLE / "db.crt", passphrase_env="MY_PASS")
    pfile = tmp_path / "pass"
    pfile.write_text("correct horse\n")
    by_file = open_signer(f"file:{encrypted_key}?passphrase-file={pfile}", EXAMPLE / "db.crt")
    assert by_env.sign(DATA) == by_file.sign(DATA) == plain.sign(DATA)
    cert_key = plain._key.public_key()
    assert isinstance(cert_key, rsa.RSAPublicKey)
    cert_key.verify(plain.sign(DATA), DATA, padding.PKCS1v15(), hashes.SHA256())


def test_file_wrong_passphrase(encrypted_key: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BOOTCHAIN_KEY_PASSPHRASE", "wrong")
    with pytest.raises(InputFileError) as info:
        open_signer(f"file:{encrypted_key}", EXAMPLE / "db.crt")
    assert info.value.one_line() == f"{encrypted_key}: wrong passphrase for the key"


def test_file_no_passphrase(encrypted_key: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BOOTCHAIN_KEY_PASSPHRASE", raising=False)
    with pytest.raises(InputFileError, match="key is encrypted and no passphrase was given"):
        FileSigner(encrypted_key, EXAMPLE / "db.crt")
    with pytest.raises(UserInputError, match=r"environment variable NOPE .* is not set"):
        FileSigner(encrypted_key, EXAMPLE / "db.crt", passphrase_env="NOPE")


def test_file_certificate_mismatch() -> None:
    with pytest.raises(InputFileError, match=r"KEK\.crt: certificate does not match the key"):
        FileSigner(EXAMPLE / "db.key", EXAMPLE / "KEK.crt")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("db.key", "has no scheme"),
        ("gpg:abc", "unknown key scheme 'gpg'"),
        ("file:/nonexistent/db.key", "cannot read key"),
        ("file:x?passphrase=1", "unknown option 'passphrase'"),
        ("pkcs11:object=db?module-path=/x.so", "no token="),
    ],
)
def test_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(UserInputError, match=message):
        open_signer(spec, EXAMPLE / "db.crt")


class _KMSLike:
    """Stands in for a boto3 KMS client: answers get_public_key and sign with a real key."""

    def __init__(self, key_path: Path) -> None:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert isinstance(key, rsa.RSAPrivateKey)
        self.key = key
        self.calls: list[dict[str, object]] = []

    def get_public_key(self, KeyId: str) -> dict[str, bytes]:
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        return {"PublicKey": self.key.public_key().public_bytes(serialization.Encoding.DER, spki)}

    def sign(self, **kwargs: object) -> dict[str, bytes]:
        self.calls.append(kwargs)
        assert kwargs["MessageType"] == "DIGEST"
        assert kwargs["SigningAlgorithm"] == "RSASSA_PKCS1_V1_5_SHA_256"
        digest = kwargs["Message"]
        assert isinstance(digest, bytes) and len(digest) == 32
        from cryptography.hazmat.primitives.asymmetric import utils

        signature = self.key.sign(digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
        return {"Signature": signature}


def test_kms_signer_contract() -> None:
    """The KMS backend's request shape; no AWS here (the client is a local stand-in)."""
    client = _KMSLike(EXAMPLE / "db.key")
    kms = KMSSigner("alias/db", EXAMPLE / "db.crt", client=client)
    assert kms.sign(DATA) == FileSigner(EXAMPLE / "db.key", EXAMPLE / "db.crt").sign(DATA)
    assert client.calls[0]["KeyId"] == "alias/db"
    assert kms.description == "kms:alias/db"
    with pytest.raises(InputFileError, match="certificate does not match KMS key"):
        KMSSigner("alias/db", EXAMPLE / "KEK.crt", client=client)


# Regression: every AWS SDK failure (no region, no credentials, no connection) escaped from the
# KMS backend as a botocore traceback.
def test_kms_without_region_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    with pytest.raises(UserInputError, match="KMS key abc: no AWS region configured"):
        open_signer("kms:abc", EXAMPLE / "db.crt")


def test_kms_without_credentials_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(UserInputError, match="KMS key abc: no AWS credentials found"):
        open_signer("kms:abc?region=eu-west-1", EXAMPLE / "db.crt")


def test_kms_unreachable_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", "http://127.0.0.1:9")  # discard port: refused
    with pytest.raises(StoreError, match="KMS key abc: GetPublicKey failed: Could not connect"):
        open_signer("kms:abc?region=eu-west-1", EXAMPLE / "db.crt")
