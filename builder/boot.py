"""The boot harness: QEMU + OVMF + swtpm, live serial watching, and the probe's report.

``boot()`` starts swtpm with fresh state on a listening socket we create and hand over (so the
socket accepts before QEMU starts: no start-up race), then QEMU with the platform's machine
definition, the pinned OVMF CODE (read-only), a copy of the varstore and the disk read-only on
virtio-blk. It follows the serial console live, reports phases, stops at a firmware refusal
or when the guest powers off, and always ends both processes (process groups) and removes its
temp folder, on success, failure, timeout, Ctrl-C and SIGTERM.

``parse_probe()`` reads the framed, checksummed sections the in-guest probe
(qemu/probe/probe.sh) prints, and fails closed on anything missing or corrupt.

The two long-running children are the one place that does not go through
``builder.run.run`` (which waits for its command): they are started here with the same tool
lookup and environment (``find_tool``, ``tool_env``).
"""

from __future__ import annotations

import atexit
import base64
import binascii
import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Protocol

from builder.errors import BootError, UserInputError
from builder.run import find_tool, tool_env

PROBE_SCRIPT = Path(__file__).resolve().parent.parent / "qemu" / "probe" / "probe.sh"

DEFAULT_FIRMWARE_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd")
DEFAULT_QEMU_ARGS: tuple[str, ...] = (
    "-machine",
    "q35,smm=on,accel=tcg",
    "-m",
    "1024",
    "-nodefaults",
    "-global",
    "driver=cfi.pflash01,property=secure,value=on",
    "-global",
    "ICH9-LPC.disable_s3=1",
)

# Phases in order, each entered when its marker shows on the serial console.
PHASES: tuple[tuple[str, str | None], ...] = (
    ("firmware", None),
    ("loader", "BdsDxe: starting Boot"),
    ("kernel", "EFI stub: "),
    ("init", "BOOTCHAIN-INIT-REACHED"),
    ("probe", "BOOTCHAIN-PROBE-START"),
    ("done", "BOOTCHAIN-PROBE-DONE"),
)

# What OVMF 2022.11 and systemd-boot 252 print when Secure Boot refuses an image (recorded
# from real boots: tests/data/boot/NOTE.md).
REFUSAL_PATTERNS: tuple[str, ...] = (
    r"BdsDxe: failed to (?:load|start) Boot[0-9A-F]{4}\b.*: (?:Access Denied|Security Violation)",
    r"BdsDxe: No bootable option or device was found",
    r"Error loading .*: (?:Access Denied|Security Violation)",
    r"Failed to (?:load|start) image.*: (?:Access Denied|Security Violation)",
)
_PANIC = re.compile(r"Kernel panic - not syncing:[^\r\n]*")


class MachineSpec(Protocol):
    """What the harness needs from a platform reference's machine definition."""

    @property
    def qemu_args(self) -> Sequence[str]: ...
    @property
    def tpm(self) -> str: ...
    @property
    def disk_interface(self) -> str: ...


@dataclass(frozen=True)
class Machine:
    """A machine definition: QEMU arguments, TPM device model, disk interface."""

    qemu_args: tuple[str, ...] = DEFAULT_QEMU_ARGS
    tpm: str = "tpm-crb"
    disk_interface: str = "virtio-blk"


DEFAULT_MACHINE = Machine()


def load_machine(platform: str | None) -> MachineSpec:
    """The machine of platform reference ``platform`` (qemu/platforms), or the default."""
    if platform is None:
        return DEFAULT_MACHINE
    from builder.measure.platform import load_platform

    machine = load_platform(platform).machine
    if machine is None:
        raise UserInputError(f"platform {platform} has no machine definition to boot")
    return machine


@dataclass(frozen=True)
class BootResult:
    """How a boot ended. ``outcome`` is "probe-done", "refused" or "powered-off"."""

    outcome: str
    serial_log: Path
    serial_text: str
    refusal: str | None
    phases: dict[str, float]  # phase -> seconds from start when it was entered
    duration: float
    accel: str

    @property
    def last_phase(self) -> str:
        return max(self.phases, key=lambda p: self.phases[p]) if self.phases else "firmware"


Progress = Callable[[str, float], None]


# --------------------------------------------------------------------------------------------
# Process bookkeeping: everything we start is ended, whatever happens.

_LIVE: set[subprocess.Popen[bytes]] = set()
_LIVE_LOCK = threading.Lock()


def _kill_group(proc: subprocess.Popen[bytes], grace: float = 3.0) -> None:
    """SIGTERM the process group of ``proc``, then SIGKILL after ``grace`` seconds."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # The group may hold stragglers after the leader exited.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with _LIVE_LOCK:
        _LIVE.discard(proc)


@atexit.register
def _kill_all() -> None:
    with _LIVE_LOCK:
        live = list(_LIVE)
    for proc in live:
        _kill_group(proc, grace=1.0)


def _spawn(
    argv: Sequence[str], *, log: Path, pass_fds: Sequence[int] = (), cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    args = [find_tool(argv[0]), *argv[1:]]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=tool_env(),
            cwd=cwd,
            pass_fds=tuple(pass_fds),
            start_new_session=True,  # own process group: killable as one, no stray SIGINT
        )
    with _LIVE_LOCK:
        _LIVE.add(proc)
    return proc


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into an exception for the duration, so ``finally`` blocks run."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise BootError(f"boot interrupted by signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# --------------------------------------------------------------------------------------------
# Acceleration

_KVM_GET_API_VERSION = 0xAE00
_KVM_CHECK_EXTENSION = 0xAE03
_KVM_CAP_X86_SMM = 117


def kvm_usable() -> bool:
    """True when /dev/kvm opens and supports SMM (OVMF Secure Boot builds need it)."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if fcntl.ioctl(fd, _KVM_GET_API_VERSION) != 12:
            return False
        return fcntl.ioctl(fd, _KVM_CHECK_EXTENSION, _KVM_CAP_X86_SMM) > 0
    except OSError:
        return False
    finally:
        os.close(fd)


def _with_accel(args: Sequence[str], accel: str) -> list[str]:
    """``args`` with the -machine accel= option set to ``accel``."""
    out = list(args)
    for i, arg in enumerate(out[:-1]):
        if arg == "-machine":
            opts = [o for o in out[i + 1].split(",") if not o.startswith("accel=")]
            out[i + 1] = ",".join([*opts, f"accel={accel}"])
            return out
    return [*out, "-accel", accel]


# --------------------------------------------------------------------------------------------
# The boot


def qemu_command(
    machine: MachineSpec,
    *,
    firmware_code: Path,
    varstore: Path,
    disk: Path,
    tpm_socket: Path,
    serial_log: Path,
    accel: str,
) -> list[str]:
    """The QEMU argv for one boot (without the binary's absolute path)."""
    if machine.tpm not in ("tpm-crb", "tpm-tis"):
        raise UserInputError(f"machine: unsupported TPM device {machine.tpm!r}")
    if machine.disk_interface != "virtio-blk":
        raise UserInputError(f"machine: unsupported disk interface {machine.disk_interface!r}")
    return [
        "qemu-system-x86_64",
        *_with_accel(machine.qemu_args, accel),
        "-drive",
        f"if=pflash,format=raw,unit=0,readonly=on,file={firmware_code}",
        "-drive",
        f"if=pflash,format=raw,unit=1,file={varstore}",
        "-chardev",
        f"socket,id=chrtpm,path={tpm_socket}",
        "-tpmdev",
        "emulator,id=tpm0,chardev=chrtpm",
        "-device",
        f"{machine.tpm},tpmdev=tpm0",
        "-drive",
        f"if=none,id=d0,format=raw,readonly=on,file={disk}",
        "-device",
        "virtio-blk-pci,drive=d0",
        "-serial",
        f"file:{serial_log}",
        "-display",
        "none",
        "-no-reboot",
    ]


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text("utf-8", "replace").strip().splitlines()
    except OSError:
        return ""
    return " / ".join(text[-lines:])


def boot(
    disk: Path,
    varstore: Path,
    machine: MachineSpec = DEFAULT_MACHINE,
    *,
    firmware_code: Path = DEFAULT_FIRMWARE_CODE,
    timeout: float = 180.0,
    serial_log: Path,
    stop_on: Sequence[str] = REFUSAL_PATTERNS,
    progress: Progress | None = None,
    accel: str = "auto",
) -> BootResult:
    """Boot ``disk`` once and return how it ended; BootError if it cannot reach an end.

    ``varstore`` is copied, never written. ``stop_on`` are regexes: the first one seen on the
    console stops the machine (outcome "refused"). ``progress(phase, seconds)`` is called on
    each phase change. ``accel`` is "auto" (KVM when usable, else TCG), "kvm" or "tcg".
    """
    for what, path in (("disk image", disk), ("varstore", varstore), ("firmware", firmware_code)):
        if not path.is_file():
            raise UserInputError(f"boot: {what} {path} not found")
    # QEMU and swtpm run in a private temp folder: give them absolute paths.
    disk, varstore, firmware_code = disk.resolve(), varstore.resolve(), firmware_code.resolve()
    serial_log = serial_log.absolute()
    if accel == "auto":
        accel = "kvm" if kvm_usable() else "tcg"
    patterns = [re.compile(p) for p in stop_on]
    serial_log.parent.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    tmp = Path(tempfile.mkdtemp(prefix="bootchain-boot-"))
    listener: socket.socket | None = None
    start = time.monotonic()
    try:
        with _sigterm_raises():
            vars_copy = tmp / "vars.fd"
            shutil.copyfile(varstore, vars_copy)
            (tmp / "tpm").mkdir()
            sock_path = tmp / "tpm.sock"
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(str(sock_path))
            listener.listen(1)
            fd = listener.fileno()
            procs.append(
                _spawn(
                    [
                        "swtpm",
                        "socket",
                        "--tpm2",
                        "--tpmstate",
                        f"dir={tmp / 'tpm'}",
                        "--ctrl",
                        f"type=unixio,fd={fd}",
                        "--flags",
                        "startup-none",
                        "--terminate",
                    ],
                    log=tmp / "swtpm.log",
                    pass_fds=[fd],
                )
            )
            serial_log.write_bytes(b"")
            argv = qemu_command(
                machine,
                firmware_code=firmware_code,
                varstore=vars_copy,
                disk=disk,
                tpm_socket=sock_path,
                serial_log=serial_log,
                accel=accel,
            )
            procs.append(_spawn(argv, log=tmp / "qemu.log", cwd=tmp))
            listener.close()  # swtpm holds its own copy
            listener = None
            return _watch(
                procs[1],
                procs[0],
                serial_log=serial_log,
                patterns=patterns,
                start=start,
                timeout=timeout,
                progress=progress,
                accel=accel,
                logs=tmp,
            )
    finally:
        if listener is not None:
            listener.close()
        for proc in reversed(procs):
            _kill_group(proc)
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class _Watch:
    text: str = ""
    phases: dict[str, float] = field(default_factory=dict)
    refusal: str | None = None


def _watch(
    qemu: subprocess.Popen[bytes],
    swtpm: subprocess.Popen[bytes],
    *,
    serial_log: Path,
    patterns: Sequence[re.Pattern[str]],
    start: float,
    timeout: float,
    progress: Progress | None,
    accel: str,
    logs: Path,
) -> BootResult:
    state = _Watch()
    state.phases["firmware"] = 0.0
    if progress:
        progress("firmware", 0.0)
    raw = bytearray()
    with serial_log.open("rb") as serial:
        while True:
            chunk = serial.read()
            if chunk:
                raw += chunk
                state.text = raw.decode("utf-8", "replace")
                _update(state, patterns, time.monotonic() - start, progress)
            elapsed = time.monotonic() - start
            if state.refusal is not None:
                return _result("refused", state, serial_log, elapsed, accel)
            code = qemu.poll()
            if code is not None:
                rest = serial.read()
                if rest:
                    raw += rest
                    state.text = raw.decode("utf-8", "replace")
                    _update(state, patterns, elapsed, progress)
                if state.refusal is not None:
                    return _result("refused", state, serial_log, elapsed, accel)
                if code != 0:
                    raise BootError(
                        f"QEMU exited {code} in phase {_last(state)} after {elapsed:.0f} s: "
                        f"{_tail(logs / 'qemu.log') or 'no output'}",
                        hint=f"serial log: {serial_log}",
                    )
                panic = _PANIC.search(state.text)
                if panic:
                    raise BootError(f"guest kernel panicked: {panic.group(0).strip()}")
                outcome = "probe-done" if "done" in state.phases else "powered-off"
                return _result(outcome, state, serial_log, elapsed, accel)
            if swtpm.poll() is not None:
                # swtpm --terminate ends when QEMU closes the TPM connection at power-off:
                # give QEMU a moment to exit before calling it a swtpm failure.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    qemu.wait(3.0)
                if qemu.poll() is not None:
                    continue
                raise BootError(
                    f"swtpm exited {swtpm.returncode} in phase {_last(state)} after "
                    f"{elapsed:.0f} s: {_tail(logs / 'swtpm.log') or 'no output'}"
                )
            if elapsed > timeout:
                raise BootError(
                    f"boot timed out after {timeout:.0f} s in phase {_last(state)}",
                    hint=f"serial log: {serial_log}",
                )
            time.sleep(0.1)


def _last(state: _Watch) -> str:
    return max(state.phases, key=lambda p: state.phases[p])


def _update(
    state: _Watch, patterns: Sequence[re.Pattern[str]], now: float, progress: Progress | None
) -> None:
    for phase, marker in PHASES:
        if marker is not None and phase not in state.phases and marker in state.text:
            state.phases[phase] = now
            if progress:
                progress(phase, now)
    if state.refusal is None:
        for pattern in patterns:
            found = pattern.search(state.text)
            if found:
                state.refusal = found.group(0).strip()
                break


def _result(outcome: str, state: _Watch, log: Path, elapsed: float, accel: str) -> BootResult:
    return BootResult(
        outcome=outcome,
        serial_log=log,
        serial_text=state.text,
        refusal=state.refusal,
        phases=dict(state.phases),
        duration=elapsed,
        accel=accel,
    )


# --------------------------------------------------------------------------------------------
# The probe's report (pure)

_BEGIN = re.compile(r"^BOOTCHAIN-PROBE-BEGIN (\S+)$")
_END = re.compile(r"^BOOTCHAIN-PROBE-END (\S+) sha256=([0-9a-f]{64})$")
_DONE = re.compile(r"^BOOTCHAIN-PROBE-DONE sections=(\d+)$")
_KMSG = re.compile(r"^\[\s*\d+\.\d+\] ")
_B64 = re.compile(r"^[A-Za-z0-9+/]+=*$")
EFI_GLOBAL_GUID = "8be4df61-93ca-11d2-aa0d-00e098032b8c"
REQUIRED_SECTIONS = (
    "meta",
    "pcrs",
    "eventlog",
    f"efivar:SecureBoot-{EFI_GLOBAL_GUID}",
    f"efivar:SetupMode-{EFI_GLOBAL_GUID}",
)


@dataclass(frozen=True)
class ProbeReport:
    """What the guest saw: Secure Boot state, PCRs per bank, event log, lockdown, variables."""

    sections: dict[str, bytes]
    secure_boot: bool
    setup_mode: bool
    pcrs: dict[str, dict[int, bytes]]
    event_log: bytes
    lockdown: str | None
    efi_variables: dict[str, bytes]  # "Name-guid" -> data (attributes stripped)
    kernel: str
    cmdline: str

    def to_json(self) -> dict[str, object]:
        """A JSON-ready summary (the event log as sha256; variables as hex)."""
        return {
            "secure_boot": self.secure_boot,
            "setup_mode": self.setup_mode,
            "lockdown": self.lockdown,
            "kernel": self.kernel,
            "cmdline": self.cmdline,
            "pcrs": {
                bank: {str(i): v.hex() for i, v in sorted(values.items())}
                for bank, values in sorted(self.pcrs.items())
            },
            "event_log_sha256": hashlib.sha256(self.event_log).hexdigest(),
            "event_log_size": len(self.event_log),
            "efi_variables": {k: v.hex() for k, v in sorted(self.efi_variables.items())},
        }


def parse_probe(serial_text: str) -> ProbeReport:
    """Parse the probe's frames out of a console log; BootError on anything missing or bad."""
    sections: dict[str, bytes] = {}
    current: str | None = None
    lines: list[str] = []
    done: int | None = None
    for number, raw_line in enumerate(serial_text.replace("\r", "").split("\n"), start=1):
        line = raw_line.strip()
        if current is None:
            if m := _BEGIN.match(line):
                current, lines = m.group(1), []
            elif m := _DONE.match(line):
                done = int(m.group(1))
            continue
        if m := _END.match(line):
            if m.group(1) != current:
                raise BootError(
                    f"probe: section {current!r} closed as {m.group(1)!r} (line {number})"
                )
            try:
                data = base64.b64decode("".join(lines), validate=True)
            except binascii.Error as exc:
                raise BootError(f"probe: section {current!r} is not valid base64") from exc
            if hashlib.sha256(data).hexdigest() != m.group(2):
                raise BootError(f"probe: section {current!r} fails its sha256 (line {number})")
            if current in sections:
                raise BootError(f"probe: section {current!r} appears twice")
            sections[current] = data
            current = None
        elif _BEGIN.match(line) or _DONE.match(line):
            raise BootError(f"probe: section {current!r} not closed (line {number})")
        elif _B64.match(line):
            lines.append(line)
        elif line and not _KMSG.match(line):
            raise BootError(f"probe: stray text inside section {current!r} (line {number})")
    if current is not None:
        raise BootError(f"probe: section {current!r} cut off (console ended inside it)")
    if done is None:
        raise BootError("probe: no BOOTCHAIN-PROBE-DONE line (probe did not finish)")
    if done != len(sections):
        raise BootError(f"probe: {len(sections)} sections read, probe sent {done}")
    missing = [s for s in REQUIRED_SECTIONS if s not in sections]
    if missing:
        raise BootError(f"probe: missing section(s) {', '.join(missing)}")
    return _report(sections)


def _efivar_bool(sections: dict[str, bytes], name: str) -> bool:
    data = sections[f"efivar:{name}-{EFI_GLOBAL_GUID}"]
    if len(data) != 5 or data[4] not in (0, 1):
        raise BootError(f"probe: EFI variable {name} has unexpected content {data.hex()}")
    return data[4] == 1


def _report(sections: dict[str, bytes]) -> ProbeReport:
    pcrs: dict[str, dict[int, bytes]] = {}
    for number, line in enumerate(sections["pcrs"].decode("ascii", "replace").splitlines(), 1):
        parts = line.split()
        try:
            bank, index, value = parts[0], int(parts[1]), bytes.fromhex(parts[2])
        except (IndexError, ValueError) as exc:
            raise BootError(f"probe: pcrs line {number} unreadable: {line!r}") from exc
        pcrs.setdefault(bank, {})[index] = value
    if not pcrs:
        raise BootError("probe: no PCR values (no TPM in the guest?)")
    meta = dict(
        line.split(" ", 1)
        for line in sections["meta"].decode("utf-8", "replace").splitlines()
        if " " in line
    )
    lockdown = None
    if "lockdown" in sections:
        found = re.search(r"\[(\w+)\]", sections["lockdown"].decode("ascii", "replace"))
        lockdown = found.group(1) if found else None
    variables = {
        name.removeprefix("efivar:"): data[4:]
        for name, data in sections.items()
        if name.startswith("efivar:")
    }
    return ProbeReport(
        sections=sections,
        secure_boot=_efivar_bool(sections, "SecureBoot"),
        setup_mode=_efivar_bool(sections, "SetupMode"),
        pcrs=pcrs,
        event_log=sections["eventlog"],
        lockdown=lockdown,
        efi_variables=variables,
        kernel=meta.get("kernel", ""),
        cmdline=meta.get("cmdline", ""),
    )
