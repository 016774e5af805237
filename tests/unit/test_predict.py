"""The predictor's event constructors and walk, checked against the real OVMF boot.

The vector's log carries the event DATA of every image-dependent event; we rebuild those
events from their decoded contents (and, where a digest covers bytes not in the log, such
as an image's Authenticode hash or a section's contents, from the log's own digests) and
require the predicted log to equal the real one event by event, byte for byte (except
ImageLocationInMemory, an allocation address in no digest), and every PCR in every bank.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from builder.errors import InputFileError
from builder.measure import eventlog as el
from builder.measure import predict as pr
from builder.measure.chain import load_chain, parse_chain
from builder.measure.efi import GptData, ImageLoadEvent, TaggedEvent, VariableData
from builder.measure.platform import capture_platform, load_platform, parse_platform

DATA = Path(__file__).resolve().parents[1] / "data" / "eventlog"
CMDLINE = "console=ttyS0,115200 loglevel=6 panic=-1"
BANKS = ("sha1", "sha256", "sha384", "sha512")


@pytest.fixture(scope="module")
def log() -> el.EventLog:
    return el.EventLog.parse((DATA / "eventlog.bin").read_bytes())


def by_type(log: el.EventLog, pcr: int, event_type: int) -> list[el.Event]:
    return [e for e in log.events if e.pcr == pcr and e.event_type == event_type]


def digests(event: el.Event) -> dict[str, bytes]:
    return {el.bank_name(a): d for a, d in event.digests}


def vector_inputs(log: el.EventLog) -> pr.ChainInputs:
    """ChainInputs from the vector's decoded event data (+ digests of bytes not in the log)."""
    variables = {}
    for e in by_type(log, 7, el.EV_EFI_VARIABLE_DRIVER_CONFIG):
        var = VariableData.parse(e.data)
        variables[var.name] = (var.guid, var.data)
    auth = VariableData.parse(by_type(log, 7, el.EV_EFI_VARIABLE_AUTHORITY)[0].data)
    apps = by_type(log, 4, el.EV_EFI_BOOT_SERVICES_APPLICATION)
    loads = [ImageLoadEvent.parse(a.data) for a in apps]
    pcr11 = by_type(log, 11, el.EV_IPL)
    sections = {el.decode(pcr11[i]): digests(pcr11[i + 1]) for i in range(0, len(pcr11), 2)}
    return pr.ChainInputs(
        bootloader=pr.ImageInput(digests(apps[0]), loads[0].length),
        uki=pr.ImageInput(digests(apps[1]), loads[1].length, "\\EFI\\Linux\\test.efi"),
        section_digests=sections,  # type: ignore[arg-type]
        uki_cmdline=CMDLINE,
        loader_cmdline=None,
        gpt_event_data=by_type(log, 5, el.EV_EFI_GPT_EVENT)[0].data,
        secureboot_variables=variables,
        authority=(auth.data[:16], auth.data[16:]),
    )


def zero_location(event: el.Event) -> el.Event:
    if event.event_type != el.EV_EFI_BOOT_SERVICES_APPLICATION:
        return event
    load = ImageLoadEvent.parse(event.data)
    return dataclasses.replace(event, data=bytes(dataclasses.replace(load, location=0)))


def test_predicted_log_equals_the_real_boot(log: el.EventLog) -> None:
    platform = load_platform("ovmf-2022.11-q35-secboot")
    chain = load_chain(platform.chain)
    events = pr.predict_events(platform, chain, vector_inputs(log), BANKS)
    real = [zero_location(e) for e in log.events]
    assert len(events) == len(real)
    for n, (ours, theirs) in enumerate(zip(events, real, strict=True)):
        assert ours == theirs, f"event {n}: {el.describe(ours)} != {el.describe(theirs)}"


def test_predicted_pcrs_equal_guest_pcrs(log: el.EventLog) -> None:
    platform = load_platform("ovmf-2022.11-q35-secboot")
    m = pr.make_measurements(platform, load_chain(platform.chain), vector_inputs(log))
    assert m.banks == ("sha1", "sha256", "sha384")
    guest: dict[str, dict[int, str]] = {}
    for line in (DATA / "pcrs.txt").read_text().splitlines():
        bank, index, value = line.split()
        guest.setdefault(bank, {})[int(index)] = value.lower()
    for bank in ("sha1", "sha256"):
        for pcr, value in m.pcrs[bank].items():
            if pcr in guest[bank]:
                assert value.hex() == guest[bank][pcr], f"{bank} PCR {pcr}"
    assert set(m.pcrs["sha384"]) == set(pr.PREDICTED_PCRS)
    assert m.pcrs["sha384"] == {
        n: el.replay(log.events, "sha384").get(n, bytes(48)) for n in pr.PREDICTED_PCRS
    }
    doc = json.loads(json.dumps(m.to_json()))
    assert doc["schema"] == "bootchain.measurements/v1"
    assert doc["platform"]["name"] == "ovmf-2022.11-q35-secboot"
    assert len(doc["platform"]["digest"]) == 64
    assert el.from_cel(doc["events"]) == m.events


def test_pcr7_variable_events_from_decoded_data(log: el.EventLog) -> None:
    real = by_type(log, 7, el.EV_EFI_VARIABLE_DRIVER_CONFIG)
    variables = {}
    for e in real:
        var = VariableData.parse(e.data)
        variables[var.name] = (var.guid, var.data)
    assert pr.secureboot_variable_events(variables, BANKS) == real


def test_authority_event_from_owner_and_cert(log: el.EventLog) -> None:
    real = by_type(log, 7, el.EV_EFI_VARIABLE_AUTHORITY)[0]
    data = VariableData.parse(real.data).data
    assert data[:16] == bytes.fromhex("00eeffc01c5b554e9a1e000000000001")
    assert pr.authority_event(data[:16], data[16:], BANKS) == real


def test_gpt_event_and_esp_device_paths(log: el.EventLog) -> None:
    gpt = by_type(log, 5, el.EV_EFI_GPT_EVENT)[0]
    assert pr.gpt_event(gpt.data, BANKS) == gpt
    prefix = load_platform("ovmf-2022.11-q35-secboot").boot_device_path
    apps = by_type(log, 4, el.EV_EFI_BOOT_SERVICES_APPLICATION)
    for app, path in zip(apps, ["\\EFI\\BOOT\\BOOTX64.EFI", "\\EFI\\Linux\\test.efi"], strict=True):
        load = ImageLoadEvent.parse(app.data)
        assert pr.esp_device_path(prefix, gpt.data, path) == load.device_path
        assert pr.image_event(digests(app), load.length, load.device_path) == zero_location(app)


def test_command_line_events_pcr12_and_pcr9(log: el.EventLog) -> None:
    pcr12 = by_type(log, 12, el.EV_IPL)[0]
    assert pr.cmdline_event(CMDLINE, BANKS) == pcr12
    load_options, initrd = by_type(log, 9, el.EV_EVENT_TAG)
    tag = pr.tagged_event(
        0x8F3B22ED,
        "LOADED_IMAGE::LoadOptions",
        pr.digests_of((CMDLINE + "\0").encode("utf-16-le"), BANKS),
    )
    assert tag == load_options
    assert TaggedEvent.parse(initrd.data).text == "Linux initrd"
    # The kernel measures the very bytes systemd-stub measured as .initrd.
    pcr11 = by_type(log, 11, el.EV_IPL)
    assert digests(initrd) == digests(pcr11[7])


def test_pcr11_name_events(log: el.EventLog) -> None:
    pcr11 = by_type(log, 11, el.EV_IPL)
    names = [el.decode(e) for e in pcr11[::2]]
    assert names == [".linux", ".osrel", ".cmdline", ".initrd"]
    fake = {n: {b: bytes(el.ALGORITHMS[el.bank_id(b)][1]) for b in BANKS} for n in names}
    ours = pr.section_events([".linux", ".osrel", ".cmdline", ".initrd", ".splash"], fake, BANKS)
    assert ours[::2] == pcr11[::2]


def test_loader_cmdline_chomps_one_newline() -> None:
    assert pr.loader_cmdline_for("a b\n") == "a b"
    assert pr.cmdline_text(b"quiet\0junk") == "quiet"


def test_changing_the_cmdline_moves_only_9_11_12(log: el.EventLog) -> None:
    platform = load_platform("ovmf-2022.11-q35-secboot")
    chain = load_chain(platform.chain)
    base = vector_inputs(log)
    other_sections = dict(base.section_digests)
    other_sections[".cmdline"] = pr.digests_of(b"quiet", BANKS)
    changed = dataclasses.replace(base, uki_cmdline="quiet", section_digests=other_sections)
    a = pr.make_measurements(platform, chain, base).pcrs["sha256"]
    b = pr.make_measurements(platform, chain, changed).pcrs["sha256"]
    assert {n for n in a if a[n] != b[n]} == {9, 11, 12}


def test_capture_round_trips_and_keeps_image_events_out(log: el.EventLog) -> None:
    platform = capture_platform(log, "x", identity={"firmware": "f"})
    again = parse_platform(platform.to_yaml(), "x.yaml")
    assert again == platform
    kept = {e.event_type for e in platform.events}
    assert el.EV_EFI_BOOT_SERVICES_APPLICATION not in kept
    assert el.EV_EFI_GPT_EVENT not in kept
    assert all(e.pcr < 8 for e in platform.events)
    assert sorted(e.pcr for e in platform.events if e.event_type == el.EV_SEPARATOR) == list(
        range(8)
    )
    shipped = load_platform("ovmf-2022.11-q35-secboot")
    assert platform.log == shipped.log
    assert platform.boot_device_path == shipped.boot_device_path
    assert shipped.machine is not None
    assert shipped.machine.firmware_code == "usr/share/OVMF/OVMF_CODE_4M.secboot.fd"
    assert shipped.identity["secure_boot"] is True


def test_bank_the_platform_lacks_is_refused(log: el.EventLog) -> None:
    platform = dataclasses.replace(load_platform("ovmf-2022.11-q35-secboot"), banks=("sha256",))
    with pytest.raises(InputFileError, match="sha1"):
        pr.predict_events(platform, load_chain(platform.chain), vector_inputs(log), ["sha1"])


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ("schema: other\n", "not a bootchain.chain/v1"),
        ("schema: bootchain.chain/v1\nname: x\nsecure_boot: true\nsteps: []\n", "non-empty"),
        (
            "schema: bootchain.chain/v1\nname: x\nsecure_boot: true\n"
            "steps: [{kind: nope, pcr: 4, event_type: EV_IPL}]\n",
            "unknown kind",
        ),
        (
            "schema: bootchain.chain/v1\nname: x\nsecure_boot: true\n"
            "steps: [{kind: image, pcr: 4, event_type: EV_IPL}]\n",
            "needs 'image'",
        ),
    ],
    ids=["schema", "empty", "kind", "image"],
)
def test_bad_chain_profiles(doc: str, message: str) -> None:
    with pytest.raises(InputFileError, match=message):
        parse_chain(doc.encode(), "c.yaml")


def test_gpt_data_roundtrip(log: el.EventLog) -> None:
    gpt = by_type(log, 5, el.EV_EFI_GPT_EVENT)[0].data
    assert bytes(GptData.parse(gpt)) == gpt


@pytest.mark.parametrize(
    "names",
    [
        (".linux", ".osrel", ".cmdline", ".initrd"),
        (".linux", ".cmdline"),
        (".pcrpkey", ".dtb", ".splash", ".initrd", ".cmdline", ".osrel", ".linux"),
    ],
    ids=["default", "minimal", "all-reversed"],
)
def test_pcr11_equals_systemd_measure(tmp_path: Path, names: tuple[str, ...]) -> None:
    """Oracle: systemd-measure 252 ``calculate --phase=`` (the value right after the stub)."""
    import shutil
    import subprocess

    tool = shutil.which("systemd-measure") or "/usr/lib/systemd/systemd-measure"
    assert Path(tool).exists(), "systemd-measure missing: install systemd"
    contents = {n: (n * 3 + "\n").encode() + bytes(range(256)) * (len(n)) for n in names}
    argv = [tool, "calculate", "--phase=", "--json=short"]
    for name, data in contents.items():
        (tmp_path / name[1:]).write_bytes(data)
        argv.append(f"--{name[1:]}={tmp_path / name[1:]}")
    banks = ["sha1", "sha256", "sha384"]
    argv += [f"--bank={b}" for b in banks]
    oracle = json.loads(subprocess.run(argv, capture_output=True, check=True).stdout)
    order = next(s for s in load_chain("systemd252-linux61-secureboot").steps if s.pcr == 11)
    digests_by_name = {n: pr.digests_of(d, banks) for n, d in contents.items()}
    events = pr.section_events(order.option("order"), digests_by_name, banks)
    for bank in banks:
        assert el.replay(events, bank)[11].hex() == oracle[bank][0]["hash"], bank


def test_changing_the_db_key_moves_only_pcr7(log: el.EventLog) -> None:
    """Authenticode digests exclude the signature: re-signing leaves PCR 4 (real boots agree)."""
    platform = load_platform("ovmf-2022.11-q35-secboot")
    chain = load_chain(platform.chain)
    base = vector_inputs(log)
    variables = dict(base.secureboot_variables)
    guid, _ = variables["db"]
    variables["db"] = (guid, b"another db")
    assert base.authority is not None
    changed = dataclasses.replace(
        base, secureboot_variables=variables, authority=(base.authority[0], b"another cert")
    )
    a = pr.make_measurements(platform, chain, base).pcrs["sha256"]
    b = pr.make_measurements(platform, chain, changed).pcrs["sha256"]
    assert {n for n in a if a[n] != b[n]} == {7}


def test_insecure_platform_is_the_capture_of_the_sboff_boot() -> None:
    real = el.EventLog.parse((DATA / "realboot-sboff" / "eventlog.bin").read_bytes())
    shipped = load_platform("ovmf-2022.11-q35-insecure")
    captured = capture_platform(real, shipped.name)
    assert captured.log == shipped.log
    assert shipped.chain == "systemd252-linux61-insecure"
    assert shipped.identity["secure_boot"] is False
    assert load_chain(shipped.chain).secure_boot is False


def test_insecure_chain_rebuilds_the_sboff_boot() -> None:
    """Chain events rebuilt from the Secure-Boot-off boot's own decoded data."""
    real = el.EventLog.parse((DATA / "realboot-sboff" / "eventlog.bin").read_bytes())
    platform = load_platform("ovmf-2022.11-q35-insecure")
    apps = by_type(real, 4, el.EV_EFI_BOOT_SERVICES_APPLICATION)
    loads = [ImageLoadEvent.parse(a.data) for a in apps]
    pcr11 = by_type(real, 11, el.EV_IPL)
    sections = {el.decode(pcr11[i]): digests(pcr11[i + 1]) for i in range(0, len(pcr11), 2)}
    variables = {}
    for e in by_type(real, 7, el.EV_EFI_VARIABLE_DRIVER_CONFIG):
        var = VariableData.parse(e.data)
        variables[var.name] = (var.guid, var.data)
    assert variables["SecureBoot"][1] == b"\x00"
    uki_path = loads[1].file_path
    assert uki_path is not None
    inputs = pr.ChainInputs(
        bootloader=pr.ImageInput(digests(apps[0]), loads[0].length),
        uki=pr.ImageInput(digests(apps[1]), loads[1].length, uki_path),
        kernel=pr.ImageInput(digests(apps[2]), loads[2].length),
        section_digests=sections,  # type: ignore[arg-type]
        uki_cmdline=CMDLINE,
        loader_cmdline=None,
        gpt_event_data=by_type(real, 5, el.EV_EFI_GPT_EVENT)[0].data,
        secureboot_variables=variables,
        authority=None,
    )
    events = pr.predict_events(platform, load_chain(platform.chain), inputs, BANKS)
    assert list(events) == [zero_location(e) for e in real.events]
