"""TokenStatus wire values are frozen; their derived properties are what callers branch on."""

from __future__ import annotations

from firmware_protocol.status import TokenStatus


def test_wire_values_never_change() -> None:
    assert {s.name: s.value for s in TokenStatus} == {
        "NONE": 0,
        "ACCEPTED": 1,
        "ALREADY_APPLIED": 2,
        "BAD_SIGNATURE": 3,
        "WRONG_METER": 4,
        "EXPIRED": 5,
        "UNKNOWN_KEY": 6,
        "MALFORMED": 7,
        "TOO_OLD": 8,
        "NOT_YET_VALID": 9,
        "PENDING": 10,
        "UNKNOWN_VERSION": 11,
        "REFUSED": 12,
    }


def test_applied_and_final() -> None:
    assert {s for s in TokenStatus if s.applied} == {
        TokenStatus.ACCEPTED,
        TokenStatus.ALREADY_APPLIED,
    }
    assert not TokenStatus.PENDING.final
    assert not TokenStatus.NONE.final
    assert TokenStatus.BAD_SIGNATURE.final
