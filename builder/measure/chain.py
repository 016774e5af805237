"""Chain profiles: what the boot loader, stub and kernel of given versions measure, as data.

A profile (``builder/measure/chains/<name>.yaml``) is an ordered list of steps; the predictor
turns each step into events. A new stub or kernel behaviour is a new profile file, not code,
as long as it uses the step kinds below.

Step kinds:
- ``authority``: PCR 7 EV_EFI_VARIABLE_AUTHORITY for the db entry that validated the images.
- ``gpt``: PCR 5 EV_EFI_GPT_EVENT of the boot disk.
- ``image`` (``image``: bootloader | uki | kernel, optional ``esp_path``): the image's
  Authenticode digest with a UEFI_IMAGE_LOAD_EVENT.
- ``loader_cmdline``: the command line the boot loader passes, UTF-16LE + NUL.
- ``uki_sections`` (``order``): per present section, H(name + NUL) then H(contents).
- ``tagged`` (``tag_id``, ``description``, ``content``: kernel_cmdline | initrd,
  ``kernel_cmdline``: uki | loader): a TCG_PCClientTaggedEvent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.errors import InputFileError
from builder.measure.eventlog import event_type_value
from builder.measure.refdoc import parse_document, read_reference, reference_path

SCHEMA = "bootchain.chain/v1"
CHAIN_DIR = Path(__file__).resolve().parent / "chains"
DEFAULT_CHAIN = "systemd252-linux61-secureboot"

STEP_KINDS = frozenset({"authority", "gpt", "image", "loader_cmdline", "uki_sections", "tagged"})
_REQUIRED: dict[str, tuple[str, ...]] = {
    "image": ("image",),
    "uki_sections": ("order",),
    "tagged": ("tag_id", "description", "content"),
}


@dataclass(frozen=True)
class Step:
    """One measuring step: kind, PCR, event type and the kind's own options."""

    kind: str
    pcr: int
    event_type: int
    options: Mapping[str, Any]

    def option(self, key: str, default: Any = None) -> Any:
        return self.options.get(key, default)


@dataclass(frozen=True)
class Chain:
    """A chain profile."""

    name: str
    description: str
    secure_boot: bool
    verified: bool
    steps: tuple[Step, ...]


def chain_path(name: str) -> Path:
    return reference_path(name, CHAIN_DIR)


def parse_chain(data: bytes, source: str) -> Chain:
    """A profile from YAML bytes; errors name ``source`` and the step."""
    doc = parse_document(data, source, SCHEMA)
    steps: list[Step] = []
    raw_steps = doc.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise InputFileError(f"{source}: 'steps' must be a non-empty list")
    for n, raw in enumerate(raw_steps):
        where = f"{source}: steps[{n}]"
        if not isinstance(raw, dict):
            raise InputFileError(f"{where}: not a mapping")
        kind = raw.get("kind")
        if kind not in STEP_KINDS:
            raise InputFileError(
                f"{where}: unknown kind {kind!r}", hint=", ".join(sorted(STEP_KINDS))
            )
        pcr = raw.get("pcr")
        if not isinstance(pcr, int) or not 0 <= pcr < 24:
            raise InputFileError(f"{where}: bad pcr {pcr!r}")
        for key in _REQUIRED.get(kind, ()):
            if key not in raw:
                raise InputFileError(f"{where}: {kind} step needs {key!r}")
        options = {k: v for k, v in raw.items() if k not in ("kind", "pcr", "event_type")}
        steps.append(Step(kind, pcr, event_type_value(str(raw.get("event_type", ""))), options))
    try:
        return Chain(
            name=str(doc["name"]),
            description=str(doc.get("description", "")),
            secure_boot=bool(doc["secure_boot"]),
            verified=bool(doc.get("verified", True)),
            steps=tuple(steps),
        )
    except KeyError as exc:
        raise InputFileError(f"{source}: missing key {exc}") from exc


def load_chain(name: str) -> Chain:
    """Load a chain profile by name (``systemd252-linux61-secureboot``) or path."""
    data, path = read_reference(name, CHAIN_DIR, "chain profile")
    return parse_chain(data, str(path))
