"""A quick hand-made boot image for developing the harness (Secure Boot OFF, unsigned).

systemd-boot + a UKI (objcopy onto systemd-stub) with a tiny busybox initramfs whose /init
behaves like the recipe's (mount, insmod, BOOTCHAIN-INIT-REACHED, probe, poweroff), written
with builder.disk. Inputs come from unpacked Debian packages in ``root`` (linux-image,
systemd-boot-efi) plus the host's busybox-static. Not reproducible (objcopy stamps time);
this is a development aid, not a build.

    python tests/boot/devimage.py ROOT OUTDIR
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from builder import disk

REPO = Path(__file__).resolve().parents[2]
PROBE = REPO / "qemu" / "probe" / "probe.sh"
CMDLINE = "console=ttyS0,115200 loglevel=6 panic=-1"

INIT = """#!/bin/sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /usr/bin /usr/sbin /sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /etc/bootchain/modules); do insmod "/lib/modules/$m"; done
echo BOOTCHAIN-INIT-REACHED
[ -x /bootchain/probe.sh ] && /bootchain/probe.sh
poweroff -f
"""


def _cpio(entries: list[tuple[str, int, bytes]]) -> bytes:
    """newc cpio: (path, mode, data); directories have mode 0o40755 and no data."""
    out = io.BytesIO()
    ino = 1
    for name, mode, data in [*entries, ("TRAILER!!!", 0, b"")]:
        raw = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(raw), 0]
        out.write(b"070701" + b"".join(b"%08X" % f for f in fields) + raw)
        out.write(b"\0" * (-(110 + len(raw)) % 4))
        out.write(data)
        out.write(b"\0" * (-len(data) % 4))
        ino += 1
    return out.getvalue()


def make_initrd(root: Path, *, probe: bool = True) -> bytes:
    kver = next((root / "lib" / "modules").iterdir()).name
    mods = ["kernel/fs/efivarfs/efivarfs.ko"]
    entries: list[tuple[str, int, bytes]] = [
        ("bin", 0o40755, b""),
        ("etc", 0o40755, b""),
        ("etc/bootchain", 0o40755, b""),
        ("lib", 0o40755, b""),
        ("lib/modules", 0o40755, b""),
        ("bin/busybox", 0o100755, Path("/usr/bin/busybox").read_bytes()),
        ("bin/sh", 0o120777, b"busybox"),
        ("init", 0o100755, INIT.encode()),
        ("etc/bootchain/modules", 0o100644, "".join(f"{m}\n" for m in mods).encode()),
    ]
    dirs = set()
    for m in mods:
        parts = m.split("/")
        for i in range(1, len(parts)):
            dirs.add("lib/modules/" + "/".join(parts[:i]))
    entries += [(d, 0o40755, b"") for d in sorted(dirs)]
    for m in mods:
        entries.append(
            (f"lib/modules/{m}", 0o100644, (root / "lib/modules" / kver / m).read_bytes())
        )
    if probe:
        entries.append(("bootchain", 0o40755, b""))
        entries.append(("bootchain/probe.sh", 0o100755, PROBE.read_bytes()))
    return _cpio(entries)


def make_uki(root: Path, initrd: bytes, out: Path, cmdline: str = CMDLINE) -> None:
    stub = root / "usr/lib/systemd/boot/efi/linuxx64.efi.stub"
    kernel = next((root / "boot").glob("vmlinuz-*"))
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "osrel").write_text('ID=debian\nVERSION_ID="12"\nPRETTY_NAME="bootchain dev"\n')
        (t / "cmdline").write_text(cmdline)
        (t / "initrd").write_bytes(initrd)
        subprocess.run(
            [
                "objcopy",
                "--add-section", f".osrel={t / 'osrel'}", "--change-section-vma", ".osrel=0x20000",
                "--add-section", f".cmdline={t / 'cmdline'}",
                "--change-section-vma", ".cmdline=0x30000",
                "--add-section", f".linux={kernel}", "--change-section-vma", ".linux=0x2000000",
                "--add-section", f".initrd={t / 'initrd'}",
                "--change-section-vma", ".initrd=0x3000000",
                str(stub), str(out),
            ],
            check=True,
        )  # fmt: skip


def make_dev_image(root: Path, outdir: Path, *, probe: bool = True) -> Path:
    """Write OUTDIR/disk.img, OUTDIR/ovmf-vars.fd (empty, SB off); return the disk path."""
    outdir.mkdir(parents=True, exist_ok=True)
    uki = outdir / "dev.efi"
    make_uki(root, make_initrd(root, probe=probe), uki)
    sdboot = root / "usr/lib/systemd/boot/efi/systemd-bootx64.efi"
    files = {
        "EFI/BOOT/BOOTX64.EFI": sdboot.read_bytes(),
        "EFI/Linux/dev.efi": uki.read_bytes(),
        "loader/loader.conf": b"timeout 0\n",
    }
    img = outdir / "disk.img"
    disk.make_disk(
        img,
        disk.DiskLayout(size_mib=128, esp_size_mib=120),
        files,
        seed=b"bootchain-dev",
        source_date_epoch=1700000000,
    )
    shutil.copyfile("/usr/share/OVMF/OVMF_VARS_4M.fd", outdir / "ovmf-vars.fd")
    os.chmod(outdir / "ovmf-vars.fd", 0o644)
    return img


if __name__ == "__main__":
    print(make_dev_image(Path(sys.argv[1]), Path(sys.argv[2])))
