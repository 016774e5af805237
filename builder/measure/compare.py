"""The verdict: expected measurements against a real firmware log (pure, shared by boot-test
and ``bootchain verify``).

Fail closed: a PCR the manifest expects with a non-initial value but that no event extends, a
bank the log lacks, or a log whose replay disagrees with the PCRs the TPM reported, is a
mismatch. Only PCRs the manifest lists are judged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from builder.errors import InputFileError, VerificationError
from builder.measure.eventlog import (
    ALGORITHMS,
    Event,
    EventLog,
    bank_id,
    describe,
    from_cel,
    replay,
)


@dataclass(frozen=True)
class Row:
    """One PCR in one bank: expected and actual value (hex; actual "" when unknown)."""

    pcr: int
    bank: str
    expected: str
    actual: str
    equal: bool


@dataclass(frozen=True)
class Mismatch:
    """Why a PCR differs. ``index`` is the first differing event within that PCR."""

    pcr: int
    bank: str
    kind: str  # digest | missing event | extra event | bank missing | tpm disagrees | value
    index: int | None
    event_type: str | None
    description: str
    expected: str | None
    actual: str | None

    def one_line(self) -> str:
        # Whole digests: a shortened pair can look equal when they differ late.
        exp = self.expected or "-"
        act = self.actual or "-"
        return f"{self.bank}: {self.description}: {self.kind} (expected {exp}, got {act})"


@dataclass(frozen=True)
class Verdict:
    """The outcome of :func:`compare`. ``ok`` is True only with no mismatch at all."""

    ok: bool
    rows: tuple[Row, ...]
    mismatches: tuple[Mismatch, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "rows": [
                {
                    "pcr": r.pcr,
                    "bank": r.bank,
                    "expected": r.expected,
                    "actual": r.actual,
                    "equal": r.equal,
                }
                for r in self.rows
            ],
            "mismatches": [
                {
                    "pcr": m.pcr,
                    "bank": m.bank,
                    "kind": m.kind,
                    "index": m.index,
                    "event_type": m.event_type,
                    "description": m.description,
                    "expected": m.expected,
                    "actual": m.actual,
                }
                for m in self.mismatches
            ],
        }

    def render_table(self) -> str:
        lines = [f"{'bank':<7} {'PCR':>3}  {'expected':<16}  {'actual':<16}  ok"]
        for r in self.rows:
            mark = "yes" if r.equal else "NO"
            lines.append(
                f"{r.bank:<7} {r.pcr:>3}  {r.expected[:16]:<16}  {r.actual[:16] or '-':<16}  {mark}"
            )
        for m in self.mismatches:
            lines.append(f"  mismatch: {m.one_line()}")
        lines.append("verdict: " + ("MATCH" if self.ok else f"{len(self.mismatches)} mismatch(es)"))
        return "\n".join(lines)


def require_match(verdict: Verdict) -> None:
    """Raise VerificationError naming the first mismatch when the verdict is not ok."""
    if verdict.ok:
        return
    if not verdict.mismatches:
        raise VerificationError("measurements did not match (no PCR compared)")
    first = verdict.mismatches[0]
    more = len(verdict.mismatches) - 1
    tail = f" (+{more} more)" if more else ""
    raise VerificationError(f"measurement mismatch: {first.one_line()}{tail}")


def _expected_pcrs(expected: Mapping[str, Any]) -> dict[str, dict[int, bytes]]:
    try:
        pcrs = expected["pcrs"]
        banks = list(expected.get("banks", list(pcrs)))
        out: dict[str, dict[int, bytes]] = {}
        for bank in banks:
            values = pcrs[bank]
            size = ALGORITHMS[bank_id(bank)][1]
            out[bank] = {}
            for key, value in values.items():
                raw = bytes.fromhex(value)
                if len(raw) != size:
                    raise InputFileError(f"measurements: pcrs.{bank}.{key} is not a {bank} value")
                if str(key) != str(int(key)) or int(key) < 0 or int(key) in out[bank]:
                    raise InputFileError(f"measurements: pcrs.{bank} key {key!r} is not one PCR")
                out[bank][int(key)] = raw
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InputFileError(f"measurements: malformed pcrs ({exc!r})") from exc
    if not any(out.values()):
        raise InputFileError("measurements: no PCR values to compare")
    # A bank named but left empty would be judged on nothing: refuse rather than skip it.
    if empty := sorted(bank for bank, values in out.items() if not values):
        raise InputFileError(f"measurements: bank {empty[0]} lists no PCR values")
    return out


def _by_pcr(events: tuple[Event, ...], pcr: int) -> list[Event]:
    return [e for e in events if e.pcr == pcr and e.event_type != 0x3]


def _first_event_difference(
    pcr: int, bank: str, exp_events: list[Event], act_events: list[Event]
) -> Mismatch | None:
    for n in range(max(len(exp_events), len(act_events))):
        exp = exp_events[n] if n < len(exp_events) else None
        act = act_events[n] if n < len(act_events) else None
        exp_d = exp.digest(bank) if exp else None
        act_d = act.digest(bank) if act else None
        if exp is not None and act is not None and exp_d == act_d and exp_d is not None:
            continue
        shown = exp if exp is not None else act
        assert shown is not None
        if exp is None:
            kind = "extra event"
        elif act is None:
            kind = "missing event"
        else:
            kind = "digest"
        return Mismatch(
            pcr=pcr,
            bank=bank,
            kind=kind,
            index=n,
            event_type=shown.type_name,
            description=f"PCR {pcr} event {n} {describe(shown)}",
            expected=exp_d.hex() if exp_d is not None else None,
            actual=act_d.hex() if act_d is not None else None,
        )
    return None


def compare(
    expected: Mapping[str, Any],
    actual: EventLog,
    actual_pcrs: Mapping[str, Mapping[int, bytes]] | None = None,
) -> Verdict:
    """Judge a real log (and optionally the TPM's PCR values) against measurements.json."""
    want = _expected_pcrs(expected)
    exp_events = from_cel(expected.get("events", []), "measurements: events")
    rows: list[Row] = []
    mismatches: list[Mismatch] = []
    log_banks = set(actual.banks)
    for bank, values in want.items():
        size = ALGORITHMS[bank_id(bank)][1]
        if bank not in log_banks:
            for pcr, value in sorted(values.items()):
                rows.append(Row(pcr, bank, value.hex(), "", False))
                mismatches.append(
                    Mismatch(
                        pcr,
                        bank,
                        "bank missing",
                        None,
                        None,
                        f"PCR {pcr} bank {bank} not in the event log",
                        value.hex(),
                        None,
                    )
                )
            continue
        try:
            replayed = replay(actual.events, bank)
        except InputFileError as exc:
            raise VerificationError(f"event log cannot be replayed: {exc.message}") from exc
        try:
            exp_replayed = replay(exp_events, bank)
        except InputFileError as exc:
            raise VerificationError(
                f"measurements: events cannot be replayed: {exc.message}"
            ) from exc
        tpm = actual_pcrs.get(bank) if actual_pcrs is not None else None
        for pcr, value in sorted(values.items()):
            from_log = replayed.get(pcr, bytes(size))
            act = from_log
            if actual_pcrs is not None:
                if tpm is None or pcr not in tpm:
                    mismatches.append(
                        Mismatch(
                            pcr,
                            bank,
                            "tpm disagrees",
                            None,
                            None,
                            f"PCR {pcr} not reported by the TPM",
                            from_log.hex(),
                            None,
                        )
                    )
                elif bytes(tpm[pcr]) != from_log:
                    mismatches.append(
                        Mismatch(
                            pcr,
                            bank,
                            "tpm disagrees",
                            None,
                            None,
                            f"PCR {pcr} log replay differs from the TPM's value",
                            from_log.hex(),
                            bytes(tpm[pcr]).hex(),
                        )
                    )
                    act = bytes(tpm[pcr])
            equal = act == value
            rows.append(Row(pcr, bank, value.hex(), act.hex(), equal))
            if pcr not in replayed and value != bytes(size):
                mismatches.append(
                    Mismatch(
                        pcr,
                        bank,
                        "missing event",
                        0,
                        None,
                        f"PCR {pcr} expected but absent from the event log",
                        value.hex(),
                        None,
                    )
                )
                continue
            # Event by event, whatever the PCR values say, so an edited expected event or an
            # event the TPM value happens to hide is still caught.
            diff = _first_event_difference(
                pcr, bank, _by_pcr(exp_events, pcr), _by_pcr(actual.events, pcr)
            )
            if diff is not None:
                mismatches.append(diff)
            elif from_log != value:
                mismatches.append(
                    Mismatch(
                        pcr,
                        bank,
                        "value",
                        None,
                        None,
                        f"PCR {pcr} differs though its events agree",
                        value.hex(),
                        from_log.hex(),
                    )
                )
            if exp_replayed.get(pcr, bytes(size)) != value:
                mismatches.append(
                    Mismatch(
                        pcr,
                        bank,
                        "inconsistent",
                        None,
                        None,
                        f"PCR {pcr}: the expected events do not replay to the expected value "
                        "(measurements edited?)",
                        value.hex(),
                        exp_replayed.get(pcr, bytes(size)).hex(),
                    )
                )
    return Verdict(not mismatches and bool(rows), tuple(rows), tuple(mismatches))
