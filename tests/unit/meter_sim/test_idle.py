"""Idle time (relay open or no power) jumps between boundaries and gives the same state."""

from __future__ import annotations

import datetime as dt
import zoneinfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_protocol import messages, units
from firmware_protocol.vectors import EXAMPLE_TOU, TEST_KEY_ID, TEST_SEED
from meter_sim import core

BERLIN = zoneinfo.ZoneInfo("Europe/Berlin")
T0 = int(dt.datetime(2026, 3, 27, 12, 0, tzinfo=BERLIN).timestamp())  # Friday before DST
PUB = messages.Ed25519Signer(TEST_KEY_ID, messages.load_private_key(TEST_SEED)).public_key_bytes()


class Zero:
    """A load of 0 W that the core does not recognise as 'no power'."""

    def power_w(self, t: int) -> int:
        del t
        return 0


def test_next_change_of_a_night_window() -> None:
    f = core.FriendlyHours("Europe/Berlin", night_start_minute=18 * 60, night_end_minute=8 * 60)
    first = f.next_change(T0)
    assert first == int(dt.datetime(2026, 3, 27, 18, 0, tzinfo=BERLIN).timestamp())
    second = f.next_change(first)
    assert second == int(dt.datetime(2026, 3, 28, 8, 0, tzinfo=BERLIN).timestamp())
    assert not f.active(first - 1)
    assert f.active(first)
    assert core.FriendlyHours("Europe/Berlin").next_change(T0) is None
    weekends = core.FriendlyHours("Europe/Berlin", weekends=True)
    assert weekends.next_change(T0) == int(dt.datetime(2026, 3, 28, tzinfo=BERLIN).timestamp())


@pytest.mark.parametrize(
    "friendly",
    [
        core.FriendlyHours("Europe/Berlin"),
        core.FriendlyHours(
            "Europe/Berlin", night_start_minute=1320, night_end_minute=360, weekends=True
        ),
    ],
)
@settings(max_examples=15, deadline=None)
@given(
    days=st.integers(0, 40), extra=st.integers(0, 86_399), credit=st.integers(-5_000_000, 5_000_000)
)
def test_idle_jump_equals_minute_steps(
    friendly: core.FriendlyHours, days: int, extra: int, credit: int
) -> None:
    config = core.MeterConfig(meter_id=5, currency=units.currency("EUR"), friendly=friendly)
    state = core.new_meter(
        config, tariff=EXAMPLE_TOU, trusted_keys={TEST_KEY_ID: PUB}, now=T0, credit_milli=credit
    )
    end = T0 + days * 86_400 + extra
    stepped = core.advance(state, config, end, Zero())
    jumped = core.advance(state, config, end, core._NoLoad())
    assert jumped == stepped
