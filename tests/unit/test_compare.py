"""The verdict: a measurements.json (here predicted from the vector's own events) against
the real OVMF log, and against deliberately broken logs, banks and TPM readings."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from builder.errors import InputFileError, VerificationError
from builder.measure import eventlog as el
from builder.measure import predict as pr
from builder.measure.chain import load_chain
from builder.measure.compare import compare, require_match
from builder.measure.platform import load_platform

DATA = Path(__file__).resolve().parents[1] / "data" / "eventlog"


@pytest.fixture(scope="module")
def log() -> el.EventLog:
    return el.EventLog.parse((DATA / "eventlog.bin").read_bytes())


@pytest.fixture(scope="module")
def expected(log: el.EventLog) -> dict[str, Any]:
    """measurements.json for the vector's own build (inputs decoded from its log)."""
    from tests.unit.test_predict import vector_inputs

    platform = load_platform("ovmf-2022.11-q35-secboot")
    m = pr.make_measurements(platform, load_chain(platform.chain), vector_inputs(log))
    doc: dict[str, Any] = json.loads(json.dumps(m.to_json()))
    return doc


def guest_pcrs() -> dict[str, dict[int, bytes]]:
    out: dict[str, dict[int, bytes]] = {}
    for line in (DATA / "pcrs.txt").read_text().splitlines():
        bank, index, value = line.split()
        out.setdefault(bank, {})[int(index)] = bytes.fromhex(value)
    return out


def with_events(log: el.EventLog, events: list[el.Event]) -> el.EventLog:
    return dataclasses.replace(log, events=tuple(events))


def test_real_boot_matches(log: el.EventLog, expected: dict[str, Any]) -> None:
    verdict = compare(expected, log)
    assert verdict.ok, verdict.render_table()
    assert len(verdict.rows) == 3 * 12
    require_match(verdict)
    assert verdict.to_json()["ok"] is True
    assert "MATCH" in verdict.render_table()


def test_real_boot_matches_with_tpm_pcrs(log: el.EventLog, expected: dict[str, Any]) -> None:
    tpm = guest_pcrs()
    tpm["sha384"] = {
        n: v for n, v in el.replay(log.events, "sha384").items() if n in pr.PREDICTED_PCRS
    }
    tpm["sha384"][8] = bytes(48)
    # pcrs.txt has sha1 for PCR 0-9 only; take 11 and 12 from the log.
    tpm["sha1"].update({n: el.replay(log.events, "sha1")[n] for n in (11, 12)})
    verdict = compare(expected, log, tpm)
    assert verdict.ok, verdict.render_table()


def test_tpm_disagreeing_with_log_fails(log: el.EventLog, expected: dict[str, Any]) -> None:
    tpm = {b: dict(el.replay(log.events, b)) for b in ("sha1", "sha256", "sha384")}
    for b in tpm:
        tpm[b][8] = bytes(len(tpm[b][0]))
    tpm["sha256"][0] = bytes(32)
    verdict = compare(expected, log, tpm)
    assert not verdict.ok
    kinds = {(m.pcr, m.bank, m.kind) for m in verdict.mismatches}
    assert (0, "sha256", "tpm disagrees") in kinds


def test_changed_image_names_first_differing_event(
    log: el.EventLog, expected: dict[str, Any]
) -> None:
    events = list(log.events)
    n = next(
        i
        for i, e in enumerate(events)
        if e.event_type == el.EV_EFI_BOOT_SERVICES_APPLICATION and b"L\x00i\x00n" in e.data
    )
    events[n] = dataclasses.replace(
        events[n], digests=tuple((a, bytes(len(d))) for a, d in events[n].digests)
    )
    verdict = compare(expected, with_events(log, events))
    assert not verdict.ok
    first = verdict.mismatches[0]
    assert (first.pcr, first.kind, first.index) == (4, "digest", 3)
    assert (
        first.description == "PCR 4 event 3 EV_EFI_BOOT_SERVICES_APPLICATION \\EFI\\Linux\\test.efi"
    )
    assert {m.pcr for m in verdict.mismatches} == {4}
    with pytest.raises(VerificationError, match=r"PCR 4 event 3 .*test\.efi"):
        require_match(verdict)


def test_missing_and_extra_events(log: el.EventLog, expected: dict[str, Any]) -> None:
    dropped = [
        e
        for e in log.events
        if not (e.pcr == 9 and e.event_type == el.EV_EVENT_TAG and b"initrd" in e.data)
    ]
    verdict = compare(expected, with_events(log, dropped))
    kinds = {(m.pcr, m.kind, m.index) for m in verdict.mismatches}
    assert kinds == {(9, "missing event", 1)}
    extra = [*log.events, el.make_event(8, el.EV_IPL, b"grub", ["sha1", "sha256", "sha384"])]
    verdict = compare(expected, with_events(log, extra))
    assert {(m.pcr, m.kind) for m in verdict.mismatches} == {(8, "extra event")}


def test_pcr_absent_from_log_fails(log: el.EventLog, expected: dict[str, Any]) -> None:
    without_12 = [e for e in log.events if e.pcr != 12]
    verdict = compare(expected, with_events(log, without_12))
    assert not verdict.ok
    assert {(m.pcr, m.kind) for m in verdict.mismatches} == {(12, "missing event")}


def test_missing_bank_fails(log: el.EventLog, expected: dict[str, Any]) -> None:
    only = el.EventLog.build(
        [dataclasses.replace(e, digests=e.digests[1:2]) for e in log.events], ["sha256"]
    )
    verdict = compare(expected, only)
    assert not verdict.ok
    assert {m.bank for m in verdict.mismatches} == {"sha1", "sha384"}
    assert all(m.kind == "bank missing" for m in verdict.mismatches)


def test_wrong_expected_value_is_reported(log: el.EventLog, expected: dict[str, Any]) -> None:
    broken = json.loads(json.dumps(expected))
    broken["pcrs"]["sha256"]["7"] = "00" * 32
    verdict = compare(broken, log)
    assert [(m.pcr, m.bank, m.kind) for m in verdict.mismatches] == [
        (7, "sha256", "value"),
        (7, "sha256", "inconsistent"),
    ]


def test_edited_expected_event_fails_even_with_matching_pcrs(
    log: el.EventLog, expected: dict[str, Any]
) -> None:
    """Regression: an edited event digest in measurements.json, PCR values left alone, used to
    pass because events were only compared when a PCR value differed."""
    broken = json.loads(json.dumps(expected))
    event = next(e for e in broken["events"] if e["pcr"] == 4 and "BOOT_SERVICES" in str(e))
    for digest in event["digests"]:
        digest["digest"] = "ff" * (len(digest["digest"]) // 2)
    verdict = compare(broken, log)
    assert not verdict.ok
    kinds = {(m.pcr, m.kind) for m in verdict.mismatches}
    assert (4, "digest") in kinds
    assert (4, "inconsistent") in kinds


@pytest.mark.parametrize(
    "doc",
    [{}, {"pcrs": {}}, {"pcrs": {"sha256": {"0": "zz"}}}, {"pcrs": {"sha256": {"0": "00"}}}],
    ids=["empty", "no-pcrs", "not-hex", "wrong-size"],
)
def test_malformed_expected_is_input_error(log: el.EventLog, doc: dict[str, Any]) -> None:
    with pytest.raises(InputFileError):
        compare(doc, log)


@pytest.mark.parametrize("name", ["realboot-debian-minimal", "realboot-sboff"])
def test_recorded_prediction_matches_recorded_real_boot(name: str) -> None:
    """A build's prediction against the real boot of that build (see NOTE.md)."""
    realboot = DATA / name
    expected = json.loads((realboot / "measurements.json").read_text())
    real = el.EventLog.parse((realboot / "eventlog.bin").read_bytes())
    tpm: dict[str, dict[int, bytes]] = {}
    for line in (realboot / "pcrs.txt").read_text().splitlines():
        bank, index, value = line.split()
        tpm.setdefault(bank, {})[int(index)] = bytes.fromhex(value)
    verdict = compare(expected, real, tpm)
    assert verdict.ok, verdict.render_table()
    assert {r.bank for r in verdict.rows} == {"sha1", "sha256", "sha384"}
    predicted = el.from_cel(expected["events"])
    assert len(predicted) == len(real.events)
    for ours, theirs in zip(predicted, real.events, strict=True):
        assert (ours.pcr, ours.event_type) == (theirs.pcr, theirs.event_type)
        if ours.event_type == el.EV_EFI_BOOT_SERVICES_APPLICATION:
            assert ours.data[8:] == theirs.data[8:]  # all but ImageLocationInMemory
        else:
            assert ours.data == theirs.data


def test_bug_a_listed_bank_with_no_pcrs_was_skipped_silently(
    log: el.EventLog, expected: dict[str, Any]
) -> None:
    doc = json.loads(json.dumps(expected))
    doc["pcrs"]["sha256"] = {}  # sha256 named in "banks" but judged on nothing
    assert "sha256" in doc["banks"]
    with pytest.raises(InputFileError, match="bank sha256 lists no PCR values"):
        compare(doc, log)


def test_bug_a_pcr_listed_twice_under_two_spellings_was_overridden(
    log: el.EventLog, expected: dict[str, Any]
) -> None:
    doc = json.loads(json.dumps(expected))
    doc["pcrs"]["sha256"]["04"] = "00" * 32
    with pytest.raises(InputFileError, match="key '04' is not one PCR"):
        compare(doc, log)
