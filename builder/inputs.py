"""Pinned Debian packages: apt download, a content-addressed cache, .deb unpack, the lock.

Packages come through apt's configured sources (``apt-get download name=version``), are checked
against the pinned sha256 BEFORE they enter the cache, and are re-hashed every time they are
read from it. A .deb is unpacked in Python (ar + tar, xz/zstd/gzip), never from the host's
installed files.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import json
import logging
import lzma
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import yaml

from builder.errors import (
    InputFileError,
    PinError,
    RecipeError,
    VerificationError,
)
from builder.fsutil import sha256_file, write_atomic
from builder.run import run

log = logging.getLogger(__name__)

LOCK_SCHEMA = "bootchain.lock/v1"
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class PackagePin:
    """One Debian package pinned by name, exact version and sha256 of the .deb."""

    name: str
    version: str
    sha256: str

    def __str__(self) -> str:
        return f"{self.name}={self.version}"


# --------------------------------------------------------------------------------------------
# content-addressed cache


def cache_dir() -> Path:
    """$BOOTCHAIN_CACHE, else $XDG_CACHE_HOME/bootchain, else ~/.cache/bootchain."""
    if os.environ.get("BOOTCHAIN_CACHE"):
        return Path(os.environ["BOOTCHAIN_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "bootchain"
    return Path.home() / ".cache" / "bootchain"


def cache_path(sha256: str) -> Path:
    """Where the blob with this digest lives (it may not exist)."""
    if not _HEX64.fullmatch(sha256):
        raise PinError(f"not a sha256 hex digest: {sha256!r}", hint="64 lowercase hex digits")
    return cache_dir() / "sha256" / sha256


def cache_get(sha256: str) -> Path | None:
    """The verified cache entry for ``sha256``, or None when absent.

    A present entry whose content does not hash to its name raises VerificationError.
    """
    path = cache_path(sha256)
    if not path.is_file():
        return None
    actual = sha256_file(path)
    if actual != sha256:
        raise VerificationError(
            f"corrupted cache entry {path}: content has sha256 {actual}",
            hint=f"delete {path} and fetch again",
        )
    return path


def cache_put(source: Path) -> tuple[str, Path]:
    """Copy ``source`` into the cache atomically; return (sha256, cache path)."""
    digest = sha256_file(source)
    final = cache_path(digest)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{digest}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, source.open("rb") as src:
            shutil.copyfileobj(src, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        Path(tmp).chmod(0o444)
        if sha256_file(Path(tmp)) != digest:
            raise VerificationError(f"{source} changed while being copied into the cache")
        Path(tmp).replace(final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            Path(tmp).unlink()
        raise
    return digest, final


# --------------------------------------------------------------------------------------------
# apt


def _apt_opts() -> list[str]:
    """apt options: run as root without the _apt sandbox; keep apt's package cache in ours
    (hosts that set Dir::Cache::pkgcache "" rebuild it on every call, ~2 s each)."""
    apt = cache_dir() / "apt"
    apt.mkdir(parents=True, exist_ok=True)
    return [
        "-q",
        "-o",
        "APT::Sandbox::User=root",
        "-o",
        f"Dir::Cache::pkgcache={apt / 'pkgcache.bin'}",
        "-o",
        f"Dir::Cache::srcpkgcache={apt / 'srcpkgcache.bin'}",
    ]


@dataclass(frozen=True)
class AptOrigin:
    """What apt's index says about one package version: where it comes from and its digest."""

    uri: str
    filename: str
    size: int
    sha256: str


def apt_versions(name: str) -> list[str]:
    """Versions of binary package ``name`` in apt's sources, apt's preference first."""
    proc = run(["apt-cache", *_apt_opts(), "madison", name], check=False, timeout=120)
    versions: list[str] = []
    for line in proc.stdout.decode("utf-8", "replace").splitlines():
        parts = [p.strip() for p in line.split("|")]
        is_binary = len(parts) == 3 and parts[0] == name and parts[2].endswith("Packages")
        if is_binary and parts[1] not in versions:
            versions.append(parts[1])
    return versions


def apt_candidate(name: str) -> str:
    """The version apt would install for ``name`` (``apt-cache policy``'s Candidate)."""
    proc = run(["apt-cache", *_apt_opts(), "policy", name], check=False, timeout=120)
    for line in proc.stdout.decode("utf-8", "replace").splitlines():
        key, _, value = line.strip().partition(":")
        if key == "Candidate" and value.strip() and value.strip() != "(none)":
            return value.strip()
    raise _unknown_package(name)


def _unknown_package(name: str) -> PinError:
    return PinError(
        f"package {name} is not in apt's sources",
        hint="check the name, or run `apt-get update`",
    )


def _require_version(name: str, version: str) -> None:
    versions = apt_versions(name)
    if not versions:
        raise _unknown_package(name)
    if version not in versions:
        raise PinError(
            f"{name} version {version} is no longer on the mirror (it has {', '.join(versions)})",
            hint="re-pin with `bootchain lock RECIPE --update`",
        )


def apt_origin(name: str, version: str) -> AptOrigin:
    """URI, file name, size and sha256 of ``name=version`` from apt's index (no download)."""
    _require_version(name, version)
    proc = run(["apt-get", *_apt_opts(), "download", "--print-uris", f"{name}={version}"])
    for line in proc.stdout.decode("utf-8", "replace").splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[3].startswith("SHA256:"):
            return AptOrigin(
                uri=parts[0].strip("'"),
                filename=parts[1],
                size=int(parts[2]),
                sha256=parts[3].removeprefix("SHA256:").lower(),
            )
    raise PinError(f"apt printed no download URI with a SHA256 for {name}={version}")


def download_package(name: str, version: str) -> tuple[str, Path]:
    """Download ``name=version`` with apt and put it in the cache; return (sha256, path).

    Uses the cached copy when apt's index digest is already there.
    """
    origin = apt_origin(name, version)
    with contextlib.suppress(VerificationError):
        cached = cache_get(origin.sha256)
        if cached is not None:
            return origin.sha256, cached
    with _download_dir() as tmp:
        deb = _apt_download(name, version, tmp)
        return cache_put(deb)


@contextlib.contextmanager
def _download_dir() -> Iterator[Path]:
    base = cache_dir() / "tmp"
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        yield Path(tmp)


def _apt_download(name: str, version: str, dest: Path) -> Path:
    run(["apt-get", *_apt_opts(), "download", f"{name}={version}"], cwd=dest, timeout=1800)
    debs = sorted(dest.glob("*.deb"))
    if len(debs) != 1:
        raise PinError(f"apt-get download {name}={version} left {len(debs)} .deb files")
    return debs[0]


def fetch_package(pin: PackagePin, *, offline: bool = False) -> Path:
    """The verified .deb for ``pin``: from the cache, else downloaded through apt.

    The download is checked against ``pin.sha256`` before it enters the cache. A corrupted cache
    entry is removed and fetched again when online, and raises VerificationError when offline.
    """
    path = cache_path(pin.sha256)
    try:
        cached = cache_get(pin.sha256)
    except VerificationError:
        if offline:
            raise
        log.warning("removing corrupted cache entry %s", path)
        path.unlink()
        cached = None
    if cached is not None:
        return cached
    if offline:
        raise PinError(
            f"{pin} (sha256 {pin.sha256}) is not in the cache {path.parent} "
            "and --offline was given",
            hint="run once without --offline (or `bootchain lock RECIPE`) to fill the cache",
        )
    origin = apt_origin(pin.name, pin.version)
    if origin.sha256 != pin.sha256:
        raise PinError(
            f"{pin}: sha256 mismatch: pinned {pin.sha256}, mirror index has {origin.sha256}",
            hint="re-pin with `bootchain lock RECIPE --update` if the change is expected",
        )
    with _download_dir() as tmp:
        deb = _apt_download(pin.name, pin.version, tmp)
        actual = sha256_file(deb)
        if actual != pin.sha256:
            raise PinError(
                f"{pin}: sha256 mismatch: pinned {pin.sha256}, downloaded {actual}",
                hint="re-pin with `bootchain lock RECIPE --update` if the change is expected",
            )
        _, final = cache_put(deb)
    return final


# --------------------------------------------------------------------------------------------
# ar archives (pure)


AR_MAGIC = b"!<arch>\n"


@dataclass(frozen=True)
class ArMember:
    """One member of an ar archive, with the header fields that a .deb carries."""

    name: str
    data: bytes
    mtime: int = 0
    uid: int = 0
    gid: int = 0
    mode: int = 0o100644


def read_ar(data: bytes, where: str = "ar archive") -> list[ArMember]:
    """Members of a common-format ar archive (as dpkg writes it), in order."""
    if not data.startswith(AR_MAGIC):
        raise InputFileError(f"{where}: not an ar archive (bad magic)")
    members: list[ArMember] = []
    offset = len(AR_MAGIC)
    while offset < len(data):
        header = data[offset : offset + 60]
        if len(header) < 60 or header[58:60] != b"`\n":
            raise InputFileError(f"{where}: bad ar member header at offset {offset}")
        try:
            name = header[0:16].decode("ascii").rstrip(" ")
            mtime = int(header[16:28].strip() or b"0")
            uid = int(header[28:34].strip() or b"0")
            gid = int(header[34:40].strip() or b"0")
            mode = int(header[40:48].strip() or b"0", 8)
            size = int(header[48:58].strip())
        except ValueError as exc:
            raise InputFileError(f"{where}: bad ar member header at offset {offset}") from exc
        start = offset + 60
        if start + size > len(data):
            raise InputFileError(f"{where}: member {name!r} at offset {offset} runs past the end")
        if name.endswith("/") and name not in ("/", "//"):
            name = name[:-1]  # GNU style terminator
        members.append(ArMember(name, data[start : start + size], mtime, uid, gid, mode))
        offset = start + size + (size & 1)
    return members


def make_ar(members: Sequence[ArMember]) -> bytes:
    """A common-format ar archive of ``members`` (the inverse of :func:`read_ar`)."""
    out = bytearray(AR_MAGIC)
    for m in members:
        if len(m.name) > 16 or "/" in m.name:
            raise ValueError(f"ar member name not representable: {m.name!r}")
        header = (
            f"{m.name:<16}{m.mtime:<12}{m.uid:<6}{m.gid:<6}{m.mode:<8o}{len(m.data):<10}`\n"
        ).encode("ascii")
        out += header + m.data
        if len(m.data) & 1:
            out += b"\n"
    return bytes(out)


# --------------------------------------------------------------------------------------------
# .deb (pure apart from reading the file)


MemberKind = Literal["file", "dir", "symlink"]


@dataclass(frozen=True)
class DebMember:
    """One entry of a package's data.tar: ``path`` is relative (no leading ``./`` or ``/``)."""

    path: str
    kind: MemberKind
    mode: int
    data: bytes = b""
    target: str = ""


@dataclass(frozen=True)
class DebPackage:
    """A parsed .deb: control fields and the members of data.tar."""

    control: Mapping[str, str]
    members: Mapping[str, DebMember] = field(repr=False)

    @property
    def name(self) -> str:
        return self.control.get("Package", "")

    @property
    def version(self) -> str:
        return self.control.get("Version", "")


def parse_control(text: str, where: str = "control") -> dict[str, str]:
    """Fields of a deb822 control paragraph; continuation lines are joined with newlines."""
    fields: dict[str, str] = {}
    key = ""
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            if fields:
                break
            continue
        if line[0] in " \t":
            if not key:
                raise InputFileError(f"{where} line {number}: continuation before any field")
            fields[key] += "\n" + line[1:]
            continue
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            raise InputFileError(f"{where} line {number}: expected 'Field: value'")
        key = name.strip()
        fields[key] = value.strip()
    return fields


def _open_compressed(name: str, blob: bytes, where: str) -> IO[bytes]:
    raw = io.BytesIO(blob)
    if name.endswith(".xz"):
        return lzma.LZMAFile(raw)
    if name.endswith(".zst"):
        import zstandard

        reader: IO[bytes] = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        return reader
    if name.endswith(".gz"):
        gz: IO[bytes] = gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[assignment]
        return gz
    if name.endswith(".bz2"):
        return bz2.BZ2File(raw)
    if name.endswith(".tar"):
        return raw
    raise InputFileError(f"{where}: unsupported compression of member {name!r}")


def _norm(path: str) -> str:
    parts = [p for p in path.split("/") if p not in ("", ".")]
    return "/".join(parts)


def read_tar_members(
    name: str,
    blob: bytes,
    where: str,
    select: Callable[[str], bool] | None = None,
) -> dict[str, DebMember]:
    """Members of a (compressed) tar stream; hard links get the data of their target."""
    members: dict[str, DebMember] = {}
    files: dict[str, DebMember] = {}
    try:
        with (
            _open_compressed(name, blob, where) as stream,
            tarfile.open(fileobj=stream, mode="r|") as tar,
        ):
            for info in tar:
                path = _norm(info.name)
                if not path:
                    continue
                wanted = select is None or select(path)
                mode = info.mode & 0o7777
                if info.isdir():
                    member = DebMember(path, "dir", mode)
                elif info.issym():
                    member = DebMember(path, "symlink", 0o777, target=info.linkname)
                elif info.islnk():
                    target = files.get(_norm(info.linkname))
                    if target is None:
                        raise InputFileError(
                            f"{where}: hard link {path} to unknown {info.linkname}"
                        )
                    if wanted and target.path not in members:
                        raise InputFileError(
                            f"{where}: hard link {path} points to {target.path}, "
                            "which the member selection left out"
                        )
                    member = DebMember(path, "file", mode, target.data)
                elif info.isfile():
                    data = b""
                    if wanted:
                        extracted = tar.extractfile(info)
                        data = extracted.read() if extracted is not None else b""
                    member = DebMember(path, "file", mode, data)
                    files[path] = member
                else:
                    raise InputFileError(f"{where}: unsupported tar entry type for {path}")
                if wanted:
                    members[path] = member
    except (tarfile.TarError, lzma.LZMAError, OSError, EOFError) as exc:
        raise InputFileError(f"{where}: cannot read {name}: {exc}") from exc
    except Exception as exc:  # zstandard.ZstdError has no common base we can import statically
        if type(exc).__name__ == "ZstdError":
            raise InputFileError(f"{where}: cannot read {name}: {exc}") from exc
        raise
    return dict(sorted(members.items()))


def parse_deb(
    data: bytes, where: str = ".deb", select: Callable[[str], bool] | None = None
) -> DebPackage:
    """Parse a .deb from bytes. ``select(path)`` limits which data.tar members are kept."""
    members = {m.name: m for m in read_ar(data, where)}
    binary = members.get("debian-binary")
    if binary is None or not binary.data.startswith(b"2."):
        raise InputFileError(f"{where}: not a Debian binary package (debian-binary missing)")
    control_name = next((n for n in members if n.startswith("control.tar")), None)
    data_name = next((n for n in members if n.startswith("data.tar")), None)
    if control_name is None or data_name is None:
        raise InputFileError(f"{where}: control.tar or data.tar member missing")
    control_members = read_tar_members(control_name, members[control_name].data, where)
    control_file = control_members.get("control")
    if control_file is None:
        raise InputFileError(f"{where}: {control_name} has no control file")
    control = parse_control(control_file.data.decode("utf-8"), f"{where}: control")
    files = read_tar_members(data_name, members[data_name].data, where, select)
    return DebPackage(control=control, members=files)


def read_deb(
    path: Path,
    pin: PackagePin | None = None,
    *,
    select: Callable[[str], bool] | None = None,
) -> DebPackage:
    """Parse the .deb at ``path``; with ``pin``, require its Package and Version to match."""
    package = parse_deb(path.read_bytes(), str(path), select)
    if pin is not None and (package.name, package.version) != (pin.name, pin.version):
        raise PinError(
            f"{path}: package is {package.name}={package.version}, pinned {pin}",
        )
    return package


# --------------------------------------------------------------------------------------------
# lock


@dataclass(frozen=True)
class LockedPackage:
    """One pinned package as resolved: digest, size and where apt found it."""

    role: str
    name: str
    version: str
    sha256: str
    size: int
    source: str
    uri: str


@dataclass(frozen=True)
class LockedFile:
    """One local input file, by path relative to the recipe."""

    path: str
    sha256: str


@dataclass(frozen=True)
class Lock:
    """The resolved inputs of a recipe (``recipes/<recipe>.lock.json``)."""

    packages: tuple[LockedPackage, ...]
    files: tuple[LockedFile, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": LOCK_SCHEMA,
            "packages": {
                p.role: {
                    "name": p.name,
                    "version": p.version,
                    "sha256": p.sha256,
                    "size": p.size,
                    "source": p.source,
                    "uri": p.uri,
                }
                for p in self.packages
            },
            "files": {f.path: {"sha256": f.sha256} for f in self.files},
        }

    def to_json(self) -> bytes:
        """Stable JSON: sorted keys, two-space indent, trailing newline."""
        return (json.dumps(self.to_dict(), sort_keys=True, indent=2) + "\n").encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes, where: str = "lock file") -> Lock:
        try:
            obj = json.loads(data)
            if obj.get("schema") != LOCK_SCHEMA:
                raise InputFileError(f"{where}: schema is {obj.get('schema')!r}, not {LOCK_SCHEMA}")
            packages = tuple(
                LockedPackage(
                    role=role,
                    name=str(p["name"]),
                    version=str(p["version"]),
                    sha256=str(p["sha256"]),
                    size=int(p["size"]),
                    source=str(p["source"]),
                    uri=str(p["uri"]),
                )
                for role, p in sorted(obj["packages"].items())
            )
            files = tuple(
                LockedFile(path=path, sha256=str(f["sha256"]))
                for path, f in sorted(obj["files"].items())
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InputFileError(f"{where}: not a bootchain lock: {exc}") from exc
        return cls(packages=packages, files=files)

    def pins(self) -> dict[str, PackagePin]:
        return {p.role: PackagePin(p.name, p.version, p.sha256) for p in self.packages}


def make_lock(
    pins: Mapping[str, PackagePin],
    files: Mapping[str, Path],
    *,
    offline: bool = False,
    previous: Lock | None = None,
) -> Lock:
    """Fetch and verify every pin, hash every local file, and describe them as a Lock.

    ``files`` maps the path as written relative to the recipe to the file on disk. Offline,
    apt is not asked for URIs: they are kept from ``previous`` where the pin is unchanged.
    """
    known = (
        {(p.role, p.name, p.version, p.sha256): p.uri for p in previous.packages}
        if previous
        else {}
    )
    packages = []
    for role, pin in sorted(pins.items()):
        deb = fetch_package(pin, offline=offline)
        uri = known.get((role, pin.name, pin.version, pin.sha256), "")
        if not offline:
            uri = apt_origin(pin.name, pin.version).uri
        packages.append(
            LockedPackage(
                role=role,
                name=pin.name,
                version=pin.version,
                sha256=pin.sha256,
                size=deb.stat().st_size,
                source=f"debian:{pin.name}={pin.version}",
                uri=uri,
            )
        )
    locked_files = []
    for rel, path in sorted(files.items()):
        if not path.is_file():
            raise InputFileError(f"local input {rel} not found at {path}")
        locked_files.append(LockedFile(path=rel, sha256=sha256_file(path)))
    return Lock(packages=tuple(packages), files=tuple(locked_files))


def check_lock(lock: Lock, pins: Mapping[str, PackagePin], files: Mapping[str, Path]) -> None:
    """Raise PinError when the recipe's pins or local files differ from the lock."""
    if lock.pins() != dict(pins):
        raise PinError(
            "the lock file does not match the recipe's package pins",
            hint="run `bootchain lock RECIPE`",
        )
    recorded = {f.path: f.sha256 for f in lock.files}
    if set(recorded) != set(files):
        raise PinError(
            "the lock file lists other local files than the recipe",
            hint="run `bootchain lock RECIPE`",
        )
    for rel, path in sorted(files.items()):
        if sha256_file(path) != recorded[rel]:
            raise PinError(
                f"local input {rel} changed since the lock was written",
                hint="run `bootchain lock RECIPE`",
            )


def lock_path(recipe_path: Path) -> Path:
    """``recipes/demo.yaml`` -> ``recipes/demo.lock.json``."""
    name = recipe_path.name
    for suffix in (".j2", ".jinja", ".yaml", ".yml"):
        name = name.removesuffix(suffix)
    return recipe_path.with_name(f"{name}.lock.json")


# --------------------------------------------------------------------------------------------
# --update: re-pin to what the mirror has, rewriting the recipe source


@dataclass(frozen=True)
class PinChange:
    """One pin moved to a new name/version/digest, and the files rewritten for it."""

    role: str
    old: PackagePin
    new: PackagePin
    files: tuple[Path, ...]

    def __str__(self) -> str:
        old, new = self.old, self.new
        if old.name == new.name:
            return (
                f"{self.role}: {old.name} {old.version} ({old.sha256[:12]}) -> "
                f"{new.version} ({new.sha256[:12]})"
            )
        return (
            f"{self.role}: {old.name} {old.version} ({old.sha256[:12]}) -> "
            f"{new.name} {new.version} ({new.sha256[:12]})"
        )


_KERNEL_NAME = re.compile(r"linux-image-(\d+\.\d+\.\d+)-(\d+)-(.+)")


def newest_kernel_name(name: str) -> str:
    """For linux-image-<ver>-<abi>-<flavour>, the name with the highest ABI apt knows."""
    match = _KERNEL_NAME.fullmatch(name)
    if match is None:
        return name
    base, _, flavour = match.groups()
    pattern = f"^linux-image-{re.escape(base)}-[0-9]+-{re.escape(flavour)}$"
    proc = run(["apt-cache", *_apt_opts(), "search", "--names-only", pattern], timeout=120)
    best = (int(match.group(2)), name)
    for line in proc.stdout.decode("utf-8", "replace").splitlines():
        candidate = line.split(" - ", 1)[0].strip()
        m = _KERNEL_NAME.fullmatch(candidate)
        if m and m.group(1) == base and m.group(3) == flavour:
            best = max(best, (int(m.group(2)), candidate))
    return best[1]


def update_pins(
    recipe_files: Sequence[Path], pins: Mapping[str, PackagePin], *, roles: Sequence[str] = ()
) -> list[PinChange]:
    """Re-pin each package to apt's candidate (kernel: also the newest ABI) and rewrite the
    recipe files where the pins are written. Returns the changes made."""
    changes: list[PinChange] = []
    for role, old in sorted(pins.items()):
        if roles and role not in roles:
            continue
        name = newest_kernel_name(old.name) if role == "kernel" else old.name
        version = apt_candidate(name)
        digest, _ = download_package(name, version)
        new = PackagePin(name, version, digest)
        if new == old:
            continue
        written = rewrite_pin(recipe_files, role, old, new)
        changes.append(PinChange(role, old, new, written))
    return changes


def rewrite_pin(
    recipe_files: Sequence[Path], role: str, old: PackagePin, new: PackagePin
) -> tuple[Path, ...]:
    """Rewrite ``packages.<role>`` from ``old`` to ``new`` in whichever files write it.

    Every changed field must be found written literally somewhere, else nothing is written.
    """
    updates: list[tuple[Path, str]] = []
    found: set[str] = set()
    for path in recipe_files:
        text = path.read_text(encoding="utf-8")
        updated, fields = rewrite_pin_text(text, role, old, new)
        found |= fields
        if updated != text:
            updates.append((path, updated))
    missing = [k for k in _PIN_FIELDS if getattr(old, k) != getattr(new, k) and k not in found]
    if missing:
        raise RecipeError(
            f"packages.{role}.{missing[0]} ({getattr(old, missing[0])}) is not written "
            "literally in " + ", ".join(str(p) for p in recipe_files),
            hint=f"set packages.{role} by hand to {new} sha256 {new.sha256}",
        )
    for path, updated in updates:
        write_atomic(path, updated.encode("utf-8"), mode=path.stat().st_mode & 0o7777)
    return tuple(path for path, _ in updates)


_PIN_FIELDS = ("name", "version", "sha256")


def rewrite_pin_text(
    text: str, role: str, old: PackagePin, new: PackagePin
) -> tuple[str, set[str]]:
    """``text`` with the ``packages.<role>`` scalars equal to ``old`` replaced by ``new``, and
    the names of the fields replaced.

    Uses YAML node marks when the raw text composes; else (jinja syntax) replaces the old
    sha256 and, on the lines beside it, the old version and name.
    """
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return _rewrite_by_lines(text, old, new)
    spans: list[tuple[int, int, str]] = []
    found: set[str] = set()
    pin_node = _child(_child(root, "packages"), role)
    for key in _PIN_FIELDS:
        node = _child(pin_node, key)
        old_value, new_value = getattr(old, key), getattr(new, key)
        if old_value == new_value or not isinstance(node, yaml.ScalarNode):
            continue
        if node.value == old_value:
            spans.append(
                (node.start_mark.index, node.end_mark.index, _scalar(new_value, node.style))
            )
            found.add(key)
    for start, end, replacement in sorted(spans, reverse=True):
        text = text[:start] + replacement + text[end:]
    return text, found


def _child(node: yaml.Node | None, key: str) -> yaml.Node | None:
    if not isinstance(node, yaml.MappingNode):
        return None
    for k, v in node.value:
        if isinstance(k, yaml.ScalarNode) and k.value == key:
            child: yaml.Node = v
            return child
    return None


def _scalar(value: str, style: str | None) -> str:
    if style == '"':
        return json.dumps(value)
    if style == "'":
        return "'" + value.replace("'", "''") + "'"
    try:
        plain_ok = yaml.safe_load(value) == value and "#" not in value
    except yaml.YAMLError:
        plain_ok = False
    return value if plain_ok else json.dumps(value)


def _token(value: str) -> re.Pattern[str]:
    return re.compile(r"(?<![\w.+~:-])" + re.escape(value) + r"(?![\w.+~:-])")


def _rewrite_by_lines(
    text: str, old: PackagePin, new: PackagePin, window: int = 3
) -> tuple[str, set[str]]:
    lines = text.splitlines(keepends=True)
    found: set[str] = set()
    for i, line in enumerate(list(lines)):
        if old.sha256 not in line:
            continue
        lines[i] = lines[i].replace(old.sha256, new.sha256)
        found.add("sha256")
        for j in range(max(0, i - window), min(len(lines), i + window + 1)):
            for key in ("version", "name"):
                before, after = getattr(old, key), getattr(new, key)
                if before == after:
                    continue
                replaced, count = _token(before).subn(after.replace("\\", "\\\\"), lines[j])
                if count:
                    lines[j] = replaced
                    found.add(key)
    return "".join(lines), found
