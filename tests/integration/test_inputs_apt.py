"""builder.inputs against the real apt sources and the real Debian packages.

Uses the real cache (``cache_dir()``), so the ~70 MB kernel .deb is downloaded once and shared
with builds and later runs. Oracles: kmod's ``modinfo``, GNU cpio, busybox's own applet list.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from builder.errors import PinError
from builder.initrd import APPLETS, make_initrd, module_closure, read_cpio, read_modinfo
from builder.inputs import (
    DebPackage,
    PackagePin,
    cache_get,
    fetch_package,
    read_deb,
    update_pins,
)

pytestmark = pytest.mark.network

KERNEL = PackagePin(
    "linux-image-6.1.0-56-amd64",
    "6.1.192-2",
    "a86e2049672f52354c4536a089203b6c82639420424d31c91cf31a181fd4d8f1",
)
KERNEL_RELEASE = "6.1.0-56-amd64"
BUSYBOX = PackagePin(
    "busybox-static",
    "1:1.35.0-4+deb12u1+b1",
    "3d3fdbe91d4660c873e14b092c213fe81c1da6362daa236eb25d0171eb108744",
)
SDBOOT = PackagePin(
    "systemd-boot-efi",
    "252.39-1~deb12u2",
    "8f2b81bdcfafc466882a0cae460272dbf10d8d97c6a3c1c6ea33038c155a2f5e",
)
# an older build still on the security mirror: what --update moves away from
SDBOOT_OLD = PackagePin(
    "systemd-boot-efi",
    "252.38-1~deb12u1",
    "099343ccb3ad569ee1f0c838423f83267f65b8555fbcc8114167621a3350f245",
)


def need(tool: str) -> str:
    found = shutil.which(tool)
    if found is None:
        pytest.fail(f"{tool} is required for this test (install it)")
    return found


@pytest.fixture(scope="module")
def kernel() -> DebPackage:
    path = fetch_package(KERNEL)
    return read_deb(path, KERNEL, select=lambda p: p.startswith("lib/modules/"))


@pytest.fixture(scope="module")
def busybox() -> DebPackage:
    return read_deb(fetch_package(BUSYBOX), BUSYBOX)


@pytest.mark.parametrize("name", ["virtio_blk", "efivarfs", "virtio_pci"])
def test_modinfo_of_real_modules_agrees_with_kmod(
    kernel: DebPackage, name: str, tmp_path: Path
) -> None:
    modinfo = need("modinfo")
    path = next(p for p in kernel.members if p.endswith(f"/{name}.ko") and "/kernel/" in p)
    ko = tmp_path / f"{name}.ko"
    ko.write_bytes(kernel.members[path].data)
    expected = subprocess.run(
        [modinfo, "-F", "depends", str(ko)], capture_output=True, check=True, text=True
    ).stdout.strip()
    assert ",".join(read_modinfo(ko.read_bytes())["depends"]) == expected
    vermagic = subprocess.run(
        [modinfo, "-F", "vermagic", str(ko)], capture_output=True, check=True, text=True
    ).stdout.strip()
    assert [v.strip() for v in read_modinfo(ko.read_bytes())["vermagic"]] == [vermagic]


def test_module_closure_real_kernel(kernel: DebPackage) -> None:
    root = f"lib/modules/{KERNEL_RELEASE}/kernel/"
    got = module_closure(kernel.members, KERNEL_RELEASE, ["virtio_blk", "efivarfs", "tpm_tis"])
    assert got == [
        root + "drivers/virtio/virtio_ring.ko",
        root + "drivers/virtio/virtio.ko",
        root + "drivers/block/virtio_blk.ko",
        root + "fs/efivarfs/efivarfs.ko",
    ]  # tpm_tis is built in (modules.builtin)


def test_busybox_has_every_applet_we_link(busybox: DebPackage, tmp_path: Path) -> None:
    binary = tmp_path / "busybox"
    binary.write_bytes(busybox.members["bin/busybox"].data)
    binary.chmod(0o755)
    listed = subprocess.run(
        [str(binary), "--list"], capture_output=True, check=True, text=True
    ).stdout.split()
    assert set(APPLETS) <= set(listed), set(APPLETS) - set(listed)


def test_real_initrd_unpacks_with_gnu_cpio(
    kernel: DebPackage, busybox: DebPackage, tmp_path: Path
) -> None:
    cpio, zstd = need("cpio"), need("zstd")
    args = (
        busybox.members,
        kernel.members,
        KERNEL_RELEASE,
        ["virtio_blk", "efivarfs"],
        b"#!/bin/sh\nexec poweroff -f\n",
        [],
        "zstd",
        1735689600,
    )
    image = make_initrd(*args)  # type: ignore[arg-type]
    assert make_initrd(*args) == image  # type: ignore[arg-type]
    raw = subprocess.run([zstd, "-dc"], input=image, capture_output=True, check=True).stdout
    subprocess.run([cpio, "-id"], input=raw, cwd=tmp_path, check=True, capture_output=True)
    order = (tmp_path / "etc/bootchain/modules").read_text().splitlines()
    assert order[-1] == f"lib/modules/{KERNEL_RELEASE}/kernel/fs/efivarfs/efivarfs.ko"
    for line in order:
        assert (tmp_path / line).read_bytes()[:4] == b"\x7fELF"
    assert {e.path for e in read_cpio(raw)} >= {"init", "bin/busybox", "dev/console"}


def test_sha256_mismatch_names_package_expected_and_actual() -> None:
    wrong = PackagePin(BUSYBOX.name, BUSYBOX.version, "0" * 64)
    with pytest.raises(PinError) as info:
        fetch_package(wrong)
    message = str(info.value)
    assert BUSYBOX.name in message and "0" * 64 in message and BUSYBOX.sha256 in message


def test_version_gone_from_the_mirror() -> None:
    gone = PackagePin(BUSYBOX.name, "1:1.30.1-6", "0" * 64)
    with pytest.raises(
        PinError,
        match=r"busybox-static version 1:1\.30\.1-6 is no longer on the mirror "
        r"\(it has 1:1\.35\.0-4\+deb12u1\+b1\)",
    ) as info:
        fetch_package(gone)
    assert info.value.hint is not None and "bootchain lock" in info.value.hint
    assert "--update" in info.value.hint


def test_unknown_package() -> None:
    with pytest.raises(PinError, match="package no-such-package-bootchain is not in apt's sources"):
        fetch_package(PackagePin("no-such-package-bootchain", "1.0", "0" * 64))


def test_corrupted_cache_entry_is_fetched_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BOOTCHAIN_CACHE", str(tmp_path / "cache"))
    path = fetch_package(SDBOOT)
    assert cache_get(SDBOOT.sha256) == path
    path.chmod(0o644)
    path.write_bytes(b"bit rot")
    assert fetch_package(SDBOOT) == path
    assert cache_get(SDBOOT.sha256) == path


def test_update_pins_rewrites_recipe(tmp_path: Path) -> None:
    kernel_old = PackagePin("linux-image-6.1.0-55-amd64", "6.1.192-1", "5" * 64)
    recipe = tmp_path / "r.yaml"
    text = (
        "name: r\n"
        "packages:\n"
        "  kernel:\n"
        f"    name: {kernel_old.name}\n"
        f"    version: {kernel_old.version}\n"
        f"    sha256: {kernel_old.sha256}\n"
        f"  systemd-boot: {{name: {SDBOOT_OLD.name}, version: {SDBOOT_OLD.version},\n"
        f"                 sha256: {SDBOOT_OLD.sha256}}}\n"
        f'  busybox:\n    name: {BUSYBOX.name}\n    version: "{BUSYBOX.version}"\n'
        f"    sha256: {BUSYBOX.sha256}\n"
    )
    recipe.write_text(text)
    fetch_package(KERNEL)  # --update finds the new kernel in the cache by apt's digest
    pins = {"kernel": kernel_old, "systemd-boot": SDBOOT_OLD, "busybox": BUSYBOX}
    changes = update_pins([recipe], pins)
    assert [(c.role, c.new) for c in changes] == [("kernel", KERNEL), ("systemd-boot", SDBOOT)]
    assert str(changes[1]) == (
        "systemd-boot: systemd-boot-efi 252.38-1~deb12u1 (099343ccb3ad) -> "
        "252.39-1~deb12u2 (8f2b81bdcfaf)"
    )
    expected = (
        text.replace(kernel_old.name, KERNEL.name)
        .replace(kernel_old.version, KERNEL.version)
        .replace(kernel_old.sha256, KERNEL.sha256)
        .replace(SDBOOT_OLD.version, SDBOOT.version)
        .replace(SDBOOT_OLD.sha256, SDBOOT.sha256)
    )
    assert recipe.read_text() == expected
    assert update_pins([recipe], {"kernel": KERNEL, "systemd-boot": SDBOOT}) == []


def test_lock_cli_update_then_offline(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    recipes = tmp_path / "recipes"
    shutil.copytree(root / "recipes", recipes)
    recipe = recipes / "debian-minimal.yaml"
    text = recipe.read_text()
    assert SDBOOT.sha256 in text, "the default recipe moved on: update this test's pins"
    recipe.write_text(
        text.replace(SDBOOT.version, SDBOOT_OLD.version).replace(SDBOOT.sha256, SDBOOT_OLD.sha256)
    )

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "builder.cli", "lock", *args, str(recipe)],
            cwd=root,
            capture_output=True,
            text=True,
            check=False,
            timeout=900,
        )

    proc = cli("--update")
    assert proc.returncode == 0, proc.stderr
    assert (
        "systemd-boot: systemd-boot-efi 252.38-1~deb12u1 (099343ccb3ad) -> "
        "252.39-1~deb12u2 (8f2b81bdcfaf)"
    ) in proc.stdout
    assert recipe.read_text() == text
    lock = recipes / "debian-minimal.lock.json"
    first = lock.read_bytes()
    obj = json.loads(first)
    assert obj["packages"]["systemd-boot"]["sha256"] == SDBOOT.sha256
    assert obj["packages"]["systemd-boot"]["uri"].endswith(".deb")
    assert "debian-minimal.yaml" in obj["files"]
    assert first == (json.dumps(obj, sort_keys=True, indent=2) + "\n").encode()
    proc = cli("--offline")
    assert proc.returncode == 0, proc.stderr
    assert lock.read_bytes() == first
