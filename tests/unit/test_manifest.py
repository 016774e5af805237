"""Golden manifest schema, canonical bytes, DSSE envelopes, trust files.

Independent oracles: the DSSE spec's PAE example, and `openssl` for keyids (sha256 of the
SPKI DER) and for verifying our Ed25519 / ECDSA P-256 signatures over the PAE bytes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from builder import dsse
from builder.errors import InputFileError, VerificationError
from builder.manifest import (
    CHANNEL_PAYLOAD_TYPE,
    MANIFEST_PAYLOAD_TYPE,
    ChannelPointer,
    IndexEntry,
    Manifest,
    ReleaseIndex,
    manifest_from_build,
    verify_envelope,
    version_key,
)
from tests.fake_outdir import make_outdir, make_release_key


@pytest.fixture(scope="module")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("release")


@pytest.fixture(scope="module")
def key_and_trust(keydir: Path) -> tuple[dsse.ReleaseKey, dsse.Trust]:
    key, trust_path = make_release_key(keydir)
    return key, dsse.load_trust(trust_path)


@pytest.fixture
def manifest(tmp_path: Path) -> Manifest:
    return manifest_from_build(make_outdir(tmp_path))


def test_pae_matches_the_dsse_spec_example() -> None:
    # github.com/secure-systems-lab/dsse protocol.md, "PAE" example
    assert (
        dsse.pae("http://example.com/HelloWorld", b"hello world")
        == b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


def test_generate_release_key_writes_0600_key_and_refuses_overwrite(keydir: Path) -> None:
    d = keydir.parent / "gen"
    dsse.generate_release_key(d)
    assert (d / "release.key").stat().st_mode & 0o777 == 0o600
    assert (d / "release.pub").read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    with pytest.raises(InputFileError, match="refusing to overwrite"):
        dsse.generate_release_key(d)


@pytest.mark.parametrize("algorithm", ["ed25519", "ecdsa-p256"])
def test_signature_and_keyid_verify_with_openssl(tmp_path: Path, algorithm: str) -> None:
    key, _ = make_release_key(tmp_path, algorithm)
    der = subprocess.run(
        ["openssl", "pkey", "-pubin", "-in", tmp_path / "release.pub", "-outform", "DER"],
        check=True,
        capture_output=True,
    ).stdout
    assert key.keyid == hashlib.sha256(der).hexdigest()

    envelope = json.loads(dsse.sign_envelope(b'{"x":1}', "text/x-test", [key]))
    (sig,) = envelope["signatures"]
    assert sig["keyid"] == key.keyid
    message = tmp_path / "pae.bin"
    message.write_bytes(dsse.pae("text/x-test", base64.b64decode(envelope["payload"])))
    (tmp_path / "sig.bin").write_bytes(base64.b64decode(sig["sig"]))
    argv = ["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", tmp_path / "release.pub"]
    argv += ["-rawin", "-in", message, "-sigfile", tmp_path / "sig.bin"]
    if algorithm != "ed25519":
        argv += ["-digest", "sha256"]
    proc = subprocess.run(argv, capture_output=True, check=False)
    assert proc.returncode == 0, proc.stderr
    # and the same check fails on a changed message
    message.write_bytes(message.read_bytes() + b" ")
    assert subprocess.run(argv, capture_output=True, check=False).returncode != 0


def test_manifest_round_trips_to_identical_canonical_bytes(manifest: Manifest) -> None:
    data = manifest.to_bytes()
    assert (
        data
        == json.dumps(
            json.loads(data), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode()
    )
    again = Manifest.from_dict(json.loads(data))
    assert again == manifest
    assert again.to_bytes() == data


def test_manifest_carries_the_build_contract(manifest: Manifest) -> None:
    doc = manifest.to_dict()
    assert doc["schema"] == "bootchain.manifest/v1"
    assert doc["recipe"] == {
        "digest": "ab" * 32,
        "lock": {"packages": [{"name": "linux", "v": "6.1"}]},
    }
    names = [a["name"] for a in doc["artifacts"]]
    assert names == sorted(names) and "BOOTX64.EFI" in names
    assert manifest.artifact("BOOTX64.EFI").authenticode_sha256
    assert manifest.artifact("disk.img").authenticode_sha256 is None
    assert doc["secure_boot"]["keyset"]["db"] == "03" * 32
    ref = manifest.platform(None)
    assert ref["pcrs"]["sha256"]["4"] and ref["events"][0]["pcr"] == 4


def test_same_build_gives_the_same_signed_envelope(tmp_path: Path, key_and_trust) -> None:  # type: ignore[no-untyped-def]
    key, _ = key_and_trust
    a = manifest_from_build(make_outdir(tmp_path / "a")).sign(key)
    b = manifest_from_build(make_outdir(tmp_path / "b")).sign(key)
    assert a == b  # Ed25519 is deterministic; the payload has no paths or times


def test_verify_accepts_the_signed_manifest(manifest: Manifest, key_and_trust) -> None:  # type: ignore[no-untyped-def]
    key, trust = key_and_trust
    assert Manifest.verify(manifest.sign(key), trust) == manifest


def _resign(envelope: bytes, key: dsse.ReleaseKey, edit) -> bytes:  # type: ignore[no-untyped-def]
    doc = json.loads(base64.b64decode(json.loads(envelope)["payload"]))
    edit(doc)
    return dsse.sign_envelope(dsse.canonical_json(doc), MANIFEST_PAYLOAD_TYPE, [key])


def _flip_payload_byte(envelope: bytes) -> bytes:
    doc = json.loads(envelope)
    payload = bytearray(base64.b64decode(doc["payload"]))
    payload[len(payload) // 2] ^= 0x01
    doc["payload"] = base64.b64encode(bytes(payload)).decode()
    return json.dumps(doc).encode()


BAD_ENVELOPES = {
    "untrusted-key": lambda env, key, other: other,
    "changed-payload-byte": lambda env, key, other: _flip_payload_byte(env),
    "changed-signature": lambda env, key, other: env.replace(b'"sig":"', b'"sig":"AA', 1),
    "wrong-payload-type": lambda env, key, other: dsse.sign_envelope(
        base64.b64decode(json.loads(env)["payload"]), CHANNEL_PAYLOAD_TYPE, [key]
    ),
    "not-json": lambda env, key, other: env[:-1],
    "no-signatures": lambda env, key, other: env.split(b',"signatures"')[0] + b',"signatures":[]}',
    "schema-v2": lambda env, key, other: _resign(
        env, key, lambda d: d.__setitem__("schema", "bootchain.manifest/v2")
    ),
    "missing-artifacts": lambda env, key, other: _resign(env, key, lambda d: d.pop("artifacts")),
    "payload-not-json": lambda env, key, other: dsse.sign_envelope(
        b"\xffnot json", MANIFEST_PAYLOAD_TYPE, [key]
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_ENVELOPES))
def test_verify_fails_closed(case: str, manifest: Manifest, key_and_trust, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    key, trust = key_and_trust
    other, _ = make_release_key(tmp_path / "other")
    good = manifest.sign(key)
    bad = BAD_ENVELOPES[case](good, key, manifest.sign(other))
    with pytest.raises(VerificationError):
        Manifest.verify(bad, trust)


def test_rotation_trust_file_with_two_keys(manifest: Manifest, tmp_path: Path) -> None:
    old, _ = make_release_key(tmp_path / "old")
    new, _ = make_release_key(tmp_path / "new")
    trust_file = dsse.make_trust_file([(old.public_key, "2025"), (new.public_key, "2026")])
    trust = dsse.parse_trust(trust_file, "trust.json")
    assert {k.name for k in trust.keys.values()} == {"2025", "2026"}
    assert Manifest.verify(manifest.sign(new), trust) == manifest
    # signed by both while fleets rotate: a fleet trusting only the old key still accepts
    both = dsse.sign_envelope(manifest.to_bytes(), MANIFEST_PAYLOAD_TYPE, [old, new])
    assert Manifest.verify(both, dsse.Trust.of([old.public_key])) == manifest
    # ...but a bad signature by a trusted key is never outvoted
    doc = json.loads(both)
    for s in doc["signatures"]:
        if s["keyid"] == old.keyid:
            s["sig"] = base64.b64encode(b"\x00" * 64).decode()
    with pytest.raises(VerificationError, match="invalid"):
        Manifest.verify(json.dumps(doc).encode(), trust)


def test_trust_file_accepts_a_bare_pem_and_rejects_wrong_keyid(tmp_path: Path) -> None:
    key, _ = make_release_key(tmp_path)
    pem = (tmp_path / "release.pub").read_bytes()
    assert list(dsse.parse_trust(pem, "pub").keys) == [key.keyid]
    bad = [{"keyid": "00" * 32, "public_key": pem.decode()}]
    with pytest.raises(InputFileError, match="keyid"):
        dsse.parse_trust(json.dumps(bad).encode(), "trust.json")
    with pytest.raises(InputFileError, match="not JSON"):
        dsse.parse_trust(b"{", "trust.json")


def test_pointer_and_index_verify_and_keep_their_types(key_and_trust) -> None:  # type: ignore[no-untyped-def]
    key, trust = key_and_trust
    ptr = ChannelPointer("debian-minimal", "stable", "1.0.0", "aa" * 32, 3)
    assert ChannelPointer.verify(ptr.sign(key), trust) == ptr
    index = ReleaseIndex("debian-minimal", 1, ())
    assert ReleaseIndex.verify(index.sign(key), trust) == index
    with pytest.raises(VerificationError, match="payloadType"):
        ChannelPointer.verify(index.sign(key), trust)
    with pytest.raises(VerificationError, match="payloadType"):
        verify_envelope(ptr.sign(key), trust)


def test_build_with_path_outside_outdir_or_bad_digest_is_refused(tmp_path: Path) -> None:
    out = make_outdir(tmp_path)
    build = json.loads((out / "build.json").read_text())
    build["artifacts"][0]["sha256"] = "XYZ"
    (out / "build.json").write_text(json.dumps(build))
    with pytest.raises(InputFileError, match=r"artifacts\[0\].*sha256"):
        manifest_from_build(out)


@pytest.mark.parametrize(
    ("low", "high"),
    [("1.0.0", "1.0.1"), ("1.9.2", "1.10.0"), ("1.0", "1.0.1"), ("2023.12", "2024.1")],
    ids=["patch", "numeric-not-text", "longer", "calendar"],
)
def test_version_order(low: str, high: str) -> None:
    assert version_key(low) < version_key(high)


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("BOOTX64.EFI", True),
        ("keys/db.crt", True),
        ("../etc/passwd", False),
        ("keys/../../x", False),
        ("/abs", False),
        ("a//b", False),
        (".hidden", False),
    ],
    ids=["plain", "subfolder", "parent", "parent-inside", "absolute", "empty-part", "dotfile"],
)
def test_artifact_names_are_safe_relative_paths(tmp_path: Path, name: str, ok: bool) -> None:
    out = make_outdir(tmp_path)
    build = json.loads((out / "build.json").read_text())
    build["artifacts"][0]["name"] = name
    (out / "build.json").write_text(json.dumps(build))
    if ok:
        assert manifest_from_build(out).artifacts
    else:
        with pytest.raises(InputFileError, match="safe relative path"):
            manifest_from_build(out)


def test_bug_untrusted_keyid_with_a_newline_split_the_error_line(manifest: Manifest) -> None:
    other = dsse.ReleaseKey(Ed25519PrivateKey.generate())
    doc = json.loads(dsse.sign_envelope(manifest.to_bytes(), MANIFEST_PAYLOAD_TYPE, [other]))
    doc["signatures"][0]["keyid"] = "ab\nverdict: MATCH"
    with pytest.raises(VerificationError) as info:
        Manifest.verify(json.dumps(doc).encode(), dsse.Trust.of([]))
    assert "\n" not in info.value.one_line() and "not signed by a trusted key" in str(info.value)


def test_bug_empty_authenticode_digest_was_dropped_silently(tmp_path: Path) -> None:
    out = make_outdir(tmp_path)
    build = json.loads((out / "build.json").read_text())
    build["artifacts"][0]["authenticode_sha256"] = ""
    (out / "build.json").write_text(json.dumps(build))
    with pytest.raises(InputFileError, match=r"authenticode_sha256: not a lowercase sha256"):
        manifest_from_build(out)


def test_bug_artifact_that_is_also_a_folder_broke_fetch(tmp_path: Path) -> None:
    out = make_outdir(tmp_path)
    build = json.loads((out / "build.json").read_text())
    build["artifacts"][0]["name"] = "keys"
    build["artifacts"][1]["name"] = "keys/db.crt"
    (out / "build.json").write_text(json.dumps(build))
    with pytest.raises(InputFileError, match="'keys' is both a file and a folder"):
        manifest_from_build(out)


def test_bug_signed_index_with_a_version_twice_was_accepted(key_and_trust) -> None:  # type: ignore[no-untyped-def]
    key, trust = key_and_trust
    a = IndexEntry("1.0.0", "aa" * 32, {"x.efi": "bb" * 32})
    b = IndexEntry("1.0.0", "cc" * 32, {"x.efi": "dd" * 32})
    with pytest.raises(VerificationError, match="listed twice"):
        ReleaseIndex.verify(ReleaseIndex("debian-minimal", 2, (a, b)).sign(key), trust)
    with pytest.raises(VerificationError, match="sequence: must be >= 1"):
        ReleaseIndex.verify(ReleaseIndex("debian-minimal", 0, (a,)).sign(key), trust)
    c = IndexEntry("1.0.1", "aa" * 32, {"../x.efi": "bb" * 32})
    with pytest.raises(VerificationError, match="safe relative path"):
        ReleaseIndex.verify(ReleaseIndex("debian-minimal", 1, (c,)).sign(key), trust)


def test_bug_a_non_ascii_trust_file_key_was_a_unicode_traceback() -> None:
    bad = [{"public_key": "-----BEGIN PUBLIC KEY-----\u00e9\n-----END PUBLIC KEY-----\n"}]
    with pytest.raises(InputFileError, match=r"trust.json: entry 0: not a PEM public key"):
        dsse.parse_trust(json.dumps(bad).encode(), "trust.json")
