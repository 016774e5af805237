"""Publish and fetch against a real S3 server (SeaweedFS), read-write and read-only identities."""

from __future__ import annotations

import hashlib
import json
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from builder import cli
from builder.dsse import ReleaseKey, Trust, load_trust
from builder.errors import ConflictError, StoreError, UserInputError, VerificationError
from builder.publish import publish
from builder.store.base import blob_key, channel_key, manifest_key
from builder.store.fetch import RollbackState, fetch, fetch_index
from builder.store.s3 import S3Store
from tests.fake_outdir import make_outdir, make_release_key
from tests.integration.seaweed import BUCKET, Weed

pytestmark = pytest.mark.s3
NAME = "debian-minimal"


@pytest.fixture
def keys(tmp_path: Path) -> tuple[ReleaseKey, Trust, Path]:
    key, trust_path = make_release_key(tmp_path / "keys")
    return key, load_trust(trust_path), trust_path


def stores(weed: Weed, request: pytest.FixtureRequest, **kw: Any) -> tuple[S3Store, S3Store]:
    """A read-write and a read-only store on a prefix of our own."""
    prefix = request.node.name.replace("[", "-").replace("]", "")
    rw = S3Store(BUCKET, prefix, weed.client("rw"), **kw)
    ro = S3Store(BUCKET, prefix, weed.client("ro"))
    return rw, ro


def raw_put(store: S3Store, key: str, data: bytes) -> None:
    store.client.put_object(Bucket=store.bucket, Key=store.prefix + key, Body=data)


def raw_get(store: S3Store, key: str) -> bytes:
    return store.client.get_object(Bucket=store.bucket, Key=store.prefix + key)["Body"].read()


def dangling(store: S3Store) -> list[str]:
    resp = store.client.list_multipart_uploads(Bucket=store.bucket, Prefix=store.prefix)
    return [u["Key"] for u in resp.get("Uploads", [])]


def test_client_signs_with_sigv4(weed: Weed) -> None:
    client = weed.client("ro")
    assert client.meta.config.signature_version == "s3v4"
    url = client.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": "x"})
    assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in url


def test_publish_then_fetch_with_read_only_identity(weed, request, keys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    key, trust, _ = keys
    rw, ro = stores(weed, request, multipart_threshold=5 << 20, part_size=5 << 20)
    out = make_outdir(tmp_path / "out", big=11 << 20)  # 3 parts
    result = publish(out, rw, key, "stable")
    assert result.manifest_created and result.channel_sequence == 1
    got = fetch(ro, NAME, "stable", trust, tmp_path / "got", artifacts=True,
                state=RollbackState(tmp_path / "state"))  # fmt: skip
    for art in got.manifest.artifacts:
        assert (tmp_path / "got" / art.name).read_bytes() == (out / art.name).read_bytes()
    assert dangling(rw) == []
    # the read-only identity cannot publish
    with pytest.raises(StoreError, match="AccessDenied"):
        publish(make_outdir(tmp_path / "out", "1.0.1"), ro, key, "stable")
    # republishing is a no-op
    again = publish(out, rw, key, "stable")
    assert not again.manifest_created and again.uploaded == () and again.channel_sequence == 1


def test_example_keys_refused_unless_allowed(weed, request, keys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    key, _, _ = keys
    rw, _ = stores(weed, request)
    out = make_outdir(tmp_path / "out", example_keys=True)
    with pytest.raises(UserInputError, match="example Secure Boot keys"):
        publish(out, rw, key, "stable")
    assert rw.get(manifest_key(NAME, "1.0.0")) is None
    publish(out, rw, key, "stable", allow_example_keys=True)


def test_killed_server_mid_multipart_then_republish_completes(  # type: ignore[no-untyped-def]
    fresh_weed, request, keys, tmp_path
) -> None:
    key, trust, _ = keys
    kw = {"multipart_threshold": 5 << 20, "part_size": 5 << 20, "workers": 2}
    rw, ro = stores(fresh_weed, request, **kw)
    state = RollbackState(tmp_path / "state")
    publish(make_outdir(tmp_path / "o", "1.0.0"), rw, key, "stable")
    out = make_outdir(tmp_path / "o", "1.0.1", big=40 << 20)  # 8 parts
    sent = [0]

    def kill_midway(n: int) -> None:
        sent[0] += n
        if sent[0] >= 15 << 20 and fresh_weed.proc is not None:
            fresh_weed.stop(kill=True)

    rw.client = fresh_weed.client("rw", max_attempts=1)
    with pytest.raises(StoreError):
        publish(out, rw, key, "stable", progress=kill_midway)
    fresh_weed.start()
    rw, ro = stores(fresh_weed, request, **kw)
    # Nothing of 1.0.1 is visible: the channel still names 1.0.0 and it fetches whole.
    assert ro.get(manifest_key(NAME, "1.0.1")) is None
    assert fetch(ro, NAME, "stable", trust, tmp_path / "r0", state=state).pointer.version == "1.0.0"
    assert dangling(rw), "the kill should have left a multipart upload behind"

    # A reader polling while the rerun publishes only ever sees complete releases.
    seen: list[str] = []
    failures: list[BaseException] = []
    done = threading.Event()

    def reader() -> None:
        reader_store = S3Store(BUCKET, rw.prefix, fresh_weed.client("ro"))
        while not done.is_set():
            try:
                got = fetch(reader_store, NAME, "stable", trust, tmp_path / "r1",
                            state=RollbackState(tmp_path / "reader-state"))  # fmt: skip
                for art in got.manifest.artifacts:
                    assert reader_store.has_blob(art.sha256, art.size), art.name
                seen.append(got.pointer.version)
            except BaseException as exc:
                failures.append(exc)
                return

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        result = publish(out, rw, key, "stable")
    finally:
        done.set()
        thread.join()
    assert failures == []
    assert set(seen) <= {"1.0.0", "1.0.1"} and seen
    assert result.aborted_uploads >= 1 and result.channel_version == "1.0.1"
    assert dangling(rw) == []
    got = fetch(ro, NAME, "stable", trust, tmp_path / "r2", artifacts=True, state=state)
    assert got.pointer.version == "1.0.1"
    assert (tmp_path / "r2" / "disk.img").read_bytes() == (out / "disk.img").read_bytes()


def test_two_publishers_racing_on_one_version(weed, request, keys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    key, trust, _ = keys
    outs = [make_outdir(tmp_path / f"p{i}", salt=str(i)) for i in range(2)]
    barrier = threading.Barrier(2)
    results: list[object] = []

    def run(out: Path) -> None:
        rw, _ = stores(weed, request)
        barrier.wait()
        try:
            results.append(publish(out, rw, key, "stable"))
        except ConflictError as exc:
            results.append(exc)

    threads = [threading.Thread(target=run, args=(o,)) for o in outs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [r for r in results if isinstance(r, ConflictError)]
    assert len(errors) == 1 and "published already with a different manifest" in str(errors[0])
    _, ro = stores(weed, request)
    got = fetch(ro, NAME, "stable", trust, tmp_path / "got", artifacts=True,
                state=RollbackState(tmp_path / "state"))  # fmt: skip
    winner = next(r for r in results if not isinstance(r, ConflictError))
    assert got.pointer.manifest_sha256 == winner.manifest_sha256  # type: ignore[attr-defined]


def test_publishers_racing_on_a_channel_end_on_the_highest(weed, request, keys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    key, trust, _ = keys
    versions = [f"2.{i}.0" for i in range(6)]
    outs = [make_outdir(tmp_path / "o", v) for v in versions]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(outs))

    def run(out: Path) -> None:
        rw, _ = stores(weed, request)
        barrier.wait()
        try:
            publish(out, rw, key, "stable")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(o,)) for o in reversed(outs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    _, ro = stores(weed, request)
    got = fetch(ro, NAME, "stable", trust, tmp_path / "got", state=RollbackState(tmp_path / "s"))
    assert got.pointer.version == "2.5.0"
    assert [r.version for r in fetch_index(ro, NAME, trust).releases] == versions


@pytest.fixture
def published(weed, request, keys, tmp_path):  # type: ignore[no-untyped-def]
    key, trust, _ = keys
    rw, ro = stores(weed, request, multipart_threshold=5 << 20, part_size=5 << 20)
    out = make_outdir(tmp_path / "out", big=6 << 20)
    publish(out, rw, key, "stable")
    return rw, ro, trust, out, RollbackState(tmp_path / "state")


def test_fetch_refuses_untrusted_key(published, tmp_path) -> None:  # type: ignore[no-untyped-def]
    rw, ro, trust, _, state = published
    stranger, trust_path = make_release_key(tmp_path / "stranger")
    with pytest.raises(VerificationError, match="not signed by a trusted key"):
        fetch(ro, NAME, "stable", load_trust(trust_path), tmp_path / "got", state=state)
    # the same manifest re-signed by a stranger and swapped in the store is refused too
    manifest = fetch(ro, NAME, "stable", trust, tmp_path / "ok", state=state).manifest
    raw_put(rw, manifest_key(NAME, "1.0.0"), manifest.sign(stranger))
    with pytest.raises(VerificationError, match="not signed by a trusted key"):
        fetch(ro, NAME, "stable", trust, tmp_path / "got", state=state)


def test_fetch_refuses_a_manifest_with_one_changed_byte(published, tmp_path) -> None:  # type: ignore[no-untyped-def]
    rw, ro, trust, _, state = published
    data = bytearray(raw_get(rw, manifest_key(NAME, "1.0.0")))
    data[-40] ^= 0x01  # inside the signature
    raw_put(rw, manifest_key(NAME, "1.0.0"), bytes(data))
    with pytest.raises(VerificationError):
        fetch(ro, NAME, "stable", trust, tmp_path / "got", state=state)
    assert not (tmp_path / "got" / "manifest.dsse.json").exists()


@pytest.mark.parametrize("damage", ["one-changed-byte", "truncated"])
def test_fetch_refuses_a_damaged_blob(published, tmp_path, damage) -> None:  # type: ignore[no-untyped-def]
    rw, ro, trust, out, state = published
    digest = hashlib.sha256((out / "disk.img").read_bytes()).hexdigest()
    data = raw_get(rw, blob_key(digest))
    bad = (
        data[:-1] if damage == "truncated" else data[:4096] + bytes([data[4096] ^ 1]) + data[4097:]
    )
    raw_put(rw, blob_key(digest), bad)
    got = tmp_path / "got"
    with pytest.raises(VerificationError, match=r"truncated|content sha256"):
        fetch(ro, NAME, "stable", trust, got, artifacts=True, state=state)
    assert not (got / "disk.img").exists() and not (got / "manifest.dsse.json").exists()
    assert [p.name for p in got.iterdir() if p.name.startswith(".")] == []


def test_fetch_refuses_a_rolled_back_pointer(published, keys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    rw, ro, trust, _, state = published
    key = keys[0]
    old = raw_get(rw, channel_key(NAME, "stable"))
    fetch(ro, NAME, "stable", trust, tmp_path / "got", state=state)
    publish(make_outdir(tmp_path / "out", "1.0.1"), rw, key, "stable")
    fetch(ro, NAME, "stable", trust, tmp_path / "got", state=state)
    raw_put(rw, channel_key(NAME, "stable"), old)
    with pytest.raises(VerificationError, match="rolled back"):
        fetch(ro, NAME, "stable", trust, tmp_path / "got", state=state)


def test_cli_publish_and_fetch_the_standard_aws_way(  # type: ignore[no-untyped-def]
    weed, request, keys, tmp_path, monkeypatch, capsys
) -> None:
    _, _, trust_path = keys
    url = f"s3://{BUCKET}/{request.node.name}"
    out = make_outdir(tmp_path / "out")
    for k, v in weed.env("rw").items():
        monkeypatch.setenv(k, v)
    argv = ["publish", str(out), "--store", url, "--channel", "stable"]
    argv += ["--key", str(tmp_path / "keys" / "release.key")]
    assert cli.main(argv) == 0
    assert "1.0.0" in capsys.readouterr().out
    for k, v in weed.env("ro").items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("BOOTCHAIN_STATE", str(tmp_path / "state"))
    argv = ["fetch", "--store", url, NAME, "--channel", "stable", "--trust", str(trust_path)]
    argv += ["--artifacts", "--out", str(tmp_path / "got")]
    assert cli.main(argv) == 0
    assert (tmp_path / "got" / "BOOTX64.EFI").read_bytes() == (out / "BOOTX64.EFI").read_bytes()
    assert json.loads((tmp_path / "state" / "channels.json").read_text())
    # publishing with the read-only identity fails with one line and exit code 5
    argv = ["publish", str(out), "--store", url, "--channel", "stable"]
    argv += ["--key", str(tmp_path / "keys" / "release.key")]
    assert cli.main(argv) == 5
    assert "AccessDenied" in capsys.readouterr().err


def test_download_cut_by_a_dying_server_is_refused_and_leaves_nothing(  # type: ignore[no-untyped-def]
    fresh_weed, request, keys, tmp_path
) -> None:
    key, trust, _ = keys
    rw, _ = stores(fresh_weed, request)
    publish(make_outdir(tmp_path / "o", big=48 << 20), rw, key, "stable")
    reader = S3Store(BUCKET, rw.prefix, fresh_weed.client("ro", max_attempts=1))
    received = [0]

    def kill_midway(n: int) -> None:
        received[0] += n
        if received[0] >= 4 << 20 and fresh_weed.proc is not None:
            fresh_weed.stop(kill=True)

    got = tmp_path / "got"
    with pytest.raises(VerificationError, match="truncated"):
        fetch(reader, NAME, "stable", trust, got, artifacts=True, progress=kill_midway,
              state=RollbackState(tmp_path / "state"))  # fmt: skip
    assert 0 < received[0] < 48 << 20
    assert sorted(p.name for p in got.iterdir()) == ["BOOTX64.EFI", "debian-minimal-1.0.0.efi"]


def test_default_build_publishes_to_s3(  # type: ignore[no-untyped-def]
    weed, request, keys, tmp_path, default_build
) -> None:
    """The real default build (keys.example): refused on S3 unless allowed; fetched intact."""
    key, trust, _ = keys
    rw, ro = stores(weed, request)
    with pytest.raises(UserInputError, match="example Secure Boot keys"):
        publish(default_build, rw, key, "stable")
    assert rw.list_keys("") == []
    result = publish(default_build, rw, key, "stable", allow_example_keys=True)
    assert result.channel_version == "1.0.0"
    fetch(ro, NAME, "stable", trust, tmp_path / "got", artifacts=True,
          state=RollbackState(tmp_path / "state"))  # fmt: skip
    build = json.loads((default_build / "build.json").read_text())
    for art in build["artifacts"]:
        fetched = (tmp_path / "got" / art["name"]).read_bytes()
        assert hashlib.sha256(fetched).hexdigest() == art["sha256"]


@pytest.mark.boot
def test_real_boot_of_the_published_build_verifies(  # type: ignore[no-untyped-def]
    weed, request, keys, tmp_path, default_build, monkeypatch, capsys
) -> None:
    """Boot the default build (QEMU+OVMF+swtpm), publish it, fetch it, verify the boot's log."""
    from builder.boottest import run_boot_test
    from builder.measure.eventlog import EV_EFI_BOOT_SERVICES_APPLICATION, EventLog

    key, trust, trust_path = keys
    outdir = tmp_path / "build"
    subprocess.run(["cp", "-r", "--sparse=always", str(default_build), str(outdir)], check=True)
    booted = run_boot_test(outdir)
    log_path = outdir / "boot-eventlog.bin"
    pcrs = tmp_path / "pcrs.txt"
    pcrs.write_text("".join(f"{bank} {i} {v.hex()}\n" for bank, values in
                            booted.probe.pcrs.items() for i, v in values.items()))  # fmt: skip
    rw, ro = stores(weed, request)
    publish(outdir, rw, key, "stable", allow_example_keys=True)
    got = fetch(ro, NAME, "stable", trust, tmp_path / "got",
                state=RollbackState(tmp_path / "state"))  # fmt: skip

    argv = ["verify", "--manifest", str(got.manifest_path), "--trust", str(trust_path)]
    assert cli.main([*argv, "--eventlog", str(log_path), "--pcrs", str(pcrs)]) == 0
    assert "verdict: MATCH" in capsys.readouterr().out

    # one event's digest changed: the UKI's PCR 4 measurement
    log = EventLog.parse(log_path.read_bytes())
    uki = [e for e in log.events
           if e.pcr == 4 and e.event_type == EV_EFI_BOOT_SERVICES_APPLICATION][-1]  # fmt: skip
    digest = uki.digest("sha256")
    assert digest is not None
    data = bytearray(log_path.read_bytes())
    at = data.find(digest)
    data[at] ^= 0x01
    bad = tmp_path / "tampered.bin"
    bad.write_bytes(bytes(data))
    assert cli.main([*argv, "--eventlog", str(bad)]) == 4
    out = capsys.readouterr().out
    assert "PCR 4" in out and "EV_EFI_BOOT_SERVICES_APPLICATION" in out
    assert f"debian-minimal-1.0.0.efi: digest (expected {digest.hex()[:16]}" in out

    for k, v in weed.env("ro").items():
        monkeypatch.setenv(k, v)
    argv = ["identify", "--store", f"s3://{BUCKET}/{rw.prefix}", "--trust", str(trust_path)]
    assert cli.main([*argv, "--eventlog", str(log_path)]) == 0
    out = capsys.readouterr().out
    assert "debian-minimal 1.0.0 (BOOTX64.EFI)" in out
    assert "debian-minimal 1.0.0 (debian-minimal-1.0.0.efi)" in out
