"""Decisions of the scheduled checks and alert notifications (pure): levels, episodes, back-off.

Nothing here reads a clock or a database: the checks service (:mod:`backend.service.alerting`)
loads a meter's newest values and the state of its previous check, asks these functions
what changed, and writes the new state and any alert in one unit of work.

**Credit** has three levels, from the meter's reported credit (milli) and its supply
account's low-credit threshold (minor units)::

    OUT   credit <= 0
    LOW   0 < credit < threshold
    OK    credit >= threshold

An alert is raised when the level goes *down* — :data:`CREDIT_TRANSITIONS`, the whole
hysteresis, as one table — and never while it stays there: a meter below its threshold
for a week alerts once, not once a minute. Going up (a top-up) re-arms silently, so the
next fall alerts again. A fall straight from OK to OUT raises only OUT_OF_CREDIT.

**Episodes** (a stale meter, an offline gateway) alert once when they begin and re-arm
when they end (:data:`EPISODE_TRANSITIONS`).

**Days of credit left** divide the credit by the average daily charge (energy, blocks and
standing charges: ``total_milli``) of the billed intervals of the last seven days.

**Delivery** of a notification retries with capped, jittered exponential back-off (the
token dispatcher's :func:`~backend.domain.topups.retry_delay_s`) and gives up after a
fixed number of attempts (:func:`delivery_step`).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from backend.domain.topups import retry_delay_s

DAY_S: Final = 86_400
#: How far back consumption counts for the days-left estimate.
ESTIMATE_WINDOW_S: Final = 7 * DAY_S
#: Less billed history than this gives no estimate (one evening is not a habit).
MIN_ESTIMATE_SPAN_S: Final = 3600


class Signal(enum.StrEnum):
    """An alert a check raises; the values are ``AlertKind`` names."""

    LOW_CREDIT = "LOW_CREDIT"
    OUT_OF_CREDIT = "OUT_OF_CREDIT"
    METER_STALE = "METER_STALE"
    GATEWAY_OFFLINE = "GATEWAY_OFFLINE"


class CreditLevel(enum.StrEnum):
    """Where a meter's credit stands against its thresholds; stored by name."""

    OK = "OK"
    LOW = "LOW"
    OUT = "OUT"


_L = CreditLevel
#: (level at the previous check, level now) → the alert to raise, if any. Every pair is
#: listed: the table is the policy.
CREDIT_TRANSITIONS: Final[Mapping[tuple[CreditLevel, CreditLevel], Signal | None]] = {
    (_L.OK, _L.OK): None,
    (_L.OK, _L.LOW): Signal.LOW_CREDIT,
    (_L.OK, _L.OUT): Signal.OUT_OF_CREDIT,
    (_L.LOW, _L.OK): None,  # topped up: re-armed
    (_L.LOW, _L.LOW): None,  # still low: already said
    (_L.LOW, _L.OUT): Signal.OUT_OF_CREDIT,
    (_L.OUT, _L.OK): None,  # topped up: re-armed
    (_L.OUT, _L.LOW): None,  # partly topped up: OUT re-armed, LOW already said
    (_L.OUT, _L.OUT): None,
}

#: (episode active at the previous check, active now) → raise an alert?
EPISODE_TRANSITIONS: Final[Mapping[tuple[bool, bool], bool]] = {
    (False, False): False,
    (False, True): True,  # an episode begins
    (True, True): False,  # it goes on: already said
    (True, False): False,  # it ended: re-armed
}


def credit_level(credit_milli: int, low_credit_minor: int) -> CreditLevel:
    """The level of ``credit_milli`` against a threshold in minor units (1 minor = 1000 milli)."""
    if credit_milli <= 0:
        return CreditLevel.OUT
    if credit_milli < low_credit_minor * 1000:
        return CreditLevel.LOW
    return CreditLevel.OK


def credit_step(
    previous: CreditLevel, credit_milli: int | None, low_credit_minor: int
) -> tuple[CreditLevel, Signal | None]:
    """The new level and the alert to raise; an unknown credit changes nothing."""
    if credit_milli is None:
        return previous, None
    level = credit_level(credit_milli, low_credit_minor)
    return level, CREDIT_TRANSITIONS[previous, level]


def episode_step(was_active: bool, active: bool, signal: Signal) -> tuple[bool, Signal | None]:
    """The new episode flag and ``signal`` if an episode just began."""
    return active, signal if EPISODE_TRANSITIONS[was_active, active] else None


def meter_stale(last_ts: int | None, now_s: int, stale_after_s: int) -> bool:
    """Whether the newest reading (Unix s) is older than ``stale_after_s``.

    A meter that never reported is not stale: there is no reading to be late yet.
    """
    return last_ts is not None and now_s - last_ts > stale_after_s


def gateway_offline(
    *,
    online: bool,
    state_at_s: int | None,
    last_reading_s: int | None,
    now_s: int,
    offline_after_s: int,
) -> bool:
    """Whether a gateway is offline or silent, for longer than ``offline_after_s``.

    *Offline*: its retained state says ``online: false`` (its Will, or a clean stop) and
    has said so for ``offline_after_s`` — a restart that is back in a minute is not an
    outage. *Silent*: it says it is online (or no state message has been seen at all), but
    neither a state message nor a reading of any of its meters has arrived for
    ``offline_after_s`` (a half-open connection, a hung poller). A gateway never heard
    from at all (just provisioned) is neither.
    """
    heard = [t for t in (state_at_s, last_reading_s) if t is not None]
    if not heard:
        return False
    if not online and state_at_s is not None:
        return now_s - state_at_s >= offline_after_s
    return now_s - max(heard) > offline_after_s


# ---------------------------------------------------------------- days of credit left


@dataclass(frozen=True, slots=True)
class UsageInterval:
    """One billed interval ``(from_ts, to_ts]`` (Unix s) and what it charged (milli)."""

    from_ts: int
    to_ts: int
    total_milli: int


@dataclass(frozen=True, slots=True)
class CreditEstimate:
    """How long the credit lasts at the recent rate of charge.

    ``daily_milli`` is the average charge per day (``None``: no usable history);
    ``days_left`` the credit divided by it, rounded down to a tenth of a day (``None``
    when either is unknown or nothing was charged; ``0.0`` when the credit is gone).
    """

    credit_milli: int | None
    daily_milli: int | None
    days_left: float | None
    #: Seconds of billed history the average is taken over.
    span_s: int


def estimate_days_left(
    intervals: Iterable[UsageInterval],
    credit_milli: int | None,
    now_s: int,
    *,
    window_s: int = ESTIMATE_WINDOW_S,
    min_span_s: int = MIN_ESTIMATE_SPAN_S,
) -> CreditEstimate:
    """Days of credit left from the intervals that ended in ``(now - window, now]``.

    The average is over the billed span — from the start of the earliest such interval to
    the end of the newest — not over the whole window, so a meter commissioned two days
    ago is averaged over two days; a span shorter than ``min_span_s`` gives no estimate.
    Gaps need no care: cumulative registers put a gap's energy into the next interval.
    """
    start = now_s - window_s
    used = [i for i in intervals if start < i.to_ts <= now_s]
    if not used:
        return CreditEstimate(credit_milli, None, None, 0)
    span_s = max(i.to_ts for i in used) - min(i.from_ts for i in used)
    total_milli = sum(i.total_milli for i in used)
    if span_s < min_span_s:
        return CreditEstimate(credit_milli, None, None, span_s)
    daily_milli = total_milli * DAY_S // span_s
    if credit_milli is None or daily_milli <= 0:
        return CreditEstimate(credit_milli, daily_milli, None, span_s)
    if credit_milli <= 0:
        return CreditEstimate(credit_milli, daily_milli, 0.0, span_s)
    # Tenths of a day, rounded down (integers until the last step: an estimate that says
    # 1.0 day must never be 0.96 of one).
    tenths = credit_milli * 10 // daily_milli
    return CreditEstimate(credit_milli, daily_milli, tenths / 10, span_s)


# ---------------------------------------------------------------- notification delivery


class DeliveryStatus(enum.StrEnum):
    """Where a notification stands; stored by name."""

    PENDING = "PENDING"  #: waiting for its next attempt (or one is under way)
    DELIVERED = "DELIVERED"  #: the endpoint answered 2xx
    FAILED = "FAILED"  #: given up after the last attempt
    CANCELLED = "CANCELLED"  #: its endpoint was deleted first


@dataclass(frozen=True, slots=True)
class DeliveryStep:
    """After an attempt: the new status and, while PENDING, seconds until the next attempt."""

    status: DeliveryStatus
    retry_in_s: float | None


def delivery_step(
    attempts: int,
    *,
    delivered: bool,
    max_attempts: int,
    base_s: float,
    cap_s: float,
    uniform: Callable[[float, float], float],
) -> DeliveryStep:
    """What follows attempt number ``attempts`` (>= 1): delivered, retry later, or give up.

    Retry ``n`` waits ``base * 2**(n-1)`` seconds capped at ``cap``, spread over
    ``[d/2, d]`` (equal jitter), so endpoints coming back after an outage are not hit
    by every pending notification in the same instant.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    if delivered:
        return DeliveryStep(DeliveryStatus.DELIVERED, None)
    if attempts >= max_attempts:
        return DeliveryStep(DeliveryStatus.FAILED, None)
    delay = retry_delay_s(attempts, base_s=base_s, cap_s=cap_s, uniform=uniform)
    return DeliveryStep(DeliveryStatus.PENDING, delay)
