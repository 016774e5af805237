"""builder.initrd: newc cpio (golden bytes from GNU cpio), compression, module closure."""

from __future__ import annotations

import gzip
import lzma
import random
import shutil
import subprocess
from pathlib import Path

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from builder.errors import InputFileError, UserInputError
from builder.initrd import (
    APPLETS,
    CpioEntry,
    compress,
    make_cpio,
    make_initrd,
    module_closure,
    read_cpio,
    read_elf_section,
    read_modinfo,
)
from builder.inputs import DebMember

DATA = Path(__file__).parent.parent / "data" / "initrd"
SDE = 1735689600


def golden_entries() -> list[CpioEntry]:
    return [
        CpioEntry.file("init", b"#!/bin/sh\necho hi\n", 0o755),
        CpioEntry.file("bin/busybox", b"abc", 0o755),
        CpioEntry.symlink("bin/sh", "busybox"),
        CpioEntry.symlink("bin/[", "busybox"),
        CpioEntry.file("etc/empty", b""),
        CpioEntry.file("etc/one", b"x"),
        CpioEntry.file("etc/two", b"xy"),
        CpioEntry.file("etc/three", b"xyz"),
        CpioEntry.file("etc/four", b"wxyz"),
        CpioEntry.file("etc/five", b"vwxyz"),
        CpioEntry.file("etc/bootchain/modules", b"lib/modules/r/kernel/a/m.ko\n"),
        CpioEntry.file("lib/modules/r/kernel/a/m.ko", b"ELF-ish"),
        CpioEntry.chardev("dev/console", 5, 1, 0o600),
        CpioEntry.directory("tmp", 0o1777),
        CpioEntry.directory("proc", 0o555),
        # bin, dev, etc, etc/bootchain and lib/... are created as parents (0755)
    ]


def need(tool: str) -> str:
    found = shutil.which(tool)
    if found is None:
        pytest.fail(f"{tool} is required for this test (install it)")
    return found


def test_cpio_equals_gnu_cpio_golden() -> None:
    assert make_cpio(golden_entries(), SDE) == (DATA / "golden.cpio").read_bytes()


def test_cpio_same_bytes_for_any_input_order() -> None:
    entries = golden_entries()
    first = make_cpio(entries, SDE)
    rng = random.Random(7)
    for _ in range(5):
        rng.shuffle(entries)
        assert make_cpio(entries, SDE) == first


def test_cpio_round_trip_golden() -> None:
    golden = (DATA / "golden.cpio").read_bytes()
    assert make_cpio(read_cpio(golden), SDE) == golden


def test_cpio_read_fields() -> None:
    entries = {e.path: e for e in read_cpio((DATA / "golden.cpio").read_bytes())}
    assert entries["dev/console"].kind == "chardev"
    assert entries["dev/console"].rdev == (5, 1)
    assert entries["bin/sh"].target == "busybox"
    assert entries["tmp"].mode == 0o1777
    assert entries["lib/modules/r"].kind == "dir"


def test_cpio_gnu_cpio_lists_and_extracts(tmp_path: Path) -> None:
    cpio = need("cpio")
    data = make_cpio(golden_entries(), SDE)
    listing = subprocess.run([cpio, "-t"], input=data, capture_output=True, check=True)
    names = listing.stdout.decode().split()
    assert names == sorted(names) and "dev/console" in names and "bin/[" in names
    subprocess.run(
        [cpio, "-idm", "--no-absolute-filenames"],
        input=data,
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    assert (tmp_path / "etc" / "five").read_bytes() == b"vwxyz"
    assert (tmp_path / "bin" / "sh").readlink() == Path("busybox")
    assert (tmp_path / "init").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "init").stat().st_mtime == SDE


def test_cpio_busybox_cpio_extracts(tmp_path: Path) -> None:
    busybox = need("busybox")
    data = make_cpio(golden_entries(), SDE)
    subprocess.run([busybox, "cpio", "-id"], input=data, cwd=tmp_path, check=True)
    assert (tmp_path / "etc" / "bootchain" / "modules").read_bytes().endswith(b"m.ko\n")
    assert (tmp_path / "bin" / "[").is_symlink()


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([CpioEntry.file("a", b"1"), CpioEntry.file("/a", b"2")], "given twice"),
        ([CpioEntry.file("a", b""), CpioEntry.file("a/b", b"")], "not a folder"),
        ([CpioEntry.file("../etc/x", b"")], "leaves the root"),
        ([CpioEntry.file("/", b"")], "empty"),
    ],
    ids=["duplicate", "file-as-parent", "dotdot", "root"],
)
def test_cpio_rejects(entries: list[CpioEntry], message: str) -> None:
    with pytest.raises(UserInputError, match=message):
        make_cpio(entries)


def test_read_cpio_rejects_truncated() -> None:
    data = make_cpio([CpioEntry.file("a", b"hello world")])
    with pytest.raises(InputFileError, match="offset"):
        read_cpio(data[:120])
    with pytest.raises(InputFileError, match="newc"):
        read_cpio(b"070707" + data[6:])


names = st.text(alphabet="abcXYZ019_-.", min_size=1, max_size=6).filter(
    lambda s: s not in (".", "..")
)


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(
        st.lists(names, min_size=1, max_size=3).map("/".join),
        st.tuples(st.binary(max_size=9), st.sampled_from([0o644, 0o755, 0o600])),
        max_size=8,
    )
)
def test_cpio_round_trip_property(files: dict[str, tuple[bytes, int]]) -> None:
    entries = [CpioEntry.file(p, d, m) for p, (d, m) in files.items()]
    try:
        data = make_cpio(entries, SDE)
    except UserInputError:
        return  # a path that is also another's parent folder
    assert len(data) % 512 == 0
    parsed = read_cpio(data)
    assert make_cpio(parsed, SDE) == data
    got = {e.path: (e.data, e.mode) for e in parsed if e.kind == "file"}
    assert got == files


@pytest.mark.parametrize("method", ["none", "gzip", "zstd"])
def test_compress_deterministic_and_decompresses(method: str) -> None:
    data = make_cpio(golden_entries(), SDE) * 20
    packed = compress(data, method)  # type: ignore[arg-type]
    assert packed == compress(data, method)  # type: ignore[arg-type]
    if method == "gzip":
        assert packed[4:8] == b"\0\0\0\0"  # mtime 0
        assert packed[3] & 0x08 == 0  # no file name
        assert gzip.decompress(packed) == data
    elif method == "zstd":
        params = zstandard.get_frame_parameters(packed)
        assert params.content_size == len(data)
        assert zstandard.ZstdDecompressor().decompress(packed) == data
    else:
        assert packed == data


def test_compress_unknown() -> None:
    with pytest.raises(UserInputError, match="lz4"):
        compress(b"", "lz4")  # type: ignore[arg-type]


# --- ELF and modules ---------------------------------------------------------------------


def module_bytes(name: str) -> bytes:
    return (DATA / "modules" / f"{name}.ko").read_bytes()


@pytest.mark.parametrize("name", ["alpha", "eps32"], ids=["elf64", "elf32"])
def test_read_modinfo(name: str) -> None:
    info = read_modinfo(module_bytes(name))
    assert info["license"] == ("GPL",)
    assert info["alias"] == (f"{name}-alias-1", f"{name}-alias-2")
    assert info["depends"] == ({"alpha": "beta,gamma", "eps32": "gamma"}[name],)


def test_read_modinfo_agrees_with_kmod() -> None:
    modinfo = need("modinfo")
    for path in sorted((DATA / "modules").glob("*.ko")):
        expected = subprocess.run(
            [modinfo, "-F", "depends", str(path)], capture_output=True, check=True, text=True
        ).stdout.strip()
        assert ",".join(read_modinfo(path.read_bytes())["depends"]) == expected, path.name


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"MZ" + b"\0" * 100, "not an ELF"),
        (b"\x7fELF\x03\x01" + b"\0" * 100, "class"),
    ],
    ids=["not-elf", "bad-class"],
)
def test_read_elf_rejects(data: bytes, message: str) -> None:
    with pytest.raises(InputFileError, match=message):
        read_elf_section(data, ".modinfo")


def test_read_elf_missing_section() -> None:
    with pytest.raises(InputFileError, match=r"no \.nosuch section"):
        read_elf_section(module_bytes("gamma"), ".nosuch")


REL = "6.1.0-99-test"
ROOT = f"lib/modules/{REL}/"


def kernel_members() -> dict[str, DebMember]:
    files = {
        "kernel/a/alpha.ko": module_bytes("alpha"),
        "kernel/b/beta.ko.xz": lzma.compress(module_bytes("beta")),
        "kernel/c/gamma.ko.zst": zstandard.ZstdCompressor().compress(module_bytes("gamma")),
        "kernel/d/delta-dash.ko": module_bytes("delta-dash"),
        "kernel/e/eps32.ko": module_bytes("eps32"),
        "kernel/l/loop1.ko": module_bytes("loop1"),
        "kernel/l/loop2.ko": module_bytes("loop2"),
        "kernel/n/needs-missing.ko": module_bytes("needs-missing"),
        "modules.builtin": b"kernel/drivers/char/tpm/tpm_tis.ko\nkernel/fs/ext4/ext4.ko\n",
    }
    return {ROOT + p: DebMember(ROOT + p, "file", 0o644, data) for p, data in files.items()}


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["gamma"], ["c/gamma.ko.zst"]),
        (["alpha"], ["c/gamma.ko.zst", "b/beta.ko.xz", "a/alpha.ko"]),
        (["delta_dash"], ["c/gamma.ko.zst", "b/beta.ko.xz", "a/alpha.ko", "d/delta-dash.ko"]),
        (["eps32", "beta"], ["c/gamma.ko.zst", "e/eps32.ko", "b/beta.ko.xz"]),
        (["tpm_tis", "gamma", "ext4"], ["c/gamma.ko.zst"]),
    ],
    ids=["leaf", "deps-first", "dash-name", "shared-dep-once", "builtin-skipped"],
)
def test_module_closure(names: list[str], expected: list[str]) -> None:
    got = module_closure(kernel_members(), REL, names)
    assert got == [f"{ROOT}kernel/{p}" for p in expected]


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["nosuch"], "kernel module nosuch not found"),
        (["needs_missing"], "nosuchmod \\(needed by needs_missing\\) not found"),
        (["loop1"], "cycle: loop1 -> loop2 -> loop1"),
    ],
    ids=["unknown", "missing-dep", "cycle"],
)
def test_module_closure_errors(names: list[str], message: str) -> None:
    with pytest.raises(UserInputError, match=message):
        module_closure(kernel_members(), REL, names)


def busybox_members() -> dict[str, DebMember]:
    return {"bin/busybox": DebMember("bin/busybox", "file", 0o755, b"\x7fELF busybox")}


def build(extra: list[CpioEntry], order_seed: int | None = None) -> bytes:
    kernel = kernel_members()
    if order_seed is not None:
        items = list(kernel.items())
        random.Random(order_seed).shuffle(items)
        kernel = dict(items)
        extra = list(extra)
        random.Random(order_seed).shuffle(extra)
    return make_initrd(
        busybox_members(), kernel, REL, ["alpha", "eps32"], b"#!/bin/sh\n", extra, "none", SDE
    )


def test_make_initrd_layout() -> None:
    extra = [CpioEntry.file("etc/motd", b"hi\n"), CpioEntry.file("usr/share/x", b"x")]
    entries = {e.path: e for e in read_cpio(build(extra))}
    assert entries["init"].mode == 0o755 and entries["init"].data == b"#!/bin/sh\n"
    assert entries["dev/console"].kind == "chardev" and entries["dev/console"].rdev == (5, 1)
    for applet in APPLETS:
        assert entries[f"bin/{applet}"].target == "busybox"
    assert entries["etc/motd"].data == b"hi\n"
    order = entries["etc/bootchain/modules"].data.decode().splitlines()
    assert order == [
        f"{ROOT}kernel/c/gamma.ko",
        f"{ROOT}kernel/b/beta.ko",
        f"{ROOT}kernel/a/alpha.ko",
        f"{ROOT}kernel/e/eps32.ko",
    ]
    # compressed modules are stored decompressed, under the .ko name
    assert entries[f"{ROOT}kernel/b/beta.ko"].data == module_bytes("beta")
    writable = [e.path for e in entries.values() if e.mode & 0o022 and e.kind != "symlink"]
    assert writable == ["tmp"]


def test_make_initrd_byte_identical_for_shuffled_inputs() -> None:
    extra = [CpioEntry.file(f"etc/f{i}", bytes([i]) * i) for i in range(8)]
    first = build(extra)
    assert all(build(extra, seed) == first for seed in range(4))


def test_make_initrd_extra_file_collision() -> None:
    with pytest.raises(UserInputError, match="/init is given twice"):
        build([CpioEntry.file("/init", b"other")])


def test_make_initrd_needs_busybox() -> None:
    with pytest.raises(UserInputError, match="bin/busybox"):
        make_initrd({}, kernel_members(), REL, [], b"", [], "none", SDE)
