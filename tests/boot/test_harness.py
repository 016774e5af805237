"""The harness itself: refusal stop, timeout, killed children, signals; nothing left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from builder import boot
from builder.errors import BootError

from .conftest import CODE_PLAIN, CODE_SB, VARS_EMPTY

pytestmark = [pytest.mark.boot, pytest.mark.usefixtures("boot_tools")]

REPO = Path(__file__).resolve().parents[2]


def _kill_later(match: str, delay: float) -> threading.Timer:
    """SIGKILL the harness child whose command starts with ``match`` after ``delay`` s."""

    def kill() -> None:
        for proc in list(boot._LIVE):
            if Path(str(proc.args[0])).name.startswith(match):
                os.kill(proc.pid, signal.SIGKILL)

    timer = threading.Timer(delay, kill)
    timer.start()
    return timer


def test_unsigned_loader_is_refused_and_stops_early(
    unsigned_app_disk: Path,
    enrolled_varstore: Path,
    leak_check: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[str] = []
    before = enrolled_varstore.read_bytes()
    # Relative paths, as `invoke boot-test` passes them (regression: QEMU runs elsewhere).
    subprocess.run(
        ["cp", "--sparse=always", str(unsigned_app_disk), str(tmp_path / "d.img")], check=True
    )
    subprocess.run(["cp", str(enrolled_varstore), str(tmp_path / "v.fd")], check=True)
    monkeypatch.chdir(tmp_path)
    result = boot.boot(
        Path("d.img"),
        Path("v.fd"),
        firmware_code=CODE_SB,
        timeout=150,
        serial_log=Path("serial.log"),
        progress=lambda phase, _t: seen.append(phase),
    )
    assert result.outcome == "refused"
    assert result.refusal is not None
    assert "Boot0001" in result.refusal and result.refusal.endswith("Access Denied")
    assert "loader" not in result.phases and seen == ["firmware"]
    assert result.duration < 150
    assert (tmp_path / "serial.log").read_bytes().decode("utf-8", "replace") == result.serial_text
    assert enrolled_varstore.read_bytes() == before  # the varstore is copied, never written


def test_hanging_boot_times_out(firmware_only_disk: Path, leak_check: Path, tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(BootError, match=r"timed out after 8 s in phase firmware"):
        boot.boot(
            firmware_only_disk,
            VARS_EMPTY,
            firmware_code=CODE_PLAIN,
            timeout=8,
            serial_log=tmp_path / "serial.log",
            stop_on=(),
        )
    assert time.monotonic() - start < 8 + 10


@pytest.mark.parametrize(
    ("victim", "match"),
    [("qemu", r"QEMU exited -9"), ("swtpm", r"swtpm exited|QEMU exited")],
    ids=["kill-qemu", "kill-swtpm"],
)
def test_killed_child_is_a_clear_error(
    firmware_only_disk: Path, leak_check: Path, tmp_path: Path, victim: str, match: str
) -> None:
    timer = _kill_later(victim, 3.0)
    start = time.monotonic()
    try:
        with pytest.raises(BootError, match=match):
            boot.boot(
                firmware_only_disk,
                VARS_EMPTY,
                firmware_code=CODE_PLAIN,
                timeout=60,
                serial_log=tmp_path / "serial.log",
                stop_on=(),
            )
    finally:
        timer.cancel()
    assert time.monotonic() - start < 30


_RUNNER = """
import sys
from pathlib import Path
from builder import boot
boot.boot(Path(sys.argv[1]), Path(sys.argv[2]), firmware_code=Path(sys.argv[3]), timeout=120,
          serial_log=Path(sys.argv[4]), stop_on=())
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_signal_cleans_up(
    firmware_only_disk: Path, leak_check: Path, tmp_path: Path, signum: int
) -> None:
    serial = tmp_path / "serial.log"
    env = {**os.environ, "TMPDIR": str(leak_check), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _RUNNER, firmware_only_disk, VARS_EMPTY, CODE_PLAIN, serial],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (serial.exists() and serial.stat().st_size):
        time.sleep(0.2)
    assert serial.exists() and serial.stat().st_size, "QEMU never started"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert b"BootError" in err or b"KeyboardInterrupt" in err
