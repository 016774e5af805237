"""Publish a build folder to a store: blobs, then the manifest, then the index and channel.

Order makes a crash harmless: readers follow channel -> manifest -> blobs, and each is written
only after everything it names exists. Manifests are create-only (identical content is a
no-op, different content a ConflictError); the index and the channel pointer move by
compare-and-swap with retries, and a channel never moves to a lower version. Rerunning after
a crash aborts the multipart uploads it left and completes the release.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TypeVar

from builder.dsse import ReleaseKey, Trust
from builder.errors import ConflictError, InputFileError, UserInputError, VerificationError
from builder.manifest import (
    ChannelPointer,
    IndexEntry,
    Manifest,
    ReleaseIndex,
    check_name,
    load_json_file,
    manifest_from_build,
    version_key,
)
from builder.store.base import (
    Progress,
    Store,
    blob_key,
    channel_key,
    index_key,
    manifest_key,
)

CAS_RETRIES = 30
T = TypeVar("T")


@dataclass(frozen=True)
class PublishResult:
    """What a publish did."""

    name: str
    version: str
    manifest_sha256: str
    uploaded: tuple[str, ...]  # artifact names whose blobs were uploaded
    skipped: tuple[str, ...]  # artifact names whose blobs were there already
    manifest_created: bool
    aborted_uploads: int
    channel: str | None
    channel_version: str | None  # where the channel points after the publish
    channel_sequence: int | None


def artifact_paths(outdir: Path, manifest: Manifest) -> dict[str, Path]:
    """Each artifact's file in ``outdir`` (from build.json ``path``), checked for size."""
    build = load_json_file(outdir / "build.json")
    paths: dict[str, Path] = {}
    for entry in build.get("artifacts", []):
        rel = PurePosixPath(str(entry.get("path", entry.get("name"))))
        if rel.is_absolute() or ".." in rel.parts:
            raise InputFileError(f"{outdir / 'build.json'}: artifact path {rel} leaves OUTDIR")
        paths[str(entry["name"])] = outdir.joinpath(*rel.parts)
    for art in manifest.artifacts:
        path = paths[art.name]
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise InputFileError(f"{path}: cannot read artifact ({exc.strerror})") from exc
        if size != art.size:
            raise InputFileError(f"{path}: {size} bytes, build.json says {art.size}")
    return paths


def compare_and_swap(
    store: Store, key: str, update: Callable[[bytes | None], bytes | None], retries: int
) -> None:
    """Apply ``update`` (current bytes -> new bytes, or None for no change) atomically."""
    for attempt in range(retries):
        current = store.get(key)
        new = update(current.data if current else None)
        if new is None:
            return
        try:
            if current is None:
                store.create(key, new)
            else:
                store.replace(key, new, current.etag)
            return
        except ConflictError:
            # Lost a race: back off a little (jitter only affects timing, never output).
            time.sleep(min(0.5, 0.01 * (2 ** min(attempt, 6))) * random.random())  # noqa: S311
    raise ConflictError(f"{store.url}/{key}: lost the compare-and-swap {retries} times")


def _verified(store: Store, key: str, check: Callable[[], T]) -> T:
    """``check()`` (a verification of what ``store`` holds at ``key``), naming it on failure."""
    try:
        return check()
    except VerificationError as exc:
        raise VerificationError(
            f"{store.url}/{key}: stored {exc.message}",
            hint="the store holds a document no trusted release key signed; find out who "
            "wrote it (pass the old keys in trust= when rotating release keys)",
        ) from exc


def publish(
    outdir: Path,
    store: Store,
    key: ReleaseKey,
    channel: str | None,
    *,
    allow_example_keys: bool = False,
    progress: Progress | None = None,
    retries: int = CAS_RETRIES,
    trust: Trust | None = None,
) -> PublishResult:
    """Publish the build in ``outdir`` to ``store`` and move ``channel`` to it (if newer).

    What the store holds already (manifest, index, pointer) is carried forward or re-signed
    only once it verifies against ``trust`` (default: ``key`` alone), so a writer of the store
    without a release key cannot slip an entry into a release the publisher signs.
    """
    trust = trust if trust is not None else Trust.of([key.public_key])
    if channel is not None:
        check_name(channel, "channel")
    manifest = manifest_from_build(outdir)
    if manifest.secure_boot.example_keys and not store.is_local and not allow_example_keys:
        raise UserInputError(
            f"{outdir}: signed with the example Secure Boot keys; refusing to publish to "
            f"{store.url}",
            hint="sign with your own keys, or pass --allow-example-keys",
        )
    paths = artifact_paths(outdir, manifest)

    # 1. Blobs (content-addressed; skipping the ones already stored).
    uploaded, skipped, aborted = [], [], 0
    for art in manifest.artifacts:
        aborted += store.abort_dangling_uploads(blob_key(art.sha256))
        if store.has_blob(art.sha256, art.size):
            skipped.append(art.name)
            if progress:
                progress(art.size)
            continue
        store.put_blob(paths[art.name], art.sha256, art.size, progress)
        uploaded.append(art.name)

    # 2. The manifest: create-only.
    envelope = manifest.sign(key)
    mkey = manifest_key(manifest.name, manifest.version)
    created = True
    try:
        store.create(mkey, envelope)
    except ConflictError:
        existing = store.get(mkey)
        if existing is None:
            raise
        stored = _verified(store, mkey, lambda: Manifest.verify(existing.data, trust))
        if stored.to_bytes() != manifest.to_bytes():
            raise ConflictError(
                f"{store.url}/{mkey}: release {manifest.name} {manifest.version} is published "
                "already with a different manifest",
                hint="bump the version; published releases are immutable",
            ) from None
        envelope, created = existing.data, False
    manifest_sha = hashlib.sha256(envelope).hexdigest()

    # 3. The index of releases.
    entry = IndexEntry(
        manifest.version,
        manifest_sha,
        {a.name: a.authenticode_sha256 for a in manifest.artifacts if a.authenticode_sha256},
    )

    ikey = index_key(manifest.name)

    def add_to_index(current: bytes | None) -> bytes | None:
        index = ReleaseIndex(manifest.name, 0, ())
        if current:
            stored = _verified(store, ikey, lambda: ReleaseIndex.verify(current, trust))
            if stored.name != manifest.name:
                raise VerificationError(f"{store.url}/{ikey}: signed index is for {stored.name}")
            index = stored
        found = index.entry(manifest.version)
        if found is not None:
            if found.manifest_sha256 != manifest_sha:
                raise ConflictError(
                    f"{store.url}/{ikey}: lists {manifest.version} with "
                    f"manifest {found.manifest_sha256}, not {manifest_sha}"
                )
            return None
        return index.with_entry(entry).sign(key)

    compare_and_swap(store, ikey, add_to_index, retries)

    # 4. The channel pointer, last; never backwards.
    final: list[ChannelPointer] = []
    if channel is not None:
        ckey = channel_key(manifest.name, channel)

        def move_channel(current: bytes | None) -> bytes | None:
            final.clear()
            seq = 0
            if current:
                cur = _verified(store, ckey, lambda: ChannelPointer.verify(current, trust))
                if (cur.name, cur.channel) != (manifest.name, channel):
                    raise VerificationError(
                        f"{store.url}/{ckey}: signed pointer is for {cur.name}/{cur.channel}"
                    )
                seq = cur.sequence
                if version_key(cur.version) > version_key(manifest.version):
                    final.append(cur)
                    return None
                if cur.version == manifest.version:
                    if cur.manifest_sha256 != manifest_sha:
                        raise ConflictError(
                            f"{store.url}/{ckey}: points to {cur.version} with another manifest"
                        )
                    final.append(cur)
                    return None
            new = ChannelPointer(manifest.name, channel, manifest.version, manifest_sha, seq + 1)
            final.append(new)
            return new.sign(key)

        compare_and_swap(store, ckey, move_channel, retries)

    return PublishResult(
        name=manifest.name,
        version=manifest.version,
        manifest_sha256=manifest_sha,
        uploaded=tuple(uploaded),
        skipped=tuple(skipped),
        manifest_created=created,
        aborted_uploads=aborted,
        channel=channel,
        channel_version=final[0].version if final else None,
        channel_sequence=final[0].sequence if final else None,
    )
