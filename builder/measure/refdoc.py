"""Named YAML reference documents (platform references, chain profiles): find and read one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from builder.errors import InputFileError


def reference_path(name: str, folder: Path) -> Path:
    """``folder/<name>.yaml`` for a name, or ``name`` itself when it is a path."""
    if name.endswith((".yaml", ".yml")) or "/" in name:
        return Path(name)
    return folder / f"{name}.yaml"


def read_reference(name: str, folder: Path, what: str) -> tuple[bytes, Path]:
    """The bytes of a named document; a missing one names the known ones."""
    path = reference_path(name, folder)
    try:
        return path.read_bytes(), path
    except FileNotFoundError:
        known = ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))
        raise InputFileError(
            f"{what} {name!r} not found ({path})", hint=f"known: {known}"
        ) from None


def parse_document(data: bytes, source: str, schema: str) -> dict[str, Any]:
    """Safe YAML that must be a mapping with ``schema: <schema>``."""
    try:
        doc = yaml.safe_load(data)
    except yaml.YAMLError as exc:
        raise InputFileError(f"{source}: not YAML ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("schema") != schema:
        raise InputFileError(f"{source}: not a {schema} document")
    return doc
