"""Small fake build folders (build.json + measurements.json + artifact bytes) for store tests.

Only the build.json contract the publisher reads is honoured; the bytes are not real images.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from builder.dsse import ReleaseKey, Trust, load_release_key, load_trust, make_trust_file
from builder.manifest import generate_release_key

PLATFORM = "ovmf-2022.11-q35-secboot"


def _bytes(seed: str, size: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}/{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


def make_outdir(
    root: Path,
    version: str = "1.0.0",
    *,
    name: str = "debian-minimal",
    example_keys: bool = False,
    salt: str = "",
    big: int = 0,
    measurements: dict[str, Any] | None = None,
    authenticode: dict[str, str] | None = None,
) -> Path:
    """Write out/<name>/<version>/ with fake artifacts; ``big`` sets disk.img's size.

    ``measurements`` replaces the fake measurements.json; ``authenticode`` the Authenticode
    digests of BOOTX64.EFI and the UKI (keys "BOOTX64.EFI" and "uki").
    """
    out = root / name / version
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "BOOTX64.EFI": _bytes(f"sdboot{salt}", 3000),
        f"{name}-{version}.efi": _bytes(f"uki{version}{salt}", 5000),
        "ovmf-vars.fd": _bytes(f"vars{salt}", 2048),
    }
    auth = {
        "BOOTX64.EFI": hashlib.sha256(b"auth-sdboot" + salt.encode()).hexdigest(),
        f"{name}-{version}.efi": hashlib.sha256(f"auth-uki{version}{salt}".encode()).hexdigest(),
    }
    if authenticode:
        auth = {
            "BOOTX64.EFI": authenticode["BOOTX64.EFI"],
            f"{name}-{version}.efi": authenticode["uki"],
        }
    given = measurements
    fake = {
        "schema": "bootchain.measurements/v1",
        "platform": {"name": PLATFORM, "digest": "00" * 32},
        "chain": "systemd252-linux61-secureboot",
        "banks": ["sha256"],
        "pcrs": {"sha256": {"4": hashlib.sha256(version.encode()).hexdigest()}},
        "events": [
            {
                "recnum": 0,
                "pcr": 4,
                "digests": [{"hashAlg": "sha256", "digest": auth["BOOTX64.EFI"]}],
                "content_type": "pcclient_std",
                "content": {"event_type": "EV_EFI_BOOT_SERVICES_APPLICATION", "event_data": ""},
            }
        ],
        "artifacts": {k: {"authenticode_sha256": v} for k, v in auth.items()},
    }
    files["measurements.json"] = json.dumps(given or fake, indent=2).encode()
    for fname, data in files.items():
        (out / fname).write_bytes(data)
    disk = out / "disk.img"
    with disk.open("wb") as f:
        chunk = _bytes(f"disk{version}{salt}", 1 << 20)
        left = big or 4096
        while left > 0:
            f.write(chunk[: min(left, len(chunk))])
            left -= min(left, len(chunk))
    artifacts = []
    for fname in sorted([*files, "disk.img"]):
        path = out / fname
        entry = {
            "name": fname,
            "path": fname,
            "size": path.stat().st_size,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        }
        if fname in auth:
            entry["authenticode_sha256"] = auth[fname]
        artifacts.append(entry)
    build = {
        "schema": "bootchain.build/v1",
        "name": name,
        "version": version,
        "recipe": {"digest": "ab" * 32, "lock": {"packages": [{"name": "linux", "v": "6.1"}]}},
        "source_date_epoch": 1700000000,
        "inputs": [
            {"role": "kernel", "name": "linux-image", "version": "6.1", "sha256": "cd" * 32}
        ],
        "tools": {"sbsign": "sbsign 0.9.4"},
        "signer": {
            "certificate_sha256": "ef" * 32,
            "subject": "CN=test db",
            "example_keys": example_keys,
            "keyset": {"PK": "01" * 32, "KEK": "02" * 32, "db": "03" * 32},
        },
        "platform": PLATFORM,
        "artifacts": artifacts,
    }
    (out / "build.json").write_text(json.dumps(build, indent=2))
    return out


def make_release_key(directory: Path, algorithm: str = "ed25519") -> tuple[ReleaseKey, Path]:
    """A fresh release key in ``directory`` and a trust file accepting it."""
    from builder.dsse import generate_release_key as generate

    if algorithm == "ed25519":
        generate_release_key(directory)
    else:
        generate(directory, algorithm)
    key = load_release_key(directory / "release.key")
    trust_path = directory / "trust.json"
    trust_path.write_bytes(make_trust_file([(key.public_key, directory.name)]))
    return key, trust_path


def trust_of(path: Path) -> Trust:
    return load_trust(path)
