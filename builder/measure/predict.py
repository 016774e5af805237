"""The PCR predictor: every event the boot will log, computed from the final shipped bytes.

``predict()`` reads the signed images, the GPT, the varstore and the db certificate into a
``ChainInputs`` (digests and event contents), then ``predict_events()`` walks the platform
reference (recorded firmware events with placeholders) and the chain profile (data) to build
the expected log; replaying it gives the PCRs. The event constructors are public so each can
be checked against a real log on its own.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder.errors import InputFileError
from builder.fsutil import write_atomic
from builder.measure.chain import Chain, Step
from builder.measure.efi import (
    DEVICE_PATH_END,
    EFI_GLOBAL_VARIABLE,
    EFI_IMAGE_SECURITY_DATABASE,
    DevicePathNode,
    GptData,
    ImageLoadEvent,
    TaggedEvent,
    VariableData,
    file_path_node,
    guid_bytes,
    hd_node,
    utf16z,
)
from builder.measure.eventlog import (
    ALGORITHMS,
    EV_EFI_BOOT_SERVICES_APPLICATION,
    EV_EFI_GPT_EVENT,
    EV_EFI_VARIABLE_AUTHORITY,
    EV_EFI_VARIABLE_DRIVER_CONFIG,
    Event,
    bank_id,
    event_with_digests,
    hash_bytes,
    make_event,
    replay,
    to_cel,
)
from builder.measure.platform import Placeholder, Platform, restrict_banks

SCHEMA = "bootchain.measurements/v1"
PREDICTED_PCRS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12)
DEFAULT_BANKS = ("sha1", "sha256", "sha384")
SECUREBOOT_VARIABLE_ORDER = ("SecureBoot", "PK", "KEK", "db", "dbx")
_VARIABLE_GUIDS = {
    "SecureBoot": EFI_GLOBAL_VARIABLE,
    "PK": EFI_GLOBAL_VARIABLE,
    "KEK": EFI_GLOBAL_VARIABLE,
    "db": EFI_IMAGE_SECURITY_DATABASE,
    "dbx": EFI_IMAGE_SECURITY_DATABASE,
}

Digests = Mapping[str, bytes]  # bank -> digest


# --- inputs -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageInput:
    """A PE image the firmware loads: Authenticode digest per bank, file size, ESP path."""

    digests: Digests
    length: int
    esp_path: str | None = None


@dataclass(frozen=True)
class ChainInputs:
    """Everything image-dependent the events need, already reduced to digests and text."""

    bootloader: ImageInput
    uki: ImageInput
    section_digests: Mapping[str, Digests]  # present UKI sections, name -> bank -> H(content)
    uki_cmdline: str
    loader_cmdline: str | None
    gpt_event_data: bytes
    secureboot_variables: Mapping[str, tuple[bytes, bytes]]  # name -> (guid, data)
    authority: tuple[bytes, bytes] | None  # (owner GUID, cert DER) of the db entry
    kernel: ImageInput | None = None


def cmdline_text(raw: bytes) -> str:
    """The .cmdline section as the stub reads it: UTF-8 up to the first NUL."""
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def loader_cmdline_for(uki_cmdline: str) -> str:
    """What systemd-boot 252 passes for a type #2 entry: .cmdline minus one trailing newline."""
    return uki_cmdline[:-1] if uki_cmdline.endswith("\n") else uki_cmdline


# --- event constructors -----------------------------------------------------------------


def secureboot_variable_events(
    variables: Mapping[str, tuple[bytes, bytes]], banks: Sequence[str]
) -> list[Event]:
    """PCR 7 EV_EFI_VARIABLE_DRIVER_CONFIG for SecureBoot, PK, KEK, db, dbx (H(event data))."""
    events = []
    for name in SECUREBOOT_VARIABLE_ORDER:
        guid, data = variables.get(name, (_VARIABLE_GUIDS[name], b""))
        raw = bytes(VariableData(guid, name, data))
        events.append(make_event(7, EV_EFI_VARIABLE_DRIVER_CONFIG, raw, banks))
    return events


def authority_event(
    owner_guid: bytes, cert_der: bytes, banks: Sequence[str], pcr: int = 7
) -> Event:
    """PCR 7 EV_EFI_VARIABLE_AUTHORITY: db's GUID and name, data = owner GUID || cert."""
    raw = bytes(VariableData(EFI_IMAGE_SECURITY_DATABASE, "db", owner_guid + cert_der))
    return make_event(pcr, EV_EFI_VARIABLE_AUTHORITY, raw, banks)


def gpt_event(gpt_event_data: bytes, banks: Sequence[str], pcr: int = 5) -> Event:
    """PCR 5 EV_EFI_GPT_EVENT = H(UEFI_GPT_DATA)."""
    GptData.parse(gpt_event_data)
    return make_event(pcr, EV_EFI_GPT_EVENT, gpt_event_data, banks)


def esp_device_path(platform_prefix: bytes, gpt_event_data: bytes, esp_path: str) -> bytes:
    """platform disk path / HD(ESP) / file path / End, as OVMF logs a loaded image."""
    number, part = GptData.parse(gpt_event_data).esp()
    size = part.last_lba - part.first_lba + 1
    return (
        platform_prefix
        + hd_node(number, part.first_lba, size, part.unique_guid)
        + file_path_node(esp_path)
        + DEVICE_PATH_END
    )


def image_event(
    digests: Digests,
    length: int,
    device_path: bytes,
    pcr: int = 4,
    event_type: int = EV_EFI_BOOT_SERVICES_APPLICATION,
) -> Event:
    """An EV_EFI_BOOT_SERVICES_APPLICATION with the Authenticode digests.

    ImageLocationInMemory is left 0: it is an allocation address, in no digest.
    """
    raw = bytes(ImageLoadEvent(0, length, 0, device_path))
    return event_with_digests(pcr, event_type, raw, digests)


def cmdline_event(
    cmdline: str, banks: Sequence[str], pcr: int = 12, event_type: int = 0xD
) -> Event:
    """systemd's command line event: data and digest are UTF-16LE + NUL."""
    return make_event(pcr, event_type, utf16z(cmdline), banks)


def section_events(
    order: Sequence[str],
    section_digests: Mapping[str, Digests],
    banks: Sequence[str],
    pcr: int = 11,
    event_type: int = 0xD,
) -> list[Event]:
    """systemd-stub's PCR 11: per present section, H(name + NUL) then H(content)."""
    events = []
    for name in order:
        if name not in section_digests:
            continue
        data = utf16z(name)
        events.append(make_event(pcr, event_type, data, banks, hashed=name.encode() + b"\0"))
        content = section_digests[name]
        events.append(event_with_digests(pcr, event_type, data, {b: content[b] for b in banks}))
    return events


def tagged_event(
    tag_id: int, description: str, digests: Digests, pcr: int = 9, event_type: int = 0x6
) -> Event:
    """Linux's EV_EVENT_TAG: TCG_PCClientTaggedEvent with the ASCII description + NUL."""
    raw = bytes(TaggedEvent(tag_id, description.encode("ascii") + b"\0"))
    return event_with_digests(pcr, event_type, raw, digests)


def digests_of(data: bytes, banks: Sequence[str]) -> dict[str, bytes]:
    """H(data) in each bank."""
    return {b: hash_bytes(b, data) for b in banks}


# --- the walk ---------------------------------------------------------------------------


def _image(inputs: ChainInputs, step: Step) -> ImageInput:
    which = step.option("image")
    image = {"bootloader": inputs.bootloader, "uki": inputs.uki, "kernel": inputs.kernel}.get(which)
    if image is None:
        raise InputFileError(f"chain step image {which!r}: no such image in this build")
    return image


def _step_events(
    step: Step, platform: Platform, inputs: ChainInputs, banks: Sequence[str]
) -> list[Event]:
    kind = step.kind
    if kind == "authority":
        if inputs.authority is None:
            raise InputFileError("chain expects a db authority event but no db entry was given")
        owner, cert = inputs.authority
        return [authority_event(owner, cert, banks, step.pcr)]
    if kind == "gpt":
        return [gpt_event(inputs.gpt_event_data, banks, step.pcr)]
    if kind == "image":
        image = _image(inputs, step)
        path = step.option("esp_path") or image.esp_path
        vendor = step.option("vendor_media_guid")
        if vendor is not None:
            device_path = bytes(DevicePathNode(4, 3, guid_bytes(str(vendor)))) + DEVICE_PATH_END
        elif path is None:
            device_path = DEVICE_PATH_END
        else:
            device_path = esp_device_path(platform.boot_device_path, inputs.gpt_event_data, path)
        chosen = {b: image.digests[b] for b in banks}
        return [image_event(chosen, image.length, device_path, step.pcr, step.event_type)]
    if kind == "loader_cmdline":
        cmdline = inputs.loader_cmdline
        if cmdline is None:
            cmdline = loader_cmdline_for(inputs.uki_cmdline)
        return [cmdline_event(cmdline, banks, step.pcr, step.event_type)]
    if kind == "uki_sections":
        order = [str(s) for s in step.option("order")]
        return section_events(order, inputs.section_digests, banks, step.pcr, step.event_type)
    if kind == "tagged":
        content = step.option("content")
        digests: Mapping[str, bytes]
        if content == "initrd":
            if ".initrd" not in inputs.section_digests:
                return []
            digests = inputs.section_digests[".initrd"]
        elif content == "kernel_cmdline":
            source = step.option("kernel_cmdline", "uki")
            text = inputs.uki_cmdline
            if source == "loader" and inputs.loader_cmdline is not None:
                text = inputs.loader_cmdline
            digests = digests_of(utf16z(text), banks)
        else:
            raise InputFileError(f"chain step tagged: unknown content {content!r}")
        d = {b: digests[b] for b in banks}
        return [
            tagged_event(
                int(step.option("tag_id")),
                str(step.option("description")),
                d,
                step.pcr,
                step.event_type,
            )
        ]
    raise InputFileError(f"chain step kind {kind!r} not supported")


def predict_events(
    platform: Platform, chain: Chain, inputs: ChainInputs, banks: Sequence[str]
) -> tuple[Event, ...]:
    """The expected event log: platform events with the chain's events at the placeholders."""
    missing = [b for b in banks if b not in platform.banks]
    if missing:
        raise InputFileError(
            f"platform {platform.name} has no recorded {', '.join(missing)} digests",
            hint=f"it records {', '.join(platform.banks)}",
        )
    events: list[Event] = []
    for item in platform.log:
        if isinstance(item, Placeholder):
            if item.name == "secureboot_variables":
                events += secureboot_variable_events(inputs.secureboot_variables, banks)
            else:
                for step in chain.steps:
                    events += _step_events(step, platform, inputs, banks)
        else:
            events.append(restrict_banks(item, banks, f"platform {platform.name}"))
    return tuple(events)


# --- measurements -----------------------------------------------------------------------


@dataclass(frozen=True)
class Measurements:
    """measurements.json: platform, chain, banks, PCR values, expected log, artifact digests."""

    platform: Mapping[str, Any]
    chain: str
    banks: tuple[str, ...]
    pcrs: Mapping[str, Mapping[int, bytes]]
    events: tuple[Event, ...]
    artifacts: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "platform": dict(self.platform),
            "chain": self.chain,
            "banks": list(self.banks),
            "pcrs": {
                bank: {str(n): v.hex() for n, v in sorted(values.items())}
                for bank, values in self.pcrs.items()
            },
            "events": to_cel(self.events),
            "artifacts": {k: dict(v) for k, v in sorted(self.artifacts.items())},
        }


def measure_events(events: Sequence[Event], banks: Sequence[str]) -> dict[str, dict[int, bytes]]:
    """PCR 0-9, 11, 12 per bank after ``events`` (all-zero where nothing extends)."""
    out: dict[str, dict[int, bytes]] = {}
    for bank in banks:
        size = ALGORITHMS[bank_id(bank)][1]
        replayed = replay(events, bank)
        out[bank] = {n: replayed.get(n, bytes(size)) for n in PREDICTED_PCRS}
    return out


def make_measurements(
    platform: Platform,
    chain: Chain,
    inputs: ChainInputs,
    banks: Sequence[str] = DEFAULT_BANKS,
    artifacts: Mapping[str, Mapping[str, str]] | None = None,
) -> Measurements:
    """Predict from already-reduced inputs (what ``predict`` does after reading the bytes)."""
    events = predict_events(platform, chain, inputs, banks)
    return Measurements(
        platform=platform.reference(),
        chain=chain.name,
        banks=tuple(banks),
        pcrs=measure_events(events, banks),
        events=events,
        artifacts=dict(artifacts or {}),
    )


def _module(name: str) -> Any:
    """Another engineer's module, imported when predicting (keeps this one importable alone)."""
    return importlib.import_module(name)


def predict(
    *,
    platform: Platform,
    chain: Chain,
    bootloader: bytes,
    uki: bytes,
    uki_path_on_esp: str,
    gpt_event_data: bytes,
    varstore: bytes,
    db_cert: bytes,
    loader_cmdline: str | None,
    banks: Sequence[str] = DEFAULT_BANKS,
) -> Measurements:
    """Predict every event and PCR 0-9, 11, 12 in ``banks`` for this build on ``platform``.

    ``loader_cmdline`` is what systemd-boot passes (None: derived from the UKI's .cmdline as
    systemd-boot 252 does for a type #2 entry).
    """
    pe = _module("builder.pe")
    uki_mod = _module("builder.uki")
    varstore_mod = _module("builder.secureboot.varstore")

    def image(data: bytes, path: str | None) -> ImageInput:
        digests = {b: bytes(pe.authenticode_digest(data, b)) for b in banks}
        return ImageInput(digests, len(data), path)

    sections: dict[str, bytes] = dict(uki_mod.read_uki_sections(uki))
    section_digests = {name: digests_of(content, banks) for name, content in sections.items()}
    uki_cmdline = cmdline_text(sections.get(".cmdline", b""))
    variables = dict(varstore_mod.read_secureboot_variables(varstore))
    secure_boot = variables.get("SecureBoot", (b"", b"\x00"))[1] == b"\x01"
    if secure_boot != chain.secure_boot:
        state = "on" if secure_boot else "off"
        raise InputFileError(
            f"chain {chain.name} is for Secure Boot {'on' if chain.secure_boot else 'off'} "
            f"but the varstore boots with Secure Boot {state}",
            hint="pick the chain profile that matches the varstore",
        )
    authority = None
    if chain.secure_boot:
        owner, cert = varstore_mod.db_entry_for(varstore, db_cert)
        authority = (bytes(owner), bytes(cert))
    kernel = None
    if ".linux" in sections and any(
        s.kind == "image" and s.option("image") == "kernel" for s in chain.steps
    ):
        kernel = image(sections[".linux"], None)
    inputs = ChainInputs(
        bootloader=image(bootloader, None),
        uki=image(uki, uki_path_on_esp),
        section_digests=section_digests,
        uki_cmdline=uki_cmdline,
        loader_cmdline=loader_cmdline,
        gpt_event_data=gpt_event_data,
        secureboot_variables=variables,
        authority=authority,
        kernel=kernel,
    )
    uki_name = uki_path_on_esp.replace("\\", "/").rsplit("/", 1)[-1]
    artifacts = {
        "BOOTX64.EFI": _artifact(bootloader, inputs.bootloader),
        uki_name: _artifact(uki, inputs.uki),
        "ovmf-vars.fd": {"sha256": hashlib.sha256(varstore).hexdigest()},
        "gpt": {"sha256": hashlib.sha256(gpt_event_data).hexdigest()},
    }
    if authority is not None:
        artifacts["db.crt"] = {"sha256": hashlib.sha256(db_cert).hexdigest()}
    return make_measurements(platform, chain, inputs, banks, artifacts)


def _artifact(data: bytes, image: ImageInput) -> dict[str, str]:
    out = {"sha256": hashlib.sha256(data).hexdigest()}
    out.update({f"authenticode_{b}": d.hex() for b, d in image.digests.items()})
    return out


def write_measurements(path: Path, measurements: Measurements) -> None:
    """Write measurements.json atomically (sorted keys, stable layout)."""
    text = json.dumps(measurements.to_json(), indent=2, sort_keys=True) + "\n"
    write_atomic(path, text.encode())
