"""The golden manifest (``bootchain.manifest/v1``) and the other signed store documents.

Three payloads travel in DSSE envelopes (see :mod:`builder.dsse`), each with its own
payloadType so one can never stand in for another:

- the release manifest: name, version, recipe digest and lock, artifacts (size, sha256,
  Authenticode digest for PE files), Secure Boot certificate fingerprints, and per platform
  the reference measurements (PCRs per bank and the expected CEL-JSON events, as in
  measurements.json);
- a channel pointer: name, channel, version, sha256 of the manifest envelope, and a sequence
  that only grows;
- the release index of a name: every published version with its PE Authenticode digests.

Canonical bytes are sorted-key JSON without whitespace; ``to_dict``/``from_dict`` round-trip.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder.dsse import (
    ReleaseKey,
    Trust,
    canonical_json,
    generate_release_key,
    load_release_key,
    load_trust,
    sign_envelope,
    verify_envelope_bytes,
)
from builder.errors import InputFileError, UserInputError, VerificationError

__all__ = [
    "CHANNEL_PAYLOAD_TYPE",
    "INDEX_PAYLOAD_TYPE",
    "MANIFEST_PAYLOAD_TYPE",
    "Artifact",
    "ChannelPointer",
    "IndexEntry",
    "Manifest",
    "ReleaseIndex",
    "SecureBootInfo",
    "check_name",
    "generate_release_key",
    "load_release_key",
    "load_trust",
    "manifest_from_build",
    "verify_envelope",
    "version_key",
]

MANIFEST_SCHEMA = "bootchain.manifest/v1"
CHANNEL_SCHEMA = "bootchain.channel/v1"
INDEX_SCHEMA = "bootchain.index/v1"
BUILD_SCHEMA = "bootchain.build/v1"

MANIFEST_PAYLOAD_TYPE = "application/vnd.bootchain.manifest+json"
CHANNEL_PAYLOAD_TYPE = "application/vnd.bootchain.channel+json"
INDEX_PAYLOAD_TYPE = "application/vnd.bootchain.index+json"

_SCHEMAS = {
    MANIFEST_PAYLOAD_TYPE: MANIFEST_SCHEMA,
    CHANNEL_PAYLOAD_TYPE: CHANNEL_SCHEMA,
    INDEX_PAYLOAD_TYPE: INDEX_SCHEMA,
}

_HEX64 = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
_PATH = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*(/[A-Za-z0-9][A-Za-z0-9._+-]*)*")


class _SchemaError(Exception):
    """Internal: a field that does not match the schema; becomes the caller's error type."""


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key for release versions: numeric runs compare as numbers, others as text.

    "1.10.0" > "1.9.2"; "1.0.0" > "1.0.0-rc1" is NOT assumed (rc sorts after; avoid suffixes
    on channels that must only move forward).
    """
    return tuple(
        (0, int(p)) if p.isdigit() else (1, p) for p in re.findall(r"\d+|[^\d.+~-]+", version)
    )


def _req(doc: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in doc:
        raise _SchemaError(f"{where}: missing key {key!r}")
    value = doc[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _SchemaError(f"{where}.{key}: wrong type {type(value).__name__}")
    return value


def _hex(doc: Mapping[str, Any], key: str, where: str) -> str:
    value = _req(doc, key, str, where)
    if not _HEX64.fullmatch(value):
        raise _SchemaError(f"{where}.{key}: not a lowercase sha256 hex digest")
    return str(value)


def _name(doc: Mapping[str, Any], key: str, where: str) -> str:
    value = _req(doc, key, str, where)
    if not _NAME.fullmatch(value) or ".." in value:
        raise _SchemaError(f"{where}.{key}: {value!r} is not a safe name")
    return str(value)


def check_name(value: str, what: str) -> str:
    """``value`` if it is a safe release name, version or channel; UserInputError otherwise."""
    if not _NAME.fullmatch(value) or ".." in value:
        raise UserInputError(
            f"{what} {value!r} is not a safe name",
            hint="use letters, digits and . _ + - (starting with a letter or digit)",
        )
    return value


def _relpath(doc: Mapping[str, Any], key: str, where: str) -> str:
    value = _req(doc, key, str, where)
    if not _PATH.fullmatch(value) or ".." in value.split("/"):
        raise _SchemaError(f"{where}.{key}: {value!r} is not a safe relative path")
    return str(value)


def _schema(doc: Mapping[str, Any], expected: str, where: str) -> None:
    if doc.get("schema") != expected:
        raise _SchemaError(f"{where}: schema is {doc.get('schema')!r}, expected {expected!r}")


@dataclass(frozen=True)
class Artifact:
    """One published file, stored as blob ``sha256``."""

    name: str
    size: int
    sha256: str
    authenticode_sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "size": self.size, "sha256": self.sha256}
        if self.authenticode_sha256 is not None:
            out["authenticode_sha256"] = self.authenticode_sha256
        return out

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], where: str) -> Artifact:
        size = _req(doc, "size", int, where)
        if size < 0:
            raise _SchemaError(f"{where}.size: negative")
        present = doc.get("authenticode_sha256") is not None
        auth = _hex(doc, "authenticode_sha256", where) if present else None
        return cls(_relpath(doc, "name", where), size, _hex(doc, "sha256", where), auth)


@dataclass(frozen=True)
class SecureBootInfo:
    """Fingerprints of the Secure Boot signing certificate and the enrolled key set."""

    certificate_sha256: str
    subject: str
    example_keys: bool
    keyset: Mapping[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "certificate_sha256": self.certificate_sha256,
            "subject": self.subject,
            "example_keys": self.example_keys,
            "keyset": dict(self.keyset),
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], where: str) -> SecureBootInfo:
        keyset = _req(doc, "keyset", dict, where)
        for k in keyset:
            _hex(keyset, k, f"{where}.keyset")
        return cls(
            _hex(doc, "certificate_sha256", where),
            _req(doc, "subject", str, where),
            _req(doc, "example_keys", bool, where),
            dict(keyset),
        )


@dataclass(frozen=True)
class Manifest:
    """A release's golden manifest (schema ``bootchain.manifest/v1``)."""

    name: str
    version: str
    recipe_digest: str
    lock: Mapping[str, Any]
    source_date_epoch: int
    artifacts: tuple[Artifact, ...]
    secure_boot: SecureBootInfo
    platforms: Mapping[str, Mapping[str, Any]]
    inputs: tuple[Mapping[str, Any], ...] = ()
    tools: Mapping[str, str] = field(default_factory=dict)

    def artifact(self, name: str) -> Artifact:
        """The artifact called ``name``; InputFileError if there is none."""
        for a in self.artifacts:
            if a.name == name:
                return a
        raise InputFileError(f"manifest {self.name} {self.version} has no artifact {name!r}")

    def platform(self, name: str | None) -> Mapping[str, Any]:
        """The measurements reference for platform ``name`` (or the only one when None)."""
        if name is None:
            if len(self.platforms) != 1:
                raise InputFileError(
                    f"manifest {self.name} {self.version} has platforms "
                    f"{sorted(self.platforms)}; choose one",
                    hint="pass --platform NAME",
                )
            return next(iter(self.platforms.values()))
        if name not in self.platforms:
            raise InputFileError(
                f"manifest {self.name} {self.version} has no platform {name!r} "
                f"(has {sorted(self.platforms)})"
            )
        return self.platforms[name]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": MANIFEST_SCHEMA,
            "name": self.name,
            "version": self.version,
            "recipe": {"digest": self.recipe_digest, "lock": self.lock},
            "source_date_epoch": self.source_date_epoch,
            "inputs": list(self.inputs),
            "tools": dict(self.tools),
            "artifacts": [a.to_dict() for a in self.artifacts],
            "secure_boot": self.secure_boot.to_dict(),
            "platforms": {k: self.platforms[k] for k in sorted(self.platforms)},
        }

    def to_bytes(self) -> bytes:
        """Canonical JSON bytes: the payload that gets signed."""
        return canonical_json(self.to_dict())

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Manifest:
        """Validate and load; InputFileError naming the key on any mismatch."""
        try:
            return cls._from_dict(doc)
        except _SchemaError as exc:
            raise InputFileError(f"manifest {exc}") from exc

    @classmethod
    def _from_dict(cls, doc: Mapping[str, Any]) -> Manifest:
        w = "manifest"
        _schema(doc, MANIFEST_SCHEMA, w)
        recipe = _req(doc, "recipe", dict, w)
        arts = _req(doc, "artifacts", list, w)
        artifacts = []
        for i, a in enumerate(arts):
            if not isinstance(a, dict):
                raise _SchemaError(f"{w}.artifacts[{i}]: not an object")
            artifacts.append(Artifact.from_dict(a, f"{w}.artifacts[{i}]"))
        names = [a.name for a in artifacts]
        if names != sorted(set(names)):
            raise _SchemaError(f"{w}.artifacts: names must be unique and sorted")
        folders = {"/".join(n.split("/")[:k]) for n in names for k in range(1, n.count("/") + 1)}
        if clash := sorted(folders & set(names)):
            raise _SchemaError(f"{w}.artifacts: {clash[0]!r} is both a file and a folder")
        platforms = _req(doc, "platforms", dict, w)
        for pname, ref in platforms.items():
            if not isinstance(ref, dict):
                raise _SchemaError(f"{w}.platforms.{pname}: not an object")
            _req(ref, "pcrs", dict, f"{w}.platforms.{pname}")
            _req(ref, "events", list, f"{w}.platforms.{pname}")
        inputs = _req(doc, "inputs", list, w)
        tools = _req(doc, "tools", dict, w)
        return cls(
            name=_name(doc, "name", w),
            version=_name(doc, "version", w),
            recipe_digest=_hex(recipe, "digest", f"{w}.recipe"),
            lock=_req(recipe, "lock", dict, f"{w}.recipe"),
            source_date_epoch=_req(doc, "source_date_epoch", int, w),
            artifacts=tuple(artifacts),
            secure_boot=SecureBootInfo.from_dict(
                _req(doc, "secure_boot", dict, w), f"{w}.secure_boot"
            ),
            platforms=dict(platforms),
            inputs=tuple(inputs),
            tools=dict(tools),
        )

    def sign(self, key: ReleaseKey) -> bytes:
        """The DSSE envelope bytes of this manifest signed by ``key``."""
        return sign_envelope(self.to_bytes(), MANIFEST_PAYLOAD_TYPE, [key])

    @classmethod
    def verify(cls, envelope: bytes, trust: Trust) -> Manifest:
        """The manifest inside ``envelope`` once its signature verifies against ``trust``."""
        try:
            return cls._from_dict(verify_envelope(envelope, trust, MANIFEST_PAYLOAD_TYPE))
        except _SchemaError as exc:
            raise VerificationError(f"signed manifest {exc}") from exc


def load_json_file(path: Path) -> dict[str, Any]:
    """Read a JSON object from ``path``; InputFileError naming the file otherwise."""
    try:
        doc = json.loads(path.read_bytes())
    except OSError as exc:
        raise InputFileError(f"{path}: cannot read ({exc.strerror})") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputFileError(f"{path}: not JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise InputFileError(f"{path}: not a JSON object")
    return doc


def manifest_from_build(outdir: Path) -> Manifest:
    """The manifest for a build folder holding build.json and measurements.json.

    Only the build.json contract is read; artifact sizes and digests are taken from it (the
    publisher checks the files against them while uploading).
    """
    build_path = outdir / "build.json"
    build = load_json_file(build_path)
    try:
        _schema(build, BUILD_SCHEMA, str(build_path))
        artifacts = []
        for i, a in enumerate(_req(build, "artifacts", list, str(build_path))):
            where = f"{build_path}: artifacts[{i}]"
            if not isinstance(a, dict):
                raise _SchemaError(f"{where}: not an object")
            artifacts.append(Artifact.from_dict(a, where))
        artifacts.sort(key=lambda a: a.name)
        names = [a.name for a in artifacts]
        if len(set(names)) != len(names):
            raise _SchemaError(f"{build_path}: duplicate artifact names")
        measurements = load_json_file(outdir / "measurements.json")
        platform = build.get("platform")
        mplat = measurements.get("platform")
        mname = mplat.get("name") if isinstance(mplat, dict) else mplat
        if not isinstance(platform, str) or (mname is not None and mname != platform):
            raise _SchemaError(
                f"{build_path}: platform {platform!r} differs from measurements.json {mname!r}"
            )
        recipe = _req(build, "recipe", dict, str(build_path))
        signer = _req(build, "signer", dict, str(build_path))
        doc = {
            "schema": MANIFEST_SCHEMA,
            "name": build.get("name"),
            "version": build.get("version"),
            "recipe": {"digest": recipe.get("digest"), "lock": recipe.get("lock", {})},
            "source_date_epoch": build.get("source_date_epoch"),
            "inputs": build.get("inputs", []),
            "tools": build.get("tools", {}),
            "artifacts": [a.to_dict() for a in artifacts],
            "secure_boot": {
                "certificate_sha256": signer.get("certificate_sha256"),
                "subject": signer.get("subject", ""),
                "example_keys": signer.get("example_keys"),
                "keyset": signer.get("keyset", {}),
            },
            "platforms": {platform: measurements},
        }
        manifest = Manifest._from_dict(doc)
    except _SchemaError as exc:
        raise InputFileError(str(exc)) from exc
    # Round-trip through canonical JSON so values are plain JSON from here on.
    return Manifest.from_dict(json.loads(manifest.to_bytes()))


def verify_envelope(
    envelope: bytes, trust: Trust, payload_type: str = MANIFEST_PAYLOAD_TYPE
) -> dict[str, Any]:
    """The JSON payload of a verified envelope whose ``schema`` matches its payloadType.

    Raises VerificationError on any doubt: unknown keyid, bad signature, wrong payloadType,
    malformed JSON or a schema field that does not match.
    """
    payload = verify_envelope_bytes(envelope, trust, payload_type)
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise VerificationError(f"signed payload is not JSON ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("schema") != _SCHEMAS[payload_type]:
        got = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise VerificationError(
            f"signed payload schema is {got!r}, expected {_SCHEMAS[payload_type]!r}"
        )
    return doc


@dataclass(frozen=True)
class ChannelPointer:
    """A signed pointer from a channel to one release; ``sequence`` only grows."""

    name: str
    channel: str
    version: str
    manifest_sha256: str
    sequence: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": CHANNEL_SCHEMA,
            "name": self.name,
            "channel": self.channel,
            "version": self.version,
            "manifest_sha256": self.manifest_sha256,
            "sequence": self.sequence,
        }

    def sign(self, key: ReleaseKey) -> bytes:
        return sign_envelope(canonical_json(self.to_dict()), CHANNEL_PAYLOAD_TYPE, [key])

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> ChannelPointer:
        w = "channel pointer"
        try:
            _schema(doc, CHANNEL_SCHEMA, w)
            seq = _req(doc, "sequence", int, w)
            if seq < 1:
                raise _SchemaError(f"{w}.sequence: must be >= 1")
            return cls(
                _name(doc, "name", w),
                _name(doc, "channel", w),
                _name(doc, "version", w),
                _hex(doc, "manifest_sha256", w),
                seq,
            )
        except _SchemaError as exc:
            raise VerificationError(str(exc)) from exc

    @classmethod
    def verify(cls, envelope: bytes, trust: Trust) -> ChannelPointer:
        return cls.from_dict(verify_envelope(envelope, trust, CHANNEL_PAYLOAD_TYPE))


@dataclass(frozen=True)
class IndexEntry:
    """One published release in the index: its manifest and PE Authenticode digests."""

    version: str
    manifest_sha256: str
    authenticode: Mapping[str, str]  # artifact name -> authenticode sha256

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "manifest_sha256": self.manifest_sha256,
            "authenticode": dict(self.authenticode),
        }


@dataclass(frozen=True)
class ReleaseIndex:
    """The signed list of a name's published releases, sorted by version."""

    name: str
    sequence: int
    releases: tuple[IndexEntry, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": INDEX_SCHEMA,
            "name": self.name,
            "sequence": self.sequence,
            "releases": [r.to_dict() for r in self.releases],
        }

    def sign(self, key: ReleaseKey) -> bytes:
        return sign_envelope(canonical_json(self.to_dict()), INDEX_PAYLOAD_TYPE, [key])

    def entry(self, version: str) -> IndexEntry | None:
        return next((r for r in self.releases if r.version == version), None)

    def with_entry(self, entry: IndexEntry) -> ReleaseIndex:
        """A new index (sequence + 1) with ``entry`` added, sorted by version."""
        releases = sorted((*self.releases, entry), key=lambda r: version_key(r.version))
        return ReleaseIndex(self.name, self.sequence + 1, tuple(releases))

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> ReleaseIndex:
        w = "release index"
        try:
            _schema(doc, INDEX_SCHEMA, w)
            entries = []
            for i, r in enumerate(_req(doc, "releases", list, w)):
                at = f"{w}.releases[{i}]"
                if not isinstance(r, dict):
                    raise _SchemaError(f"{at}: not an object")
                auth = _req(r, "authenticode", dict, at)
                for k in auth:
                    _relpath({"artifact": k}, "artifact", f"{at}.authenticode")
                    _hex(auth, k, f"{at}.authenticode")
                entries.append(
                    IndexEntry(_name(r, "version", at), _hex(r, "manifest_sha256", at), auth)
                )
            versions = [e.version for e in entries]
            if len(set(versions)) != len(versions):
                raise _SchemaError(f"{w}.releases: a version is listed twice")
            seq = _req(doc, "sequence", int, w)
            if seq < 1:
                raise _SchemaError(f"{w}.sequence: must be >= 1")
            return cls(_name(doc, "name", w), seq, tuple(entries))
        except _SchemaError as exc:
            raise VerificationError(str(exc)) from exc

    @classmethod
    def verify(cls, envelope: bytes, trust: Trust) -> ReleaseIndex:
        return cls.from_dict(verify_envelope(envelope, trust, INDEX_PAYLOAD_TYPE))
