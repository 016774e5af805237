"""Real builds boot with Secure Boot on and measure exactly as predicted; tampering is refused.

Each boot costs 20-60 s of TCG: builds are shared per session (tests/conftest.py), each gets
one private copy here, and negative boots stop at the firmware's refusal.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from builder import boottest

from ..conftest import bootchain

pytestmark = [pytest.mark.boot, pytest.mark.usefixtures("boot_tools")]

COMPARED = [*range(10), 11, 12]


def _sparse_copy(outdir: Path, dest: Path) -> Path:
    """A private copy of a shared build (disk.img stays sparse)."""
    target = dest / outdir.name
    subprocess.run(["cp", "-r", "--sparse=always", str(outdir), str(target)], check=True)
    return target


@pytest.fixture(scope="session")
def booted_default(default_build: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the default build that passed `bootchain boot-test` (CLI, as users run it)."""
    outdir = _sparse_copy(default_build, tmp_path_factory.mktemp("booted"))
    proc = bootchain("boot-test", outdir, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "verdict: MATCH" in proc.stdout
    return outdir


def _check_report(outdir: Path) -> dict[str, object]:
    report = json.loads((outdir / "boot-report.json").read_text())
    assert report["schema"] == "bootchain.boot-report/v1"
    assert report["ok"] is True
    probe = report["probe"]
    assert probe["secure_boot"] is True and probe["setup_mode"] is False
    assert probe["lockdown"] == "integrity"  # the Debian kernel locks down under Secure Boot
    rows = {(r["bank"], r["pcr"]): r for r in report["verdict"]["rows"]}
    for bank in ("sha1", "sha256"):
        for pcr in COMPARED:
            row = rows[(bank, pcr)]
            assert row["equal"] and row["expected"] == row["actual"], (bank, pcr)
            assert row["actual"] == probe["pcrs"][bank][str(pcr)]
    assert (outdir / "boot-serial.log").stat().st_size > 0
    return report


def test_default_recipe_boots_and_matches(booted_default: Path) -> None:
    report = _check_report(booted_default)
    phases = report["phases_s"]
    assert isinstance(phases, dict)
    in_order = sorted(phases, key=lambda p: phases[p])
    assert in_order == ["firmware", "loader", "kernel", "init", "probe", "done"]


@pytest.mark.parametrize(
    "build_name", ["console_build", "fresh_keys_build", "console_fresh_keys_build"]
)
def test_other_builds_boot_and_match(
    build_name: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    outdir = _sparse_copy(request.getfixturevalue(build_name), tmp_path)
    result = boottest.run_boot_test(outdir)
    assert result.verdict.ok, result.verdict.render_table()
    _check_report(outdir)


@pytest.mark.parametrize("case", list(boottest.NEGATIVE_CASES))
def test_negative_case_is_refused(case: str, default_build: Path, tmp_path: Path) -> None:
    outdir = _sparse_copy(default_build, tmp_path)
    (result,) = boottest.run_negative(outdir, cases=[case])
    assert result.ok, result.one_line()
    assert "Access Denied" in result.detail or "Security Violation" in result.detail
    if case.startswith("uki-"):  # systemd-boot ran and the firmware refused the UKI it loaded
        assert result.detail.startswith("Error loading \\EFI\\Linux\\")
    else:  # the firmware refused systemd-boot itself
        assert result.detail.startswith("BdsDxe: failed to load Boot0001")
    log = (outdir / "boot-negative" / f"{case}.log").read_text("utf-8", "replace")
    assert "BOOTCHAIN-INIT-REACHED" not in log


def test_edited_measurements_fail_the_verdict(booted_default: Path) -> None:
    (result,) = boottest.run_negative(booted_default, cases=[boottest.EDITED_MEASUREMENTS])
    assert result.ok, result.one_line()
    assert "PCR 4" in result.detail


def test_tampered_build_fails_the_cli(booted_default: Path, tmp_path: Path) -> None:
    """boot-test itself exits non-zero, with one clear line, when the firmware refuses."""
    outdir = _sparse_copy(booted_default, tmp_path)
    build = boottest.load_build(outdir)
    disk, _ = boottest.make_negative_case(build, "uki-cmdline-byte", tmp_path, b"")
    disk.replace(outdir / "disk.img")
    proc = bootchain("boot-test", outdir, check=False)
    assert proc.returncode == 4, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("bootchain: error: firmware refused the build: Error loading")


def test_capture_by_boot_reproduces_the_reference(default_build: Path, tmp_path: Path) -> None:
    """`platform capture` from a real boot gives the same platform events as the recorded
    reference (same OVMF, same QEMU device layout): a new firmware is one command."""
    from builder.measure.platform import load_platform

    outdir = _sparse_copy(default_build, tmp_path)
    reference = load_platform(boottest.load_build(outdir).platform.name)
    captured = boottest.capture_by_boot(outdir, reference.name, identity=reference.identity)
    assert captured.log == reference.log
    assert captured.boot_device_path == reference.boot_device_path
    assert captured.banks == reference.banks
    assert captured.machine == reference.machine
    assert (outdir / "capture-serial.log").stat().st_size > 0
