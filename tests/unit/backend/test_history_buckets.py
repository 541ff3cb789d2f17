"""Consumption history buckets (pure): local hours, days and months across DST, slots, limits."""

from __future__ import annotations

import itertools
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backend.adapters.db.history_repo import IntervalSums, SlotSums, TariffInfo
from backend.service.history import (
    LIMITS,
    Resolution,
    boundaries,
    bucket_of,
    day_start,
    default_start,
    fold_slots,
    hour_starts,
    instant,
    round_minor,
    slot_grid,
)
from backend.service.refusals import MalformedRequestError
from backend.service.statements import apportion, next_month, parse_month
from firmware_protocol import rating
from firmware_protocol.tariff import flat_tariff
from firmware_protocol.units import currency

BERLIN = ZoneInfo("Europe/Berlin")
SANTIAGO = ZoneInfo("America/Santiago")
KOLKATA = ZoneInfo("Asia/Kolkata")
KATHMANDU = ZoneInfo("Asia/Kathmandu")
FAST = settings(max_examples=200, deadline=None)


def ts(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp())


def local(t: int, zone: ZoneInfo = BERLIN) -> str:
    return datetime.fromtimestamp(t, zone).isoformat()


# ------------------------------------------------------------------------------ days


@pytest.mark.parametrize(
    ("zone", "first", "last"),
    [
        ("Europe/Berlin", "2026-03-20", "2026-04-05"),
        ("Europe/Berlin", "2026-10-20", "2026-11-05"),
        # Chile moves its clocks at midnight: the day begins at 01:00 after the gap.
        ("America/Santiago", "2026-04-01", "2026-04-10"),
        ("America/Santiago", "2026-09-01", "2026-09-10"),
        ("Australia/Lord_Howe", "2026-04-01", "2026-04-10"),
    ],
)
def test_day_starts_are_the_meters_local_midnights(zone: str, first: str, last: str) -> None:
    """Days begin exactly where the rating function takes its standing charges."""
    z = ZoneInfo(zone)
    tariff = flat_tariff(
        tariff_id=1, currency=currency("EUR"), timezone=zone, price_milli_per_kwh=1
    )
    d0, d1 = date.fromisoformat(first), date.fromisoformat(last)
    ours = [day_start(d0 + timedelta(days=i), z) for i in range((d1 - d0).days + 1)]
    theirs = rating.local_midnights(tariff, ours[0], ours[-1])
    assert ours[1:] == theirs


def test_dst_days_are_23_and_25_hours_and_their_hours_are_real_hours() -> None:
    spring = boundaries(
        Resolution.DAY, BERLIN, ts("2026-03-28T12:00:00+01:00"), ts("2026-03-30T00:00:00+02:00")
    )
    assert [local(b) for b in spring] == [
        "2026-03-28T00:00:00+01:00",
        "2026-03-29T00:00:00+01:00",
        "2026-03-30T00:00:00+02:00",
    ]
    assert [b - a for a, b in itertools.pairwise(spring)] == [24 * 3600, 23 * 3600]
    autumn = boundaries(
        Resolution.DAY, BERLIN, ts("2026-10-25T00:00:00+02:00"), ts("2026-10-26T00:00:00+01:00")
    )
    assert autumn[1] - autumn[0] == 25 * 3600

    hours = hour_starts(date(2026, 3, 29), BERLIN)
    assert len(hours) == 23
    assert "02:00" not in {local(h)[11:16] for h in hours}
    assert all(b - a == 3600 for a, b in itertools.pairwise(hours))
    hours = hour_starts(date(2026, 10, 25), BERLIN)
    assert len(hours) == 25
    labels = [local(h)[11:] for h in hours]
    assert labels.count("02:00:00+02:00") == 1
    assert labels.count("02:00:00+01:00") == 1
    assert all(b - a == 3600 for a, b in itertools.pairwise(hours))
    # The hours of a day tile the day exactly.
    day = boundaries(Resolution.DAY, BERLIN, hours[0], hours[0] + 1)
    assert (hours[0], hours[-1] + 3600) == (day[0], day[1])


def test_hour_buckets_in_a_half_hour_zone_and_a_midnight_gap() -> None:
    b = boundaries(
        Resolution.HOUR, KOLKATA, ts("2026-01-01T10:10:00+05:30"), ts("2026-01-01T12:00:00+05:30")
    )
    assert [local(x, KOLKATA)[11:16] for x in b] == ["10:00", "11:00", "12:00"]
    assert slot_grid(b) == (3600, 1800)
    # Santiago 2026-09-06: 00:00 -04 jumps to 01:00 -03; no 00:00 bucket, the day starts at 01:00.
    day = date(2026, 9, 6)
    hours = hour_starts(day, SANTIAGO)
    assert len(hours) == 23
    assert local(hours[0], SANTIAGO) == "2026-09-06T01:00:00-03:00"
    assert hours[0] == day_start(day, SANTIAGO)


def test_months_begin_at_local_midnight_of_the_first() -> None:
    b = boundaries(Resolution.MONTH, BERLIN, ts("2026-02-10T00:00:00Z"), ts("2026-04-01T00:00:00Z"))
    assert [local(x) for x in b] == [
        "2026-02-01T00:00:00+01:00",
        "2026-03-01T00:00:00+01:00",
        "2026-04-01T00:00:00+02:00",
        "2026-05-01T00:00:00+02:00",
    ]
    # 2026-04-01T00:00Z is 02:00 local on April 1st: April's bucket is included.
    exact = boundaries(
        Resolution.MONTH, BERLIN, ts("2026-02-01T00:00:00+01:00"), ts("2026-04-01T00:00:00+02:00")
    )
    assert len(exact) == 3
    assert next_month(date(2026, 12, 1)) == date(2027, 1, 1)
    assert parse_month("2026-03") == date(2026, 3, 1)
    for bad in ("2026-13", "2026-3", "26-03", "2026-03-01", "1969-12", "abcd-ef"):
        assert parse_month(bad) is None


def test_a_range_is_widened_to_whole_buckets() -> None:
    b = boundaries(
        Resolution.HOUR, BERLIN, ts("2026-06-01T10:30:00+02:00"), ts("2026-06-01T12:00:01+02:00")
    )
    assert [local(x)[11:16] for x in b] == ["10:00", "11:00", "12:00", "13:00"]
    b = boundaries(
        Resolution.HOUR, BERLIN, ts("2026-06-01T10:00:00+02:00"), ts("2026-06-01T12:00:00+02:00")
    )
    assert [local(x)[11:16] for x in b] == ["10:00", "11:00", "12:00"]


# ------------------------------------------------------------------------------ attribution


def test_an_interval_counts_in_the_bucket_holding_its_end() -> None:
    b = boundaries(
        Resolution.DAY, BERLIN, ts("2026-06-01T00:00:00+02:00"), ts("2026-06-03T00:00:00+02:00")
    )
    midnight = ts("2026-06-02T00:00:00+02:00")
    assert bucket_of(b, midnight) == 0  # a reading at midnight closes the day before
    assert bucket_of(b, midnight + 1) == 1
    assert bucket_of(b, b[0]) is None  # ends at the range's start: the day before
    assert bucket_of(b, b[-1]) == 1
    assert bucket_of(b, b[-1] + 1) is None


@st.composite
def ranges(draw: st.DrawFn) -> tuple[Resolution, ZoneInfo, int, int]:
    resolution = draw(st.sampled_from(list(Resolution)))
    zone = ZoneInfo(
        draw(
            st.sampled_from(
                ["Europe/Berlin", "America/Santiago", "Asia/Kolkata", "Asia/Kathmandu", "UTC"]
            )
        )
    )
    start = draw(st.integers(ts("2020-01-01T00:00:00Z"), ts("2030-01-01T00:00:00Z")))
    span = {
        Resolution.HOUR: 10 * 86400,
        Resolution.DAY: 120 * 86400,
        Resolution.MONTH: 3 * 365 * 86400,
    }
    return resolution, zone, start, start + draw(st.integers(1, span[resolution]))


@FAST
@given(ranges(), st.lists(st.integers(0, 2**40), min_size=1, max_size=20))
def test_slots_fall_inside_one_bucket(
    r: tuple[Resolution, ZoneInfo, int, int], offsets: list[int]
) -> None:
    """Grouping by equal slots in SQL puts every interval in the bucket of its end."""
    resolution, zone, start, end = r
    b = boundaries(resolution, zone, start, end)
    size, phase = slot_grid(b)
    assert all((x - phase) % size == 0 for x in b)
    for offset in offsets:
        to_ts = b[0] + 1 + offset % (b[-1] - b[0])
        k = (to_ts - (phase + 1)) // size  # the SQL expression
        slot = SlotSums(start=phase + k * size, sums=_sums(1, wh=(1,)))
        _, buckets, _ = fold_slots(b, [slot], {}, zone)
        got = [i for i, x in enumerate(buckets) if x.readings]
        assert got == [bucket_of(b, to_ts)]
    # Boundaries are bucket starts in the local calendar.
    for x in b:
        t = datetime.fromtimestamp(x, zone)
        if resolution is not Resolution.HOUR:
            assert x == day_start(t.date(), zone)
        if resolution is Resolution.MONTH:
            assert t.day == 1
    assert b[0] <= start < b[1]
    assert b[-2] < end <= b[-1]


def test_slot_grid_is_as_coarse_as_the_boundaries_allow() -> None:
    utc = ZoneInfo("UTC")
    assert slot_grid(boundaries(Resolution.DAY, utc, 0 + 86400 * 400, 86400 * 500))[0] == 86400
    days = boundaries(
        Resolution.DAY, BERLIN, ts("2026-03-01T00:00:00Z"), ts("2026-04-30T00:00:00Z")
    )
    assert slot_grid(days)[0] == 3600
    hours = boundaries(
        Resolution.HOUR, KATHMANDU, ts("2026-01-01T00:00:00Z"), ts("2026-01-02T00:00:00Z")
    )
    size, phase = slot_grid(hours)
    assert (size, phase) == (3600, 900)  # +05:45


# ------------------------------------------------------------------------------ folding


def _sums(
    tariff: int, *, wh: tuple[int, ...], milli: tuple[int, ...] = (), **kw: int
) -> IntervalSums:
    return IntervalSums(
        tariff_id=tariff,
        readings=kw.get("readings", 1),
        import_wh=sum(wh),
        block_milli=kw.get("block", 0),
        days=kw.get("days", 0),
        standing_milli=kw.get("standing", 0),
        total_milli=sum(milli) + kw.get("block", 0) + kw.get("standing", 0),
        payer_minor=kw.get("payer", 0),
        unrated_block_wh=0,
        band_wh=wh,
        band_milli=milli or tuple(0 for _ in wh),
    )


def test_fold_merges_bands_by_name_across_tariffs_and_totals_everything() -> None:
    b = boundaries(
        Resolution.DAY, BERLIN, ts("2026-06-01T00:00:00+02:00"), ts("2026-06-03T00:00:00+02:00")
    )
    tariffs = {
        1: TariffInfo(wire_id=1, code="home", version=1, bands=("night", "day")),
        2: TariffInfo(wire_id=2, code="home", version=2, bands=("day", "peak")),
    }
    slots = [
        SlotSums(
            start=b[0],
            sums=_sums(1, wh=(100, 200), milli=(1_000, 4_000), payer=5, days=1, standing=40_000),
        ),
        SlotSums(start=b[0] + 3600, sums=_sums(1, wh=(1, 2), milli=(10, 40), block=7)),
        SlotSums(start=b[1], sums=_sums(2, wh=(300, 50), milli=(6_000, 1_500), payer=7)),
    ]
    names, buckets, totals = fold_slots(b, slots, tariffs, BERLIN)
    assert names == ["night", "day", "peak"]
    first, second = buckets
    assert (first.readings, first.energy_wh, first.band_wh) == (2, 303, [101, 202, 0])
    assert first.band_milli == [1_010, 4_040, 0]
    assert (first.block_milli, first.energy_milli, first.energy_minor) == (7, 5_057, 5)
    assert (first.standing_days, first.standing_milli, first.standing_minor) == (1, 40_000, 40)
    assert (first.total_milli, first.total_minor, first.debited_minor) == (45_057, 45, 5)
    assert (second.band_wh, second.band_milli) == ([0, 300, 50], [0, 6_000, 1_500])
    assert first.local_start == "2026-06-01T00:00:00+02:00"
    assert (first.start, first.end) == (
        datetime.fromtimestamp(b[0], UTC),
        datetime.fromtimestamp(b[1], UTC),
    )
    assert totals.energy_wh == 653
    assert totals.band_wh == [101, 502, 50]
    assert totals.total_milli == first.total_milli + second.total_milli
    assert totals.debited_minor == 12
    # An unknown tariff's bands are named by position.
    names, _, _ = fold_slots(b, [SlotSums(start=b[0], sums=_sums(9, wh=(1, 1)))], {}, BERLIN)
    assert names == ["#0", "#1"]


def test_round_minor_is_half_up_and_apportion_adds_up() -> None:
    assert [round_minor(m) for m in (0, 499, 500, 1_499, 1_500)] == [0, 0, 1, 1, 2]
    assert apportion(10, [0, 0]) == [0, 0]
    assert apportion(0, [0]) == [0]
    assert apportion(3, [1_400, 1_400, 200]) == [2, 1, 0]  # equal remainders: earlier first
    assert apportion(3, [1_400, 1_300, 300]) == [2, 1, 0]
    assert apportion(3, [1_300, 1_400, 300]) == [1, 2, 0]
    assert apportion(2, [1_500, 500]) == [2, 0]  # ties on the remainder: earlier first
    with pytest.raises(ValueError, match="non-negative"):
        apportion(-1, [1])


@FAST
@given(st.lists(st.integers(0, 10**9), min_size=1, max_size=12), st.integers(0, 999))
def test_apportioning_the_debited_minor_units_keeps_each_line_within_one(
    milli: list[int], carry_in: int
) -> None:
    """The statement's lines share what the payer was debited; each within one minor unit."""
    total_milli = sum(milli)
    debited = (carry_in + total_milli) // 1000  # what the payer's carry stream debits
    parts = apportion(debited, milli)
    assert sum(parts) == debited
    for part, m in zip(parts, milli, strict=True):
        assert abs(part * 1000 - m) < 2000
        assert part >= 0


# ------------------------------------------------------------------------------ ranges


def test_limits_per_resolution_with_a_clear_error() -> None:
    # The longest October (a 25-hour day) still fits in 31 days of hours.
    october = boundaries(
        Resolution.HOUR, BERLIN, ts("2026-10-01T00:00:00+02:00"), ts("2026-11-01T00:00:00+01:00")
    )
    assert len(october) - 1 == 745 == LIMITS[Resolution.HOUR].buckets
    with pytest.raises(MalformedRequestError) as hours:
        boundaries(
            Resolution.HOUR,
            BERLIN,
            ts("2026-10-01T00:00:00+02:00"),
            ts("2026-11-01T01:00:00+01:00"),
        )
    message = str(hours.value)
    assert "at most 31 days" in message
    assert "746 buckets" in message
    assert "resolution=day" in message
    with pytest.raises(MalformedRequestError, match="at most 366 days"):
        boundaries(Resolution.DAY, BERLIN, ts("2026-01-01T00:00:00Z"), ts("2027-01-03T00:00:00Z"))
    with pytest.raises(MalformedRequestError, match="at most 366 days"):
        boundaries(Resolution.DAY, BERLIN, ts("2000-01-01T00:00:00Z"), ts("2027-01-03T00:00:00Z"))
    assert (
        len(
            boundaries(
                Resolution.DAY,
                BERLIN,
                ts("2028-01-01T00:00:00+01:00"),
                ts("2029-01-01T00:00:00+01:00"),
            )
        )
        == 367
    )
    with pytest.raises(MalformedRequestError, match="at most 120 months"):
        boundaries(Resolution.MONTH, BERLIN, ts("2016-01-01T00:00:00Z"), ts("2026-02-02T00:00:00Z"))
    with pytest.raises(MalformedRequestError, match="must be after from") as empty:
        boundaries(Resolution.DAY, BERLIN, 1_000, 1_000)
    assert empty.value.errors[0].field == "to"


def test_bounds_and_defaults() -> None:
    assert instant(date(2026, 3, 29), BERLIN, "from") == ts("2026-03-29T00:00:00+01:00")
    assert instant(datetime(2026, 3, 29, 1, 30, 0, 999, tzinfo=UTC), BERLIN, "to") == ts(
        "2026-03-29T01:30:00Z"
    )
    with pytest.raises(MalformedRequestError, match="offset"):
        instant(datetime(2026, 3, 29), BERLIN, "to")  # noqa: DTZ001 - refused on purpose
    with pytest.raises(MalformedRequestError, match="must fall in"):
        instant(date(1969, 12, 31), BERLIN, "from")
    now = ts("2026-03-29T15:20:00+02:00")
    assert default_start(Resolution.HOUR, BERLIN, now) == ts("2026-03-29T00:00:00+01:00")
    assert default_start(Resolution.DAY, BERLIN, now) == ts("2026-03-01T00:00:00+01:00")
    assert default_start(Resolution.MONTH, BERLIN, now) == ts("2026-01-01T00:00:00+01:00")
    # At exactly midnight the range ending there is the day before.
    assert default_start(Resolution.HOUR, BERLIN, ts("2026-03-30T00:00:00+02:00")) == ts(
        "2026-03-29T00:00:00+01:00"
    )
