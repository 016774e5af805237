"""Probe output parsing and refusal detection, on consoles recorded from real boots."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from builder import boot, disk
from builder.errors import BootError
from builder.measure import eventlog

DATA = Path(__file__).resolve().parents[1] / "data" / "boot"
PROBE_LOG = (DATA / "serial-probe-sb-off.log").read_text("utf-8")
REFUSED_LOG = (DATA / "serial-refused-unsigned-sdboot.log").read_text("utf-8")


def test_recorded_probe_parses() -> None:
    report = boot.parse_probe(PROBE_LOG)
    assert report.secure_boot is False and report.setup_mode is True
    assert report.lockdown == "none"
    assert report.kernel == "6.1.0-56-amd64"
    assert report.cmdline == "console=ttyS0,115200 loglevel=6 panic=-1"
    assert set(report.pcrs) == {"sha1", "sha256", "sha384", "sha512"}
    assert all(len(report.pcrs[b]) == 24 for b in report.pcrs)
    assert f"LoaderInfo-{'4a67b082-0a4c-41cf-b6c7-440b29bb8c4f'}" in report.efi_variables
    info = report.efi_variables["LoaderInfo-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"]
    assert info.decode("utf-16-le").rstrip("\0") == "systemd-boot 252.39-1~deb12u2"
    assert report.to_json()["event_log_size"] == len(report.event_log)


def test_recorded_event_log_replays_to_recorded_pcrs() -> None:
    report = boot.parse_probe(PROBE_LOG)
    log = eventlog.EventLog.parse(report.event_log)
    for bank in ("sha1", "sha256"):
        replayed = eventlog.replay(log.events, bank)
        assert replayed, bank
        for index, value in replayed.items():
            assert report.pcrs[bank][index] == value, (bank, index)


def test_gpt_event_equals_what_ovmf_measured(tmp_path: Path) -> None:
    # The recorded boot used tests/boot/devimage.py: 128 MiB disk, 120 MiB ESP, this seed.
    # The GPT does not depend on the ESP's files.
    img = tmp_path / "disk.img"
    layout = disk.DiskLayout(size_mib=128, esp_size_mib=120)
    disk.make_disk(img, layout, {"x": b"x"}, seed=b"bootchain-dev", source_date_epoch=0)
    data = disk.gpt_event_data(img)
    log = eventlog.EventLog.parse(boot.parse_probe(PROBE_LOG).event_log)
    gpt_events = [e for e in log.events if e.type_name == "EV_EFI_GPT_EVENT"]
    assert len(gpt_events) == 1
    assert gpt_events[0].data == data
    assert gpt_events[0].digest("sha256") == hashlib.sha256(data).digest()


def _corrupt_checksum(text: str) -> str:
    return re.sub(
        r"(BOOTCHAIN-PROBE-END pcrs sha256=)(.)",
        lambda m: m.group(1) + ("1" if m.group(2) == "0" else "0"),
        text,
        count=1,
    )


def _flip_payload(text: str) -> str:
    start = text.index("BOOTCHAIN-PROBE-BEGIN eventlog")
    at = text.index("\n", start) + 5
    swapped = "B" if text[at] != "B" else "C"
    return text[:at] + swapped + text[at + 1 :]


def _drop_section(text: str) -> str:
    start = text.index("BOOTCHAIN-PROBE-BEGIN lockdown")
    end = text.index("\n", text.index("BOOTCHAIN-PROBE-END lockdown")) + 1
    return text[:start] + text[end:]


@pytest.mark.parametrize(
    ("mangle", "match"),
    [
        (_corrupt_checksum, "fails its sha256"),
        (_flip_payload, "fails its sha256|not valid base64"),
        (lambda t: t[: t.index("BOOTCHAIN-PROBE-END eventlog")], "cut off"),
        (lambda t: t.replace("BOOTCHAIN-PROBE-DONE", "XX"), "no BOOTCHAIN-PROBE-DONE"),
        (_drop_section, "sections read"),
        (lambda t: t.replace("BOOTCHAIN-PROBE-END meta", "BOOTCHAIN-PROBE-END pcrs"), "closed as"),
        (
            lambda t: t.replace("BOOTCHAIN-PROBE-BEGIN pcrs", "BOOTCHAIN-PROBE-BEGIN meta").replace(
                "BOOTCHAIN-PROBE-END pcrs", "BOOTCHAIN-PROBE-END meta"
            ),
            "appears twice",
        ),
        (lambda t: "", "no BOOTCHAIN-PROBE-DONE"),
    ],
    ids=[
        "bad-checksum",
        "flipped-payload",
        "truncated",
        "no-done",
        "dropped-section",
        "mismatched-end",
        "duplicate",
        "empty",
    ],
)
def test_probe_fails_closed(mangle: object, match: str) -> None:
    assert callable(mangle)
    with pytest.raises(BootError, match=match):
        boot.parse_probe(mangle(PROBE_LOG))


def test_probe_tolerates_kernel_lines_between_base64() -> None:
    start = PROBE_LOG.index("BOOTCHAIN-PROBE-BEGIN eventlog")
    at = PROBE_LOG.index("\n", start) + 1
    text = PROBE_LOG[:at] + "[   30.123456] random: crng init done\r\n" + PROBE_LOG[at:]
    assert boot.parse_probe(text).event_log == boot.parse_probe(PROBE_LOG).event_log


def test_probe_rejects_missing_required_section() -> None:
    text = PROBE_LOG.replace(
        "BOOTCHAIN-PROBE-BEGIN eventlog", "BOOTCHAIN-PROBE-BEGIN evlog"
    ).replace("BOOTCHAIN-PROBE-END eventlog", "BOOTCHAIN-PROBE-END evlog")
    with pytest.raises(BootError, match="missing section"):
        boot.parse_probe(text)


def test_refusal_patterns_match_recorded_refusal() -> None:
    hits = [p for p in boot.REFUSAL_PATTERNS if re.search(p, REFUSED_LOG)]
    assert hits
    first = re.search(boot.REFUSAL_PATTERNS[0], REFUSED_LOG)
    assert first is not None and first.group(0).endswith("Access Denied")
    assert not any(re.search(p, PROBE_LOG) for p in boot.REFUSAL_PATTERNS)


def test_with_accel_rewrites_machine_option() -> None:
    args = boot._with_accel(boot.DEFAULT_QEMU_ARGS, "kvm")
    assert args[1] == "q35,smm=on,accel=kvm"
    assert boot._with_accel(["-m", "1"], "tcg") == ["-m", "1", "-accel", "tcg"]
