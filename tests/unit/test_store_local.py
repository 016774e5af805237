"""Local folder store: layout, idempotent publish, conflicts, races, fail-closed fetch."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest

from builder import cli
from builder.dsse import Trust, load_trust
from builder.errors import (
    ConflictError,
    InputFileError,
    StoreError,
    UserInputError,
    VerificationError,
)
from builder.publish import publish
from builder.store.base import blob_key, channel_key, index_key, manifest_key, open_store
from builder.store.fetch import RollbackState, fetch, fetch_index
from builder.store.local import LocalStore
from tests.fake_outdir import make_outdir, make_release_key

NAME = "debian-minimal"


@pytest.fixture
def env(tmp_path: Path) -> tuple[LocalStore, object, Trust, RollbackState]:
    key, trust_path = make_release_key(tmp_path / "keys")
    return (
        LocalStore(tmp_path / "store"),
        key,
        load_trust(trust_path),
        RollbackState(tmp_path / "state"),
    )


def test_open_store_urls(tmp_path: Path) -> None:
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    assert isinstance(open_store(f"file://{tmp_path}"), LocalStore)
    with pytest.raises(Exception, match="unsupported store URL"):
        open_store("ftp://x/y")


def test_publish_lays_out_the_store_and_fetch_gets_identical_bytes(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store, key, trust, state = env
    out = make_outdir(tmp_path / "out")
    result = publish(out, store, key, "stable")
    assert result.manifest_created and len(result.uploaded) == 5
    assert (result.channel_version, result.channel_sequence) == ("1.0.0", 1)
    root = store.root
    assert (root / manifest_key(NAME, "1.0.0")).is_file()
    assert (root / channel_key(NAME, "stable")).is_file()
    assert (root / index_key(NAME)).is_file()
    build = json.loads((out / "build.json").read_text())
    for art in build["artifacts"]:
        assert (root / blob_key(art["sha256"])).read_bytes() == (out / art["path"]).read_bytes()

    got = fetch(store, NAME, "stable", trust, tmp_path / "got", artifacts=True, state=state)
    assert got.manifest.version == "1.0.0"
    for art in build["artifacts"]:
        assert (tmp_path / "got" / art["name"]).read_bytes() == (out / art["path"]).read_bytes()
    assert sorted(p.name for p in (tmp_path / "got").iterdir()) == sorted(
        [a["name"] for a in build["artifacts"]] + ["manifest.dsse.json"]
    )


def test_republishing_identical_content_is_a_no_op(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store, key, _, _ = env
    out = make_outdir(tmp_path / "out")
    first = publish(out, store, key, "stable")
    before = {p: p.read_bytes() for p in sorted(store.root.rglob("*")) if p.is_file()}
    again = publish(out, store, key, "stable")
    after = {p: p.read_bytes() for p in sorted(store.root.rglob("*")) if p.is_file()}
    assert not again.manifest_created and again.uploaded == () and len(again.skipped) == 5
    assert again.manifest_sha256 == first.manifest_sha256
    assert again.channel_sequence == 1
    assert before == after


def test_same_version_different_content_is_a_conflict(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store, key, _, _ = env
    publish(make_outdir(tmp_path / "a"), store, key, "stable")
    with pytest.raises(ConflictError, match="published already with a different manifest"):
        publish(make_outdir(tmp_path / "b", salt="x"), store, key, "stable")


def test_channel_never_moves_backwards(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store, key, trust, _ = env
    publish(make_outdir(tmp_path / "o", "1.0.1"), store, key, "stable")
    old = publish(make_outdir(tmp_path / "o", "1.0.0"), store, key, "stable")
    assert (old.channel_version, old.channel_sequence) == ("1.0.1", 1)
    assert [r.version for r in fetch_index(store, NAME, trust).releases] == ["1.0.0", "1.0.1"]


def test_racing_publishers_on_a_channel_end_on_the_highest_version(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store, key, trust, state = env
    versions = [f"1.0.{i}" for i in range(8)]
    outs = [make_outdir(tmp_path / "o", v) for v in versions]
    errors: list[BaseException] = []

    def run(out: Path) -> None:
        try:
            publish(out, store, key, "stable")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(o,)) for o in reversed(outs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    got = fetch(store, NAME, "stable", trust, tmp_path / "got", state=state)
    assert got.pointer.version == "1.0.7"
    index = fetch_index(store, NAME, trust)
    assert [r.version for r in index.releases] == versions  # no update lost
    assert index.sequence == 8


def test_racing_publishers_on_one_version_exactly_one_wins(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store, key, _, _ = env
    outs = [make_outdir(tmp_path / f"p{i}", salt=str(i)) for i in range(4)]
    results: list[object] = []
    barrier = threading.Barrier(len(outs))

    def run(out: Path) -> None:
        barrier.wait()
        try:
            results.append(publish(out, store, key, "stable"))
        except ConflictError as exc:
            results.append(exc)

    threads = [threading.Thread(target=run, args=(o,)) for o in outs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    conflicts = [r for r in results if isinstance(r, ConflictError)]
    assert len(conflicts) == len(outs) - 1
    assert all("different manifest" in str(c) for c in conflicts)


def _tamper_byte(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if at is None else at] ^= 0x01
    path.write_bytes(bytes(data))


def test_fetch_refuses_untrusted_key(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store, _, trust, state = env
    stranger, _ = make_release_key(tmp_path / "stranger")
    publish(make_outdir(tmp_path / "o"), store, stranger, "stable")
    with pytest.raises(VerificationError, match="not signed by a trusted key"):
        fetch(store, NAME, "stable", trust, tmp_path / "got", state=state)
    assert not (tmp_path / "got" / "manifest.dsse.json").exists()


def test_fetch_refuses_a_manifest_with_one_changed_byte(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store, key, trust, state = env
    publish(make_outdir(tmp_path / "o"), store, key, "stable")
    _tamper_byte(store.root / manifest_key(NAME, "1.0.0"), at=120)
    with pytest.raises(VerificationError):
        fetch(store, NAME, "stable", trust, tmp_path / "got", state=state)
    assert not (tmp_path / "got").exists() or not any((tmp_path / "got").iterdir())


@pytest.mark.parametrize("damage", ["one-changed-byte", "truncated", "one-extra-byte"])
def test_fetch_refuses_a_damaged_blob_and_leaves_nothing(env, tmp_path: Path, damage: str) -> None:  # type: ignore[no-untyped-def]
    store, key, trust, state = env
    out = make_outdir(tmp_path / "o")
    publish(out, store, key, "stable")
    digest = hashlib.sha256((out / "disk.img").read_bytes()).hexdigest()
    blob = store.root / blob_key(digest)
    data = blob.read_bytes()
    blob.write_bytes(
        {
            "one-changed-byte": lambda: data[:100] + bytes([data[100] ^ 1]) + data[101:],
            "truncated": lambda: data[: len(data) // 2],
            "one-extra-byte": lambda: data + b"\0",
        }[damage]()
    )
    got = tmp_path / "got"
    with pytest.raises(VerificationError, match=r"blobs/sha256/[0-9a-f]{64}"):
        fetch(store, NAME, "stable", trust, got, artifacts=True, state=state)
    assert not (got / "disk.img").exists()
    assert not (got / "manifest.dsse.json").exists()
    assert [p.name for p in got.iterdir() if p.name.startswith(".")] == []


def test_fetch_refuses_a_rolled_back_channel_pointer(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store, key, trust, state = env
    publish(make_outdir(tmp_path / "o", "1.0.0"), store, key, "stable")
    pointer = store.root / channel_key(NAME, "stable")
    old_pointer = pointer.read_bytes()
    fetch(store, NAME, "stable", trust, tmp_path / "got", state=state)
    publish(make_outdir(tmp_path / "o", "1.0.1"), store, key, "stable")
    assert fetch(store, NAME, "stable", trust, tmp_path / "got", state=state).pointer.sequence == 2
    pointer.write_bytes(old_pointer)  # an attacker (or a stale mirror) serves the old pointer
    with pytest.raises(VerificationError, match=r"rolled back to 1\.0\.0"):
        fetch(store, NAME, "stable", trust, tmp_path / "got", state=state)
    # another store URL is tracked separately
    fetch(store, NAME, "stable", trust, tmp_path / "got", state=RollbackState(tmp_path / "s2"))


def test_fetch_refuses_a_pointer_for_another_channel(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store, key, trust, state = env
    publish(make_outdir(tmp_path / "o", "1.0.0"), store, key, "testing")
    testing = (store.root / channel_key(NAME, "testing")).read_bytes()
    (store.root / channel_key(NAME, "stable")).write_bytes(testing)
    with pytest.raises(VerificationError, match="pointer is for debian-minimal/testing"):
        fetch(store, NAME, "stable", trust, tmp_path / "got", state=state)


def test_fetch_of_a_missing_channel_is_a_store_error(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store, _, trust, state = env
    with pytest.raises(StoreError, match="no channel"):
        fetch(store, NAME, "stable", trust, tmp_path / "got", state=state)


def test_crash_mid_blob_leaves_nothing_and_rerun_completes(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store, key, trust, state = env
    out = make_outdir(tmp_path / "o", big=3 << 20)

    class Crash(Exception):
        pass

    seen = [0]

    def crash(n: int) -> None:
        seen[0] += n
        if seen[0] > 2 << 20:
            raise Crash

    with pytest.raises(Crash):
        publish(out, store, key, "stable", progress=crash)
    assert not (store.root / "releases").exists()
    assert not (store.root / "channels").exists()
    assert [p for p in store.root.rglob(".*.tmp")] == []
    publish(out, store, key, "stable")
    got = fetch(store, NAME, "stable", trust, tmp_path / "got", artifacts=True, state=state)
    assert (tmp_path / "got" / "disk.img").read_bytes() == (out / "disk.img").read_bytes()
    assert got.pointer.version == "1.0.0"


def test_local_create_is_exclusive_and_replace_is_compare_and_swap(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    etag = store.create("x/a", b"one")
    with pytest.raises(ConflictError, match="exists already"):
        store.create("x/a", b"two")
    new = store.replace("x/a", b"two", etag)
    with pytest.raises(ConflictError, match="changed under us"):
        store.replace("x/a", b"three", etag)
    obj = store.get("x/a")
    assert obj is not None and (obj.data, obj.etag) == (b"two", new)
    with pytest.raises(StoreError, match="unsafe"):
        store.get("../etc/passwd")


def test_republishing_with_an_ecdsa_key_is_a_no_op_too(tmp_path: Path) -> None:
    # ECDSA signatures differ on every run: "identical" means the same signed payload.
    key, trust_path = make_release_key(tmp_path / "keys", "ecdsa-p256")
    store = LocalStore(tmp_path / "store")
    out = make_outdir(tmp_path / "out")
    first = publish(out, store, key, "stable")
    again = publish(out, store, key, "stable")
    assert not again.manifest_created and again.manifest_sha256 == first.manifest_sha256
    got = fetch(store, NAME, "stable", load_trust(trust_path), tmp_path / "got",
                state=RollbackState(tmp_path / "state"))  # fmt: skip
    assert got.pointer.sequence == 1


def test_a_corrupt_rollback_state_is_an_error_not_a_reset(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store, key, trust, state = env
    publish(make_outdir(tmp_path / "o"), store, key, "stable")
    state.path.parent.mkdir(parents=True, exist_ok=True)
    state.path.write_text("{")
    with pytest.raises(InputFileError, match="rollback state is not JSON"):
        fetch(store, NAME, "stable", trust, tmp_path / "got", state=state)


@pytest.mark.parametrize("channel", ["../x", "a/b", "", ".hidden"])
def test_unsafe_channel_names_are_refused(env, tmp_path: Path, channel: str) -> None:  # type: ignore[no-untyped-def]
    store, key, trust, state = env
    with pytest.raises(UserInputError, match="not a safe name"):
        publish(make_outdir(tmp_path / "o"), store, key, channel)
    with pytest.raises(UserInputError, match="not a safe name"):
        fetch(store, NAME, channel, trust, tmp_path / "got", state=state)


def test_fetch_a_pinned_version_through_the_signed_index(env, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    store, key, _, _ = env
    for version in ("1.0.0", "1.0.1"):
        publish(make_outdir(tmp_path / "o", version), store, key, "stable")
    trust_file = tmp_path / "keys" / "trust.json"
    argv = ["fetch", NAME, "--store", str(store.root), "--trust", str(trust_file)]
    assert cli.main([*argv, "--version", "1.0.0", "--artifacts", "--out", str(tmp_path / "g")]) == 0
    assert "debian-minimal 1.0.0 verified" in capsys.readouterr().out
    assert (tmp_path / "g" / "debian-minimal-1.0.0.efi").is_file()
    assert cli.main([*argv, "--version", "9.9.9", "--out", str(tmp_path / "g")]) == 5
    # a manifest swapped for another release's (validly signed) one is refused
    other = (store.root / manifest_key(NAME, "1.0.1")).read_bytes()
    (store.root / manifest_key(NAME, "1.0.0")).write_bytes(other)
    assert cli.main([*argv, "--version", "1.0.0", "--out", str(tmp_path / "h")]) == 4


def test_bug_publish_resigned_an_index_entry_from_a_store_writer(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # Someone who can write the store but holds no release key adds a release to the index
    # (claiming an Authenticode digest of their own image). The next publish must not sign it.
    from builder.dsse import sign_envelope
    from builder.manifest import INDEX_PAYLOAD_TYPE, IndexEntry, ReleaseIndex

    store, key, trust, _ = env
    publish(make_outdir(tmp_path / "a", "1.0.0"), store, key, "stable")
    index = fetch_index(store, NAME, trust)
    evil = IndexEntry("0.9.0", "ab" * 32, {"evil.efi": "cd" * 32})
    forged = ReleaseIndex(NAME, index.sequence + 1, (evil, *index.releases))
    mallory, _ = make_release_key(tmp_path / "mallory")
    data = sign_envelope(
        json.dumps(forged.to_dict(), sort_keys=True).encode(), INDEX_PAYLOAD_TYPE, [mallory]
    )
    (store.root / index_key(NAME)).write_bytes(data)
    with pytest.raises(VerificationError, match=r"index/debian-minimal.dsse.json: stored"):
        publish(make_outdir(tmp_path / "b", "1.0.1"), store, key, "stable")
    assert (store.root / index_key(NAME)).read_bytes() == data  # not re-signed by our key


def test_bug_publish_reused_an_unsigned_stored_manifest_and_pointer(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # A stored manifest envelope with the right payload but no trusted signature must not be
    # named by the signed index; nor may an unsigned pointer count as "already there".
    store, key, _, _ = env
    out = make_outdir(tmp_path / "a", "1.0.0")
    publish(out, store, key, "stable")
    mkey = store.root / manifest_key(NAME, "1.0.0")
    doc = json.loads(mkey.read_bytes())
    doc["signatures"][0]["keyid"] = "00" * 32
    mkey.write_bytes(json.dumps(doc).encode())
    with pytest.raises(VerificationError, match=r"manifest.dsse.json: stored .*not signed"):
        publish(out, store, key, "stable")
    other = LocalStore(tmp_path / "store2")
    publish(out, other, key, "stable")
    doc = json.loads((other.root / channel_key(NAME, "stable")).read_bytes())
    doc["signatures"][0]["sig"] = doc["signatures"][0]["sig"][::-1]
    (other.root / channel_key(NAME, "stable")).write_bytes(json.dumps(doc).encode())
    with pytest.raises(VerificationError, match=r"stable.dsse.json: stored"):
        publish(out, other, key, "stable")


def test_publish_with_a_rotated_key_accepts_what_the_old_key_signed(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store, old, _, state = env
    publish(make_outdir(tmp_path / "a", "1.0.0"), store, old, "stable")
    new, _ = make_release_key(tmp_path / "new")
    with pytest.raises(VerificationError, match="not signed by a trusted key"):
        publish(make_outdir(tmp_path / "b", "1.0.1"), store, new, "stable")
    both = Trust.of([old.public_key, new.public_key])
    result = publish(make_outdir(tmp_path / "b", "1.0.1"), store, new, "stable", trust=both)
    assert (result.channel_version, result.channel_sequence) == ("1.0.1", 2)
    got = fetch(store, NAME, "stable", Trust.of([new.public_key]), tmp_path / "g", state=state)
    assert got.manifest.version == "1.0.1"


@pytest.mark.parametrize("entry", [{}, {"version": "1.0.0"}, {"version": "1", "sequence": "x"}])
def test_bug_a_malformed_rollback_state_entry_crashed_fetch(env, tmp_path: Path, entry) -> None:  # type: ignore[no-untyped-def]
    store, key, trust, state = env
    publish(make_outdir(tmp_path / "o"), store, key, "stable")
    state.path.parent.mkdir(parents=True, exist_ok=True)
    state.path.write_text(json.dumps({f"{store.url}|{NAME}|stable": entry}))
    with pytest.raises(InputFileError, match=r"rollback state entry .* sequence >= 1"):
        fetch(store, NAME, "stable", trust, tmp_path / "got", state=state)


def test_bug_an_unwritable_fetch_destination_was_a_traceback(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store, key, trust, state = env
    publish(make_outdir(tmp_path / "o"), store, key, "stable")
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(UserInputError, match=r"file/.*: cannot write here"):
        fetch(store, NAME, "stable", trust, tmp_path / "file", artifacts=True, state=state)
    assert (tmp_path / "file").read_text() == "not a folder"
    assert not state.path.exists()  # nothing remembered for a fetch that failed


def test_bug_an_unusable_rollback_state_folder_was_a_traceback(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store, key, trust, _ = env
    publish(make_outdir(tmp_path / "o"), store, key, "stable")
    (tmp_path / "state-file").write_text("")
    state = RollbackState(tmp_path / "state-file" / "sub")
    with pytest.raises(InputFileError, match=r"state-file/sub: cannot keep rollback state"):
        fetch(store, NAME, "stable", trust, tmp_path / "got", state=state)
