"""The injectable clock: fixed, manual and accelerated time, and the aware-datetime helpers."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta, timezone, tzinfo

import pytest

from meter_sim.clock import (
    AcceleratedClock,
    Clock,
    ClockError,
    FixedClock,
    ManualClock,
    ensure_aware,
    system_now,
    unix_seconds,
)

T0 = 1_780_000_000  # 2026-05-28T20:26:40Z


class FakeMonotonic:
    """A monotonic source a test moves by hand."""

    def __init__(self, value: float = 1000.0) -> None:
        self.value = value
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        return self.value


def test_all_clocks_satisfy_the_protocol() -> None:
    clocks: list[Clock] = [
        FixedClock(T0),
        ManualClock(T0),
        AcceleratedClock(T0, 1, FakeMonotonic()),
    ]
    assert [c.now() for c in clocks] == [T0, T0, T0]


def test_fixed_clock() -> None:
    clock = FixedClock(T0)
    assert clock.now() == T0
    assert clock.now() == T0
    assert FixedClock(0).now() == 0


@pytest.mark.parametrize("bad", [-1, True, 1.5, "1", None])
def test_fixed_and_manual_clock_reject_bad_times(bad: object) -> None:
    with pytest.raises(ClockError, match=r"t must be"):
        FixedClock(bad)  # type: ignore[arg-type]
    with pytest.raises(ClockError, match=r"t must be"):
        ManualClock(bad)  # type: ignore[arg-type]
    with pytest.raises(ClockError, match=r"t must be"):
        ManualClock().set(bad)  # type: ignore[arg-type]


def test_manual_clock_set_and_advance() -> None:
    clock = ManualClock()
    assert clock.now() == 0
    clock.set(T0)
    assert clock.now() == T0
    assert clock.advance(60) == T0 + 60
    assert clock.advance(0) == T0 + 60
    assert clock.now() == T0 + 60
    clock.set(T0 - 3600)  # backwards: an RTC correction
    assert clock.now() == T0 - 3600


@pytest.mark.parametrize("bad", [-1, 1.0, True])
def test_manual_clock_refuses_to_advance_backwards_or_by_non_ints(bad: object) -> None:
    clock = ManualClock(T0)
    with pytest.raises(ClockError, match="advance"):
        clock.advance(bad)  # type: ignore[arg-type]
    assert clock.now() == T0


def test_accelerated_clock_real_time() -> None:
    mono = FakeMonotonic(500.0)
    clock = AcceleratedClock(T0, 1, mono)
    assert clock.now() == T0
    mono.value = 500.999
    assert clock.now() == T0  # floor: never ahead of the real source
    mono.value = 501.0
    assert clock.now() == T0 + 1
    mono.value = 500.0 + 86_400
    assert clock.now() == T0 + 86_400


def test_accelerated_clock_one_day_per_minute() -> None:
    mono = FakeMonotonic(0.0)
    clock = AcceleratedClock(T0, 1440, mono)
    mono.value = 60.0
    assert clock.now() == T0 + 86_400
    mono.value = 0.5
    assert clock.now() == T0 + 720
    mono.value = 0.0001  # 0.144 simulated seconds
    assert clock.now() == T0


def test_accelerated_clock_reads_the_source_once_at_construction() -> None:
    mono = FakeMonotonic(42.0)
    clock = AcceleratedClock(T0, 10, mono)
    assert mono.calls == 1
    assert clock.real_start == 42.0
    mono.value = 43.0
    assert clock.now() == T0 + 10
    assert mono.calls == 2


def test_accelerated_clock_is_monotonic_while_its_source_is() -> None:
    mono = FakeMonotonic(0.0)
    clock = AcceleratedClock(T0, 7, mono)
    seen = []
    for step in range(1, 2000):
        mono.value = step * 0.0137
        seen.append(clock.now())
    assert seen == sorted(seen)
    assert seen[-1] == T0 + int(1999 * 0.0137 * 7)


@pytest.mark.parametrize("bad", [0, -5, True, 1.5, "2"])
def test_accelerated_clock_rejects_bad_speed(bad: object) -> None:
    with pytest.raises(ClockError, match="speed"):
        AcceleratedClock(T0, bad, FakeMonotonic())  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [-1, 1.5, False])
def test_accelerated_clock_rejects_bad_start(bad: object) -> None:
    with pytest.raises(ClockError, match="start_sim"):
        AcceleratedClock(bad, 1, FakeMonotonic())  # type: ignore[arg-type]


def test_real_seconds() -> None:
    clock = AcceleratedClock(T0, 1440, FakeMonotonic())
    assert clock.real_seconds(86_400) == 60.0
    assert clock.real_seconds(0) == 0.0
    assert clock.real_seconds(60) == pytest.approx(60 / 1440)
    assert AcceleratedClock(T0, 1, FakeMonotonic()).real_seconds(15) == 15.0
    for bad in (-1, 1.5):
        with pytest.raises(ClockError, match="simulated duration"):
            clock.real_seconds(bad)  # type: ignore[arg-type]


def test_real_seconds_until() -> None:
    mono = FakeMonotonic(10.0)
    clock = AcceleratedClock(T0, 60, mono)
    assert clock.real_seconds_until(T0 + 3600) == 60.0
    mono.value = 10.5  # 30 simulated seconds later
    assert clock.real_seconds_until(T0 + 60) == 0.5
    assert clock.real_seconds_until(T0 + 30) == 0.0
    assert clock.real_seconds_until(T0) == 0.0  # already past: no negative sleep
    with pytest.raises(ClockError, match="sim_t"):
        clock.real_seconds_until(1.0)  # type: ignore[arg-type]


def test_real_factory_and_system_now_read_the_host_clock() -> None:
    before = int(time.time())
    now = system_now()
    assert isinstance(now, int)
    assert before <= now <= int(time.time())
    clock = AcceleratedClock.real(now, 1)
    assert clock.real_monotonic is time.monotonic
    assert now <= clock.now() <= now + 5
    assert AcceleratedClock.real(now).speed == 1


def test_equality_ignores_the_source() -> None:
    a = AcceleratedClock(T0, 2, FakeMonotonic(1.0))
    b = AcceleratedClock(T0, 2, FakeMonotonic(99.0))
    assert a == b
    assert "real_monotonic" not in repr(a)


class _NoOffset(tzinfo):
    """A tzinfo that is attached but knows no offset: still naive by Python's definition."""

    def utcoffset(self, dt: datetime | None) -> timedelta | None:  # noqa: ARG002 - tzinfo API
        return None

    def dst(self, dt: datetime | None) -> timedelta | None:  # noqa: ARG002 - tzinfo API
        return None

    def tzname(self, dt: datetime | None) -> str | None:  # noqa: ARG002 - tzinfo API
        return None


def test_ensure_aware() -> None:
    aware = datetime(2026, 3, 29, 2, 30, tzinfo=timezone(timedelta(hours=1)))
    assert ensure_aware(aware) is aware
    with pytest.raises(ClockError, match="naive datetime 2026-03-29T02:30:00"):
        ensure_aware(datetime(2026, 3, 29, 2, 30))  # noqa: DTZ001 - the naive case under test
    with pytest.raises(ClockError, match="naive"):
        ensure_aware(datetime(2026, 1, 1, tzinfo=_NoOffset()))


def test_unix_seconds() -> None:
    assert unix_seconds(datetime(1970, 1, 1, tzinfo=UTC)) == 0
    assert unix_seconds(datetime(2026, 5, 28, 20, 26, 40, tzinfo=UTC)) == T0
    plus2 = timezone(timedelta(hours=2))
    assert unix_seconds(datetime(2026, 5, 28, 22, 26, 40, tzinfo=plus2)) == T0
    assert unix_seconds(datetime(2026, 5, 28, 20, 26, 40, 999_999, tzinfo=UTC)) == T0
    assert unix_seconds(datetime(1969, 12, 31, 23, 59, 59, 500_000, tzinfo=UTC)) == -1
    with pytest.raises(ClockError):
        unix_seconds(datetime(2026, 1, 1))  # noqa: DTZ001 - the naive case under test
