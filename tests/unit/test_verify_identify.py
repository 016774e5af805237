"""`bootchain verify` and `bootchain identify` on a REAL boot of the default build.

tests/data/eventlog/realboot-debian-minimal/ holds the default build's predicted
measurements.json and the firmware log and TPM PCRs of a real QEMU+OVMF+swtpm boot of that
build (recorded by the measure engineer; see tests/data/eventlog/README.md). We publish a
release whose manifest carries that prediction, fetch it, and verify the real log against it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from builder import cli
from builder.dsse import load_trust
from builder.errors import InputFileError
from builder.publish import publish
from builder.store.fetch import RollbackState, fetch
from builder.store.local import LocalStore
from tests.fake_outdir import make_outdir, make_release_key

DATA = Path(__file__).resolve().parents[1] / "data" / "eventlog" / "realboot-debian-minimal"
LOG = DATA / "eventlog.bin"
PCRS = DATA / "pcrs.txt"
NAME = "debian-minimal"


def _reference() -> tuple[dict[str, Any], dict[str, str]]:
    """The build's predicted measurements.json and its PE Authenticode sha256 digests."""
    measurements = json.loads((DATA / "measurements.json").read_text())
    arts = measurements["artifacts"]
    auth = {
        "BOOTX64.EFI": arts["BOOTX64.EFI"]["authenticode_sha256"],
        "uki": arts[f"{NAME}-1.0.0.efi"]["authenticode_sha256"],
    }
    return measurements, auth


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
    assert {r["bank"] for r in doc["rows"]} == {"sha1", "sha256", "sha384"}


def test_verify_names_the_changed_event(published, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    bad, digest = _tampered_log(tmp_path)
    assert cli.main(_verify(published, bad, "--json")) == 4
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False
    first = doc["mismatches"][0]
    assert first["pcr"] == 4 and first["event_type"] == "EV_EFI_BOOT_SERVICES_APPLICATION"
    assert first["bank"] == "sha256" and first["index"] == 3
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


@pytest.mark.parametrize(
    "text",
    ["sha256 7 " + "00" * 32 + "\nsha256 7 " + "11" * 32 + "\n",
     '{"sha256": {"7": "' + "00" * 32 + '", "07": "' + "11" * 32 + '"}}'],
    ids=["text", "json"],
)  # fmt: skip
def test_bug_a_pcr_given_twice_in_the_pcr_file_silently_took_the_last(text: str) -> None:
    from builder.commands.verify import parse_pcrs

    with pytest.raises(InputFileError, match=r"pcrs.txt: sha256 PCR 7 is given twice"):
        parse_pcrs(text.encode(), "pcrs.txt")


def test_bug_a_pcr_file_bank_that_is_not_an_object_was_skipped() -> None:
    from builder.commands.verify import parse_pcrs

    with pytest.raises(InputFileError, match=r"pcrs.json: bank 'sha256' is not an object"):
        parse_pcrs(b'{"sha256": ["00"]}', "pcrs.json")
