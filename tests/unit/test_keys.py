"""Key sets: generation, the CLI, and one clear error per problem in load_keyset."""

from __future__ import annotations

import datetime
import json
import re
import shutil
import stat
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from builder.cli import main
from builder.errors import InputFileError, UserInputError
from builder.secureboot import esl
from builder.secureboot.keys import ROLES, generate_keyset, load_keyset

ROOT = Path(__file__).resolve().parents[2]
SDE = 1764115200
AT = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
OWNER = uuid.UUID("11111111-2222-4333-8444-555555555555")


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("keys") / "set"
    generate_keyset(directory, source_date_epoch=SDE, owner_guid=OWNER, subject_prefix="t")
    return directory


@pytest.fixture
def keyset_dir(generated: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "set"
    shutil.copytree(generated, copy)
    return copy


def test_generated_set_is_complete(generated: Path) -> None:
    names = sorted(p.name for p in generated.iterdir())
    assert names == sorted(
        [f"{r}.{e}" for r in ROLES for e in ("key", "crt", "der", "esl", "auth")] + ["keyset.json"]
    )
    for role in ROLES:
        assert stat.S_IMODE((generated / f"{role}.key").stat().st_mode) == 0o600
    meta = json.loads((generated / "keyset.json").read_text())
    assert meta["owner_guid"] == str(OWNER)
    assert meta["algorithm"] == "rsa2048"
    assert meta["example"] is False
    ks = load_keyset(generated, at=AT)
    assert ks.owner_guid == OWNER
    assert ks.fingerprints == {r: meta["certificates"][r]["sha256"] for r in ROLES}
    assert not ks.example
    assert ks.paths["db"].key == generated / "db.key"


def test_certificates(generated: Path) -> None:
    for role in ROLES:
        cert = x509.load_der_x509_certificate((generated / f"{role}.der").read_bytes())
        assert cert.subject == cert.issuer
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == f"t {role}"
        assert cert.not_valid_before_utc == datetime.datetime(2025, 11, 26, tzinfo=datetime.UTC)
        assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days == 3650
        cert.verify_directly_issued_by(cert)
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        assert usage.digital_signature
        if role == "db":
            eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            assert list(eku) == [ExtendedKeyUsageOID.CODE_SIGNING]


def test_auth_chain(generated: Path) -> None:
    signed_by = {"PK": "PK", "KEK": "PK", "db": "KEK"}
    for role, by in signed_by.items():
        auth = esl.AuthenticatedVariable.parse((generated / f"{role}.auth").read_bytes())
        assert auth.timestamp == esl.EfiTime(2025, 11, 26, 0, 0, 0)
        esl.verify_variable(role, auth, (generated / f"{by}.der").read_bytes())


def test_refuses_to_overwrite(generated: Path) -> None:
    before = (generated / "PK.key").read_bytes()
    with pytest.raises(UserInputError, match="refusing to overwrite"):
        generate_keyset(generated, source_date_epoch=SDE)
    assert (generated / "PK.key").read_bytes() == before


def test_unknown_algorithm(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="unknown key algorithm"):
        generate_keyset(tmp_path / "x", source_date_epoch=SDE, algorithm="ed25519")


# Regression: a long --subject (X.509 CN is at most 64 characters) and a SOURCE_DATE_EPOCH
# outside the years certificates can express were ValueError tracebacks from cryptography.
@pytest.mark.parametrize(
    ("env", "args", "message"),
    [
        ({}, ["--subject", "x" * 61], r"makes a 65-character common name; X\.509 allows 64"),
        ({"SOURCE_DATE_EPOCH": "-99999999999"}, [], r"SOURCE_DATE_EPOCH -99999999999: .*"),
        ({"SOURCE_DATE_EPOCH": "99999999999999"}, [], r"would not fit 1970\.\.9999"),
    ],
    ids=["subject-too-long", "epoch-before-1970", "epoch-after-9999"],
)
def test_cli_generate_bad_values_are_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    args: list[str],
    message: str,
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", str(SDE))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    target = tmp_path / "bad"
    assert main(["keys", "generate", str(target), *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    assert not target.exists()


# Regression: a key set folder that cannot be made (its parent is a file) was a traceback.
def test_generate_where_no_folder_can_be_made(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserInputError, match=r"file: cannot make the key set folder"):
        generate_keyset(tmp_path / "file" / "keys", source_date_epoch=SDE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_cli_generate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", str(SDE))
    target = tmp_path / "cli"
    assert main(["keys", "generate", str(target), "--example", "--algorithm", "rsa3072"]) == 0
    ks = load_keyset(target, at=AT)
    assert ks.example and ks.algorithm == "rsa3072"
    assert "owner GUID" in capsys.readouterr().out
    assert main(["keys", "generate", str(target)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err


def test_example_keys_load() -> None:
    ks = load_keyset(ROOT / "keys.example", at=AT)
    assert ks.example
    assert "PUBLIC TEST KEYS" in (ROOT / "keys.example" / "README.md").read_text()


def _self_signed(key: rsa.RSAPrivateKey, eku: bool) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t db")])
    start = datetime.datetime(2025, 11, 26, tzinfo=datetime.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=1000))
    )
    if eku:
        b = b.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    return b.sign(key, hashes.SHA256())


def _replace_db_cert(directory: Path, eku: bool) -> None:
    pem = (directory / "db.key").read_bytes()
    key = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    cert = _self_signed(key, eku)
    (directory / "db.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "db.der").write_bytes(cert.public_bytes(serialization.Encoding.DER))


def _break(directory: Path, problem: str) -> None:
    if problem == "missing-key":
        (directory / "KEK.key").unlink()
    elif problem == "missing-auth":
        (directory / "db.auth").unlink()
    elif problem == "missing-json":
        (directory / "keyset.json").unlink()
    elif problem == "key-mismatch":
        shutil.copy(directory / "KEK.key", directory / "db.key")
    elif problem == "der-differs":
        shutil.copy(directory / "KEK.der", directory / "db.der")
    elif problem == "db-no-eku":
        _replace_db_cert(directory, eku=False)
    elif problem == "db-wrong-eku":
        _replace_db_cert(directory, eku=True)
    elif problem == "esl-other-owner":
        der = (directory / "KEK.der").read_bytes()
        (directory / "KEK.esl").write_bytes(bytes(esl.x509_list(uuid.UUID(int=1), der)))
    elif problem == "auth-wrong-signer":
        data = (directory / "KEK.esl").read_bytes()
        from builder.secureboot.signers import FileSigner

        signer = FileSigner(directory / "db.key", directory / "db.crt")
        auth = esl.sign_variable("KEK", data, signer, esl.EfiTime.from_epoch(SDE))
        (directory / "KEK.auth").write_bytes(bytes(auth))
    elif problem == "fingerprint":
        meta = json.loads((directory / "keyset.json").read_text())
        meta["certificates"]["PK"]["sha256"] = "00" * 32
        (directory / "keyset.json").write_text(json.dumps(meta))
    elif problem == "crt-holds-private-key":
        with (directory / "PK.crt").open("ab") as f:
            f.write((directory / "PK.key").read_bytes())
    elif problem == "auth-truncated":
        (directory / "db.auth").write_bytes((directory / "db.auth").read_bytes()[:100])
    elif problem == "auth-garbled-pkcs7":
        data = bytearray((directory / "db.auth").read_bytes())
        data[40:200] = bytes(b ^ 0x5A for b in data[40:200])
        (directory / "db.auth").write_bytes(data)
    elif problem == "bad-guid":
        meta = json.loads((directory / "keyset.json").read_text())
        meta["owner_guid"] = "nope"
        (directory / "keyset.json").write_text(json.dumps(meta))


PROBLEMS = {
    "missing-key": r"KEK\.key: private key is missing",
    "missing-auth": r"db\.auth: db authenticated update is missing",
    "missing-json": r"keyset\.json: key set description is missing",
    "key-mismatch": r"db\.crt: certificate does not match its key db\.key",
    "der-differs": r"db\.der: differs from db\.crt",
    "db-no-eku": r"db\.crt: db certificate has no extended key usage",
    "db-wrong-eku": r"db\.crt: db certificate extended key usage lacks codeSigning",
    "esl-other-owner": r"KEK\.esl: is not one EFI_CERT_X509 list",
    "auth-wrong-signer": r"KEK\.auth: not signed by PK",
    "fingerprint": r"keyset\.json: sha256 of PK does not match PK\.crt",
    "bad-guid": r"keyset\.json: owner_guid 'nope' is no GUID",
    # Regression: a combined cert+key PEM loaded fine, and the build copied the .crt (with the
    # private key) into the published keys/ folder.
    "crt-holds-private-key": r"PK\.crt: holds a private key",
    # Regression: a damaged .auth gave an error that did not name the file.
    "auth-truncated": r"db\.auth: WIN_CERTIFICATE at offset 0x10: dwLength \d+ out of range",
    "auth-garbled-pkcs7": r"db\.auth: EFI_VARIABLE_AUTHENTICATION_2: bad PKCS#7",
}


@pytest.mark.parametrize(("problem", "message"), PROBLEMS.items(), ids=PROBLEMS.keys())
def test_load_keyset_problems(keyset_dir: Path, problem: str, message: str) -> None:
    _break(keyset_dir, problem)
    with pytest.raises(InputFileError, match=message) as info:
        load_keyset(keyset_dir, at=AT)
    assert "\n" not in info.value.one_line()


def test_expired(keyset_dir: Path) -> None:
    with pytest.raises(InputFileError, match=r"PK\.crt: PK certificate expired on 2035-11-24"):
        load_keyset(keyset_dir, at=datetime.datetime(2040, 1, 1, tzinfo=datetime.UTC))


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(InputFileError, match="key set folder not found"):
        load_keyset(tmp_path / "absent")


def test_cli_generate_release(tmp_path: Path) -> None:
    assert main(["keys", "generate-release", str(tmp_path / "rel")]) == 0
    assert sorted(p.name for p in (tmp_path / "rel").iterdir()) == ["release.key", "release.pub"]
