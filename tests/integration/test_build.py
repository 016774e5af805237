"""The build pipeline on the real default recipe: what build.json records, independent oracles
on the shipped bytes (sbverify, systemd-measure, objcopy), reproducibility, and which PCRs a
change moves."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from builder.fsutil import sha256_file
from builder.repro import VARIANTS, build_variant, compare_outdirs
from tests.conftest import EXAMPLE_KEYS, RECIPES, ROOT

SYSTEMD_MEASURE = "/usr/lib/systemd/systemd-measure"
UKI = "debian-minimal-1.0.0.efi"


def test_build_json_records_every_artifact(default_build: Path) -> None:
    record = json.loads((default_build / "build.json").read_text())
    assert record["schema"] == "bootchain.build/v1"
    on_disk = sorted(
        p.relative_to(default_build).as_posix()
        for p in default_build.rglob("*")
        if p.is_file() and p.name != "build.json"
    )
    assert sorted(a["path"] for a in record["artifacts"]) == on_disk
    for artifact in record["artifacts"]:
        path = default_build / artifact["path"]
        assert artifact["size"] == path.stat().st_size
        assert artifact["sha256"] == sha256_file(path)
    roles = {i["role"] for i in record["inputs"]}
    assert {"kernel", "systemd-boot", "busybox", "ovmf", "uki.osrel", "initrd.init"} <= roles
    assert record["signer"]["example_keys"] is True
    assert record["source_date_epoch"] == 1735689600


def test_no_host_details_in_any_output(default_build: Path) -> None:
    needles = [str(ROOT).encode(), str(default_build).encode(), socket.gethostname().encode()]
    needles = [n for n in needles if len(n) > 3]
    for path in default_build.rglob("*"):
        if path.is_file() and path.stat().st_size < 64 << 20:
            data = path.read_bytes()
            for needle in needles:
                assert needle not in data, f"{needle!r} in {path.name}"


def test_private_keys_never_in_outputs(default_build: Path) -> None:
    for path in default_build.rglob("*"):
        if path.is_file() and path.stat().st_size < 64 << 20:
            assert b"PRIVATE KEY" not in path.read_bytes(), path


@pytest.mark.parametrize("name", ["BOOTX64.EFI", UKI])
def test_sbverify_accepts_the_signed_artifacts(default_build: Path, name: str) -> None:
    subprocess.run(
        ["sbverify", "--cert", str(EXAMPLE_KEYS / "db.crt"), str(default_build / name)],
        check=True,
        capture_output=True,
    )


def _dump_sections(uki: Path, dest: Path) -> dict[str, Path]:
    out = {}
    for section in ("linux", "osrel", "cmdline", "initrd"):
        target = dest / section
        subprocess.run(
            ["objcopy", "--dump-section", f".{section}={target}", str(uki), str(dest / "junk")],
            check=True,
            capture_output=True,
        )
        out[section] = target
    return out


def _systemd_measure(files: dict[str, Path]) -> str:
    # --phase= : the value right after the stub, before systemd-pcrphase extends any phase
    # (our initrd runs no systemd, so that is what the TPM holds).
    args = [SYSTEMD_MEASURE, "calculate", "--bank=sha256", "--phase="]
    args += [f"--{name}={path}" for name, path in sorted(files.items())]
    proc = subprocess.run(args, check=True, capture_output=True, text=True)
    # "11:sha256=<hex>", one line for the one phase asked for
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("11:sha256=")]
    return line.split("=", 1)[1].strip().lower()


def test_pcr11_systemd_measure_on_shipped_sections_equals_inputs_and_prediction(
    default_build: Path, tmp_path: Path
) -> None:
    """The UKI carries exactly the intended bytes, and our PCR 11 equals systemd's."""
    shipped = _dump_sections(default_build / UKI, tmp_path)
    # objcopy dumps the raw (file-aligned) size; the stub measures VirtualSize bytes.
    from builder.uki import read_uki_sections

    sections = read_uki_sections((default_build / UKI).read_bytes())
    for name, path in shipped.items():
        path.write_bytes(path.read_bytes()[: len(sections[f".{name}"])])
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    originals = {
        "initrd": default_build / "initrd.img",
        "cmdline": inputs / "cmdline",
        "osrel": inputs / "osrel",
        "linux": inputs / "linux",
    }
    from builder.recipe import load_recipe

    recipe = load_recipe(RECIPES / "debian-minimal.yaml")
    originals["cmdline"].write_text(recipe.cmdline)
    osrel = (RECIPES / "files" / "os-release").read_bytes()
    originals["osrel"].write_bytes(osrel + b'IMAGE_ID=debian-minimal\nIMAGE_VERSION="1.0.0"\n')
    from builder.inputs import fetch_package, read_deb

    kernel = read_deb(
        fetch_package(recipe.packages["kernel"], offline=True),
        select=lambda p: p.startswith("boot/vmlinuz-"),
    )
    (vmlinuz,) = [m for m in kernel.members.values() if m.kind == "file"]
    originals["linux"].write_bytes(vmlinuz.data)

    from_inputs = _systemd_measure(originals)
    assert _systemd_measure(shipped) == from_inputs
    measurements = json.loads((default_build / "measurements.json").read_text())
    assert measurements["pcrs"]["sha256"]["11"] == from_inputs


def test_second_build_elsewhere_is_byte_identical(default_build: Path, tmp_path: Path) -> None:
    """Another folder, TZ, umask, locale and (with libfaketime) clock: the same bytes."""
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(RECIPES, elsewhere / "recipes")
    shutil.copytree(EXAMPLE_KEYS, elsewhere / "my-keys")
    second = build_variant(
        elsewhere,
        elsewhere / "recipes" / "debian-minimal.yaml",
        elsewhere / "my-keys",
        tmp_path / "out",
        VARIANTS[1],
    )
    report = compare_outdirs(default_build, second)
    assert report.equal, report.render()
    assert len(report.digests) >= 9


def _pcrs(outdir: Path) -> dict[str, dict[str, str]]:
    return json.loads((outdir / "measurements.json").read_text())["pcrs"]


def _changed(a: Path, b: Path) -> set[int]:
    pa, pb = _pcrs(a), _pcrs(b)
    changed = set()
    for bank in pa:
        changed |= {int(i) for i in pa[bank] if pa[bank][i] != pb[bank][i]}
    return changed


def test_changing_only_the_cmdline_moves_pcr_4_9_11_12(
    default_build: Path, build_recipe: Callable[..., Path]
) -> None:
    other = build_recipe(
        "debian-minimal.yaml", "--set", "cmdline=console=ttyS0,115200 loglevel=3 panic=-1"
    )
    assert _changed(default_build, other) == {4, 9, 11, 12}


def test_changing_only_the_db_key_moves_pcr_7_alone(
    default_build: Path, fresh_keys_build: Path
) -> None:
    """PCR 4 holds Authenticode digests, which exclude the certificate table: re-signing the
    same bytes with another key leaves PCR 4 as it was; PCR 7 records the new PK/KEK/db and
    the db entry that validated the images."""
    assert _changed(default_build, fresh_keys_build) == {7}
    record = json.loads((fresh_keys_build / "build.json").read_text())
    assert record["signer"]["example_keys"] is False


# Regression: the output folder kept mkdtemp's 0700, so no other user (a web server, an
# uploader) could read a build.
def test_output_folder_is_readable_by_others(default_build: Path) -> None:
    assert default_build.stat().st_mode & 0o777 == 0o755


def test_published_certificates_are_only_certificates(default_build: Path) -> None:
    from cryptography import x509

    for role in ("PK", "KEK", "db"):
        pem = (default_build / "keys" / f"{role}.crt").read_bytes()
        assert pem.count(b"-----BEGIN") == 1
        x509.load_pem_x509_certificate(pem)
