"""Capped, jittered exponential back-off: the delay before retry number ``attempt``.

Used by the MQTT link (reconnects) and the meter drivers (retries and the per-device
unreachable period). Pure: the random source is passed in, so tests are exact.

The delay grows as ``base * 2**attempt`` up to ``cap`` and is then spread over
``[delay/2, delay]`` ("equal jitter", AWS Architecture Blog, *Exponential Backoff And
Jitter*, 2015): after a broker restart, hundreds of gateways do not reconnect in the
same instant, yet none retries sooner than half its nominal delay.
"""

from __future__ import annotations

from collections.abc import Callable


def backoff_delay(
    attempt: int, *, base: float, cap: float, uniform: Callable[[float, float], float]
) -> float:
    """Seconds to wait before retry ``attempt`` (0 = the first retry); ``uniform(a, b)`` jitters."""
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0, got {attempt}")
    # 2**attempt overflows a float only for absurd attempts; cap the exponent first.
    nominal = min(cap, base * 2 ** min(attempt, 62))
    return uniform(nominal / 2, nominal)
