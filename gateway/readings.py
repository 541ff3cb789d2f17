"""Pure mapping from what meters report to what the gateway publishes: readings, batches, birth.

No I/O here: the service polls, this module shapes. ``band_wh`` policy (MQTT.md §3.2
lets a gateway omit trailing bands): the meter's 8 band registers are sent with
**trailing zero registers trimmed, at least one kept** — a band the active tariff does
not have is always 0, and a consumer reads a missing trailing band as 0 Wh. A band that
was used once (cumulative > 0) is never trimmed, so no energy ever disappears.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from firmware_protocol import modbus_map as mm
from firmware_protocol.mqtt import (
    MAX_READINGS_PER_BATCH,
    GatewayState,
    MeterPresence,
    Reading,
    Relay,
)

_RELAY = {mm.RelayState.CLOSED: Relay.CLOSED, mm.RelayState.OPEN: Relay.OPEN}


def trim_bands(bands: Sequence[int]) -> tuple[int, ...]:
    """The band registers without trailing zeros, keeping at least the first."""
    end = len(bands)
    while end > 1 and bands[end - 1] == 0:
        end -= 1
    return tuple(bands[:end])


def reading_from_snapshot(snap: mm.MeterSnapshot) -> Reading:
    """One poll block as an MQTT :class:`Reading` (MQTT.md §3.2 names each source register).

    ``ts`` is the meter's own clock (the instant the registers belong to) and
    ``last_token_id`` its ``last_message_id`` register (the last message it processed
    and, in this firmware, accepted).
    """
    return Reading(
        meter=snap.meter_id,
        ts=snap.clock_unix,
        import_wh=snap.import_wh,
        band_wh=trim_bands(snap.import_wh_bands),
        credit_milli=snap.credit_milli,
        relay=_RELAY[snap.relay_state],
        power_w=snap.power_w,
        voltage_dv=snap.voltage_dv,
        current_ma=snap.current_ma,
        tariff_id=snap.active_tariff_id,
        last_token_id=snap.token.last_message_id,
        status_flags=int(snap.status_flags),
        block_period=snap.block_period_index,
        block_period_wh=snap.block_period_wh,
    )


def chunk_readings(
    readings: Sequence[Reading], size: int = MAX_READINGS_PER_BATCH
) -> list[tuple[Reading, ...]]:
    """Readings split into batches of at most ``size`` (a batch holds 1..1000)."""
    return [tuple(readings[i : i + size]) for i in range(0, len(readings), size)]


def is_historical(created: int, now: float, poll_interval_s: float) -> bool:
    """A batch is *historical* when it waited longer than one poll interval to be sent.

    ``created`` is stored in whole seconds (the outbox's column), so a batch made at
    12.9 s has ``created`` 12: allow that second, or at sub-second poll intervals every
    other live batch would look late.
    """
    return now - created > poll_interval_s + 1


def birth_state(*, boot_seq: int, now: int, fw: str, reachable: Mapping[int, bool]) -> GatewayState:
    """The retained birth (MQTT.md §3.3): online, the software version, every meter ascending."""
    meters = tuple(MeterPresence(meter=m, reachable=reachable[m]) for m in sorted(reachable))
    return GatewayState(online=True, boot_seq=boot_seq, ts=now, fw=fw, meters=meters)


def offline_state(*, boot_seq: int, now: int) -> GatewayState:
    """The Will, and what a clean stop publishes (MQTT.md §3.3)."""
    return GatewayState(online=False, boot_seq=boot_seq, ts=now)


def latest_per_meter(readings: Iterable[Reading]) -> dict[int, Reading]:
    """The newest reading (by ``ts``) of each meter among ``readings``."""
    out: dict[int, Reading] = {}
    for r in readings:
        if r.meter not in out or r.ts > out[r.meter].ts:
            out[r.meter] = r
    return out
