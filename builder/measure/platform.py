"""Platform references (qemu/platforms/<name>.yaml): identity, machine, recorded firmware events.

A reference holds the firmware log of a real boot with the image-dependent events cut out:
the PCR 7 Secure Boot variables become the placeholder ``secureboot_variables`` and the run
of events the boot chain makes (PCR 7 authority, GPT, images, PCR 8-15) becomes
``boot_chain``. The predictor fills both; everything else (PCR 0-3, 6, the firmware's own
PCR 4/5/7 events) is replayed as recorded. ``digest`` is the sha256 of the reference file,
which manifests name.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from builder.errors import InputFileError
from builder.measure.efi import ImageLoadEvent, VariableData, device_path_prefix
from builder.measure.eventlog import (
    EV_EFI_BOOT_SERVICES_APPLICATION,
    EV_EFI_BOOT_SERVICES_DRIVER,
    EV_EFI_GPT_EVENT,
    EV_EFI_GPT_EVENT2,
    EV_EFI_VARIABLE_AUTHORITY,
    EV_EFI_VARIABLE_DRIVER_CONFIG,
    Event,
    EventLog,
    bank_id,
    from_cel,
    to_cel,
)
from builder.measure.refdoc import parse_document, read_reference, reference_path

SCHEMA = "bootchain.platform/v1"
PLATFORM_DIR = Path(__file__).resolve().parents[2] / "qemu" / "platforms"
DEFAULT_PLATFORM = "ovmf-2022.11-q35-secboot"
DEFAULT_CHAIN = "systemd252-linux61-secureboot"

SECUREBOOT_VARIABLES = "secureboot_variables"
BOOT_CHAIN = "boot_chain"
PLACEHOLDERS = (SECUREBOOT_VARIABLES, BOOT_CHAIN)


@dataclass(frozen=True)
class Placeholder:
    """Where the predictor inserts image-dependent events into the recorded sequence."""

    name: str


@dataclass(frozen=True)
class Machine:
    """How the boot harness starts this platform (read by builder.boot)."""

    qemu_args: tuple[str, ...]
    firmware_code: str
    firmware_vars_template: str
    ovmf_package: Mapping[str, str]
    tpm: str
    disk_interface: str

    def to_json(self) -> dict[str, Any]:
        return {
            "qemu_args": list(self.qemu_args),
            "firmware_code": self.firmware_code,
            "firmware_vars_template": self.firmware_vars_template,
            "ovmf_package": dict(self.ovmf_package),
            "tpm": self.tpm,
            "disk_interface": self.disk_interface,
        }


@dataclass(frozen=True)
class Platform:
    """A platform reference. ``log`` mixes recorded events and placeholders, in log order."""

    name: str
    identity: Mapping[str, Any]
    machine: Machine | None
    banks: tuple[str, ...]
    boot_device_path: bytes
    log: tuple[Event | Placeholder, ...]
    digest: str = field(default="", compare=False)
    notes: str = ""
    chain: str = "systemd252-linux61-secureboot"

    @property
    def events(self) -> tuple[Event, ...]:
        """The recorded (platform) events alone."""
        return tuple(e for e in self.log if isinstance(e, Event))

    def reference(self) -> dict[str, Any]:
        """What measurements.json says about the platform: name, digest, identity."""
        return {"name": self.name, "digest": self.digest, **dict(self.identity)}

    def to_json(self) -> dict[str, Any]:
        log: list[dict[str, Any]] = []
        for item in self.log:
            if isinstance(item, Placeholder):
                log.append({"placeholder": item.name})
            else:
                record = to_cel([item])[0]
                del record["recnum"]
                log.append(record)
        out: dict[str, Any] = {
            "schema": SCHEMA,
            "name": self.name,
            "identity": dict(self.identity),
            "chain": self.chain,
        }
        if self.machine is not None:
            out["machine"] = self.machine.to_json()
        out["banks"] = list(self.banks)
        out["boot_device_path"] = self.boot_device_path.hex()
        if self.notes:
            out["notes"] = self.notes
        out["log"] = log
        return out

    def to_yaml(self) -> bytes:
        """The reference file's bytes (deterministic key order and layout)."""
        text = yaml.safe_dump(self.to_json(), sort_keys=False, width=100, allow_unicode=False)
        return f"# bootchain platform reference ({SCHEMA})\n{text}".encode()


def _is_chain_event(event: Event) -> bool:
    """True for events the boot chain (image, disk, varstore contents) determines."""
    t = event.event_type
    if event.pcr >= 8:
        return True
    if t in (EV_EFI_GPT_EVENT, EV_EFI_GPT_EVENT2):
        return True
    if t == EV_EFI_BOOT_SERVICES_APPLICATION:
        return True
    if t == EV_EFI_BOOT_SERVICES_DRIVER and event.pcr == 4:
        return True
    return event.pcr == 7 and t == EV_EFI_VARIABLE_AUTHORITY


def capture_platform(
    log: EventLog,
    name: str,
    *,
    identity: Mapping[str, Any] | None = None,
    machine: Machine | None = None,
    notes: str = "",
    chain: str | None = None,
) -> Platform:
    """A platform reference from a real firmware log of this platform.

    Keeps the platform-made events, replaces the PCR 7 Secure Boot variables and the first
    run of chain events by placeholders, and records the hardware part of the boot disk's
    device path (from the first EV_EFI_BOOT_SERVICES_APPLICATION).
    """
    items: list[Event | Placeholder] = []
    boot_device_path: bytes | None = None
    chain_seen = False
    secure_boot: bool | None = None
    for event in log.events:
        if event.pcr == 7 and event.event_type == EV_EFI_VARIABLE_DRIVER_CONFIG:
            try:
                var = VariableData.parse(event.data, event.offset)
            except InputFileError:
                var = None
            if var is not None and var.name == "SecureBoot":
                secure_boot = var.data == b"\x01"
            if not (items and items[-1] == Placeholder(SECUREBOOT_VARIABLES)):
                items.append(Placeholder(SECUREBOOT_VARIABLES))
            continue
        if _is_chain_event(event):
            if event.event_type == EV_EFI_BOOT_SERVICES_APPLICATION and boot_device_path is None:
                image = ImageLoadEvent.parse(event.data, event.offset)
                boot_device_path = device_path_prefix(image.device_path)
            if not chain_seen:
                items.append(Placeholder(BOOT_CHAIN))
                chain_seen = True
            continue
        items.append(event)
    if not chain_seen or boot_device_path is None:
        raise InputFileError(
            f"event log for platform {name!r}: no EV_EFI_BOOT_SERVICES_APPLICATION",
            hint="capture from the log of a boot that loaded an image from disk",
        )
    ident: dict[str, Any] = dict(identity or {})
    if secure_boot is not None:
        ident.setdefault("secure_boot", secure_boot)
    if chain is None:
        chain = "systemd252-linux61-insecure" if secure_boot is False else DEFAULT_CHAIN
    return Platform(
        name, ident, machine, log.banks, boot_device_path, tuple(items), "", notes, chain
    )


def platform_path(name: str) -> Path:
    """The file of a named reference, or ``name`` itself when it is a path."""
    return reference_path(name, PLATFORM_DIR)


def parse_platform(data: bytes, source: str) -> Platform:
    """A reference from its file bytes; errors name ``source`` and the key."""
    doc = parse_document(data, source, SCHEMA)
    try:
        machine_doc = doc.get("machine")
        machine = None
        if machine_doc is not None:
            machine = Machine(
                qemu_args=tuple(str(a) for a in machine_doc["qemu_args"]),
                firmware_code=str(machine_doc["firmware_code"]),
                firmware_vars_template=str(machine_doc["firmware_vars_template"]),
                ovmf_package={k: str(v) for k, v in machine_doc["ovmf_package"].items()},
                tpm=str(machine_doc["tpm"]),
                disk_interface=str(machine_doc["disk_interface"]),
            )
        banks = tuple(str(b) for b in doc["banks"])
        for b in banks:
            bank_id(b)
        items: list[Event | Placeholder] = []
        for n, rec in enumerate(doc["log"]):
            if isinstance(rec, dict) and "placeholder" in rec:
                if rec["placeholder"] not in PLACEHOLDERS:
                    raise InputFileError(f"{source}: log[{n}]: unknown placeholder")
                items.append(Placeholder(str(rec["placeholder"])))
            else:
                items.extend(from_cel([rec], f"{source}: log[{n}]"))
        identity = doc["identity"]
        if not isinstance(identity, dict):
            raise InputFileError(f"{source}: identity must be a mapping")
        boot_device_path = bytes.fromhex(str(doc["boot_device_path"]))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InputFileError(f"{source}: missing or malformed key ({exc!r})") from exc
    if Placeholder(BOOT_CHAIN) not in items:
        raise InputFileError(f"{source}: log has no 'boot_chain' placeholder")
    return Platform(
        name=str(doc["name"]),
        identity=identity,
        machine=machine,
        banks=banks,
        boot_device_path=boot_device_path,
        log=tuple(items),
        digest=hashlib.sha256(data).hexdigest(),
        notes=str(doc.get("notes", "")),
        chain=str(doc.get("chain", DEFAULT_CHAIN)),
    )


def load_platform(name: str) -> Platform:
    """Load ``qemu/platforms/<name>.yaml`` (or a path)."""
    data, path = read_reference(name, PLATFORM_DIR, "platform reference")
    return parse_platform(data, str(path))


def restrict_banks(event: Event, banks: Sequence[str], source: str) -> Event:
    """``event`` with exactly ``banks`` digests, in that order."""
    digests: list[tuple[int, bytes]] = []
    for bank in banks:
        value = event.digest(bank)
        if value is None:
            raise InputFileError(f"{source}: recorded PCR {event.pcr} event has no {bank} digest")
        digests.append((bank_id(bank), value))
    return Event(event.pcr, event.event_type, tuple(digests), event.data)
