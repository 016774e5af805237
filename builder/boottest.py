"""The boot test of a built OUTDIR: boot it, read the probe, compare with measurements.json.

``run_boot_test`` boots ``disk.img`` with ``ovmf-vars.fd`` on the build's platform (machine
definition and the firmware CODE from the pinned ovmf package), requires Secure Boot on,
replays the guest's event log against the golden measurements and writes ``boot-report.json``
(plus ``boot-serial.log`` and ``boot-eventlog.bin``) next to the artifacts.

``run_negative`` boots variants that must be refused (a byte flipped in the UKI's .linux,
.initrd or .cmdline, the UKI signed by a key outside db, an unsigned systemd-boot, a varstore
without our db) and checks that an edited measurements.json fails the verdict.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder import boot as harness
from builder.disk import list_esp_files, read_esp_files, rewrite_esp
from builder.errors import BootError, InputFileError, UserInputError, VerificationError
from builder.fsutil import write_atomic
from builder.measure.compare import Verdict, compare
from builder.measure.eventlog import EventLog
from builder.measure.platform import Machine, Platform, load_platform

REPORT_SCHEMA = "bootchain.boot-report/v1"
NEGATIVE_SCHEMA = "bootchain.boot-negative/v1"
ESP_BOOTLOADER = "EFI/BOOT/BOOTX64.EFI"


@dataclass(frozen=True)
class BuildDir:
    """A built OUTDIR: its build.json, measurements.json and platform reference."""

    path: Path
    build: Mapping[str, Any]
    measurements: Mapping[str, Any]
    platform: Platform
    machine: Machine

    @property
    def source_date_epoch(self) -> int:
        return int(self.build.get("source_date_epoch", 0))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text("utf-8"))
    except FileNotFoundError as exc:
        raise UserInputError(f"{path} not found", hint="point at a build's output folder") from exc
    except (OSError, ValueError) as exc:
        raise InputFileError(f"{path}: not readable JSON ({exc})") from exc


def load_build(outdir: Path) -> BuildDir:
    """Read OUTDIR/build.json and measurements.json and the platform they name."""
    build = _read_json(outdir / "build.json")
    measurements = _read_json(outdir / "measurements.json")
    for name in ("disk.img", "ovmf-vars.fd"):
        if not (outdir / name).is_file():
            raise UserInputError(f"{outdir / name} not found", hint="is this a complete build?")
    name = build.get("platform") or measurements.get("platform", {}).get("name")
    if not isinstance(name, str):
        raise InputFileError(f"{outdir / 'build.json'}: no platform named")
    platform = load_platform(name)
    if platform.machine is None:
        raise UserInputError(f"platform {name} has no machine definition to boot")
    want = measurements.get("platform", {}).get("digest")
    if want and platform.digest and want != platform.digest:
        raise VerificationError(
            f"{outdir / 'measurements.json'} was predicted for platform {name} with digest "
            f"{want[:16]}, but qemu/platforms has {platform.digest[:16]}",
            hint="rebuild, or boot on the platform reference the build used",
        )
    return BuildDir(outdir, build, measurements, platform, platform.machine)


def firmware_files(build: BuildDir, dest: Path, *, offline: bool = False) -> tuple[Path, bytes]:
    """(CODE file written under ``dest``, VARS template bytes) from the pinned ovmf package."""
    from builder.inputs import PackagePin, fetch_package, read_deb

    pin_doc = next((i for i in build.build.get("inputs", []) if i.get("role") == "ovmf"), None)
    if pin_doc is None:
        raise InputFileError(f"{build.path / 'build.json'}: no pinned ovmf package in inputs")
    pin = PackagePin(pin_doc["name"], pin_doc["version"], pin_doc["sha256"])
    wanted = {build.machine.firmware_code, build.machine.firmware_vars_template}
    package = read_deb(fetch_package(pin, offline=offline), pin, select=wanted.__contains__)
    found = {}
    for path in wanted:
        member = package.members.get(path)
        if member is None or member.kind != "file":
            raise InputFileError(f"package {pin} has no file {path}")
        found[path] = member.data
    code = dest / Path(build.machine.firmware_code).name
    code.write_bytes(found[build.machine.firmware_code])
    return code, found[build.machine.firmware_vars_template]


@dataclass(frozen=True)
class BootTestResult:
    """A positive boot test: the verdict and the boot it came from."""

    verdict: Verdict
    boot: harness.BootResult
    probe: harness.ProbeReport
    report_path: Path


def boot_build(
    build: BuildDir,
    *,
    serial_log: Path,
    timeout: float = 300.0,
    firmware_code: Path | None = None,
    offline: bool = False,
    progress: harness.Progress | None = None,
) -> tuple[harness.BootResult, harness.ProbeReport]:
    """Boot a build to its probe (for boot-test and platform capture); refusal = error."""
    with tempfile.TemporaryDirectory(prefix="bootchain-fw-") as tmp:
        code = firmware_code or firmware_files(build, Path(tmp), offline=offline)[0]
        result = harness.boot(
            build.path / "disk.img",
            build.path / "ovmf-vars.fd",
            build.machine,
            firmware_code=code,
            timeout=timeout,
            serial_log=serial_log,
            progress=progress,
        )
    if result.outcome == "refused":
        raise VerificationError(
            f"firmware refused the build: {result.refusal}", hint=str(serial_log)
        )
    return result, harness.parse_probe(result.serial_text)


def run_boot_test(
    outdir: Path,
    *,
    timeout: float = 300.0,
    firmware_code: Path | None = None,
    offline: bool = False,
    progress: harness.Progress | None = None,
) -> BootTestResult:
    """Boot OUTDIR, compare with its measurements.json, write boot-report.json.

    Returns the result whatever the verdict (the caller decides the exit code). Raises
    VerificationError when the firmware refuses the build or Secure Boot is not on, BootError
    when the boot cannot reach the probe.
    """
    build = load_build(outdir)
    serial = outdir / "boot-serial.log"
    result, probe = boot_build(
        build,
        serial_log=serial,
        timeout=timeout,
        firmware_code=firmware_code,
        offline=offline,
        progress=progress,
    )
    write_atomic(outdir / "boot-eventlog.bin", probe.event_log)
    verdict = compare(build.measurements, EventLog.parse(probe.event_log), probe.pcrs)
    report = {
        "schema": REPORT_SCHEMA,
        "build": {"name": build.build.get("name"), "version": build.build.get("version")},
        "platform": build.platform.name,
        "outcome": result.outcome,
        "accel": result.accel,
        "duration_s": round(result.duration, 1),
        "phases_s": {k: round(v, 1) for k, v in result.phases.items()},
        "serial_log": serial.name,
        "event_log": "boot-eventlog.bin",
        "probe": probe.to_json(),
        "verdict": verdict.to_json(),
        "ok": verdict.ok and probe.secure_boot and not probe.setup_mode,
    }
    path = outdir / "boot-report.json"
    write_atomic(path, (json.dumps(report, indent=2, sort_keys=True) + "\n").encode())
    expect_sb = build.platform.identity.get("secure_boot", True)
    if expect_sb and (not probe.secure_boot or probe.setup_mode):
        raise VerificationError(
            f"guest reports SecureBoot={int(probe.secure_boot)} SetupMode="
            f"{int(probe.setup_mode)}: Secure Boot was not enforced",
            hint=str(path),
        )
    return BootTestResult(verdict, result, probe, path)


def capture_by_boot(
    outdir: Path,
    name: str,
    *,
    machine: Machine | None = None,
    identity: Mapping[str, Any] | None = None,
    notes: str = "",
    timeout: float = 300.0,
    firmware_code: Path | None = None,
    offline: bool = False,
    progress: harness.Progress | None = None,
) -> Platform:
    """Boot a reference build and record platform reference ``name`` from the guest's log.

    ``machine`` and ``firmware_code`` describe the platform being captured (default: the
    build's own). The serial log is kept as OUTDIR/capture-serial.log.
    """
    from builder.measure.platform import capture_platform

    build = load_build(outdir)
    if machine is not None:
        build = BuildDir(build.path, build.build, build.measurements, build.platform, machine)
    _, probe = boot_build(
        build,
        serial_log=outdir / "capture-serial.log",
        timeout=timeout,
        firmware_code=firmware_code,
        offline=offline,
        progress=progress,
    )
    return capture_platform(
        EventLog.parse(probe.event_log),
        name,
        identity=identity,
        machine=build.machine,
        notes=notes,
    )


# --------------------------------------------------------------------------------------------
# Negative cases

NEGATIVE_CASES: dict[str, str] = {
    "uki-linux-byte": "one byte flipped in the UKI's .linux",
    "uki-initrd-byte": "one byte flipped in the UKI's .initrd",
    "uki-cmdline-byte": "one byte flipped in the UKI's .cmdline",
    "uki-foreign-key": "UKI signed by a key outside db",
    "bootloader-unsigned": "systemd-boot without its signature",
    "varstore-foreign-db": "varstore whose db does not hold our certificate",
}
EDITED_MEASUREMENTS = "measurements-edited"


@dataclass(frozen=True)
class NegativeResult:
    """One negative case: refused as it must be (``ok``), with the line that showed it."""

    name: str
    description: str
    ok: bool
    detail: str
    duration: float

    def one_line(self) -> str:
        state = "rejected as it must be" if self.ok else "NOT REJECTED"
        return f"{self.name}: {state}: {self.detail}"


def _uki_path(disk: Path) -> str:
    ukis = [e.path for e in list_esp_files(disk) if e.path.startswith("EFI/Linux/")]
    if len(ukis) != 1:
        raise InputFileError(f"{disk}: expected one UKI under EFI/Linux/, found {ukis}")
    return ukis[0]


def _flip_section(data: bytes, section: str) -> bytes:
    from builder.pe import parse_pe

    image = parse_pe(data)
    found = next((s for s in image.sections if s.name == section), None)
    if found is None or not found.virtual_size:
        raise InputFileError(f"UKI has no {section} section to flip a byte in")
    at = found.raw_offset + min(found.virtual_size, found.raw_size) // 2
    out = bytearray(data)
    out[at] ^= 0x01
    return bytes(out)


def _foreign_keyset(work: Path, sde: int) -> Any:
    from builder.secureboot.keys import generate_keyset

    return generate_keyset(work / "foreign-keys", source_date_epoch=sde, subject_prefix="foreign")


def make_negative_case(
    build: BuildDir, name: str, work: Path, vars_template: bytes
) -> tuple[Path, Path]:
    """(disk, varstore) of negative case ``name``, written under ``work``."""
    from builder.secureboot.authenticode import sign_pe, strip_signature
    from builder.secureboot.varstore import make_varstore

    src_disk, src_vars = build.path / "disk.img", build.path / "ovmf-vars.fd"
    disk, varstore = work / f"{name}.img", src_vars
    sde = build.source_date_epoch
    if name.startswith("uki-"):
        uki = _uki_path(src_disk)
        data = read_esp_files(src_disk)[uki]
        if name == "uki-foreign-key":
            keys = _foreign_keyset(work, sde)
            changed = sign_pe(strip_signature(data), keys.signer("db"), replace=True)
        else:
            section = "." + name.removeprefix("uki-").removesuffix("-byte")
            changed = _flip_section(data, section)
        rewrite_esp(src_disk, disk, {uki: changed}, source_date_epoch=sde)
    elif name == "bootloader-unsigned":
        data = read_esp_files(src_disk)[ESP_BOOTLOADER]
        rewrite_esp(src_disk, disk, {ESP_BOOTLOADER: strip_signature(data)}, source_date_epoch=sde)
    elif name == "varstore-foreign-db":
        disk = src_disk
        varstore = work / f"{name}.fd"
        keys = _foreign_keyset(work, sde)
        varstore.write_bytes(make_varstore(vars_template, keys, source_date_epoch=sde))
    else:
        raise UserInputError(
            f"unknown negative case {name!r}",
            hint=f"one of {', '.join([*NEGATIVE_CASES, EDITED_MEASUREMENTS])}",
        )
    return disk, varstore


def edit_measurements(measurements: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of measurements.json with one event digest changed (the UKI's sha256 in PCR 4),
    the PCR values left as they were: the verdict must still catch it."""
    edited: dict[str, Any] = copy.deepcopy(dict(measurements))
    try:
        images = [e for e in edited["events"] if e["pcr"] == 4 and len(e["digests"]) > 0]
        digest = next(d for d in images[-1]["digests"] if d["hashAlg"] == "sha256")
        value = bytearray(bytes.fromhex(digest["digest"]))
    except (KeyError, TypeError, ValueError, IndexError, StopIteration) as exc:
        raise InputFileError("measurements.json has no sha256 PCR 4 event to edit") from exc
    value[-1] ^= 0x01
    digest["digest"] = value.hex()
    return edited


def check_edited_measurements(build: BuildDir) -> NegativeResult:
    """The last real boot's log against an edited measurements.json must NOT match."""
    log_path = build.path / "boot-eventlog.bin"
    if not log_path.is_file():
        raise UserInputError(
            f"{log_path} not found", hint="run the positive boot test first (it records the log)"
        )
    report = _read_json(build.path / "boot-report.json")
    pcrs = {
        bank: {int(i): bytes.fromhex(v) for i, v in values.items()}
        for bank, values in report["probe"]["pcrs"].items()
    }
    verdict = compare(
        edit_measurements(build.measurements), EventLog.parse(log_path.read_bytes()), pcrs
    )
    detail = verdict.mismatches[0].one_line() if verdict.mismatches else "verdict still matches"
    return NegativeResult(
        EDITED_MEASUREMENTS, "measurements.json edited by one digest", not verdict.ok, detail, 0.0
    )


def run_negative(
    outdir: Path,
    *,
    cases: Sequence[str] | None = None,
    timeout: float = 300.0,
    firmware_code: Path | None = None,
    offline: bool = False,
    progress: Callable[[str, str, float], None] | None = None,
) -> list[NegativeResult]:
    """Boot each negative case (stopping at the refusal); write boot-negative.json."""
    names = list(cases) if cases is not None else [*NEGATIVE_CASES, EDITED_MEASUREMENTS]
    known = [*NEGATIVE_CASES, EDITED_MEASUREMENTS]
    unknown = [n for n in names if n not in known]
    if not names or unknown:
        raise UserInputError(
            f"unknown negative case {unknown[0]!r}" if unknown else "no negative case to run",
            hint=f"one of {', '.join(known)}",
        )
    build = load_build(outdir)
    results: list[NegativeResult] = []
    logs = outdir / "boot-negative"
    logs.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bootchain-neg-") as tmp:
        work = Path(tmp)
        code, template = firmware_files(build, work, offline=offline)
        code = firmware_code or code
        for name in names:
            if name == EDITED_MEASUREMENTS:
                results.append(check_edited_measurements(build))
                continue
            case_dir = work / name
            case_dir.mkdir()
            disk, varstore = make_negative_case(build, name, case_dir, template)

            def step(phase: str, seconds: float, name: str = name) -> None:
                if progress:
                    progress(name, phase, seconds)

            try:
                result = harness.boot(
                    disk,
                    varstore,
                    build.machine,
                    firmware_code=code,
                    timeout=timeout,
                    serial_log=logs / f"{name}.log",
                    progress=step,
                )
            except BootError as exc:
                results.append(NegativeResult(name, NEGATIVE_CASES[name], False, str(exc), 0.0))
                continue
            finally:
                shutil.rmtree(case_dir, ignore_errors=True)
            if result.outcome == "refused" and "init" not in result.phases:
                detail = result.refusal or ""
                ok = True
            else:
                detail = f"booted to phase {result.last_phase} ({result.outcome})"
                ok = False
            results.append(NegativeResult(name, NEGATIVE_CASES[name], ok, detail, result.duration))
    doc = {
        "schema": NEGATIVE_SCHEMA,
        "ok": bool(results) and all(r.ok for r in results),
        "cases": [
            {
                "name": r.name,
                "description": r.description,
                "refused": r.ok,
                "detail": r.detail,
                "duration_s": round(r.duration, 1),
            }
            for r in results
        ],
    }
    write_atomic(outdir / "boot-negative.json", (json.dumps(doc, indent=2) + "\n").encode())
    return results
