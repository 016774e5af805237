"""Pinned Debian packages: apt download, a content-addressed cache, .deb unpack, the lock."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PackagePin:
    """One Debian package pinned by name, exact version and sha256 of the .deb."""

    name: str
    version: str
    sha256: str
