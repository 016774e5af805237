"""Small file helpers shared by every stage: atomic writes, hashing, output folders."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


Buffer = bytes | bytearray | memoryview


def write_atomic(path: Path, data: Buffer | Sequence[Buffer], mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and ``os.replace``.

    ``data`` may be a sequence of buffers written one after the other (no joined copy).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for part in (data,) if isinstance(data, bytes | bytearray | memoryview) else data:
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        Path(tmp).chmod(mode)
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """A fresh folder beside ``final`` that replaces it only if the block succeeds.

    On any exception the staging folder, and any parent folder made for it, is removed and
    ``final`` is left as it was.
    """
    created = [p for p in (final.parent, *final.parent.parents) if not p.exists()]
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".partial"))
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        for parent in created:  # deepest first
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        final.replace(old)
        stage.replace(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        stage.replace(final)
