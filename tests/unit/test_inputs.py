"""builder.inputs without the network: ar and .deb parsing (fixtures from dpkg-deb), the
content-addressed cache, the lock file, and rewriting pins in recipe text."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from builder.errors import InputFileError, PinError, RecipeError, VerificationError
from builder.inputs import (
    ArMember,
    Lock,
    LockedFile,
    LockedPackage,
    PackagePin,
    PinChange,
    cache_dir,
    cache_get,
    cache_path,
    cache_put,
    check_lock,
    fetch_package,
    lock_path,
    make_ar,
    make_lock,
    parse_control,
    read_ar,
    read_deb,
    rewrite_pin,
    rewrite_pin_text,
)

DATA = Path(__file__).parent.parent / "data" / "inputs"
DEBS = {c: DATA / f"hello-{c}_1.0-1+b1_all.deb" for c in ("xz", "zst", "gz")}
VERSION = "1:1.0-1+b1"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("BOOTCHAIN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# --- ar ------------------------------------------------------------------------------------


@pytest.mark.parametrize("comp", sorted(DEBS))
def test_ar_round_trip_dpkg_deb(comp: str) -> None:
    data = DEBS[comp].read_bytes()
    members = read_ar(data)
    assert [m.name for m in members] == ["debian-binary", f"control.tar.{comp}", f"data.tar.{comp}"]
    assert members[0].data == b"2.0\n"
    assert make_ar(members) == data


def test_ar_odd_sizes_round_trip() -> None:
    members = [ArMember("a", b"x"), ArMember("bb", b""), ArMember("c", b"xyz", 5, 1, 2, 0o100755)]
    assert read_ar(make_ar(members)) == members


def test_ar_gnu_ar_member_names(tmp_path: Path) -> None:
    ar = shutil.which("ar")
    if ar is None:
        pytest.fail("ar (binutils) is required")
    (tmp_path / "one").write_bytes(b"1")
    (tmp_path / "two").write_bytes(b"22")
    subprocess.run([ar, "rcD", "x.a", "one", "two"], cwd=tmp_path, check=True)
    members = read_ar((tmp_path / "x.a").read_bytes())
    assert [(m.name, m.data) for m in members] == [("one", b"1"), ("two", b"22")]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"PK\3\4", "bad magic"),
        (b"!<arch>\nshort", "bad ar member header at offset 8"),
        (make_ar([ArMember("a", b"hello")])[:-2], "runs past the end"),
    ],
    ids=["magic", "header", "truncated"],
)
def test_ar_rejects(data: bytes, message: str) -> None:
    with pytest.raises(InputFileError, match=message):
        read_ar(data, "x.deb")


# --- .deb ----------------------------------------------------------------------------------


@pytest.mark.parametrize("comp", sorted(DEBS))
def test_read_deb(comp: str) -> None:
    package = read_deb(DEBS[comp])
    assert package.name == f"hello-{comp}"
    assert package.version == VERSION
    assert package.control["Description"].splitlines() == [
        "test package for bootchain's .deb reader",
        "A second line of the description.",
        ".",
        "A third paragraph.",
    ]
    m = package.members
    assert m["usr/bin/hello"].data == b"#!/bin/sh\necho hello\n"
    assert m["usr/bin/hello"].mode == 0o755
    assert m["usr/bin/hi"].kind == "symlink" and m["usr/bin/hi"].target == "hello"
    assert m["usr/lib/hello/hello-hardlink"].data == m["usr/bin/hello"].data
    assert m["usr/share/doc/hello/README"].data == b"odd"
    assert m["usr/share/doc"].kind == "dir"
    assert list(m) == sorted(m)


@pytest.mark.parametrize("comp", sorted(DEBS))
def test_read_deb_agrees_with_dpkg_deb(comp: str) -> None:
    dpkg_deb = shutil.which("dpkg-deb")
    if dpkg_deb is None:
        pytest.fail("dpkg-deb is required")
    listing = subprocess.run(
        [dpkg_deb, "-c", str(DEBS[comp])], capture_output=True, check=True, text=True
    ).stdout
    expected = set()
    for line in listing.splitlines():
        name = line.split(None, 5)[5].split(" -> ")[0].split(" link to ")[0]
        if name.strip("./"):
            expected.add(name.removeprefix("./").rstrip("/"))
    assert set(read_deb(DEBS[comp]).members) == expected
    for field in ("Package", "Version", "Architecture", "Maintainer"):
        value = subprocess.run(
            [dpkg_deb, "-f", str(DEBS[comp]), field], capture_output=True, check=True, text=True
        ).stdout.strip()
        assert read_deb(DEBS[comp]).control[field] == value


def test_read_deb_select() -> None:
    package = read_deb(DEBS["xz"], select=lambda p: p.startswith("usr/bin"))
    assert sorted(package.members) == ["usr/bin", "usr/bin/hello", "usr/bin/hi"]


def test_read_deb_checks_pin() -> None:
    good = PackagePin("hello-xz", VERSION, sha(DEBS["xz"]))
    assert read_deb(DEBS["xz"], good).name == "hello-xz"
    with pytest.raises(PinError, match=r"package is hello-xz=1:1.0-1\+b1, pinned hello-xz=2"):
        read_deb(DEBS["xz"], PackagePin("hello-xz", "2", good.sha256))


def test_read_deb_rejects_non_deb(tmp_path: Path) -> None:
    path = tmp_path / "x.deb"
    path.write_bytes(make_ar([ArMember("debian-binary", b"2.0\n")]))
    with pytest.raises(InputFileError, match=r"control.tar or data.tar member missing"):
        read_deb(path)
    path.write_bytes(
        make_ar([ArMember("debian-binary", b"2.0\n"), ArMember("control.tar.lz", b"")])
    )
    with pytest.raises(InputFileError, match=r"data.tar"):
        read_deb(path)
    members = read_ar(DEBS["xz"].read_bytes())
    broken = [*members[:2], ArMember(members[2].name, members[2].data[:100])]
    path.write_bytes(make_ar(broken))
    with pytest.raises(InputFileError, match=r"cannot read data.tar.xz"):
        read_deb(path)


def test_parse_control_errors() -> None:
    assert parse_control("A: 1\nB: two\n words\n\nC: next paragraph\n") == {
        "A": "1",
        "B": "two\nwords",
    }
    with pytest.raises(InputFileError, match=r"line 1: continuation"):
        parse_control(" x\n")
    with pytest.raises(InputFileError, match=r"line 2: expected"):
        parse_control("A: 1\nnot a field\n")


# --- cache ---------------------------------------------------------------------------------


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("BOOTCHAIN_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == Path.home() / ".cache" / "bootchain"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "bootchain"
    monkeypatch.setenv("BOOTCHAIN_CACHE", str(tmp_path / "explicit"))
    assert cache_dir() == tmp_path / "explicit"


def test_cache_put_get(cache: Path) -> None:
    digest, path = cache_put(DEBS["gz"])
    assert digest == sha(DEBS["gz"])
    assert path == cache / "sha256" / digest
    assert cache_get(digest) == path
    assert cache_get("0" * 64) is None
    assert not list((cache / "sha256").glob(".*"))  # no temp files left


def test_cache_rejects_bad_digest(cache: Path) -> None:
    with pytest.raises(PinError, match=r"not a sha256"):
        cache_path("../../etc/passwd")


def test_fetch_offline_from_cache(cache: Path) -> None:
    _, path = cache_put(DEBS["xz"])
    pin = PackagePin("hello-xz", VERSION, sha(DEBS["xz"]))
    assert fetch_package(pin, offline=True) == path


def test_fetch_offline_corrupted_entry_is_named(cache: Path) -> None:
    digest, path = cache_put(DEBS["xz"])
    path.chmod(0o644)
    path.write_bytes(b"garbage")
    with pytest.raises(VerificationError, match=f"corrupted cache entry {path}"):
        fetch_package(PackagePin("hello-xz", VERSION, digest), offline=True)


def test_fetch_offline_not_cached(cache: Path) -> None:
    with pytest.raises(PinError, match=r"hello-xz=1:1.0-1\+b1 .* not in the cache .* --offline"):
        fetch_package(PackagePin("hello-xz", VERSION, "ab" * 32), offline=True)


# --- lock ----------------------------------------------------------------------------------


def test_lock_json_is_stable_and_round_trips(cache: Path, tmp_path: Path) -> None:
    pins = {
        role: PackagePin(f"hello-{c}", VERSION, cache_put(DEBS[c])[0])
        for role, c in (("busybox", "zst"), ("kernel", "xz"))
    }
    local = tmp_path / "motd"
    local.write_bytes(b"hi\n")
    lock = make_lock(pins, {"files/motd": local}, offline=True)
    text = lock.to_json()
    assert (
        text
        == make_lock(dict(reversed(pins.items())), {"files/motd": local}, offline=True).to_json()
    )
    obj = json.loads(text)
    assert obj["schema"] == "bootchain.lock/v1"
    assert list(obj["packages"]) == ["busybox", "kernel"]
    assert obj["packages"]["kernel"]["source"] == "debian:hello-xz=1:1.0-1+b1"
    assert obj["packages"]["kernel"]["size"] == DEBS["xz"].stat().st_size
    assert obj["files"] == {"files/motd": {"sha256": hashlib.sha256(b"hi\n").hexdigest()}}
    assert Lock.from_json(text) == lock
    assert Lock.from_json(text).pins() == pins
    check_lock(lock, pins, {"files/motd": local})
    local.write_bytes(b"changed\n")
    with pytest.raises(PinError, match=r"files/motd changed"):
        check_lock(lock, pins, {"files/motd": local})
    with pytest.raises(PinError, match=r"package pins"):
        check_lock(lock, {"kernel": pins["kernel"]}, {"files/motd": local})


def test_lock_rejects_foreign_json() -> None:
    with pytest.raises(InputFileError, match=r"schema"):
        Lock.from_json(b'{"schema": "other"}')
    with pytest.raises(InputFileError, match=r"not a bootchain lock"):
        Lock.from_json(b"[]")


def test_lock_path() -> None:
    assert lock_path(Path("recipes/demo.yaml")) == Path("recipes/demo.lock.json")
    assert lock_path(Path("r/x.yaml.j2")) == Path("r/x.lock.json")


def test_lock_missing_local_file(cache: Path, tmp_path: Path) -> None:
    with pytest.raises(InputFileError, match=r"local input init.sh not found"):
        make_lock({}, {"init.sh": tmp_path / "nope"}, offline=True)


def test_lock_dataclasses_equal() -> None:
    a = Lock(
        (LockedPackage("k", "n", "v", "0" * 64, 1, "debian:n=v", ""),), (LockedFile("f", "1" * 64),)
    )
    assert Lock.from_json(a.to_json()) == a


# --- rewriting pins ------------------------------------------------------------------------

OLD = PackagePin("systemd-boot-efi", "252.38-1~deb12u1", "1" * 64)
NEW = PackagePin("systemd-boot-efi", "252.39-1~deb12u2", "2" * 64)
K_OLD = PackagePin("linux-image-6.1.0-55-amd64", "6.1.192-1", "3" * 64)
K_NEW = PackagePin("linux-image-6.1.0-56-amd64", "6.1.192-2", "4" * 64)

BLOCK = f"""# comment stays
packages:
  kernel:
    name: {K_OLD.name}   # the ABI is in the name
    version: {K_OLD.version}
    sha256: {K_OLD.sha256}
  systemd-boot:
    name: {OLD.name}
    version: "{OLD.version}"
    sha256: '{OLD.sha256}'
other: {OLD.version}
"""


def test_rewrite_block_style_keeps_everything_else() -> None:
    text, found = rewrite_pin_text(BLOCK, "systemd-boot", OLD, NEW)
    assert found == {"version", "sha256"}
    assert text == BLOCK.replace(f'"{OLD.version}"', f'"{NEW.version}"').replace(
        OLD.sha256, NEW.sha256
    )
    assert f"other: {OLD.version}" in text


def test_rewrite_kernel_name() -> None:
    text, found = rewrite_pin_text(BLOCK, "kernel", K_OLD, K_NEW)
    assert found == {"name", "version", "sha256"}
    assert f"name: {K_NEW.name}   # the ABI is in the name" in text
    assert f"version: {K_NEW.version}\n" in text


def test_rewrite_flow_style() -> None:
    src = (
        f"packages:\n  systemd-boot: {{name: {OLD.name}, version: {OLD.version}, "
        f'sha256: "{OLD.sha256}"}}\n'
    )
    text, _ = rewrite_pin_text(src, "systemd-boot", OLD, NEW)
    assert text == src.replace(OLD.version, NEW.version).replace(OLD.sha256, NEW.sha256)


def test_rewrite_quotes_a_plain_value_that_needs_it() -> None:
    src = "packages:\n  ovmf: {name: ovmf, version: 1.0-1, sha256: " + "1" * 64 + "}\n"
    old = PackagePin("ovmf", "1.0-1", "1" * 64)
    text, _ = rewrite_pin_text(src, "ovmf", old, PackagePin("ovmf", "2.0", "2" * 64))
    assert 'version: "2.0"' in text  # plain 2.0 would load as a float


def test_rewrite_jinja_fallback() -> None:
    src = (
        "{% set abi = 55 %}\npackages:\n  systemd-boot:\n"
        f"    name: {OLD.name}\n    version: {OLD.version}\n    sha256: {OLD.sha256}\n"
        f"note: {{{{ '{OLD.version}' }}}}\n\n\n\nfar: {OLD.version}\n"
    )
    text, found = rewrite_pin_text(src, "systemd-boot", OLD, NEW)
    assert found == {"version", "sha256"}
    assert f"    version: {NEW.version}\n    sha256: {NEW.sha256}\n" in text
    assert f"far: {OLD.version}" in text  # not beside the digest: untouched


def test_rewrite_pin_in_base_and_child(tmp_path: Path) -> None:
    base = tmp_path / "base.yaml"
    child = tmp_path / "child.yaml"
    base.write_text(BLOCK)
    child.write_text(
        f"extends: base.yaml\npackages:\n  systemd-boot:\n    version: {OLD.version}\n"
    )
    written = rewrite_pin([child, base], "systemd-boot", OLD, NEW)
    assert written == (child, base)
    assert NEW.version in child.read_text() and NEW.sha256 in base.read_text()


def test_rewrite_pin_templated_value_is_an_error(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    src = BLOCK.replace(f'version: "{OLD.version}"', 'version: "{{ sdboot_version }}"')
    recipe.write_text(src)
    with pytest.raises(
        RecipeError, match=r"packages.systemd-boot.version .* not written literally"
    ):
        rewrite_pin([recipe], "systemd-boot", OLD, NEW)
    assert recipe.read_text() == src  # nothing written


def test_pin_change_line() -> None:
    assert str(PinChange("systemd-boot", OLD, NEW, ())) == (
        "systemd-boot: systemd-boot-efi 252.38-1~deb12u1 (111111111111) -> "
        "252.39-1~deb12u2 (222222222222)"
    )
    assert str(PinChange("kernel", K_OLD, K_NEW, ())) == (
        "kernel: linux-image-6.1.0-55-amd64 6.1.192-1 (333333333333) -> "
        "linux-image-6.1.0-56-amd64 6.1.192-2 (444444444444)"
    )


def test_offline_lock_keeps_uris_of_unchanged_pins(cache: Path) -> None:
    pin = PackagePin("hello-gz", VERSION, cache_put(DEBS["gz"])[0])
    other = PackagePin("hello-xz", VERSION, cache_put(DEBS["xz"])[0])
    size = DEBS["gz"].stat().st_size
    previous = Lock(
        (LockedPackage("busybox", pin.name, VERSION, pin.sha256, size, "debian:x", "http://m/x"),),
        (),
    )
    kept = make_lock({"busybox": pin}, {}, offline=True, previous=previous)
    assert kept.packages[0].uri == "http://m/x"
    moved = make_lock({"busybox": other}, {}, offline=True, previous=previous)
    assert moved.packages[0].uri == ""


def test_read_deb_select_hard_link_needs_its_target() -> None:
    with pytest.raises(InputFileError, match=r"hard link usr/lib/hello/hello-hardlink points to"):
        read_deb(DEBS["gz"], select=lambda p: p.startswith("usr/lib"))
    both = read_deb(DEBS["gz"], select=lambda p: p.startswith(("usr/lib", "usr/bin/hello")))
    assert both.members["usr/lib/hello/hello-hardlink"].data == b"#!/bin/sh\necho hello\n"
