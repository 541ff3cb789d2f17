"""Decisions of the scheduled checks, table first: hysteresis, episodes, days left, back-off."""

from __future__ import annotations

import itertools

import pytest

from backend.adapters.db.alert_tables import AlertKind
from backend.domain.alerting import (
    CREDIT_TRANSITIONS,
    DAY_S,
    EPISODE_TRANSITIONS,
    CreditLevel,
    DeliveryStatus,
    Signal,
    UsageInterval,
    credit_level,
    credit_step,
    delivery_step,
    episode_step,
    estimate_days_left,
    gateway_offline,
    meter_stale,
)

OK, LOW, OUT = CreditLevel.OK, CreditLevel.LOW, CreditLevel.OUT


def test_signals_are_alert_kinds() -> None:
    for signal in Signal:
        assert AlertKind(signal.value).value == signal.value


def test_transition_tables_are_complete() -> None:
    assert set(CREDIT_TRANSITIONS) == set(itertools.product(CreditLevel, CreditLevel))
    assert set(EPISODE_TRANSITIONS) == set(itertools.product((False, True), (False, True)))
    # Only falls alert; rising (a top-up) or staying never does.
    order = {OUT: 0, LOW: 1, OK: 2}
    for (before, after), signal in CREDIT_TRANSITIONS.items():
        assert (signal is not None) == (order[after] < order[before]), (before, after)


@pytest.mark.parametrize(
    ("credit_milli", "threshold_minor", "level"),
    [
        (-1, 300, OUT),
        (0, 300, OUT),
        (1, 300, LOW),
        (299_999, 300, LOW),
        (300_000, 300, OK),  # at the threshold is not below it
        (300_001, 300, OK),
        (1, 0, OK),  # no threshold: only OUT can alert
        (0, 0, OUT),
    ],
)
def test_credit_level(credit_milli: int, threshold_minor: int, level: CreditLevel) -> None:
    assert credit_level(credit_milli, threshold_minor) is level


# The hysteresis as one table: (previous level, credit now) → (new level, alert).
THRESHOLD = 500  # minor units: 500_000 milli
HYSTERESIS = [
    (OK, 600_000, OK, None),
    (OK, 499_999, LOW, Signal.LOW_CREDIT),
    (OK, 0, OUT, Signal.OUT_OF_CREDIT),  # straight to OUT: one alert, the severe one
    (LOW, 400_000, LOW, None),  # still below: no second alert
    (LOW, 1, LOW, None),
    (LOW, 0, OUT, Signal.OUT_OF_CREDIT),
    (LOW, -5_000, OUT, Signal.OUT_OF_CREDIT),
    (LOW, 500_000, OK, None),  # topped up: re-armed
    (OUT, -1, OUT, None),
    (OUT, 100_000, LOW, None),  # partial top-up: LOW was said already
    (OUT, 2_000_000, OK, None),
    (OK, None, OK, None),  # no credit reported yet: nothing changes
    (LOW, None, LOW, None),
]


@pytest.mark.parametrize(("before", "credit", "after", "signal"), HYSTERESIS)
def test_credit_hysteresis_table(
    before: CreditLevel, credit: int | None, after: CreditLevel, signal: Signal | None
) -> None:
    assert credit_step(before, credit, THRESHOLD) == (after, signal)


def test_a_week_of_falling_credit_alerts_once_per_crossing() -> None:
    level, raised = OK, []
    falls = [900_000, 600_000, 499_000, 450_000, 300_000, 1_000, 0, -20_000, -40_000]
    falls += [1_000_000, 700_000, 480_000, 470_000]  # top-up, then a new fall
    for credit in falls:
        level, signal = credit_step(level, credit, THRESHOLD)
        if signal is not None:
            raised.append((credit, signal))
    assert raised == [
        (499_000, Signal.LOW_CREDIT),
        (0, Signal.OUT_OF_CREDIT),
        (480_000, Signal.LOW_CREDIT),
    ]


@pytest.mark.parametrize(
    ("was", "now", "active", "raised"),
    [
        (False, False, False, False),
        (False, True, True, True),
        (True, True, True, False),
        (True, False, False, False),
    ],
)
def test_episode_table(was: bool, now: bool, active: bool, raised: bool) -> None:
    signal = Signal.METER_STALE if raised else None
    assert episode_step(was, now, Signal.METER_STALE) == (active, signal)


def test_meter_stale() -> None:
    assert not meter_stale(None, 10_000, 900)  # never reported: nothing is late
    assert not meter_stale(10_000 - 900, 10_000, 900)
    assert meter_stale(10_000 - 901, 10_000, 900)


NOW = 1_000_000


@pytest.mark.parametrize(
    ("online", "state_at", "reading", "offline"),
    [
        (False, None, None, False),  # provisioned, never connected: not an outage
        (True, None, None, False),
        (False, NOW - 60, NOW - 60, False),  # a quick restart is not an outage yet
        (False, NOW - 900, None, True),  # offline for the whole threshold
        (False, NOW - 3600, NOW - 10, True),  # offline: readings do not arrive from it
        (True, NOW - 86_400, NOW - 30, False),  # online for a day, readings flowing
        (True, NOW - 86_400, NOW - 901, True),  # online but silent
        (True, NOW - 901, None, True),
        (True, NOW - 100, NOW - 5000, False),  # a fresh birth message counts
        (False, None, NOW - 10, False),  # no state message seen yet: readings speak
        (False, None, NOW - 901, True),
    ],
)
def test_gateway_offline(
    online: bool, state_at: int | None, reading: int | None, offline: bool
) -> None:
    got = gateway_offline(
        online=online,
        state_at_s=state_at,
        last_reading_s=reading,
        now_s=NOW,
        offline_after_s=900,
    )
    assert got is offline


# ------------------------------------------------------------------- days left


def hourly(days: float, milli_per_hour: int, *, end: int = NOW) -> list[UsageInterval]:
    hours = int(days * 24)
    return [
        UsageInterval(end - (h + 1) * 3600, end - h * 3600, milli_per_hour) for h in range(hours)
    ]


def test_days_left_of_a_steady_week() -> None:
    intervals = hourly(7, 50_000)  # 50 minor units an hour: 1_200_000 milli a day
    estimate = estimate_days_left(intervals, 3_000_000, NOW)
    assert estimate.daily_milli == 1_200_000
    assert estimate.days_left == 2.5
    assert estimate.span_s == 7 * DAY_S


def test_days_left_only_counts_the_last_seven_days() -> None:
    old = hourly(3, 1_000_000, end=NOW - 7 * DAY_S)  # heavy use before the window
    estimate = estimate_days_left([*old, *hourly(7, 50_000)], 3_000_000, NOW)
    assert estimate.daily_milli == 1_200_000
    future = [UsageInterval(NOW, NOW + 3600, 10**9)]  # not yet: ignored
    assert estimate_days_left([*hourly(7, 50_000), *future], 3_000_000, NOW) == estimate


def test_days_left_averages_over_the_billed_span_not_the_window() -> None:
    # Commissioned two days ago: two days of history, not seven.
    estimate = estimate_days_left(hourly(2, 50_000), 600_000, NOW)
    assert (estimate.daily_milli, estimate.days_left, estimate.span_s) == (
        1_200_000,
        0.5,
        2 * DAY_S,
    )


def test_days_left_rounds_down_to_a_tenth() -> None:
    estimate = estimate_days_left(hourly(1, 100_000), 2_399_999, NOW)  # 2_400_000 a day
    assert estimate.daily_milli == 2_400_000
    assert estimate.days_left == 0.9


def test_gaps_need_no_care() -> None:
    # A day without readings: the next interval spans it and carries its energy.
    intervals = [
        UsageInterval(NOW - 3 * DAY_S, NOW - 2 * DAY_S, 1_000_000),
        UsageInterval(NOW - 2 * DAY_S, NOW, 2_000_000),
    ]
    estimate = estimate_days_left(intervals, 5_000_000, NOW)
    assert (estimate.daily_milli, estimate.days_left) == (1_000_000, 5.0)


@pytest.mark.parametrize(
    ("intervals", "credit", "daily", "days"),
    [
        ([], 1_000, None, None),  # no consumption: no estimate
        (hourly(7, 0), 1_000, 0, None),  # nothing charged: cannot run out
        ([UsageInterval(NOW - 600, NOW, 5_000)], 1_000, None, None),  # too little history
        (hourly(1, 10_000), None, 240_000, None),  # credit unknown
        (hourly(1, 10_000), 0, 240_000, 0.0),  # nothing left
        (hourly(1, 10_000), -50_000, 240_000, 0.0),
    ],
)
def test_days_left_without_an_answer(
    intervals: list[UsageInterval], credit: int | None, daily: int | None, days: float | None
) -> None:
    estimate = estimate_days_left(intervals, credit, NOW)
    assert (estimate.daily_milli, estimate.days_left) == (daily, days)


# ------------------------------------------------------------------- delivery back-off


def upper(lo: float, hi: float) -> float:
    return hi


def lower(lo: float, hi: float) -> float:
    return lo


def test_backoff_schedule_doubles_to_the_cap_and_gives_up() -> None:
    steps = [
        delivery_step(n, delivered=False, max_attempts=8, base_s=10, cap_s=300, uniform=upper)
        for n in range(1, 9)
    ]
    assert [s.retry_in_s for s in steps] == [10, 20, 40, 80, 160, 300, 300, None]
    assert [s.status for s in steps] == [DeliveryStatus.PENDING] * 7 + [DeliveryStatus.FAILED]


def test_backoff_is_jittered_over_the_upper_half() -> None:
    low = delivery_step(3, delivered=False, max_attempts=8, base_s=10, cap_s=300, uniform=lower)
    assert low.retry_in_s == 20  # nominal 40, equal jitter: [20, 40]


def test_a_2xx_delivers_on_any_attempt_even_the_last() -> None:
    for attempt in (1, 8):
        step = delivery_step(
            attempt, delivered=True, max_attempts=8, base_s=10, cap_s=300, uniform=upper
        )
        assert step.status is DeliveryStatus.DELIVERED
        assert step.retry_in_s is None


def test_one_attempt_means_no_retry() -> None:
    step = delivery_step(1, delivered=False, max_attempts=1, base_s=1, cap_s=1, uniform=upper)
    assert step.status is DeliveryStatus.FAILED
    with pytest.raises(ValueError, match="attempts"):
        delivery_step(0, delivered=False, max_attempts=1, base_s=1, cap_s=1, uniform=upper)
