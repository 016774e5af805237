"""The store interface shared by the local folder and S3, and the object layout.

Layout under a store's root (a folder or ``s3://bucket/prefix``)::

    blobs/sha256/<hex>                        content-addressed artifact bytes
    releases/<name>/<version>/manifest.dsse.json   immutable signed manifest (create-only)
    channels/<name>/<channel>.dsse.json       signed channel pointer (compare-and-swap)
    index/<name>.dsse.json                    signed release index (compare-and-swap)

Small objects (manifests, pointers, index) are read whole with an opaque ``etag`` and written
with ``create`` (fails if present) or ``replace`` (fails unless the etag still matches).
Blobs stream in and out; :func:`download_blob` checks every byte against the digest.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from builder.errors import StoreError, UserInputError, VerificationError

Progress = Callable[[int], None]
"""Called with the number of bytes just transferred (from worker threads too)."""

_HEX64 = re.compile(r"[0-9a-f]{64}")


def blob_key(digest: str) -> str:
    if not _HEX64.fullmatch(digest):
        raise VerificationError(f"not a sha256 hex digest: {digest!r}")
    return f"blobs/sha256/{digest}"


def manifest_key(name: str, version: str) -> str:
    return f"releases/{name}/{version}/manifest.dsse.json"


def channel_key(name: str, channel: str) -> str:
    return f"channels/{name}/{channel}.dsse.json"


def index_key(name: str) -> str:
    return f"index/{name}.dsse.json"


@dataclass(frozen=True)
class StoredObject:
    """A small object read whole, with the etag to compare-and-swap against."""

    data: bytes
    etag: str


class Store(abc.ABC):
    """One place releases live. Implementations: LocalStore, S3Store."""

    url: str
    is_local: bool = False

    @abc.abstractmethod
    def get(self, key: str) -> StoredObject | None:
        """The object at ``key``, or None when there is none."""

    @abc.abstractmethod
    def create(self, key: str, data: bytes) -> str:
        """Write ``key`` only if absent (ConflictError otherwise); returns the new etag."""

    @abc.abstractmethod
    def replace(self, key: str, data: bytes, etag: str) -> str:
        """Overwrite ``key`` only if its etag is still ``etag`` (ConflictError otherwise)."""

    @abc.abstractmethod
    def blob_size(self, digest: str) -> int | None:
        """Size of the stored blob ``digest``, or None when absent."""

    @abc.abstractmethod
    def put_blob(self, path: Path, digest: str, size: int, progress: Progress | None) -> None:
        """Upload ``path`` as blob ``digest``; the bytes are checked against the digest."""

    @abc.abstractmethod
    def iter_blob(self, digest: str) -> Iterator[bytes]:
        """The stored bytes of blob ``digest`` in chunks (StoreError when absent)."""

    @abc.abstractmethod
    def list_keys(self, prefix: str) -> list[str]:
        """Sorted keys under ``prefix`` (a folder-like prefix ending in "/")."""

    def abort_dangling_uploads(self, key: str) -> int:
        """Abort unfinished uploads of ``key`` left by a crash; returns how many."""
        return 0

    def has_blob(self, digest: str, size: int) -> bool:
        """True when blob ``digest`` is stored with the expected size."""
        return self.blob_size(digest) == size


def _stream(store: Store, digest: str, size: int) -> Iterator[bytes]:
    """The blob's chunks; a connection lost after the first byte is a truncated download."""
    chunks = store.iter_blob(digest)
    done = 0
    while True:
        try:
            try:
                chunk = next(chunks, b"")
            except OSError as exc:  # a folder store's read error is the store's, not dest's
                raise StoreError(
                    f"{store.url}/{blob_key(digest)}: cannot read ({exc.strerror})"
                ) from exc
        except StoreError as exc:
            if done == 0:
                raise
            raise VerificationError(
                f"{store.url}/{blob_key(digest)}: truncated, {done} of {size} bytes ({exc})"
            ) from exc
        if not chunk:
            return
        done += len(chunk)
        yield chunk


def download_blob(
    store: Store, digest: str, size: int, dest: Path, progress: Progress | None = None
) -> None:
    """Stream blob ``digest`` to ``dest`` through a temp file, checking size and sha256.

    Nothing is left at ``dest`` (or beside it) unless every byte verified.
    """
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    except OSError as exc:
        raise UserInputError(f"{dest}: cannot write here ({exc.strerror})") from exc
    try:
        hasher = hashlib.sha256()
        done = 0
        with os.fdopen(fd, "wb") as f:
            for chunk in _stream(store, digest, size):
                done += len(chunk)
                if done > size:
                    raise VerificationError(
                        f"{store.url}/{blob_key(digest)}: longer than the {size} bytes expected"
                    )
                hasher.update(chunk)
                f.write(chunk)
                if progress:
                    progress(len(chunk))
            f.flush()
            os.fsync(f.fileno())
        if done != size:
            raise VerificationError(
                f"{store.url}/{blob_key(digest)}: truncated, {done} of {size} bytes"
            )
        if hasher.hexdigest() != digest:
            raise VerificationError(
                f"{store.url}/{blob_key(digest)}: content sha256 is {hasher.hexdigest()}"
            )
        Path(tmp).chmod(0o644)
        Path(tmp).replace(dest)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            Path(tmp).unlink()
        raise UserInputError(f"{dest}: cannot write ({exc.strerror})") from exc
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            Path(tmp).unlink()
        raise


def open_store(url: str) -> Store:
    """The store at ``url``: ``s3://bucket/prefix``, ``file:///path`` or a folder path."""
    if url.startswith("s3://"):
        from builder.store.s3 import S3Store

        return S3Store.from_url(url)
    if "://" in url and not url.startswith("file://"):
        raise UserInputError(
            f"unsupported store URL {url!r}", hint="use s3://bucket/prefix or a folder path"
        )
    from builder.store.local import LocalStore

    return LocalStore(Path(url.removeprefix("file://")))
