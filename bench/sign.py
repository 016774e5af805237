"""Signing benchmark: our Authenticode signer against sbsign on the same ~60 MB UKI.

    .venv/bin/python bench/sign.py [--size-mib 60] [--runs 5] [--stub PATH]

Builds a UKI from the systemd-boot-efi 252 stub (downloaded with apt-get unless --stub is
given) with a seeded random .initrd, makes a throwaway RSA-2048 key, then times whole
processes: the real CLI, `bootchain sign --key --cert IN OUT` (start-up, imports, key, read,
sign, atomic write with fsync), `sbsign --key --cert --output`, and sbsign followed by
`sync OUT` (the same durability as our atomic write). Prints the median of each and the
ratios; the signed outputs are checked with sbverify.
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def fetch_stub(folder: Path) -> Path:
    subprocess.run(
        ["apt-get", "download", "systemd-boot-efi"], cwd=folder, check=True, capture_output=True
    )
    (deb,) = folder.glob("systemd-boot-efi_*.deb")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(folder / "root")], check=True)
    return folder / "root/usr/lib/systemd/boot/efi/linuxx64.efi.stub"


def make_keys(folder: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bootchain bench db")])
    start = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=3650))
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = folder / "db.key", folder / "db.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def make_uki_file(stub: Path, size_mib: int, dst: Path) -> None:
    from builder.uki import UKISection, make_uki

    rng = random.Random(60)
    sections = [
        UKISection(".osrel", b"ID=debian\nVERSION_ID=12\n", True),
        UKISection(".cmdline", b"console=ttyS0 quiet", True),
        UKISection(".initrd", rng.randbytes(size_mib << 20), True),
        UKISection(".linux", stub.read_bytes(), True),  # any PE; the size is in .initrd
    ]
    dst.write_bytes(make_uki(stub.read_bytes(), sections, 1_700_000_000))


# The warm-up run must be able to leave .pyc files, as any installed Python would; with
# PYTHONDONTWRITEBYTECODE inherited, every run would compile the edited modules again.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def timed(*argvs: list[str]) -> tuple[float, float]:
    """(wall, CPU user+sys) seconds of running ``argvs`` one after the other."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    for argv in argvs:
        subprocess.run(argv, check=True, capture_output=True, cwd=ROOT, env=ENV)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=60)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--stub", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bootchain-bench-sign-") as tmp:
        folder = Path(tmp)
        stub = args.stub or fetch_stub(folder)
        key, cert = make_keys(folder)
        uki = folder / "uki.efi"
        make_uki_file(stub, args.size_mib, uki)
        ours_out, sbsign_out = folder / "ours.efi", folder / "sbsign.efi"
        script = Path(sys.executable).with_name("bootchain")  # the installed entry point
        bootchain = [str(script)] if script.exists() else [sys.executable, "-m", "builder.cli"]
        ours = [*bootchain, "sign", "--key", str(key), "--cert", str(cert), str(uki)]
        ours.append(str(ours_out))
        sbsign = ["sbsign", "--key", str(key), "--cert", str(cert)]
        sbsign += ["--output", str(sbsign_out), str(uki)]
        commands = {
            "ours": [ours],
            "sbsign": [sbsign],
            "sbsign+sync": [sbsign, ["sync", str(sbsign_out)]],
        }
        for argvs in commands.values():  # warm the page cache and .pyc files
            timed(*argvs)
        times: dict[str, list[float]] = {name: [] for name in commands}
        cpu: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.runs):  # interleaved, so load from others hits all alike
            for name, argvs in commands.items():
                wall, used = timed(*argvs)
                times[name].append(wall)
                cpu[name].append(used)
        for out in (ours_out, sbsign_out):
            subprocess.run(["sbverify", "--cert", str(cert), str(out)], check=True)
        median = {name: statistics.median(values) for name, values in times.items()}
        median_cpu = {name: statistics.median(values) for name, values in cpu.items()}
        print(f"UKI: {uki.stat().st_size / 2**20:.1f} MiB, {args.runs} runs each, median wall")
        labels = {
            "ours": "ours: bootchain sign (atomic write + fsync)",
            "sbsign": "sbsign",
            "sbsign+sync": "sbsign + sync OUT",
        }
        for name, label in labels.items():
            print(f"{label:43}: {median[name]:.3f} s  (CPU {median_cpu[name]:.3f} s)")
        print(f"ratio ours/sbsign       : {median['ours'] / median['sbsign']:.2f}x")
        print(f"ratio ours/(sbsign+sync): {median['ours'] / median['sbsign+sync']:.2f}x")


if __name__ == "__main__":
    main()
