"""A store in a local folder (the default ``./store``): no server needed.

Immutable objects are written to a temp file and hard-linked into place (``os.link`` fails if
the name exists: create-exclusive). Pointers are compare-and-swapped under an exclusive
``flock`` on a lock file in ``.locks/``, then replaced atomically. The etag of an object is
the sha256 of its bytes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from builder.errors import ConflictError, StoreError, VerificationError
from builder.fsutil import CHUNK, write_atomic
from builder.store.base import Progress, Store, StoredObject, blob_key


class LocalStore(Store):
    """Releases in a folder, same layout as S3."""

    is_local = True

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = os.fspath(root.absolute())

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise StoreError(f"unsafe store key {key!r}")
        return self.root.joinpath(*parts)

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        with (locks / (key.replace("/", "%") + ".lock")).open("a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def get(self, key: str) -> StoredObject | None:
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"{self.url}/{key}: cannot read ({exc.strerror})") from exc
        return StoredObject(data, hashlib.sha256(data).hexdigest())

    def _link_new(self, tmp: Path, path: Path, key: str) -> None:
        try:
            os.link(tmp, path)
        except FileExistsError as exc:
            raise ConflictError(f"{self.url}/{key}: exists already") from exc
        finally:
            tmp.unlink()

    def _temp(self, path: Path) -> tuple[int, Path]:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        Path(tmp).chmod(0o644)
        return fd, Path(tmp)

    def create(self, key: str, data: bytes) -> str:
        path = self._path(key)
        fd, tmp = self._temp(path)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self._link_new(tmp, path, key)
        return hashlib.sha256(data).hexdigest()

    def replace(self, key: str, data: bytes, etag: str) -> str:
        with self._locked(key):
            current = self.get(key)
            if current is None or current.etag != etag:
                raise ConflictError(f"{self.url}/{key}: changed under us (etag mismatch)")
            write_atomic(self._path(key), data)
        return hashlib.sha256(data).hexdigest()

    def list_keys(self, prefix: str) -> list[str]:
        base = self._path(prefix.rstrip("/")) if prefix.strip("/") else self.root
        if not base.is_dir():
            return []
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".")
        )

    def blob_size(self, digest: str) -> int | None:
        try:
            return self._path(blob_key(digest)).stat().st_size
        except FileNotFoundError:
            return None

    def put_blob(self, path: Path, digest: str, size: int, progress: Progress | None) -> None:
        key = blob_key(digest)
        final = self._path(key)
        fd, tmp = self._temp(final)
        hasher = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as out, path.open("rb") as src:
                while chunk := src.read(CHUNK):
                    hasher.update(chunk)
                    out.write(chunk)
                    if progress:
                        progress(len(chunk))
                out.flush()
                os.fsync(out.fileno())
            if hasher.hexdigest() != digest:
                raise VerificationError(
                    f"{path}: sha256 is {hasher.hexdigest()}, build.json says {digest}"
                )
            if final.exists() and final.stat().st_size != size:
                tmp.replace(final)  # repair a damaged blob: content-addressed, so safe
                return
            with contextlib.suppress(ConflictError):
                self._link_new(tmp, final, key)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def iter_blob(self, digest: str) -> Iterator[bytes]:
        key = blob_key(digest)
        try:
            f = self._path(key).open("rb")
        except FileNotFoundError as exc:
            raise StoreError(f"{self.url}/{key}: no such blob") from exc
        with f:
            while chunk := f.read(CHUNK):
                yield chunk
