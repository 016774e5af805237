"""The disk image checked by independent tools: sfdisk, fsck.fat, mtools."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from builder import disk

SDE = 1700000000
FILES = {
    "EFI/BOOT/BOOTX64.EFI": b"MZ" + bytes(range(256)) * 400,
    "EFI/Linux/debian-minimal-1.0.0.efi": b"MZ" + bytes(reversed(range(256))) * 12000,
    "loader/loader.conf": b"timeout 0\ndefault debian-minimal-1.0.0.efi\n",
    "loader/entries/an-entry-with-a-long-name.conf": b"title x\n",
    "empty": b"",
}
EXTRA = disk.Partition("data", disk.LINUX_DATA_TYPE, 4, content=b"DATA")
LAYOUT = disk.DiskLayout(size_mib=110, esp_size_mib=100, partitions=(EXTRA,))


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:  # a missing tool fails, never skips
        pytest.fail(f"{name} not installed")
    return path


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    img = tmp_path_factory.mktemp("disk") / "disk.img"
    disk.make_disk(img, LAYOUT, FILES, seed=b"recipe-digest", source_date_epoch=SDE)
    return img


def test_sfdisk_agrees(image: Path) -> None:
    out = subprocess.run(
        [_tool("sfdisk"), "--json", str(image)], check=True, capture_output=True, text=True
    ).stdout
    table = json.loads(out)["partitiontable"]
    assert table["label"] == "gpt"
    assert table["id"] == str(disk.derive_guid(b"recipe-digest", "disk")).upper()
    esp, data = table["partitions"]
    assert (esp["start"], esp["size"], esp["type"]) == (
        2048,
        100 * 2048,
        str(disk.ESP_TYPE).upper(),
    )
    assert esp["name"] == "EFI System Partition"
    assert (data["start"], data["size"], data["name"]) == (2048 + 100 * 2048, 4 * 2048, "data")
    assert data["uuid"] == str(disk.derive_guid(b"recipe-digest", "partition:data")).upper()
    # sfdisk --verify checks both GPT copies and their CRCs.
    verify = subprocess.run(
        [_tool("sfdisk"), "--verify", str(image)], capture_output=True, text=True, check=False
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "No errors detected" in verify.stdout


def test_fsck_fat_clean(image: Path, tmp_path: Path) -> None:
    esp = tmp_path / "esp.img"
    with image.open("rb") as src, esp.open("wb") as dst:
        src.seek(1 << 20)
        dst.write(src.read(100 << 20))
    proc = subprocess.run(
        [_tool("fsck.fat"), "-n", "-v", "-V", str(esp)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "32 bit entries" in proc.stdout
    assert "5 files" in proc.stdout or "files," in proc.stdout
    for bad in ("differ", "Free cluster summary wrong", "Dirty", "Orphan", "should be"):
        assert bad not in proc.stdout


def test_mtools_reads_files_back(image: Path) -> None:
    target = f"{image}@@1M"
    listing = subprocess.run(
        [_tool("mdir"), "-/", "-i", target, "::"], capture_output=True, text=True, check=True
    ).stdout
    assert "debian-minimal-1.0.0.efi" in listing
    assert "Volume in drive : is ESP" in listing
    for path, data in FILES.items():
        got = subprocess.run(
            [_tool("mtype"), "-i", target, f"::{path}"], capture_output=True, check=True
        ).stdout
        assert got == data, path
    info = subprocess.run(
        [_tool("minfo"), "-i", target, "::"], capture_output=True, text=True, check=True
    ).stdout
    assert 'disk type="FAT32   "' in info
    assert "hidden sectors: 2048" in info


def test_mtools_timestamps_from_sde(image: Path) -> None:
    listing = subprocess.run(
        [_tool("mdir"), "-i", f"{image}@@1M", "::EFI/BOOT"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "2023-11-14  22:13" in listing


def test_directories_spanning_clusters(tmp_path: Path) -> None:
    """120 long names in one folder need many 512-byte directory clusters."""
    files = {
        f"EFI/Linux/a-long-file-name-number-{i:03d}.efi": bytes([i]) * (i * 37) for i in range(120)
    }
    files.update({f"d{i}/F{i}.TXT": b"x" * 512 for i in range(30)})
    img = tmp_path / "many.img"
    disk.make_disk(img, disk.DiskLayout(40, 36), files, seed=b"m", source_date_epoch=SDE)
    esp = tmp_path / "esp.img"
    with img.open("rb") as src, esp.open("wb") as dst:
        src.seek(1 << 20)
        dst.write(src.read(36 << 20))
    proc = subprocess.run(
        [_tool("fsck.fat"), "-n", "-V", str(esp)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0 and "183 files" in proc.stdout, proc.stdout
    listing = subprocess.run(
        [_tool("mdir"), "-b", "-/", "-i", f"{img}@@1M", "::"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in files:
        assert f"::/{name}" in listing, name
    for name in ("EFI/Linux/a-long-file-name-number-119.efi", "d29/F29.TXT"):
        got = subprocess.run(
            [_tool("mtype"), "-i", f"{img}@@1M", f"::{name}"], capture_output=True, check=True
        ).stdout
        assert got == files[name]
