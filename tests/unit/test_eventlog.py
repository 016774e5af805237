"""TCG event log codec against the recorded OVMF boot (tests/data/eventlog, see NOTE.md)."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import yaml

from builder.errors import InputFileError
from builder.measure import eventlog as el
from builder.measure.efi import (
    GptData,
    ImageLoadEvent,
    TaggedEvent,
    VariableData,
    device_path_text,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "eventlog"
LOG = DATA / "eventlog.bin"


@pytest.fixture(scope="module")
def raw() -> bytes:
    return LOG.read_bytes()


@pytest.fixture(scope="module")
def log(raw: bytes) -> el.EventLog:
    return el.EventLog.parse(raw)


def read_pcrs_txt() -> dict[str, dict[int, bytes]]:
    out: dict[str, dict[int, bytes]] = {}
    for line in (DATA / "pcrs.txt").read_text().splitlines():
        bank, index, value = line.split()
        out.setdefault(bank, {})[int(index)] = bytes.fromhex(value)
    return out


@pytest.fixture(scope="module")
def tpm2_eventlog() -> dict[str, object]:
    tool = shutil.which("tpm2_eventlog")
    assert tool, "tpm2_eventlog missing: install tpm2-tools"
    proc = subprocess.run([tool, str(LOG)], capture_output=True, check=True)
    parsed = yaml.safe_load(proc.stdout)
    assert isinstance(parsed, dict)
    return parsed


def test_round_trip_is_byte_identical(raw: bytes, log: el.EventLog) -> None:
    assert bytes(log) == raw


def test_banks_from_spec_id(log: el.EventLog) -> None:
    assert log.banks == ("sha1", "sha256", "sha384", "sha512")
    assert len(log.events) == 38


@pytest.mark.parametrize("bank", ["sha1", "sha256"])
def test_replay_equals_guest_pcrs_0_to_9(log: el.EventLog, bank: str) -> None:
    expected = read_pcrs_txt()[bank]
    got = el.replay(log.events, bank)
    for pcr in range(10):
        assert got.get(pcr, bytes(len(expected[pcr]))) == expected[pcr], f"{bank} PCR {pcr}"
    assert 8 not in got  # nothing extends PCR 8


def test_replay_pcr_11_12_and_never_10(log: el.EventLog) -> None:
    expected = read_pcrs_txt()["sha256"]
    got = el.replay(log.events, "sha256")
    assert got[11] == expected[11]
    assert got[12] == expected[12]
    assert 10 not in got


def test_digests_agree_with_tpm2_eventlog(
    log: el.EventLog, tpm2_eventlog: dict[str, object]
) -> None:
    events = tpm2_eventlog["events"]
    assert isinstance(events, list)
    assert len(events) == len(log.events) + 1  # tpm2_eventlog counts the header as event 0
    for ours, theirs in zip(log.events, events[1:], strict=True):
        assert ours.pcr == theirs["PCRIndex"]
        assert ours.type_name == theirs["EventType"]
        assert len(ours.data) == theirs["EventSize"]
        digests = {d["AlgorithmId"]: d["Digest"] for d in theirs["Digests"]}
        assert {el.bank_name(a): d.hex() for a, d in ours.digests} == digests


def test_replay_agrees_with_tpm2_eventlog_all_banks(
    log: el.EventLog, tpm2_eventlog: dict[str, object]
) -> None:
    pcrs = tpm2_eventlog["pcrs"]
    assert isinstance(pcrs, dict)
    for bank, values in pcrs.items():
        got = el.replay(log.events, bank)
        size = el.ALGORITHMS[el.bank_id(bank)][1]
        assert {k: v.hex() for k, v in got.items()} == {
            int(k): f"{v:0{size * 2}x}" for k, v in values.items()
        }


def test_decoded_event_data(log: el.EventLog) -> None:
    ev = log.events
    secureboot = el.decode(ev[3])
    assert isinstance(secureboot, VariableData)
    assert (secureboot.name, secureboot.data) == ("SecureBoot", b"\x01")
    assert bytes(secureboot) == ev[3].data
    app = el.decode(ev[24])
    assert isinstance(app, ImageLoadEvent)
    assert app.file_path == "\\EFI\\Linux\\test.efi"
    assert app.length == 9376104
    assert device_path_text(app.device_path) == (
        "PciRoot(0x0)/Pci(0x1,0x0)/HD(1,GPT,5b1c0000-0000-4000-8000-0000000000e5,0x800,0x23000)"
        "/\\EFI\\Linux\\test.efi"
    )
    assert bytes(app) == ev[24].data
    gpt = el.decode(ev[22])
    assert isinstance(gpt, GptData)
    assert bytes(gpt) == ev[22].data
    assert gpt.esp()[1].name == "ESP"
    tag = el.decode(ev[34])
    assert isinstance(tag, TaggedEvent)
    assert (tag.tag_id, tag.text) == (0x8F3B22ED, "LOADED_IMAGE::LoadOptions")
    assert el.decode(ev[26]) == ".linux"
    assert el.decode(ev[8]) == 0
    assert el.describe(ev[24]) == "EV_EFI_BOOT_SERVICES_APPLICATION \\EFI\\Linux\\test.efi"
    assert el.describe(ev[36]) == "EV_EFI_ACTION Exit Boot Services Invocation"


def test_event_digests_are_hashes_of_their_data(log: el.EventLog) -> None:
    """Where the firmware hashes the event data itself, make_event reproduces the event."""
    for n in (3, 4, 5, 6, 7, 8, 13, 21, 22, 36, 37):
        e = log.events[n]
        assert el.make_event(e.pcr, e.event_type, e.data, log.banks) == e, n


def test_cel_json_round_trip(log: el.EventLog) -> None:
    cel = el.to_cel(log.events)
    assert cel[0]["content"]["event_type"] == "EV_S_CRTM_VERSION"
    assert cel[0]["digests"][1]["hashAlg"] == "sha256"
    back = el.from_cel(json.loads(json.dumps(cel)))
    assert back == log.events
    rebuilt = el.EventLog.build(back, log.banks)
    assert el.EventLog.parse(bytes(rebuilt)).events == log.events


def test_table_lists_every_event(log: el.EventLog) -> None:
    table = el.render_table(log.events)
    assert len(table.splitlines()) == len(log.events) + 1
    assert "\\EFI\\BOOT\\BOOTX64.EFI" in table


def test_padding_round_trips(raw: bytes) -> None:
    padded = raw + bytes(64)
    assert bytes(el.EventLog.parse(padded)) == padded


def test_startup_locality_sets_pcr0_start() -> None:
    loc = el.Event(0, el.EV_NO_ACTION, ((0xB, bytes(32)),), b"StartupLocality\0\x03")
    sep = el.make_event(0, el.EV_SEPARATOR, bytes(4), ["sha256"])
    start = bytes(31) + b"\x03"
    digest = sep.digest("sha256")
    assert digest is not None
    assert el.replay([loc, sep], "sha256")[0] == hashlib.sha256(start + digest).digest()


def _first_event_offset(raw: bytes) -> int:
    return 32 + struct.unpack_from("<I", raw, 28)[0]


@pytest.mark.parametrize(
    ("name", "mutate", "message"),
    [
        ("empty", lambda b: b"", "offset 0"),
        ("truncated_mid_event", lambda b: b[:-7], "declares"),
        ("truncated_header", lambda b: b[:40], "offset"),
        (
            "huge_digest_count",
            lambda b: (
                b[: _first_event_offset(b) + 8]
                + struct.pack("<I", 0xFFFFFFFF)
                + b[_first_event_offset(b) + 12 :]
            ),
            "digests",
        ),
        (
            "unknown_algorithm",
            lambda b: (
                b[: _first_event_offset(b) + 12]
                + struct.pack("<H", 0x1234)
                + b[_first_event_offset(b) + 14 :]
            ),
            "algorithm 0x1234",
        ),
        (
            "lying_event_size",
            lambda b: (
                b[: _first_event_offset(b) + 12 + 4 * 2 + 20 + 32 + 48 + 64]
                + struct.pack("<I", 0x7FFFFFFF)
                + b[_first_event_offset(b) + 12 + 8 + 164 + 4 :]
            ),
            "declares 2147483647",
        ),
        ("not_tcg2", lambda b: b[:4] + struct.pack("<I", 8) + b[8:], "not EV_NO_ACTION"),
        ("bad_spec_signature", lambda b: b[:32] + b"Spec ID Event02\0" + b[48:], "signature"),
        (
            "spec_id_lies_about_sha256_size",
            lambda b: b[: 32 + 34] + struct.pack("<H", 20) + b[32 + 36 :],
            "sha256 declared with digest size 20",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_hostile_input_is_a_clear_error(
    raw: bytes, name: str, mutate: object, message: str
) -> None:
    assert callable(mutate)
    with pytest.raises(InputFileError, match=message) as info:
        el.EventLog.parse(mutate(raw), source="bad.bin")
    assert "offset" in str(info.value)
    assert str(info.value).startswith("bad.bin")


def test_cli_replay_and_show(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from builder.cli import main

    assert main(["eventlog", "replay", str(LOG), "--bank", "sha256"]) == 0
    out = capsys.readouterr().out.splitlines()
    txt = (DATA / "pcrs.txt").read_text().splitlines()
    for pcr in (0, 1, 2, 3, 4, 5, 6, 7, 9, 11, 12):
        assert f"sha256 {pcr} {read_pcrs_txt()['sha256'][pcr].hex().upper()}" in out
    assert not any(line.startswith("sha256 10 ") for line in out)
    assert len(txt) == 26
    assert main(["eventlog", "show", str(LOG), "--cel"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert el.from_cel(records) == el.EventLog.parse(LOG.read_bytes()).events
    bad = tmp_path / "bad.bin"
    bad.write_bytes(LOG.read_bytes()[:100])
    assert main(["eventlog", "show", str(bad)]) == 2
    assert f"{bad}: " in capsys.readouterr().err


def test_cli_platform_capture(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from builder.cli import main
    from builder.measure.platform import load_platform

    out = tmp_path / "p.yaml"
    args = ["platform", "capture", "--from-eventlog", str(LOG), "mine", "--output", str(out)]
    args += ["--machine-from", "ovmf-2022.11-q35-secboot", "--firmware", "OVMF x"]
    assert main(args) == 0
    mine = load_platform(str(out))
    shipped = load_platform("ovmf-2022.11-q35-secboot")
    assert (mine.log, mine.machine, mine.chain) == (shipped.log, shipped.machine, shipped.chain)
    assert mine.identity == {"firmware": "OVMF x", "secure_boot": True}
    assert mine.digest != shipped.digest


def test_bug_an_event_with_two_digests_of_one_bank_was_accepted() -> None:
    # Event.digest() and replay() took the first, another tool may take the last: refuse.
    sep = el.make_event(4, el.EV_SEPARATOR, bytes(4), ["sha1", "sha256"])
    good = bytes(el.EventLog.build([sep], ["sha1", "sha256"]))
    twice = good[: len(good) - len(bytes(sep))] + (
        struct.pack("<III", 4, el.EV_SEPARATOR, 2)
        + struct.pack("<H", 0xB) + hashlib.sha256(bytes(4)).digest()
        + struct.pack("<H", 0xB) + bytes(32)
        + struct.pack("<I", 4) + bytes(4)
    )  # fmt: skip
    assert el.EventLog.parse(good).events == (sep,)
    with pytest.raises(InputFileError, match=r"bad.bin: event at offset \d+ has two sha256"):
        el.EventLog.parse(twice, source="bad.bin")
