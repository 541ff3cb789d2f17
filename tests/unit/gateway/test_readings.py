"""Pure helpers: snapshot → reading, band trimming, batching, historical, birth; back-off."""

from __future__ import annotations

import pytest

from firmware_protocol import mqtt
from gateway.backoff import backoff_delay
from gateway.readings import (
    birth_state,
    chunk_readings,
    is_historical,
    latest_per_meter,
    offline_state,
    reading_from_snapshot,
    trim_bands,
)
from tests.unit.gateway.fakes import snapshot


@pytest.mark.parametrize(
    ("bands", "trimmed"),
    [
        ((0,) * 8, (0,)),
        ((5, 0, 0), (5,)),
        ((5, 0, 7, 0), (5, 0, 7)),
        ((0, 3), (0, 3)),
        ((1,) * 8, (1,) * 8),
    ],
)
def test_trailing_zero_bands_are_trimmed_keeping_one(
    bands: tuple[int, ...], trimmed: tuple[int, ...]
) -> None:
    assert trim_bands(bands) == trimmed


def test_reading_from_snapshot_maps_every_field() -> None:
    r = reading_from_snapshot(snapshot(42, clock=1_700_000_000, credit=-1500, wh=900))
    assert r == mqtt.Reading(
        meter=42,
        ts=1_700_000_000,
        import_wh=900,
        band_wh=(900,),
        credit_milli=-1500,
        relay=mqtt.Relay.CLOSED,
        power_w=10,
        voltage_dv=2300,
        current_ma=43,
        tariff_id=1,
        last_token_id=0,
        status_flags=0,
        block_period=24000,
        block_period_wh=900,
    )


def test_chunks_latest_historical() -> None:
    rs = [reading_from_snapshot(snapshot(m, clock=t)) for m in (1, 2) for t in (5, 9, 7)]
    assert [len(c) for c in chunk_readings(rs, 4)] == [4, 2]
    assert {m: r.ts for m, r in latest_per_meter(rs).items()} == {1: 9, 2: 9}
    assert is_historical(100, 162, 60)
    # created is whole seconds: a batch made at 100.9 s and sent 60 s later is not late
    assert not is_historical(100, 161, 60)
    assert not is_historical(100, 100.95, 0.5)
    assert is_historical(100, 101.6, 0.5)


def test_birth_lists_meters_ascending_and_offline_has_none() -> None:
    birth = birth_state(boot_seq=3, now=10, fw="fw 1", reachable={9: False, 2: True})
    assert [(p.meter, p.reachable) for p in birth.meters or ()] == [(2, True), (9, False)]
    assert birth.online
    assert birth.fw == "fw 1"
    assert offline_state(boot_seq=3, now=11) == mqtt.GatewayState(online=False, boot_seq=3, ts=11)


def test_backoff_grows_caps_and_jitters_within_half_to_full() -> None:
    low = [backoff_delay(a, base=0.5, cap=10, uniform=lambda lo, _hi: lo) for a in range(8)]
    high = [backoff_delay(a, base=0.5, cap=10, uniform=lambda _lo, hi: hi) for a in range(8)]
    assert high == [0.5, 1, 2, 4, 8, 10, 10, 10]
    assert low == [h / 2 for h in high]
    assert backoff_delay(10_000, base=1, cap=60, uniform=lambda _lo, hi: hi) == 60
    with pytest.raises(ValueError, match="attempt"):
        backoff_delay(-1, base=1, cap=2, uniform=lambda lo, _hi: lo)
