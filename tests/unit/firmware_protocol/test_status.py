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


def test_status_for_error_is_most_specific() -> None:
    from firmware_protocol import errors
    from firmware_protocol.status import status_for_error

    cases = {
        errors.UnknownVersionError("x"): TokenStatus.UNKNOWN_VERSION,
        errors.PayloadTooLargeError("x"): TokenStatus.MALFORMED,
        errors.MalformedError("x"): TokenStatus.MALFORMED,
        errors.SignatureError("x"): TokenStatus.BAD_SIGNATURE,
        errors.UnknownKeyError("x"): TokenStatus.UNKNOWN_KEY,
        errors.WrongMeterError("x"): TokenStatus.WRONG_METER,
        errors.ExpiredError("x"): TokenStatus.EXPIRED,
        errors.NotYetValidError("x"): TokenStatus.NOT_YET_VALID,
        errors.AlreadyAppliedError("x"): TokenStatus.ALREADY_APPLIED,
        errors.TooOldError("x"): TokenStatus.TOO_OLD,
        errors.TariffError("x"): TokenStatus.REFUSED,
    }
    for exc, status in cases.items():
        assert status_for_error(exc) is status, exc
