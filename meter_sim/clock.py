"""The simulator's injectable clock: simulated Unix seconds, optionally accelerated.

The meter core never reads the real clock; it is handed a :class:`Clock` and asks it
``now()`` (integer Unix seconds, the unit on the wire). Tests use :class:`FixedClock` or
:class:`ManualClock`; the shells (CLI, fleet runner) build an :class:`AcceleratedClock`
with :meth:`AcceleratedClock.real` and may seed it from :func:`system_now`. Those two
factories are the only code in ``meter_sim``'s core modules that touch ``time``, and
only the shells call them.

Accelerated time: ``sim = start_sim + floor(real_elapsed * speed)`` with an integer
``speed`` (1 = real time, 1440 = one simulated day per real minute). The real elapsed
time is a float of the monotonic source; it is turned into integer seconds once, with
floor, so ``now()`` never runs ahead of the real source and never goes backwards while
the source does not.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class ClockError(ValueError):
    """A clock built with bad arguments, or a naive datetime where an aware one is needed."""


class Clock(Protocol):
    """Source of simulated time."""

    def now(self) -> int:
        """Current simulated time in integer Unix seconds."""
        ...


def _check_unix(name: str, value: object) -> int:
    # bool is an int subclass; True as a timestamp is always a bug.
    if type(value) is not int:
        raise ClockError(f"{name} must be an int (Unix seconds), got {value!r}")
    if value < 0:
        raise ClockError(f"{name} must be >= 0 (Unix seconds), got {value}")
    return value


@dataclass(frozen=True, slots=True)
class FixedClock:
    """A clock stopped at one instant (tests)."""

    t: int

    def __post_init__(self) -> None:
        _check_unix("t", self.t)

    def now(self) -> int:
        """The fixed instant."""
        return self.t


@dataclass(slots=True)
class ManualClock:
    """A clock a test moves by hand: :meth:`set` anywhere, :meth:`advance` forwards."""

    t: int = 0

    def __post_init__(self) -> None:
        _check_unix("t", self.t)

    def now(self) -> int:
        """The instant last set."""
        return self.t

    def set(self, t: int) -> None:
        """Jump to ``t``; backwards too, as an RTC correction would."""
        self.t = _check_unix("t", t)

    def advance(self, seconds: int) -> int:
        """Move forward by ``seconds`` (>= 0) and return the new time."""
        if type(seconds) is not int or seconds < 0:
            raise ClockError(f"advance needs an int >= 0 seconds, got {seconds!r}")
        self.t += seconds
        return self.t


@dataclass(frozen=True, slots=True)
class AcceleratedClock:
    """Simulated time running ``speed`` times faster than an injected monotonic source."""

    start_sim: int
    speed: int
    real_monotonic: Callable[[], float] = field(repr=False, compare=False)
    #: the monotonic source's reading at construction: simulated time starts here
    real_start: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_unix("start_sim", self.start_sim)
        if type(self.speed) is not int or self.speed < 1:
            raise ClockError(f"speed must be an int >= 1, got {self.speed!r}")
        # frozen: the one write, at construction, goes through object.__setattr__.
        object.__setattr__(self, "real_start", self.real_monotonic())

    @classmethod
    def real(cls, start_sim: int, speed: int = 1) -> AcceleratedClock:
        """A clock driven by :func:`time.monotonic`. For the shells (CLI/fleet) only."""
        return cls(start_sim, speed, time.monotonic)

    def now(self) -> int:
        """``start_sim + floor(real_elapsed * speed)``."""
        elapsed = self.real_monotonic() - self.real_start
        return self.start_sim + math.floor(elapsed * self.speed)

    def real_seconds(self, sim_s: int) -> float:
        """Real seconds that ``sim_s`` simulated seconds take (to schedule a sleep)."""
        if type(sim_s) is not int or sim_s < 0:
            raise ClockError(f"a simulated duration must be an int >= 0, got {sim_s!r}")
        return sim_s / self.speed

    def real_seconds_until(self, sim_t: int) -> float:
        """Real seconds from now until simulated time reaches ``sim_t``; 0.0 if already past.

        Computed from the real source rather than from ``now()`` so a sleep scheduled
        with it ends on the simulated second, not up to one simulated second late.
        """
        if type(sim_t) is not int:
            raise ClockError(f"sim_t must be an int (Unix seconds), got {sim_t!r}")
        target_elapsed = (sim_t - self.start_sim) / self.speed
        return max(0.0, target_elapsed - (self.real_monotonic() - self.real_start))


def system_now() -> int:
    """The host's wall-clock time in integer Unix seconds. For the shells (CLI/fleet) only."""
    return int(time.time())


def ensure_aware(dt: datetime) -> datetime:
    """Return ``dt`` unchanged if it is timezone-aware; raise :class:`ClockError` if naive."""
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ClockError(f"naive datetime {dt.isoformat()} has no timezone offset")
    return dt


def unix_seconds(dt: datetime) -> int:
    """Integer Unix seconds of an aware datetime, floored (sub-second parts dropped)."""
    # timedelta floor division is exact integer arithmetic; dt.timestamp() is a float.
    return (ensure_aware(dt) - _EPOCH) // timedelta(seconds=1)
