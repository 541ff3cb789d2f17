"""The rating function: bands across DST, cumulative charges, registers, standing charges.

The core is additivity (DESIGN §3): rating consumption as one interval or split at any
points gives the same total to the rating unit, checked by hypothesis against an
independent brute-force oracle (minute-by-minute local-time high-water mark).
"""

from __future__ import annotations

import datetime as dt
import functools
import itertools
import zoneinfo
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_protocol import errors, rating
from firmware_protocol.rating import (
    RATING_CASES,
    Charge,
    RatingCase,
    RatingGapError,
    RegisterError,
    Registers,
    advance,
    band_at,
    band_charge_milli,
    block_charge_milli,
    block_period_of,
    block_period_start,
    cumulative_charge_milli,
    local_midnights,
    next_band_change,
    rate_interval,
    rating_date,
    standing_charges_milli,
    start_registers,
)
from firmware_protocol.tariff import (
    MAX_SWITCHES_PER_DAY,
    Band,
    Block,
    Switch,
    Tariff,
    flat_tariff,
)
from firmware_protocol.units import currency

EUR = currency("EUR")
HOUR = 3600
DAY = 86_400
FAST = settings(max_examples=40, deadline=None)


def ts(text: str, zone: str, *, fold: int = 0) -> int:
    """Unix seconds of a local wall-clock time."""
    local = dt.datetime.fromisoformat(text).replace(tzinfo=zoneinfo.ZoneInfo(zone), fold=fold)
    return int(local.timestamp())


def tou(
    zone: str,
    *,
    weekday: Sequence[tuple[int, int]] = ((0, 0), (150, 1), (1020, 2), (1260, 0)),
    weekend: Sequence[tuple[int, int]] = ((0, 0), (150, 1), (1260, 0)),
    holiday: Sequence[tuple[int, int]] = ((0, 0),),
    holidays: tuple[dt.date, ...] = (),
    blocks: tuple[Block, ...] = (),
    standing: int = 0,
    prices: tuple[int, ...] = (20_000, 30_000, 45_000),
    tariff_id: int = 3,
) -> Tariff:
    return Tariff(
        tariff_id=tariff_id,
        currency=EUR,
        timezone=zone,
        bands=tuple(Band(f"b{i}", p) for i, p in enumerate(prices)),
        weekday=tuple(Switch(m, b) for m, b in weekday),
        weekend=tuple(Switch(m, b) for m, b in weekend),
        holiday=tuple(Switch(m, b) for m, b in holiday),
        holidays=holidays,
        blocks=blocks,
        standing_charge_milli_per_day=standing,
    )


BERLIN = tou("Europe/Berlin")


# --------------------------------------------------------------------------- reference


@functools.cache
def _zone(key: str) -> zoneinfo.ZoneInfo:
    return zoneinfo.ZoneInfo(key)


def ref_marks(zone: str, instants: Sequence[int]) -> list[dt.datetime]:
    """Brute force: the local wall-clock high-water mark at each (ascending) instant.

    Walks UTC minute by minute from 48 h before each instant (anything earlier showed less
    than the instant itself: offsets are within +-24 h), keeping the maximum naive local
    time seen. Offsets and transitions of the zones used are whole minutes, so the minute
    samples see every wall-clock minute the real clock shows.
    """
    z = _zone(zone)
    out: list[dt.datetime] = []
    u = instants[0] - instants[0] % 60 - 48 * HOUR
    mark = dt.datetime.fromtimestamp(u, z).replace(tzinfo=None)
    for t in instants:
        u = max(u, t - t % 60 - 48 * HOUR)
        while u <= t:
            mark = max(mark, dt.datetime.fromtimestamp(u, z).replace(tzinfo=None))
            u += 60
        out.append(max(mark, dt.datetime.fromtimestamp(t, z).replace(tzinfo=None)))
    return out


def ref_schedule(tariff: Tariff, date: dt.date) -> tuple[Switch, ...]:
    if date in tariff.holidays:
        return tariff.holiday
    return tariff.weekend if date.isoweekday() in (6, 7) else tariff.weekday


def ref_band(tariff: Tariff, mark: dt.datetime) -> int:
    minute = mark.hour * 60 + mark.minute
    return [s.band for s in ref_schedule(tariff, mark.date()) if s.minute <= minute][-1]


def ref_block(tariff: Tariff, period_wh: int) -> int:
    """F by its definition: each Wh costs the adder of the tier it falls in; floor once."""
    total = 0
    for i, block in enumerate(tariff.blocks):
        upper = tariff.blocks[i + 1].from_wh if i + 1 < len(tariff.blocks) else period_wh
        total += block.adder_milli_per_kwh * max(0, min(period_wh, upper) - block.from_wh)
    return total // 1000


def ref_block_per_wh(tariff: Tariff, period_wh: int) -> int:
    total = 0
    for k in range(period_wh):  # the Wh [k, k+1)
        adders = [b.adder_milli_per_kwh for b in tariff.blocks if b.from_wh <= k]
        total += adders[-1] if adders else 0
    return total // 1000


def ref_total(tariff: Tariff, events: Sequence[tuple[int, int]]) -> tuple[list[int], int]:
    """Oracle: per-band energy by brute-force band, per-month block energy; floors once each."""
    marks = ref_marks(tariff.timezone, [t for t, _ in events])
    band_wh = [0] * len(tariff.bands)
    month_wh: dict[tuple[int, int], int] = {}
    for (_, wh), mark in zip(events, marks, strict=True):
        band_wh[ref_band(tariff, mark)] += wh
        key = (mark.year, mark.month)
        month_wh[key] = month_wh.get(key, 0) + wh
    energy = sum(
        wh * b.price_milli_per_kwh // 1000 for wh, b in zip(band_wh, tariff.bands, strict=True)
    )
    return band_wh, energy + sum(ref_block(tariff, wh) for wh in month_wh.values())


# --------------------------------------------------------------------------- known answers


@pytest.mark.parametrize("case", RATING_CASES, ids=lambda c: c.name)
def test_known_answer_cases(case: RatingCase) -> None:
    regs = start_registers(case.tariff, case.activation)
    snapshots = [regs]
    for t, wh in case.events:
        regs = advance(case.tariff, regs, t, wh)
        snapshots.append(regs)
    assert tuple(band_at(case.tariff, t) for t, _ in case.events) == case.expected_bands
    assert regs.band_wh == case.expected_band_wh
    assert cumulative_charge_milli(case.tariff, regs) == case.expected_energy_milli
    assert standing_charges_milli(case.tariff, case.activation, case.end) == (
        case.expected_standing_milli
    )
    assert case.expected_total_milli == case.expected_energy_milli + case.expected_standing_milli
    # one interval, and event by event, give the same total
    assert rate_interval(case.tariff, snapshots[0], regs).total_milli == case.expected_energy_milli
    steps = [rate_interval(case.tariff, a, b).total_milli for a, b in itertools.pairwise(snapshots)]
    assert sum(steps) == case.expected_energy_milli
    assert ref_total(case.tariff, case.events)[1] == case.expected_energy_milli


def test_known_answers_are_the_documented_numbers() -> None:
    # Guard against someone "fixing" the vectors by re-running the code: RATING.md §8.
    assert [c.expected_total_milli for c in RATING_CASES] == [
        218,
        50_300,
        45_640,
        305_100,
        119_650,
    ]


def test_flat_rating_floors_cumulative_not_per_event() -> None:
    tariff = RATING_CASES[0].tariff
    before = start_registers(tariff, RATING_CASES[0].activation)
    one = advance(tariff, before, RATING_CASES[0].activation + 1, 1)
    seven = Registers((7,), one.block_period, 7)
    charge = rate_interval(tariff, one, seven)
    assert charge == Charge(
        energy_wh=(6,), energy_milli=(218 - 31,), block_wh=6, block_milli=0, total_milli=187
    )


# --------------------------------------------------------------------------- bands in time


def test_band_at_spring_forward_gap_applies_switch_after_gap() -> None:
    # 2026-03-29 Berlin: 02:00 CET -> 03:00 CEST; the 02:30 switch is in the gap.
    assert band_at(BERLIN, ts("2026-03-29 01:59:59", "Europe/Berlin")) == 0
    assert band_at(BERLIN, ts("2026-03-29 03:00", "Europe/Berlin")) == 1
    assert ts("2026-03-29 03:00", "Europe/Berlin") == 1_774_746_000
    assert next_band_change(BERLIN, ts("2026-03-29 01:00", "Europe/Berlin")) == 1_774_746_000


def test_band_at_fall_back_switch_at_first_occurrence() -> None:
    zone = "Europe/Berlin"
    first = ts("2026-10-25 02:30", zone)
    assert band_at(BERLIN, first - 1) == 0
    assert band_at(BERLIN, first) == 1
    # 02:00..02:29 CET (second pass) stays in the day band: the mark never goes back
    assert band_at(BERLIN, ts("2026-10-25 02:10", zone, fold=1)) == 1
    # a switch at 03:00 applies after the repeated hour, at 03:00 CET
    late = tou(zone, weekend=((0, 0), (180, 1)))
    assert band_at(late, ts("2026-10-25 02:59:59", zone, fold=1)) == 0
    assert band_at(late, ts("2026-10-25 03:00", zone)) == 1
    assert next_band_change(late, ts("2026-10-25 02:30", zone)) == ts("2026-10-25 03:00", zone)


def test_switches_inside_the_gap_share_its_end_and_the_last_wins() -> None:
    zone = "America/New_York"  # 2026-03-08 02:00 EST -> 03:00 EDT
    tariff = tou(zone, weekend=((0, 0), (130, 1), (140, 2), (200, 0)))
    gap_end = ts("2026-03-08 03:00", zone)
    assert band_at(tariff, gap_end - 1) == 0
    assert band_at(tariff, gap_end) == 2
    assert next_band_change(tariff, gap_end - 5) == gap_end
    assert next_band_change(tariff, gap_end) == ts("2026-03-08 03:20", zone)


def test_holiday_wins_over_weekend_and_weekday() -> None:
    tariff = tou(
        "Europe/Berlin",
        holiday=((0, 2),),
        holidays=(dt.date(2026, 12, 25), dt.date(2026, 12, 26)),
    )
    assert band_at(tariff, ts("2026-12-25 12:00", "Europe/Berlin")) == 2  # Friday
    assert band_at(tariff, ts("2026-12-26 12:00", "Europe/Berlin")) == 2  # Saturday
    assert band_at(tariff, ts("2026-12-27 12:00", "Europe/Berlin")) == 1  # Sunday
    assert band_at(tariff, ts("2026-12-28 18:00", "Europe/Berlin")) == 2  # Monday peak


def test_skipped_midnight_day_starts_at_first_instant() -> None:
    # America/Santiago 2026-09-06: 00:00 -04 -> 01:00 -03; the date begins at 01:00.
    zone = "America/Santiago"
    tariff = tou(zone, weekend=((0, 0), (30, 1), (90, 2)), standing=1_000)
    first = ts("2026-09-06 01:00", zone)
    assert first == 1_788_667_200
    assert rating_date(tariff, first - 1) == dt.date(2026, 9, 5)
    assert rating_date(tariff, first) == dt.date(2026, 9, 6)
    assert band_at(tariff, first) == 1  # the 00:30 switch applies from the day's start
    assert next_band_change(tariff, first) == ts("2026-09-06 01:30", zone)
    assert local_midnights(tariff, first - DAY, first + 1) == [first]
    assert standing_charges_milli(tariff, first - 1, first) == 1_000


def test_fall_back_across_midnight_keeps_the_new_date() -> None:
    # America/St_Johns 2006-10-29 00:01 NDT -> 2006-10-28 23:01 NST: the clock shows
    # the 28th again for an hour, the rating date stays the 29th.
    zone = "America/St_Johns"
    tariff = tou(zone, weekday=((0, 0),), weekend=((0, 1), (360, 2)))  # 28th Sat, 29th Sun
    midnight = ts("2006-10-29 00:00", zone)
    repeat = ts("2006-10-28 23:30", zone, fold=1)
    assert repeat - midnight == 30 * 60
    assert rating_date(tariff, repeat) == dt.date(2006, 10, 29)
    assert band_at(tariff, repeat) == 1
    assert next_band_change(tariff, repeat) == ts("2006-10-29 06:00", zone)
    assert local_midnights(tariff, midnight - 1, midnight + 3 * HOUR) == [midnight]
    # the month changes the same way: 2009-11-01 00:01 NDT -> 2009-10-31 23:01 NST
    nov = ts("2009-11-01 00:00", zone)
    back = ts("2009-10-31 23:30", zone, fold=1)
    assert block_period_of(tariff, back) == 2009 * 12 + 10
    assert block_period_start(tariff, 2009 * 12 + 10) == nov
    regs = advance(tariff, start_registers(tariff, nov - 10), nov, 5)
    assert advance(tariff, regs, back, 5).block_period_wh == 10


def test_skipped_date_begins_with_the_next_one() -> None:
    # Pacific/Apia skipped 2011-12-30 entirely (UTC-10 -> UTC+14).
    zone = "Pacific/Apia"
    tariff = flat_tariff(
        tariff_id=1,
        currency=EUR,
        timezone=zone,
        price_milli_per_kwh=1,
        standing_charge_milli_per_day=5,
    )
    jump = ts("2011-12-31 00:00", zone)
    assert rating_date(tariff, jump - 1) == dt.date(2011, 12, 29)
    assert rating_date(tariff, jump) == dt.date(2011, 12, 31)
    assert local_midnights(tariff, jump - 1, jump) == [jump, jump]
    assert standing_charges_milli(tariff, jump - 1, jump) == 10
    assert next_band_change(tariff, jump - 100) == jump


def test_next_band_change_after_last_switch_is_day_end() -> None:
    zone = "Europe/Berlin"
    assert next_band_change(BERLIN, ts("2026-03-30 22:00", zone)) == ts("2026-03-31 00:00", zone)
    assert next_band_change(BERLIN, ts("2026-03-30 16:59:59", zone)) == ts("2026-03-30 17:00", zone)


@functools.cache
def _window(zone: str, day: dt.date) -> tuple[list[int], list[dt.datetime]]:
    """Minute instants from 2 h before to 26 h after a local date's start, with their marks."""
    start = int(
        dt.datetime.combine(day - dt.timedelta(days=1), dt.time(12), _zone(zone)).timestamp()
    )
    instants = list(range(start - start % 60, start + 40 * HOUR, 60))
    return instants, ref_marks(zone, instants)


DST_DAYS = (
    ("Europe/Berlin", dt.date(2026, 3, 29)),
    ("Europe/Berlin", dt.date(2026, 10, 25)),
    ("America/New_York", dt.date(2026, 3, 8)),
    ("America/New_York", dt.date(2026, 11, 1)),
    ("Australia/Lord_Howe", dt.date(2026, 4, 5)),  # 30-minute fall-back
    ("Australia/Lord_Howe", dt.date(2026, 10, 4)),  # 30-minute spring-forward
    ("America/Santiago", dt.date(2026, 9, 6)),  # midnight skipped
    ("America/Santiago", dt.date(2026, 4, 5)),  # 24:00 -> 23:00 repeat
    ("America/St_Johns", dt.date(2006, 10, 29)),  # fall-back across midnight
)
INTERESTING_MINUTES = (1, 29, 30, 59, 60, 61, 90, 119, 120, 121, 150, 179, 180, 181, 1410, 1439)


@st.composite
def schedules(draw: st.DrawFn, n_bands: int) -> tuple[tuple[int, int], ...]:
    minutes = draw(
        st.lists(
            st.sampled_from(INTERESTING_MINUTES) | st.integers(1, 1439),
            max_size=MAX_SWITCHES_PER_DAY - 1,
            unique=True,
        )
    )
    slots = [0, *sorted(minutes)]
    bands = draw(st.lists(st.integers(0, n_bands - 1), min_size=len(slots), max_size=len(slots)))
    return tuple(zip(slots, bands, strict=True))


@st.composite
def tariffs(draw: st.DrawFn, zone: str, near: dt.date, tariff_id: int = 1) -> Tariff:
    n = draw(st.integers(1, 4))
    thresholds = sorted(draw(st.lists(st.integers(0, 4_000), max_size=3, unique=True)))
    return tou(
        zone,
        prices=tuple(draw(st.lists(st.integers(0, 99_991), min_size=n, max_size=n))),
        weekday=draw(schedules(n)),
        weekend=draw(schedules(n)),
        holiday=draw(schedules(n)),
        holidays=tuple(
            sorted(
                draw(st.sets(st.sampled_from([near + dt.timedelta(days=k) for k in (-1, 0, 1)])))
            )
        ),
        blocks=tuple(Block(t, draw(st.integers(0, 60_000))) for t in thresholds),
        standing=draw(st.integers(0, 50_000)),
        tariff_id=tariff_id,
    )


@FAST
@given(data=st.data(), where=st.sampled_from(DST_DAYS))
def test_band_at_matches_brute_force_around_dst(
    data: st.DataObject, where: tuple[str, dt.date]
) -> None:
    zone, day = where
    tariff = data.draw(tariffs(zone, day))
    instants, marks = _window(zone, day)
    second = data.draw(st.integers(0, 59))
    for t, mark in zip(instants, marks, strict=True):
        expected = ref_band(tariff, mark)
        assert band_at(tariff, t) == expected, (t, mark)
        assert band_at(tariff, t + second) == expected, (t + second, mark)
        assert rating_date(tariff, t) == mark.date()
        assert block_period_of(tariff, t) == mark.year * 12 + mark.month - 1


@FAST
@given(data=st.data(), where=st.sampled_from(DST_DAYS))
def test_next_band_change_chain_is_exactly_the_switch_and_day_starts(
    data: st.DataObject, where: tuple[str, dt.date]
) -> None:
    zone, day = where
    tariff = data.draw(tariffs(zone, day))
    instants, marks = _window(zone, day)
    # Reference boundaries: the mark enters a new date or passes a switch minute.
    expected: list[int] = []
    for (_, prev), (t, mark) in itertools.pairwise(zip(instants, marks, strict=True)):
        minutes = {s.minute for s in ref_schedule(tariff, mark.date())}
        before = prev.hour * 60 + prev.minute
        now = mark.hour * 60 + mark.minute
        if prev.date() != mark.date() or any(before < m <= now for m in minutes):
            expected.append(t)
    chain: list[int] = []
    t = instants[0]
    while True:
        t = next_band_change(tariff, t)
        if t > instants[-1]:
            break
        chain.append(t)
    assert chain == expected


# --------------------------------------------------------------------------- standing charges


@pytest.mark.parametrize(
    ("zone", "date", "hours"),
    [
        ("Europe/Berlin", "2026-03-29", 23),
        ("Europe/Berlin", "2026-10-25", 25),
        ("Europe/Berlin", "2026-06-01", 24),
        ("America/New_York", "2026-03-08", 23),
        ("America/New_York", "2026-11-01", 25),
        ("Australia/Lord_Howe", "2026-04-05", 24.5),
    ],
)
def test_day_lengths_and_one_charge_per_day(zone: str, date: str, hours: float) -> None:
    tariff = tou(zone, standing=12_345)
    start = ts(f"{date} 00:00", zone)
    midnights = local_midnights(tariff, start - 1, start + 30 * HOUR)
    assert midnights[0] == start
    assert midnights[1] - midnights[0] == int(hours * HOUR)
    assert len(midnights) == 2
    # the charge is taken at the midnight itself, for the day that begins
    assert standing_charges_milli(tariff, start - 1, start) == 12_345
    assert standing_charges_milli(tariff, start, midnights[1] - 1) == 0
    assert standing_charges_milli(tariff, start, start) == 0


@FAST
@given(
    zone=st.sampled_from(["Europe/Berlin", "America/New_York"]),
    a=st.integers(ts("2026-01-01 00:00", "UTC"), ts("2027-01-01 00:00", "UTC")),
    lengths=st.tuples(st.integers(0, 40 * DAY), st.integers(0, 40 * DAY)),
)
def test_standing_charges_count_local_midnights_and_add_up(
    zone: str, a: int, lengths: tuple[int, int]
) -> None:
    tariff = tou(zone, standing=700)
    b, c = a + lengths[0], a + lengths[0] + lengths[1]
    z = _zone(zone)
    first = dt.datetime.fromtimestamp(a, z).date()
    naive = [
        int(dt.datetime.combine(first + dt.timedelta(days=k), dt.time(0), z).timestamp())
        for k in range(1, 82)
    ]
    assert local_midnights(tariff, a, c) == [m for m in naive if a < m <= c]
    assert standing_charges_milli(tariff, a, b) + standing_charges_milli(tariff, b, c) == (
        standing_charges_milli(tariff, a, c)
    )
    assert all(
        y - x in (23 * HOUR, 24 * HOUR, 25 * HOUR)
        for x, y in itertools.pairwise(local_midnights(tariff, a, c))
    )


# --------------------------------------------------------------------------- charges and blocks


BLOCKS = tou("Europe/Berlin", blocks=(Block(500, 20_000), Block(1_000, 50_000), Block(1_001, 7)))


def test_block_charge_exact_values() -> None:
    assert block_charge_milli(BERLIN, 10**6) == 0  # no blocks
    energies = (0, 500, 501, 549, 550, 1_000, 1_001, 1_002)
    assert [block_charge_milli(BLOCKS, e) for e in energies] == [
        0,
        0,
        20,  # 1 Wh at 20 000 milli/kWh
        980,
        1_000,
        10_000,
        10_050,
        10_050,  # + 1 Wh at 7 milli/kWh = 0.007 milli: floored, not lost
    ]
    assert block_charge_milli(BLOCKS, 2_001) == 10_050 + 7  # 1000 Wh at 7 milli/kWh
    assert block_charge_milli(BLOCKS, rating.MAX_REGISTER_WH) > 0


@FAST
@given(data=st.data(), energies=st.lists(st.integers(0, 3_000), min_size=2, max_size=6))
def test_block_charge_is_its_definition_and_telescopes(
    data: st.DataObject, energies: list[int]
) -> None:
    tariff = data.draw(tariffs("UTC", dt.date(2026, 1, 1)))
    energies.sort()
    for e in energies:
        assert block_charge_milli(tariff, e) == ref_block_per_wh(tariff, e)
    parts = [
        block_charge_milli(tariff, b) - block_charge_milli(tariff, a)
        for a, b in itertools.pairwise(energies)
    ]
    assert all(p >= 0 for p in parts)
    assert sum(parts) == block_charge_milli(tariff, energies[-1]) - block_charge_milli(
        tariff, energies[0]
    )


def test_band_charge_is_floor_of_cumulative() -> None:
    assert band_charge_milli(BERLIN, 2, 7) == 315
    assert band_charge_milli(RATING_CASES[0].tariff, 0, 7) == 218
    assert band_charge_milli(BERLIN, 0, 0) == 0


def test_block_periods_are_local_months() -> None:
    zone = "America/New_York"
    tariff = tou(zone)
    nov = ts("2026-11-01 00:00", zone)
    assert block_period_of(tariff, nov - 1) == 2026 * 12 + 9
    assert block_period_of(tariff, nov) == 2026 * 12 + 10
    assert block_period_start(tariff, 2026 * 12 + 10) == nov
    assert block_period_start(tariff, rating.MIN_PERIOD) == ts("1969-12-01 00:00", zone)
    assert block_period_start(tariff, rating.MAX_PERIOD) == ts("2106-02-01 00:00", zone)
    assert block_period_of(tariff, 0) == rating.MIN_PERIOD
    assert block_period_of(tariff, 2**32 - 1) == rating.MAX_PERIOD


# --------------------------------------------------------------------------- additivity


ANCHORS = (
    ("Europe/Berlin", dt.date(2026, 3, 29)),
    ("Europe/Berlin", dt.date(2026, 10, 25)),
    ("Europe/Berlin", dt.date(2026, 4, 1)),  # month boundary
    ("America/New_York", dt.date(2026, 3, 8)),
    ("America/New_York", dt.date(2026, 11, 1)),  # DST end on a month boundary
    ("America/St_Johns", dt.date(2009, 11, 1)),  # fall-back across a month boundary
    ("Australia/Lord_Howe", dt.date(2026, 10, 4)),
)


@st.composite
def event_streams(draw: st.DrawFn, zone: str, day: dt.date) -> list[tuple[int, int]]:
    t = int(dt.datetime.combine(day, dt.time(0), _zone(zone)).timestamp())
    t -= draw(st.integers(0, 36 * 60)) * 60
    events = []
    for _ in range(draw(st.integers(1, 40))):
        step = draw(st.integers(0, 240)) * 60 + draw(st.sampled_from((0, 0, 0, 1, -1)))
        t = max(t, t + step)
        events.append((t, draw(st.integers(0, 1_500))))
    return events


@dataclass(frozen=True, slots=True)
class Stream:
    """Snapshots of a meter replaying events: ``(tariff, registers)`` after each event."""

    snapshots: list[tuple[Tariff, Registers]]
    closing: dict[int, tuple[Registers, Registers]]  # id(tariff) -> (first, last) registers


def replay(
    segments: Sequence[tuple[Tariff, int, Sequence[tuple[int, int]]]],
) -> Stream:
    snapshots: list[tuple[Tariff, Registers]] = []
    closing: dict[int, tuple[Registers, Registers]] = {}
    for tariff, activation, events in segments:
        regs = first = start_registers(tariff, activation)
        snapshots.append((tariff, regs))
        for t, wh in events:
            regs = advance(tariff, regs, t, wh)
            snapshots.append((tariff, regs))
        closing[id(tariff)] = (first, regs)
    return Stream(snapshots, closing)


def rate_split(stream: Stream, cuts: Sequence[int]) -> int:
    """Rate between consecutive cut snapshots, splitting at a tariff activation if crossed."""
    total = 0
    for i, j in itertools.pairwise(cuts):
        (ta, a), (tb, b) = stream.snapshots[i], stream.snapshots[j]
        if ta is tb:
            total += rate_interval(ta, a, b).total_milli
        else:  # the meter snapshots its registers at the activation
            total += rate_interval(ta, a, stream.closing[id(ta)][1]).total_milli
            total += rate_interval(tb, stream.closing[id(tb)][0], b).total_milli
    return total


@settings(max_examples=60, deadline=None)
@given(data=st.data(), where=st.sampled_from(ANCHORS))
def test_additivity_one_tariff(data: st.DataObject, where: tuple[str, dt.date]) -> None:
    zone, day = where
    tariff = data.draw(tariffs(zone, day))
    events = data.draw(event_streams(zone, day))
    stream = replay([(tariff, events[0][0], events)])
    final = stream.snapshots[-1][1]
    band_wh, expected = ref_total(tariff, events)
    assert list(final.band_wh) == band_wh
    assert cumulative_charge_milli(tariff, final) == expected
    whole = rate_interval(tariff, stream.snapshots[0][1], final)
    assert whole.total_milli == expected
    assert whole.energy_wh == tuple(band_wh)
    n = len(stream.snapshots)
    cuts = sorted(data.draw(st.sets(st.integers(1, n - 2))) if n > 2 else set())
    assert rate_split(stream, [0, *cuts, n - 1]) == expected
    # each piece is also a difference of the meter's cumulative charges
    for i, j in itertools.pairwise([0, *cuts, n - 1]):
        a, b = stream.snapshots[i][1], stream.snapshots[j][1]
        piece = rate_interval(tariff, a, b)
        assert piece.total_milli == cumulative_charge_milli(tariff, b) - cumulative_charge_milli(
            tariff, a
        )
        assert piece.block_wh == sum(piece.energy_wh)


@settings(max_examples=30, deadline=None)
@given(data=st.data(), first=st.sampled_from(ANCHORS), second=st.sampled_from(ANCHORS))
def test_additivity_across_a_tariff_change(
    data: st.DataObject, first: tuple[str, dt.date], second: tuple[str, dt.date]
) -> None:
    old = data.draw(tariffs(first[0], first[1], tariff_id=1))
    new = data.draw(tariffs(second[0], first[1], tariff_id=2))
    events = data.draw(event_streams(first[0], first[1]))
    k = data.draw(st.integers(0, len(events)))
    activation = events[k][0] if k < len(events) else events[-1][0] + 1
    before, after = events[:k], events[k:]
    stream = replay([(old, events[0][0], before), (new, activation, after)])
    expected = (ref_total(old, before)[1] if before else 0) + (
        ref_total(new, after)[1] if after else 0
    )
    assert (
        cumulative_charge_milli(old, stream.closing[id(old)][1])
        + cumulative_charge_milli(new, stream.closing[id(new)][1])
        == expected
    )
    n = len(stream.snapshots)
    cuts = sorted(data.draw(st.sets(st.integers(1, n - 2))) if n > 2 else set())
    assert rate_split(stream, [0, *cuts, n - 1]) == expected
    assert rate_split(stream, [0, n - 1]) == expected


@settings(max_examples=25, deadline=None)
@given(
    data=st.data(),
    steps=st.lists(st.tuples(st.integers(0, 50 * DAY), st.integers(0, 3_000)), max_size=12),
)
def test_cumulative_charges_telescope_over_long_gaps(
    data: st.DataObject, steps: list[tuple[int, int]]
) -> None:
    tariff = data.draw(tariffs("Europe/Berlin", dt.date(2026, 1, 1)))
    t = ts("2026-01-15 00:00", "Europe/Berlin")
    events = []
    for dt_, wh in steps:
        t += dt_
        events.append((t, wh))
    stream = replay([(tariff, ts("2026-01-15 00:00", "Europe/Berlin"), events)])
    regs = [r for _, r in stream.snapshots]
    expected = ref_total(tariff, events)[1] if events else 0
    assert cumulative_charge_milli(tariff, regs[-1]) == expected
    for a, b in itertools.pairwise(regs):
        diff = cumulative_charge_milli(tariff, b) - cumulative_charge_milli(tariff, a)
        try:
            assert rate_interval(tariff, a, b).total_milli == diff
        except RatingGapError:
            assert b.block_period - a.block_period > 1


# --------------------------------------------------------------------------- registers


def test_advance_rolls_periods_and_skips() -> None:
    tariff = BLOCKS
    zone = "Europe/Berlin"
    regs = start_registers(tariff, ts("2026-01-31 12:00", zone))
    regs = advance(tariff, regs, ts("2026-01-31 12:00", zone), 1_001)
    assert (regs.block_period, regs.block_period_wh) == (2026 * 12, 1_001)
    feb = advance(tariff, regs, ts("2026-02-01 12:00", zone), 10)
    assert (feb.block_period, feb.block_period_wh, feb.prev_block_period_wh) == (
        2026 * 12 + 1,
        10,
        1_001,
    )
    assert feb.closed_block_milli == 10_050
    charge = rate_interval(tariff, regs, feb)
    assert (charge.block_milli, charge.block_wh) == (0, 10)
    # April after January: March was skipped, its closing value is 0
    apr = advance(tariff, feb, ts("2026-04-01 00:00", zone), 0)
    assert (apr.block_period, apr.block_period_wh, apr.prev_block_period_wh) == (
        2026 * 12 + 3,
        0,
        0,
    )
    with pytest.raises(RatingGapError) as gap:
        rate_interval(tariff, feb, apr)
    assert gap.value.peer_fault is False
    assert cumulative_charge_milli(tariff, apr) == cumulative_charge_milli(tariff, feb)


def test_registers_accept_valid_and_default() -> None:
    regs = Registers((1, 2), 24_300)
    assert (regs.block_period_wh, regs.prev_block_period_wh, regs.closed_block_milli) == (0, 0, 0)
    assert start_registers(BERLIN, 0) == Registers((0, 0, 0), 1970 * 12)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"band_wh": [1]},  # not a tuple
        {"band_wh": ()},
        {"band_wh": (0,) * 9},
        {"band_wh": (-1,)},
        {"band_wh": (True,)},
        {"band_wh": (1.5,)},
        {"band_wh": (rating.MAX_REGISTER_WH + 1,)},
        {"block_period": rating.MIN_PERIOD - 1},
        {"block_period": "24300"},
        {"block_period_wh": -1},
        {"prev_block_period_wh": -1},
        {"closed_block_milli": -1},
        {"closed_block_milli": 2**63},
    ],
)
def test_registers_reject_malformed(kwargs: dict[str, object]) -> None:
    fields: dict[str, object] = {"band_wh": (0,), "block_period": 24_300} | kwargs
    with pytest.raises(RegisterError) as err:
        Registers(**fields)  # type: ignore[arg-type]
    assert isinstance(err.value, errors.MalformedError)
    assert err.value.peer_fault is True


def test_charge_rejects_inconsistent() -> None:
    with pytest.raises(errors.UnitError, match="one entry per band"):
        Charge(energy_wh=(1, 2), energy_milli=(1,), block_wh=3, block_milli=0, total_milli=1)
    with pytest.raises(errors.UnitError, match="total_milli"):
        Charge(energy_wh=(1,), energy_milli=(1,), block_wh=1, block_milli=2, total_milli=1)


P = 2026 * 12  # a block period used by the rejection tests


@pytest.mark.parametrize(
    ("before", "after", "match"),
    [
        (Registers((0, 0), P), Registers((0, 0, 0), P), "before has 2 band registers"),
        (Registers((0, 0, 0), P), Registers((0,), P), "after has 1 band registers"),
        (Registers((5, 0, 0), P, 5), Registers((4, 1, 0), P, 5), r"band_wh\[0\] went backwards"),
        (Registers((0, 0, 0), P, 0, 0, 5), Registers((0, 0, 0), P), "closed_block_milli"),
        (Registers((0, 0, 0), P, 5), Registers((0, 0, 0), P, 4), "within a period"),
        (Registers((0, 0, 0), P, 5), Registers((0, 0, 0), P + 1, 0, 4), "prev_block_period_wh"),
        (Registers((0, 0, 0), P + 1), Registers((0, 0, 0), P), "block_period went backwards"),
        (Registers((0, 0, 0), P), Registers((1, 0, 0), P, 2), "differs from the band energy"),
        (Registers((0, 0, 0), P), Registers((1, 0, 0), P + 1, 0, 2), "differs"),
    ],
)
def test_rate_interval_rejects_inconsistent_registers(
    before: Registers, after: Registers, match: str
) -> None:
    with pytest.raises(RegisterError, match=match):
        rate_interval(BERLIN, before, after)


def test_rate_interval_gap_is_typed() -> None:
    with pytest.raises(RatingGapError, match="2 block periods apart"):
        rate_interval(BERLIN, Registers((0, 0, 0), P), Registers((0, 0, 0), P + 2))
    assert issubclass(RatingGapError, errors.ProtocolError)


def test_advance_rejects_bad_input() -> None:
    regs = Registers((0, 0, 0), 2026 * 12 + 5)
    with pytest.raises(RegisterError, match="before the registers"):
        advance(BERLIN, regs, ts("2026-05-31 23:59:59", "Europe/Berlin"), 1)
    with pytest.raises(RegisterError, match="has 1 band registers"):
        advance(BERLIN, Registers((0,), P), ts("2026-01-01 12:00", "Europe/Berlin"), 1)
    with pytest.raises(errors.UnitError, match="wh"):
        advance(BERLIN, regs, ts("2026-06-01 12:00", "Europe/Berlin"), -1)
    with pytest.raises(RegisterError, match="band_wh"):  # overflow of the register
        advance(
            BERLIN,
            Registers((rating.MAX_REGISTER_WH, 0, 0), 2026 * 12 + 5),
            ts("2026-06-01 01:00", "Europe/Berlin"),
            1,
        )
    with pytest.raises(RegisterError, match="has 2 band registers"):
        cumulative_charge_milli(BERLIN, Registers((0, 0), P))


@pytest.mark.parametrize("t", [-1, 2**32, 1.5, True, "0", None])
def test_instants_must_be_u32_ints(t: object) -> None:
    for fn in (band_at, next_band_change, rating_date, block_period_of):
        with pytest.raises(errors.UnitError, match="t must"):
            fn(BERLIN, t)  # type: ignore[arg-type]
    with pytest.raises(errors.UnitError, match="start must"):
        local_midnights(BERLIN, t, 10)  # type: ignore[arg-type]
    with pytest.raises(errors.UnitError, match="end must"):
        local_midnights(BERLIN, 10, t)  # type: ignore[arg-type]


def test_other_argument_rejections() -> None:
    with pytest.raises(errors.UnitError, match="end 5 is before start 6"):
        local_midnights(BERLIN, 6, 5)
    with pytest.raises(errors.UnitError, match=r"band must be in 0\.\.2"):
        band_charge_milli(BERLIN, 3, 1)
    with pytest.raises(errors.UnitError, match="energy_wh"):
        band_charge_milli(BERLIN, 0, -1)
    with pytest.raises(errors.UnitError, match="period_wh"):
        block_charge_milli(BERLIN, -1)
    with pytest.raises(errors.UnitError, match="period must be in"):
        block_period_start(BERLIN, rating.MAX_PERIOD + 1)
    with pytest.raises(errors.UnitError, match="tariff must be a Tariff"):
        band_at("Europe/Berlin", 0)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- caches


def test_caches_stay_bounded_and_correct() -> None:
    # Many tariff objects: the per-tariff cache is reset, answers do not change.
    made = [tou("Europe/Berlin", tariff_id=i) for i in range(1, rating._RATER_CACHE_LIMIT + 5)]
    t = ts("2026-03-30 18:00", "Europe/Berlin")
    assert {band_at(x, t) for x in made} == {2}
    assert len(rating._RATERS) <= rating._RATER_CACHE_LIMIT
    # Many dates for one tariff: the per-date cache is reset, answers do not change.
    tariff = made[-1]
    start = ts("2000-01-03 18:00", "Europe/Berlin")
    bands = {band_at(tariff, start + k * DAY) for k in range(rating._DAY_CACHE_LIMIT + 10)}
    assert bands == {1, 2}  # weekday peak, weekend day
    assert len(rating._rater(tariff).days) <= rating._DAY_CACHE_LIMIT


def _last_sunday(year: int, month: int) -> dt.date:
    day = dt.date(year + month // 12, month % 12 + 1, 1) - dt.timedelta(days=1)
    return day - dt.timedelta(days=(day.weekday() + 1) % 7)


@FAST
@given(
    year=st.integers(1996, 2100),
    month=st.sampled_from([3, 10]),
    shift=st.integers(-1, 1),
    zone=st.sampled_from(["Europe/Berlin", "Europe/London", "Europe/Helsinki"]),
)
def test_offset_pieces_end_exactly_at_transitions(
    year: int, month: int, shift: int, zone: str
) -> None:
    # EU rules since 1996: the last Sunday of March and October, 01:00 UTC.
    day = _last_sunday(year, month) + dt.timedelta(days=shift)
    pieces = rating._pieces(zone, day.toordinal())
    z = _zone(zone)

    def offset(t: int) -> dt.timedelta | None:
        return dt.datetime.fromtimestamp(t, z).utcoffset()

    for (_, end, off), (start, _, _) in itertools.pairwise(pieces):
        assert end == start
        assert offset(end - 1) == dt.timedelta(seconds=off)
        assert offset(end) != offset(end - 1)
    assert len(pieces) == 2
    transition = int(dt.datetime.combine(_last_sunday(year, month), dt.time(1), dt.UTC).timestamp())
    assert pieces[0][1] == transition
