"""The deterministic initramfs: newc cpio, fixed-parameter compression, kernel module closure.

Pure: bytes in, bytes out. Entries are sorted by path, parents are created, uid/gid are 0,
every mtime is SOURCE_DATE_EPOCH and inode numbers follow the sorted order, so the same inputs
give the same bytes whatever order they came in.
"""

from __future__ import annotations

import gzip
import lzma
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from builder.errors import InputFileError, UserInputError
from builder.inputs import DebMember

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"
BLOCK = 512

EntryKind = Literal["file", "dir", "symlink", "chardev"]
Compression = Literal["none", "gzip", "zstd"]

S_IFDIR = 0o040000
S_IFREG = 0o100000
S_IFLNK = 0o120000
S_IFCHR = 0o020000
_KIND_BITS = {"dir": S_IFDIR, "file": S_IFREG, "symlink": S_IFLNK, "chardev": S_IFCHR}
_BITS_KIND: dict[int, EntryKind] = {
    S_IFDIR: "dir",
    S_IFREG: "file",
    S_IFLNK: "symlink",
    S_IFCHR: "chardev",
}


# The busybox applets the guest /init may call. Fixed (the host cannot be trusted to run the
# guest's binary); every name is checked against `busybox --list` of busybox-static 1.35.
APPLETS: tuple[str, ...] = (
    "[",
    "[[",
    "base64",
    "basename",
    "cat",
    "chmod",
    "cmp",
    "cp",
    "cut",
    "date",
    "dd",
    "dirname",
    "dmesg",
    "echo",
    "env",
    "false",
    "find",
    "grep",
    "head",
    "hexdump",
    "insmod",
    "ln",
    "ls",
    "mkdir",
    "mknod",
    "mount",
    "od",
    "poweroff",
    "printf",
    "readlink",
    "reboot",
    "rm",
    "sed",
    "seq",
    "sh",
    "sha1sum",
    "sha256sum",
    "sha512sum",
    "sleep",
    "stat",
    "sync",
    "tail",
    "tee",
    "test",
    "tr",
    "true",
    "umount",
    "uname",
    "wc",
    "xxd",
)


@dataclass(frozen=True)
class CpioEntry:
    """One archive entry: ``path`` relative (no leading ``/``), ``mode`` permission bits only."""

    path: str
    mode: int
    kind: EntryKind = "file"
    data: bytes = b""
    target: str = ""
    rdev: tuple[int, int] = (0, 0)

    @classmethod
    def file(cls, path: str, data: bytes, mode: int = 0o644) -> CpioEntry:
        return cls(path, mode, "file", data)

    @classmethod
    def directory(cls, path: str, mode: int = 0o755) -> CpioEntry:
        return cls(path, mode, "dir")

    @classmethod
    def symlink(cls, path: str, target: str) -> CpioEntry:
        return cls(path, 0o777, "symlink", target=target)

    @classmethod
    def chardev(cls, path: str, major: int, minor: int, mode: int = 0o600) -> CpioEntry:
        return cls(path, mode, "chardev", rdev=(major, minor))

    @property
    def content(self) -> bytes:
        """What the archive stores after the name: file data or the symlink target."""
        if self.kind == "file":
            return self.data
        if self.kind == "symlink":
            return self.target.encode("utf-8")
        return b""


def _clean(path: str) -> str:
    parts = [p for p in path.strip("/").split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise UserInputError(f"initrd path {path!r} is empty or leaves the root")
    return "/".join(parts)


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


def _header(
    ino: int, mode: int, nlink: int, mtime: int, size: int, rdev: tuple[int, int], name: bytes
) -> bytes:
    fields = (ino, mode, 0, 0, nlink, mtime, size, 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
    return NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)


def normalize_entries(entries: Iterable[CpioEntry]) -> list[CpioEntry]:
    """Entries with clean paths, missing parent folders added (0755), sorted by path.

    Two entries for one path are an error, unless both are the same folder.
    """
    by_path: dict[str, CpioEntry] = {}
    for entry in entries:
        path = _clean(entry.path)
        cleaned = CpioEntry(
            path, entry.mode & 0o7777, entry.kind, entry.data, entry.target, entry.rdev
        )
        previous = by_path.get(path)
        if previous is not None and not (previous == cleaned and cleaned.kind == "dir"):
            raise UserInputError(f"initrd path /{path} is given twice")
        by_path[path] = cleaned
    for path in list(by_path):
        parts = path.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            existing = by_path.get(parent)
            if existing is None:
                by_path[parent] = CpioEntry.directory(parent)
            elif existing.kind != "dir":
                raise UserInputError(f"initrd path /{parent} is a {existing.kind}, not a folder")
    return [by_path[p] for p in sorted(by_path, key=lambda p: p.encode("utf-8"))]


def make_cpio(entries: Iterable[CpioEntry], source_date_epoch: int = 0) -> bytes:
    """A newc cpio archive of ``entries``; byte-identical for the same set of entries.

    The bytes equal what ``cpio -o -H newc --reproducible --owner=0:0`` (GNU cpio 2.13) writes
    for the same tree listed in sorted order: inodes numbered from 0 in that order, device
    numbers 0, the archive padded with zeros to a 512-byte block.
    """
    ordered = normalize_entries(entries)
    subdirs: dict[str, int] = {}
    for entry in ordered:
        if entry.kind == "dir" and "/" in entry.path:
            parent = entry.path.rsplit("/", 1)[0]
            subdirs[parent] = subdirs.get(parent, 0) + 1
    out = bytearray()
    for ino, entry in enumerate(ordered):
        nlink = 2 + subdirs.get(entry.path, 0) if entry.kind == "dir" else 1
        content = entry.content
        name = entry.path.encode("utf-8")
        mode = _KIND_BITS[entry.kind] | entry.mode
        head = _header(ino, mode, nlink, source_date_epoch, len(content), entry.rdev, name)
        out += head + name + b"\0"
        out += b"\0" * _pad4(len(head) + len(name) + 1)
        out += content + b"\0" * _pad4(len(content))
    name = TRAILER.encode("ascii")
    head = _header(0, 0, 1, 0, 0, (0, 0), name)
    out += head + name + b"\0" + b"\0" * _pad4(len(head) + len(name) + 1)
    out += b"\0" * (-len(out) % BLOCK)
    return bytes(out)


def read_cpio(data: bytes) -> list[CpioEntry]:
    """The entries of a newc archive up to its trailer (the inverse of :func:`make_cpio`)."""
    entries: list[CpioEntry] = []
    offset = 0
    while True:
        head = data[offset : offset + 110]
        if len(head) < 110 or head[:6] != NEWC_MAGIC:
            raise InputFileError(f"cpio: no newc header at offset {offset}")
        try:
            f = [int(head[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        except ValueError as exc:
            raise InputFileError(f"cpio: bad header field at offset {offset}") from exc
        mode, size, namesize = f[1], f[6], f[11]
        name_start = offset + 110
        name = data[name_start : name_start + namesize - 1].decode("utf-8")
        body = name_start + namesize + _pad4(110 + namesize)
        content = data[body : body + size]
        if len(content) != size:
            raise InputFileError(f"cpio: entry {name!r} at offset {offset} runs past the end")
        offset = body + size + _pad4(size)
        if name == TRAILER:
            return entries
        kind = _BITS_KIND.get(mode & 0o170000)
        if kind is None:
            raise InputFileError(f"cpio: entry {name!r} has unsupported type {mode:o}")
        entries.append(
            CpioEntry(
                path=name,
                mode=mode & 0o7777,
                kind=kind,
                data=content if kind == "file" else b"",
                target=content.decode("utf-8") if kind == "symlink" else "",
                rdev=(f[9], f[10]),
            )
        )


def compress(data: bytes, method: Compression) -> bytes:
    """Compress with fixed parameters (deterministic for a given library version).

    gzip: level 9, mtime 0, no file name. zstd: level 19, one thread, no dictionary, content
    size and checksum in the frame header.
    """
    if method == "none":
        return data
    if method == "gzip":
        return gzip.compress(data, compresslevel=9, mtime=0)
    if method == "zstd":
        import zstandard

        compressor = zstandard.ZstdCompressor(
            level=19, write_content_size=True, write_checksum=True, threads=0
        )
        result: bytes = compressor.compress(data)
        return result
    raise UserInputError(f"unknown initrd compression {method!r}", hint="none, gzip or zstd")


# --------------------------------------------------------------------------------------------
# kernel modules


_MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


def read_elf_section(elf: bytes, section: str, where: str = "ELF") -> bytes:
    """The bytes of the named section of an ELF file (32/64-bit, either byte order)."""
    if elf[:4] != b"\x7fELF" or len(elf) < 52:
        raise InputFileError(f"{where}: not an ELF file")
    klass, endian = elf[4], elf[5]
    if klass not in (1, 2) or endian not in (1, 2):
        raise InputFileError(f"{where}: bad ELF class/data bytes {klass}/{endian}")
    bo = "<" if endian == 1 else ">"
    try:
        if klass == 2:
            (shoff,) = struct.unpack_from(bo + "Q", elf, 0x28)
            shentsize, shnum, shstrndx = struct.unpack_from(bo + "HHH", elf, 0x3A)
            fmt, name_i, off_i, size_i = bo + "IIQQQQIIQQ", 0, 4, 5
        else:
            (shoff,) = struct.unpack_from(bo + "I", elf, 0x20)
            shentsize, shnum, shstrndx = struct.unpack_from(bo + "HHH", elf, 0x2E)
            fmt, name_i, off_i, size_i = bo + "IIIIIIIIII", 0, 4, 5
        headers = [struct.unpack_from(fmt, elf, shoff + i * shentsize) for i in range(shnum)]
        strtab = headers[shstrndx]
        names = elf[strtab[off_i] : strtab[off_i] + strtab[size_i]]
    except (struct.error, IndexError) as exc:
        raise InputFileError(f"{where}: truncated ELF section headers") from exc
    for h in headers:
        start = h[name_i]
        end = names.find(b"\0", start)
        if names[start:end].decode("ascii", "replace") == section:
            body = elf[h[off_i] : h[off_i] + h[size_i]]
            if len(body) != h[size_i]:
                raise InputFileError(f"{where}: section {section} runs past the end")
            return body
    raise InputFileError(f"{where}: no {section} section")


def read_modinfo(module: bytes, where: str = "module") -> dict[str, tuple[str, ...]]:
    """The ``.modinfo`` key=value strings of a kernel module (keys may repeat, e.g. alias)."""
    info: dict[str, list[str]] = {}
    for item in read_elf_section(module, ".modinfo", where).split(b"\0"):
        if not item:
            continue
        key, sep, value = item.decode("utf-8", "replace").partition("=")
        if sep:
            info.setdefault(key, []).append(value)
    return {k: tuple(v) for k, v in info.items()}


def decompress_module(path: str, data: bytes) -> bytes:
    """Plain ELF bytes of a ``.ko``, ``.ko.xz``, ``.ko.zst`` or ``.ko.gz``."""
    try:
        if path.endswith(".xz"):
            return lzma.decompress(data)
        if path.endswith(".gz"):
            return gzip.decompress(data)
        if path.endswith(".zst"):
            import zstandard

            out: bytes = zstandard.ZstdDecompressor().decompressobj().decompress(data)
            return out
    except (lzma.LZMAError, OSError, EOFError) as exc:
        raise InputFileError(f"{path}: cannot decompress module: {exc}") from exc
    return data


def _module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    for suffix in _MODULE_SUFFIXES:
        if base.endswith(suffix):
            return base[: -len(suffix)].replace("-", "_")
    return ""


def module_closure(
    members: Mapping[str, DebMember], kernel_release: str, names: Sequence[str]
) -> list[str]:
    """Member paths of ``names`` and everything they depend on, in load order (deps first).

    Modules built into the kernel (``modules.builtin``) are skipped; a name that is neither
    built in nor shipped raises UserInputError naming it.
    """
    root = f"lib/modules/{kernel_release}/"
    index: dict[str, str] = {}
    for path in sorted(members):
        if path.startswith(root) and members[path].kind == "file":
            name = _module_name(path)
            if name:
                index.setdefault(name, path)
    builtin_member = members.get(root + "modules.builtin")
    builtin = set()
    if builtin_member is not None:
        for line in builtin_member.data.decode("utf-8").splitlines():
            if line.strip():
                builtin.add(_module_name(line.strip()))
    if not index and builtin_member is None:
        raise UserInputError(f"the kernel package has no {root} (is {kernel_release} right?)")

    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, chain: tuple[str, ...]) -> None:
        name = name.replace("-", "_")
        if name in builtin or state.get(name) == "done":
            return
        if state.get(name) == "active":
            raise UserInputError(f"kernel module dependency cycle: {' -> '.join((*chain, name))}")
        path = index.get(name)
        if path is None:
            needed = f" (needed by {chain[-1]})" if chain else ""
            raise UserInputError(f"kernel module {name}{needed} not found under /{root}")
        state[name] = "active"
        info = read_modinfo(decompress_module(path, members[path].data), path)
        deps = [d for value in info.get("depends", ()) for d in value.split(",") if d]
        for dep in sorted(deps):
            visit(dep, (*chain, name))
        state[name] = "done"
        order.append(path)

    for name in names:
        visit(name, ())
    return order


# --------------------------------------------------------------------------------------------
# the initramfs


def _initrd_module_path(path: str) -> str:
    for suffix in (".xz", ".zst", ".gz"):
        if path.endswith(".ko" + suffix):
            return path[: -len(suffix)]
    return path


def make_initrd(
    busybox_members: Mapping[str, DebMember],
    kernel_members: Mapping[str, DebMember],
    kernel_release: str,
    modules: Sequence[str],
    init_script: bytes,
    extra_files: Sequence[CpioEntry],
    compression: Compression,
    source_date_epoch: int,
) -> bytes:
    """The compressed initramfs: busybox + applet links in /bin, modules and their load order
    in /etc/bootchain/modules, /init, the extra files, and /dev/console."""
    busybox = busybox_members.get("bin/busybox")
    if busybox is None or busybox.kind != "file":
        raise UserInputError("the busybox package has no bin/busybox (pin busybox-static)")
    entries: list[CpioEntry] = [
        CpioEntry.file("bin/busybox", busybox.data, 0o755),
        *(CpioEntry.symlink(f"bin/{applet}", "busybox") for applet in APPLETS),
        CpioEntry.symlink("sbin", "bin"),
        CpioEntry.directory("dev"),
        CpioEntry.chardev("dev/console", 5, 1, 0o600),
        CpioEntry.directory("proc", 0o555),
        CpioEntry.directory("sys", 0o555),
        CpioEntry.directory("run"),
        CpioEntry.directory("tmp", 0o1777),
        CpioEntry.file("init", init_script, 0o755),
    ]
    loaded: list[str] = []
    for path in module_closure(kernel_members, kernel_release, modules):
        target = _initrd_module_path(path)
        entries.append(CpioEntry.file(target, decompress_module(path, kernel_members[path].data)))
        loaded.append(target)
    entries.append(
        CpioEntry.file("etc/bootchain/modules", "".join(f"{p}\n" for p in loaded).encode())
    )
    entries.extend(extra_files)
    return compress(make_cpio(entries, source_date_epoch), compression)
