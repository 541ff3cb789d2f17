"""Anti-replay window: table cases plus a model-based property against a plain set."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware_protocol import errors
from firmware_protocol.replay import WINDOW, ReplayWindow, Verdict


def test_in_order_out_of_order_and_too_old() -> None:
    w = ReplayWindow()
    for i in (1, 2, 5, 3):
        w = w.accept(i)
    assert w.highest == 5
    assert w.verdict(4) is Verdict.NEW
    assert w.verdict(3) is Verdict.ALREADY_APPLIED
    with pytest.raises(errors.AlreadyAppliedError):
        w.accept(5)
    w = w.accept(5 + WINDOW - 1)
    assert w.verdict(5) is Verdict.ALREADY_APPLIED
    assert w.verdict(4) is Verdict.TOO_OLD
    with pytest.raises(errors.TooOldError):
        w.accept(4)
    w = w.accept(10_000)
    assert w.bitmap == 1
    assert ReplayWindow.from_bytes(w.to_bytes()) == w


@given(st.lists(st.integers(1, 300), max_size=200))
def test_matches_a_model(ids: list[int]) -> None:
    """Never accepts an id twice; refuses only ids it must (seen, or below the window)."""
    w = ReplayWindow()
    seen: set[int] = set()
    for i in ids:
        verdict = w.verdict(i)
        if i in seen:
            assert verdict is not Verdict.NEW
        elif verdict is Verdict.NEW:
            w = w.accept(i)
            seen.add(i)
        else:
            assert verdict is Verdict.TOO_OLD
            assert i <= w.highest - WINDOW
        assert ReplayWindow.from_bytes(w.to_bytes()) == w


@pytest.mark.parametrize(
    ("highest", "bitmap"),
    [(-1, 0), (0, 1), (5, 0), (5, 2), (2**32, 1), (1, 2**64), (True, 1)],
)
def test_rejects_inconsistent_state(highest: int, bitmap: int) -> None:
    with pytest.raises(errors.MalformedError):
        ReplayWindow(highest, bitmap)


def test_rejects_bad_ids_and_bytes() -> None:
    for bad in (0, -1, 2**32, True):
        with pytest.raises(errors.MalformedError):
            ReplayWindow().accept(bad)
    with pytest.raises(errors.MalformedError, match="12 bytes"):
        ReplayWindow.from_bytes(b"\x00" * 11)
