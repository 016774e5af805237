"""Hostile event logs: the parser returns a log or raises InputFileError, never anything else.

Bounded for CI: a few hundred examples per property, no deadline flakiness (~ seconds).
"""

from __future__ import annotations

import contextlib
import struct
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builder.errors import InputFileError
from builder.measure import eventlog as el

RAW = (Path(__file__).resolve().parents[1] / "data" / "eventlog" / "eventlog.bin").read_bytes()
FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)


def check(data: bytes) -> None:
    """Parse; on success the log must round-trip and decode/replay without foreign errors."""
    try:
        log = el.EventLog.parse(data, source="fuzz")
    except InputFileError as exc:
        assert "offset" in exc.message
        return
    assert bytes(log) == data
    for event in log.events:
        el.describe(event)
        with contextlib.suppress(InputFileError):
            el.decode(event)
    for bank in log.banks:
        if bank in el.HASHLIB:
            with contextlib.suppress(InputFileError):
                el.replay(log.events, bank)


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes(data: bytes) -> None:
    check(data)


@FUZZ
@given(
    st.lists(st.tuples(st.integers(0, len(RAW) - 1), st.integers(0, 255)), min_size=1, max_size=8)
)
def test_flipped_bytes_of_real_log(flips: list[tuple[int, int]]) -> None:
    data = bytearray(RAW)
    for pos, value in flips:
        data[pos] = value
    check(bytes(data))


@FUZZ
@given(st.integers(0, len(RAW)), st.binary(max_size=64))
def test_truncated_and_extended(cut: int, tail: bytes) -> None:
    check(RAW[:cut] + tail)


@FUZZ
@given(
    st.integers(0, len(RAW) - 4),
    st.sampled_from([0, 1, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 2**31 + 7]),
)
def test_lying_u32_anywhere(pos: int, value: int) -> None:
    check(RAW[:pos] + struct.pack("<I", value) + RAW[pos + 4 :])


@FUZZ
@given(st.binary(min_size=0, max_size=300), st.sampled_from(sorted(el.EVENT_TYPE_NAMES)))
def test_decoders_on_random_data(data: bytes, event_type: int) -> None:
    event = el.Event(0, event_type, ((0xB, bytes(32)),), data, 100)
    el.describe(event)
    try:
        el.decode(event)
    except InputFileError as exc:
        assert "offset" in exc.message
