"""A real S3 server for integration tests: SeaweedFS ``weed mini`` on 127.0.0.1.

The session fixture ``weed`` starts one server on free ports in a temp folder with a
read-write and a read-only identity, and stops it at the end; ``fresh_weed`` gives a test its
own server (to kill and restart). A missing ``weed`` fails the tests (no skip).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.seaweed import BUCKET, Weed

__all__ = ["BUCKET", "Weed"]


@pytest.fixture(scope="session")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Weed]:
    server = Weed(tmp_path_factory.mktemp("weed"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fresh_weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Weed]:
    server = Weed(tmp_path_factory.mktemp("weed-own"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
