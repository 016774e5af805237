"""asn1crypto classes for the Microsoft Authenticode structures, for parsing signatures.

Imported lazily by builder.secureboot.authenticode (only verification needs asn1crypto;
signing writes its few fixed DER structures directly, which keeps `sign` fast to start).
"""

from __future__ import annotations

from typing import Any, ClassVar

from asn1crypto import algos, core


class SpcString(core.Choice):  # type: ignore[misc]
    _alternatives: ClassVar[list[tuple[Any, ...]]] = [
        ("unicode", core.BMPString, {"implicit": 0}),
        ("ascii", core.IA5String, {"implicit": 1}),
    ]


class SpcSerializedObject(core.Sequence):  # type: ignore[misc]
    _fields: ClassVar[list[tuple[Any, ...]]] = [
        ("class_id", core.OctetString),
        ("serialized_data", core.OctetString),
    ]


class SpcLink(core.Choice):  # type: ignore[misc]
    _alternatives: ClassVar[list[tuple[Any, ...]]] = [
        ("url", core.IA5String, {"implicit": 0}),
        ("moniker", SpcSerializedObject, {"implicit": 1}),
        ("file", SpcString, {"explicit": 2}),
    ]


class SpcPeImageData(core.Sequence):  # type: ignore[misc]
    _fields: ClassVar[list[tuple[Any, ...]]] = [
        ("flags", core.BitString),
        ("file", SpcLink, {"explicit": 0, "optional": True}),
    ]


class SpcAttributeTypeAndOptionalValue(core.Sequence):  # type: ignore[misc]
    _fields: ClassVar[list[tuple[Any, ...]]] = [
        ("type", core.ObjectIdentifier),
        ("value", core.Any, {"optional": True}),
    ]


class DigestInfo(core.Sequence):  # type: ignore[misc]
    _fields: ClassVar[list[tuple[Any, ...]]] = [
        ("digest_algorithm", algos.DigestAlgorithm),
        ("digest", core.OctetString),
    ]


class SpcIndirectDataContent(core.Sequence):  # type: ignore[misc]
    _fields: ClassVar[list[tuple[Any, ...]]] = [
        ("data", SpcAttributeTypeAndOptionalValue),
        ("message_digest", DigestInfo),
    ]


class SpcSpOpusInfo(core.Sequence):  # type: ignore[misc]
    _fields: ClassVar[list[tuple[Any, ...]]] = [
        ("program_name", SpcString, {"explicit": 0, "optional": True}),
        ("more_info", SpcLink, {"explicit": 1, "optional": True}),
    ]


class SetOfOID(core.SetOf):  # type: ignore[misc]
    _child_spec = core.ObjectIdentifier


class SetOfOctetString(core.SetOf):  # type: ignore[misc]
    _child_spec = core.OctetString


class SetOfOpusInfo(core.SetOf):  # type: ignore[misc]
    _child_spec = SpcSpOpusInfo


class Attribute(core.Sequence):  # type: ignore[misc]
    _fields: ClassVar[list[tuple[Any, ...]]] = [
        ("type", core.ObjectIdentifier),
        ("values", core.Any),
    ]
