"""`bootchain verify` and `bootchain identify` on a REAL firmware event log.

The log and the PCR values the guest read from the TPM are the recorded boot in
tests/data/eventlog/ (see its README: OVMF 2022.11 Secure Boot, systemd-boot 252 + UKI). The
published manifest's reference is that boot's own log (as CEL-JSON) with the TPM's PCRs, so a
pass needs our codec, the comparison engine and the signed manifest to agree with the TPM.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from builder import cli
from builder.dsse import load_trust
from builder.measure.eventlog import EV_EFI_BOOT_SERVICES_APPLICATION, EventLog, to_cel
from builder.publish import publish
from builder.store.fetch import RollbackState, fetch
from builder.store.local import LocalStore
from tests.fake_outdir import PLATFORM, make_outdir, make_release_key

DATA = Path(__file__).resolve().parents[1] / "data" / "eventlog"
LOG = DATA / "eventlog.bin"
PCRS = DATA / "pcrs.txt"
NAME = "debian-minimal"


def _reference() -> tuple[dict[str, Any], dict[str, str]]:
    log = EventLog.parse(LOG.read_bytes())
    pcrs: dict[str, dict[str, str]] = {}
    for line in PCRS.read_text().splitlines():
        bank, index, value = line.split()
        if bank == "sha256" and int(index) in (*range(10), 11, 12):
            pcrs.setdefault(bank, {})[index] = value.lower()
    apps = [
        e.digest("sha256").hex()  # type: ignore[union-attr]
        for e in log.events
        if e.pcr == 4 and e.event_type == EV_EFI_BOOT_SERVICES_APPLICATION
    ]
    assert len(apps) == 2  # systemd-boot, then the UKI
    measurements = {
        "schema": "bootchain.measurements/v1",
        "platform": {"name": PLATFORM, "digest": "00" * 32},
        "chain": "systemd252-linux61-secureboot",
        "banks": ["sha256"],
        "pcrs": pcrs,
        "events": to_cel(log.events),
        "artifacts": {},
    }
    return measurements, {"BOOTX64.EFI": apps[0], "uki": apps[1]}


@pytest.fixture
def published(tmp_path: Path) -> dict[str, Path]:
    measurements, auth = _reference()
    key, trust = make_release_key(tmp_path / "keys")
    store = tmp_path / "store"
    out = make_outdir(tmp_path / "out", measurements=measurements, authenticode=auth)
    publish(out, LocalStore(store), key, "stable")
    got = fetch(LocalStore(store), NAME, "stable", load_trust(trust), tmp_path / "got",
                state=RollbackState(tmp_path / "state"))  # fmt: skip
    return {"manifest": got.manifest_path, "trust": trust, "store": store}


def _tampered_log(tmp_path: Path) -> tuple[Path, str]:
    """The log with the UKI's PCR 4 digest changed in one byte; returns (path, old digest)."""
    _, auth = _reference()
    data = bytearray(LOG.read_bytes())
    at = data.find(bytes.fromhex(auth["uki"]))
    assert at > 0 and data.find(bytes.fromhex(auth["uki"]), at + 1) == -1
    data[at] ^= 0x01
    bad = tmp_path / "tampered.bin"
    bad.write_bytes(bytes(data))
    return bad, auth["uki"]


def _verify(p: dict[str, Path], log: Path, *extra: str) -> list[str]:
    return ["verify", "--manifest", str(p["manifest"]), "--trust", str(p["trust"]),
            "--eventlog", str(log), *extra]  # fmt: skip


def test_verify_passes_on_the_real_boot(published, capsys) -> None:  # type: ignore[no-untyped-def]
    assert cli.main(_verify(published, LOG, "--pcrs", str(PCRS))) == 0
    out = capsys.readouterr().out
    assert "verdict: MATCH" in out


def test_verify_json_passes_on_the_real_boot(published, capsys) -> None:  # type: ignore[no-untyped-def]
    assert cli.main(_verify(published, LOG, "--json")) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is True and doc["release"] == {"name": NAME, "version": "1.0.0"}
    assert {r["pcr"] for r in doc["rows"]} >= {0, 4, 7, 11}


def test_verify_names_the_changed_event(published, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    bad, digest = _tampered_log(tmp_path)
    assert cli.main(_verify(published, bad, "--json")) == 4
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False
    first = doc["mismatches"][0]
    assert first["pcr"] == 4 and first["event_type"] == "EV_EFI_BOOT_SERVICES_APPLICATION"
    assert first["expected"] == digest and first["actual"] != digest
    assert cli.main(_verify(published, bad)) == 4
    table = capsys.readouterr().out
    assert "EV_EFI_BOOT_SERVICES_APPLICATION" in table and "PCR 4" in table


def test_verify_with_the_real_log_but_other_tpm_values_fails(published, tmp_path) -> None:  # type: ignore[no-untyped-def]
    pcrs = PCRS.read_text().replace("sha256 0 756C", "sha256 0 756D")
    (tmp_path / "pcrs.txt").write_text(pcrs)
    assert cli.main(_verify(published, LOG, "--pcrs", str(tmp_path / "pcrs.txt"))) == 4


def test_verify_refuses_an_untrusted_manifest(published, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    _, other = make_release_key(tmp_path / "other")
    argv = _verify(published, LOG)
    argv[argv.index("--trust") + 1] = str(other)
    assert cli.main(argv) == 4
    assert "not signed by a trusted key" in capsys.readouterr().err


def test_identify_names_the_release_that_booted(published, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    argv = ["identify", "--store", str(published["store"]), "--trust", str(published["trust"])]
    assert cli.main([*argv, "--eventlog", str(LOG)]) == 0
    out = capsys.readouterr().out
    assert "debian-minimal 1.0.0 (BOOTX64.EFI)" in out
    assert "debian-minimal 1.0.0 (debian-minimal-1.0.0.efi)" in out
    bad, _ = _tampered_log(tmp_path)
    assert cli.main([*argv, "--eventlog", str(bad), "--json"]) == 4
    doc = json.loads(capsys.readouterr().out)
    assert [len(d["releases"]) for d in doc] == [1, 0]
