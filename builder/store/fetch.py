"""Fetch a release from a store, failing closed.

The channel pointer and the manifest must verify against the trust file; the manifest
envelope must hash to what the pointer names; every artifact byte is checked against its
digest while streaming. A pointer older than the last one seen for the same store, name and
channel is refused (rollback protection); the last seen (version, sequence) is kept in
``$BOOTCHAIN_STATE`` or ``$XDG_STATE_HOME/bootchain`` (``~/.local/state/bootchain``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from builder.dsse import Trust
from builder.errors import InputFileError, StoreError, VerificationError
from builder.fsutil import write_atomic
from builder.manifest import ChannelPointer, Manifest, ReleaseIndex, check_name, version_key
from builder.store.base import (
    Progress,
    Store,
    channel_key,
    download_blob,
    index_key,
    manifest_key,
)

MANIFEST_FILE = "manifest.dsse.json"


def state_dir() -> Path:
    """Where fetch remembers the last channel pointers it saw."""
    if os.environ.get("BOOTCHAIN_STATE"):
        return Path(os.environ["BOOTCHAIN_STATE"])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "bootchain"


class RollbackState:
    """The last (version, sequence) seen per store URL, name and channel, in one JSON file."""

    def __init__(self, directory: Path | None = None) -> None:
        self.path = (directory or state_dir()) / "channels.json"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, dict[str, object]]]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock = self.path.with_suffix(".lock").open("a")
        except OSError as exc:
            raise InputFileError(
                f"{self.path.parent}: cannot keep rollback state here ({exc.strerror})",
                hint="set BOOTCHAIN_STATE to a writable folder",
            ) from exc
        with lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                seen = self._read()
                yield seen
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _read(self) -> dict[str, dict[str, object]]:
        if not self.path.exists():
            return {}
        try:
            seen = json.loads(self.path.read_bytes())
        except (ValueError, UnicodeDecodeError) as exc:
            raise InputFileError(
                f"{self.path}: rollback state is not JSON ({exc})",
                hint="restore it from a backup; deleting it drops rollback protection",
            ) from exc
        if not isinstance(seen, dict) or not all(isinstance(v, dict) for v in seen.values()):
            raise InputFileError(f"{self.path}: rollback state is not an object of channels")
        for slot, last in seen.items():
            seq = last.get("sequence")
            if not isinstance(last.get("version"), str) or type(seq) is not int or seq < 1:
                raise InputFileError(
                    f"{self.path}: rollback state entry {slot!r} needs a version string and "
                    "a sequence >= 1",
                    hint="restore it from a backup; deleting it drops rollback protection",
                )
        return seen

    @staticmethod
    def _slot(url: str, name: str, channel: str) -> str:
        return f"{url}|{name}|{channel}"

    def check(self, url: str, pointer: ChannelPointer) -> None:
        """Raise VerificationError if ``pointer`` is older than the one seen before."""
        with self._locked() as seen:
            last = seen.get(self._slot(url, pointer.name, pointer.channel))
        if last is None:
            return
        version, sequence = str(last["version"]), int(str(last["sequence"]))
        older = pointer.sequence < sequence or version_key(pointer.version) < version_key(version)
        replayed = pointer.sequence == sequence and pointer.version != version
        if older or replayed:
            raise VerificationError(
                f"{url}: channel {pointer.channel} of {pointer.name} rolled back to "
                f"{pointer.version} (sequence {pointer.sequence}); seen {version} "
                f"(sequence {sequence}) before",
                hint="the store is stale or under attack; do not use it",
            )

    def remember(self, url: str, pointer: ChannelPointer) -> None:
        """Record ``pointer`` as the newest seen (never lowering what is recorded)."""
        with self._locked() as seen:
            slot = self._slot(url, pointer.name, pointer.channel)
            last = seen.get(slot)
            if last is not None and int(str(last["sequence"])) >= pointer.sequence:
                return
            seen[slot] = {"version": pointer.version, "sequence": pointer.sequence}
            text = json.dumps(seen, indent=2, sort_keys=True) + "\n"
            write_atomic(self.path, text.encode("utf-8"))


@dataclass(frozen=True)
class FetchResult:
    """What a fetch verified and wrote."""

    manifest: Manifest
    pointer: ChannelPointer
    manifest_path: Path
    artifacts: tuple[Path, ...]


def fetch_pointer(store: Store, name: str, channel: str, trust: Trust) -> ChannelPointer:
    """The verified channel pointer for ``name``/``channel``."""
    key = channel_key(check_name(name, "release name"), check_name(channel, "channel"))
    obj = store.get(key)
    if obj is None:
        raise StoreError(f"{store.url}/{key}: no channel {channel!r} for {name!r}")
    pointer = ChannelPointer.verify(obj.data, trust)
    if (pointer.name, pointer.channel) != (name, channel):
        raise VerificationError(
            f"{store.url}/{key}: signed pointer is for {pointer.name}/{pointer.channel}"
        )
    return pointer


def fetch_manifest(
    store: Store, name: str, version: str, trust: Trust, manifest_sha256: str | None
) -> tuple[Manifest, bytes]:
    """The verified manifest of a release and its envelope bytes."""
    key = manifest_key(check_name(name, "release name"), check_name(version, "version"))
    obj = store.get(key)
    if obj is None:
        raise StoreError(f"{store.url}/{key}: no such release")
    manifest = Manifest.verify(obj.data, trust)
    got = hashlib.sha256(obj.data).hexdigest()
    if manifest_sha256 is not None and got != manifest_sha256:
        raise VerificationError(
            f"{store.url}/{key}: envelope sha256 {got}, channel pointer says {manifest_sha256}"
        )
    if (manifest.name, manifest.version) != (name, version):
        raise VerificationError(
            f"{store.url}/{key}: signed manifest is for {manifest.name} {manifest.version}"
        )
    return manifest, obj.data


def list_names(store: Store) -> list[str]:
    """Release names that have an index in ``store``."""
    suffix = ".dsse.json"
    return [
        k.removeprefix("index/").removesuffix(suffix)
        for k in store.list_keys("index/")
        if k.endswith(suffix) and "/" not in k.removeprefix("index/")
    ]


def fetch_index(store: Store, name: str, trust: Trust) -> ReleaseIndex:
    """The verified release index of ``name``."""
    key = index_key(check_name(name, "release name"))
    obj = store.get(key)
    if obj is None:
        raise StoreError(f"{store.url}/{key}: no releases of {name!r}")
    index = ReleaseIndex.verify(obj.data, trust)
    if index.name != name:
        raise VerificationError(f"{store.url}/{key}: signed index is for {index.name}")
    return index


def fetch(
    store: Store,
    name: str,
    channel: str,
    trust: Trust,
    out: Path,
    *,
    artifacts: bool = False,
    state: RollbackState | None = None,
    progress: Progress | None = None,
) -> FetchResult:
    """Verify and download the release ``channel`` points to into ``out``."""
    state = state if state is not None else RollbackState()
    pointer = fetch_pointer(store, name, channel, trust)
    state.check(store.url, pointer)
    manifest, envelope = fetch_manifest(
        store, name, pointer.version, trust, pointer.manifest_sha256
    )
    manifest_path, written = _write_release(store, manifest, envelope, out, artifacts, progress)
    state.remember(store.url, pointer)
    return FetchResult(manifest, pointer, manifest_path, written)


def fetch_version(
    store: Store,
    name: str,
    version: str,
    trust: Trust,
    out: Path,
    *,
    artifacts: bool = False,
    progress: Progress | None = None,
) -> tuple[Manifest, Path, tuple[Path, ...]]:
    """Verify and download one pinned release; the signed index must list its manifest."""
    entry = fetch_index(store, name, trust).entry(version)
    if entry is None:
        raise StoreError(f"{store.url}/{index_key(name)}: no release {version!r} of {name!r}")
    manifest, envelope = fetch_manifest(store, name, version, trust, entry.manifest_sha256)
    manifest_path, written = _write_release(store, manifest, envelope, out, artifacts, progress)
    return manifest, manifest_path, written


def _write_release(
    store: Store,
    manifest: Manifest,
    envelope: bytes,
    out: Path,
    artifacts: bool,
    progress: Progress | None,
) -> tuple[Path, tuple[Path, ...]]:
    written: list[Path] = []
    if artifacts:
        for art in manifest.artifacts:
            dest = out / art.name
            download_blob(store, art.sha256, art.size, dest, progress)
            written.append(dest)
    manifest_path = out / MANIFEST_FILE
    write_atomic(manifest_path, envelope)
    return manifest_path, tuple(written)
