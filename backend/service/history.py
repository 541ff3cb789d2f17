"""Consumption history of a supply account: billed intervals in local hour, day or month buckets.

The pure core (everything above :class:`HistoryService`) turns a range and the tenant's
time zone into bucket boundaries and folds slot sums into buckets; the service reads the
slot sums in one scoped query.

Decisions:

- **An interval belongs to the bucket containing its end.** A billed interval is
  ``(from_ts, to_ts]`` between two readings of cumulative registers; the registers do
  not say *when* inside the interval the energy flowed, and the backend never pro-rates
  energy (DESIGN §3). So the whole interval goes to the bucket ``(start, end]`` holding
  ``to_ts`` — half-open like the interval itself, so a reading taken exactly at midnight
  closes the day before. A gap in readings therefore shows as an empty bucket followed
  by a large one; the totals are exact either way.
- **Buckets are local calendar units of the tenant's zone** (``tenants.timezone``).
  A day begins at local midnight — at the first instant after a gap when midnight is
  skipped, at its first occurrence when it repeats — exactly where
  :func:`firmware_protocol.rating.local_midnights` (the meter's standing-charge clock)
  puts it, so days are 23 or 25 hours long around DST changes. Hour buckets are the
  local clock's hours: a fall-back night has two ``01:00`` buckets (with different
  offsets), a spring-forward night none at ``02:00``. Months begin at the first day's
  start.
- **Ranges** ``[from, to)`` are widened to whole buckets (the bucket containing ``from``
  through the one containing the instant before ``to``) and limited per resolution
  (:data:`LIMITS`): at most 31 days of hours, 366 days, 120 months; more is a 400 that
  says which resolution to use instead. ``from``/``to`` may be RFC 3339 instants or local
  dates (``2026-03-01`` = that day's local start). Defaults: ``to`` now; ``from`` the
  start of the current local day (hours), month (days) or year (months).
- **Money**: ``*_milli`` are exact sums of the billed intervals; ``*_minor`` round them
  half up for display. ``debited_minor`` is what the ledger took from the prepaid
  account for these readings (floors of running totals, see the monthly statement,
  which reconciles both to the unit).
- **Aggregation happens in SQL** on a grid of equal slots (the gcd of the bucket
  lengths, aligned with the boundaries: an hour, or 15 or 30 minutes in zones with such
  offsets, a day where there is no DST), so a month of ten-second readings is never
  loaded row by row; each slot then falls inside exactly one bucket.
"""

from __future__ import annotations

import bisect
import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Final
from zoneinfo import ZoneInfo

from backend.adapters.db.engine import Database
from backend.adapters.db.history_repo import HistoryRepository, SlotSums, TariffInfo
from backend.domain.auth import Action
from backend.service.context import Call, require
from backend.service.errors import NotFoundError
from backend.service.refusals import MalformedRequestError

#: Earliest and latest local dates a range may touch (room for a day either side).
MIN_DATE: Final = date(1970, 1, 2)
MAX_DATE: Final = date(9998, 12, 30)


class Resolution(enum.StrEnum):
    """Bucket size of a consumption history."""

    HOUR = "hour"
    DAY = "day"
    MONTH = "month"


@dataclass(frozen=True, slots=True)
class Limit:
    """How much one request may cover at a resolution."""

    buckets: int
    #: The limit in words, for the error message.
    span: str
    #: Longer than any bucket of this resolution can be (a cheap first check).
    longest_s: int


LIMITS: Final[Mapping[Resolution, Limit]] = {
    # 31 days of hours, one of them a 25-hour day.
    Resolution.HOUR: Limit(31 * 24 + 1, "31 days", 2 * 3600),
    Resolution.DAY: Limit(366, "366 days", 26 * 3600),
    Resolution.MONTH: Limit(120, "120 months", 32 * 86400),
}
_COARSER: Final = {Resolution.HOUR: "day", Resolution.DAY: "month", Resolution.MONTH: None}


# ---------------------------------------------------------------------------- boundaries


def day_start(day: date, zone: ZoneInfo) -> int:
    """The instant (Unix s) local date ``day`` begins in ``zone``.

    ``fold=0`` is the first occurrence of an ambiguous midnight and, for a midnight
    inside a gap, the offset before the gap — which is the instant the gap starts, the
    first instant of the new date. Both are what ``rating.local_midnights`` does.
    """
    return int(datetime.combine(day, time(0), tzinfo=zone).timestamp())


def hour_starts(day: date, zone: ZoneInfo) -> list[int]:
    """The instants at which the local clock shows ``HH:00:00`` on ``day``, ascending.

    A repeated hour appears twice (both folds exist), a skipped hour not at all.
    """
    found: set[int] = set()
    for hour in range(24):
        for fold in (0, 1):
            ts = int(datetime.combine(day, time(hour, fold=fold), tzinfo=zone).timestamp())
            back = datetime.fromtimestamp(ts, zone)
            if (back.date(), back.hour, back.minute, back.second) == (day, hour, 0, 0):
                found.add(ts)
    return sorted(found)


def local_date(ts: int, zone: ZoneInfo) -> date:
    """The local date in ``zone`` at instant ``ts``."""
    return datetime.fromtimestamp(ts, zone).date()


def _month_start(day: date) -> date:
    return day.replace(day=1)


def _next_month(day: date) -> date:
    return date(day.year + (day.month == 12), day.month % 12 + 1, 1)


def _check_date(day: date, name: str) -> None:
    if not MIN_DATE <= day <= MAX_DATE:
        raise MalformedRequestError.one(name, f"must fall in {MIN_DATE}..{MAX_DATE}")


def _candidates(resolution: Resolution, zone: ZoneInfo, first: date, last: date) -> list[int]:
    """Every bucket start of ``resolution`` on local dates ``first..last`` (months: their 1st)."""
    out: set[int] = set()
    if resolution is Resolution.MONTH:
        month = _month_start(first)
        while month <= last:
            out.add(day_start(month, zone))
            month = _next_month(month)
        return sorted(out)
    day = first
    while day <= last:
        if resolution is Resolution.DAY:
            out.add(day_start(day, zone))
        else:
            out.update(hour_starts(day, zone))
        day += timedelta(days=1)
    # A date skipped whole (Pacific/Apia 2011-12-30) begins with the next one: the set
    # keeps one boundary, so no empty bucket appears.
    return sorted(out)


def boundaries(resolution: Resolution, zone: ZoneInfo, start: int, end: int) -> list[int]:
    """Bucket boundaries ``b0 <= start < … < bn >= end`` covering ``[start, end)``.

    Raises :class:`MalformedRequestError` when that is more buckets than :data:`LIMITS`
    allows, or the range is empty.
    """
    if end <= start:
        raise MalformedRequestError.one("to", "must be after from")
    limit = LIMITS[resolution]
    if end - start > limit.buckets * limit.longest_s:
        _too_many(resolution, None)
    first = local_date(start, zone) - timedelta(days=1)
    last = local_date(end, zone) + timedelta(days=1)
    if resolution is Resolution.MONTH:
        last = _next_month(last)
    _check_date(first, "from")
    _check_date(last, "to")
    grid = _candidates(resolution, zone, first, last)
    lo = bisect.bisect_right(grid, start) - 1
    hi = bisect.bisect_left(grid, end)
    if lo < 0 or hi >= len(grid):  # pragma: no cover - the candidates reach a day beyond
        raise AssertionError("bucket grid does not cover the range")
    chosen = grid[lo : hi + 1]
    if len(chosen) - 1 > limit.buckets:
        _too_many(resolution, len(chosen) - 1)
    return chosen


def _too_many(resolution: Resolution, count: int | None) -> None:
    limit = LIMITS[resolution]
    got = "" if count is None else f" ({count} buckets)"
    coarser = _COARSER[resolution]
    advice = f"; narrow it or use resolution={coarser}" if coarser else "; narrow it"
    raise MalformedRequestError.one(
        "from",
        f"resolution={resolution} covers at most {limit.span} ({limit.buckets} buckets) "
        f"per request; this range is longer{got}{advice}",
    )


def slot_grid(bounds: Sequence[int]) -> tuple[int, int]:
    """``(size, phase)``: the coarsest equal slots every boundary falls on (``b ≡ phase``)."""
    if len(bounds) < 2:
        raise ValueError("a grid needs two boundaries")
    size = 0
    for b in bounds[1:]:
        size = math.gcd(size, b - bounds[0])
    return size, bounds[0] % size


def bucket_of(bounds: Sequence[int], to_ts: int) -> int | None:
    """Index ``i`` of the bucket ``(bounds[i], bounds[i+1]]`` holding ``to_ts``, else ``None``."""
    i = bisect.bisect_left(bounds, to_ts) - 1
    return i if 0 <= i < len(bounds) - 1 else None


def default_start(resolution: Resolution, zone: ZoneInfo, end: int) -> int:
    """Where a range ending at ``end`` starts by default (module docstring)."""
    today = local_date(max(end - 1, 0), zone)
    if resolution is Resolution.HOUR:
        return day_start(today, zone)
    if resolution is Resolution.DAY:
        return day_start(_month_start(today), zone)
    return day_start(today.replace(month=1, day=1), zone)


def instant(value: datetime | date, zone: ZoneInfo, name: str) -> int:
    """A query bound as Unix seconds: an aware instant, or a local date's start."""
    if isinstance(value, datetime):
        if value.utcoffset() is None:
            raise MalformedRequestError.one(name, "needs a time zone offset (or Z)")
        _check_date(value.astimezone(UTC).date(), name)
        return math.floor(value.timestamp())
    _check_date(value, name)
    return day_start(value, zone)


# ---------------------------------------------------------------------------- buckets


def round_minor(milli: int) -> int:
    """Milli to minor units, half up (display only; the ledger floors running totals)."""
    return (milli + 500) // 1000


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsumptionBucket:
    """One bucket of a consumption history (or the totals of all of them)."""

    start: datetime
    end: datetime
    #: The bucket's start on the local clock, with its offset (``2026-10-25T02:00:00+01:00``).
    local_start: str
    #: Billed intervals (readings) ending in the bucket.
    readings: int
    energy_wh: int
    #: Energy per band, aligned with the history's ``bands``.
    band_wh: list[int]
    band_milli: list[int]
    #: Inclining-block adders (part of the energy charge).
    block_milli: int
    #: Energy charge: the bands' charges plus the block adders.
    energy_milli: int
    energy_minor: int
    standing_days: int
    standing_milli: int
    standing_minor: int
    total_milli: int
    total_minor: int
    #: Minor units the ledger took from the prepaid account for these readings.
    debited_minor: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsumptionHistory:
    """A supply account's billed consumption in local buckets."""

    supply_account_id: int
    currency: str
    timezone: str
    resolution: Resolution
    start: datetime
    end: datetime
    #: Band names across the range's tariffs (``band_wh`` and ``band_milli`` follow them).
    bands: list[str]
    buckets: list[ConsumptionBucket]
    totals: ConsumptionBucket


@dataclass(slots=True)
class _Acc:
    readings: int = 0
    energy_wh: int = 0
    block_milli: int = 0
    days: int = 0
    standing_milli: int = 0
    total_milli: int = 0
    debited_minor: int = 0
    band_wh: dict[str, int] = field(default_factory=dict)
    band_milli: dict[str, int] = field(default_factory=dict)


def band_names(tariff_id: int, count: int, tariffs: Mapping[int, TariffInfo]) -> list[str]:
    """Names of a tariff's first ``count`` bands (``#i`` where the tariff is unknown)."""
    known = tariffs.get(tariff_id)
    names = list(known.bands) if known is not None else []
    return [names[i] if i < len(names) else f"#{i}" for i in range(count)]


def _bucket(acc: _Acc, names: list[str], start: int, end: int, zone: ZoneInfo) -> ConsumptionBucket:
    energy_milli = sum(acc.band_milli.values()) + acc.block_milli
    return ConsumptionBucket(
        start=datetime.fromtimestamp(start, UTC),
        end=datetime.fromtimestamp(end, UTC),
        local_start=datetime.fromtimestamp(start, zone).isoformat(),
        readings=acc.readings,
        energy_wh=acc.energy_wh,
        band_wh=[acc.band_wh.get(n, 0) for n in names],
        band_milli=[acc.band_milli.get(n, 0) for n in names],
        block_milli=acc.block_milli,
        energy_milli=energy_milli,
        energy_minor=round_minor(energy_milli),
        standing_days=acc.days,
        standing_milli=acc.standing_milli,
        standing_minor=round_minor(acc.standing_milli),
        total_milli=acc.total_milli,
        total_minor=round_minor(acc.total_milli),
        debited_minor=acc.debited_minor,
    )


def fold_slots(
    bounds: Sequence[int],
    slots: Iterable[SlotSums],
    tariffs: Mapping[int, TariffInfo],
    zone: ZoneInfo,
) -> tuple[list[str], list[ConsumptionBucket], ConsumptionBucket]:
    """Band names, one bucket per pair of boundaries, and the totals."""
    accs = [_Acc() for _ in range(len(bounds) - 1)]
    total = _Acc()
    names: list[str] = []
    for slot in sorted(slots, key=lambda s: (s.sums.tariff_id, s.start)):
        # slot.start is the floor of (to_ts - 1) on the grid: inside [b_i, b_i+1).
        i = bisect.bisect_right(bounds, slot.start) - 1
        if not 0 <= i < len(accs):  # pragma: no cover - the query asked for this range only
            continue
        s = slot.sums
        count = max(len(s.band_wh), len(s.band_milli))
        tariff_bands = band_names(s.tariff_id, count, tariffs)
        for acc in (accs[i], total):
            acc.readings += s.readings
            acc.energy_wh += s.import_wh
            acc.block_milli += s.block_milli
            acc.days += s.days
            acc.standing_milli += s.standing_milli
            acc.total_milli += s.total_milli
            acc.debited_minor += s.payer_minor
            for b, name in enumerate(tariff_bands):
                wh = s.band_wh[b] if b < len(s.band_wh) else 0
                milli = s.band_milli[b] if b < len(s.band_milli) else 0
                acc.band_wh[name] = acc.band_wh.get(name, 0) + wh
                acc.band_milli[name] = acc.band_milli.get(name, 0) + milli
        names.extend(n for n in tariff_bands if n not in names)
    buckets = [_bucket(acc, names, bounds[i], bounds[i + 1], zone) for i, acc in enumerate(accs)]
    return names, buckets, _bucket(total, names, bounds[0], bounds[-1], zone)


# ---------------------------------------------------------------------------- use case


class HistoryService:
    """Reads a supply account's consumption history."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def consumption(
        self,
        call: Call,
        supply_account_id: int,
        *,
        resolution: Resolution,
        start: datetime | date | None = None,
        end: datetime | date | None = None,
    ) -> ConsumptionHistory:
        """The account's billed consumption per local hour, day or month."""
        require(call, Action.SUPPLY_ACCOUNT_READ)
        async with self._db.read() as session:
            repo = HistoryRepository(session)
            found = await repo.account(call.scope, supply_account_id)
            if found is None:
                raise NotFoundError(f"no supply account {supply_account_id}")
            account, tenant = found
            zone = ZoneInfo(tenant.timezone)
            given = None if start is None else instant(start, zone, "from")
            hi = instant(call.now if end is None else end, zone, "to")
            lo = default_start(resolution, zone, hi) if given is None else given
            bounds = boundaries(resolution, zone, lo, hi)
            size, phase = slot_grid(bounds)
            slots = await repo.slot_sums(
                account.id, after=bounds[0], until=bounds[-1], size=size, phase=phase
            )
            tariffs = await repo.tariffs(tenant.id, {s.sums.tariff_id for s in slots})
        names, buckets, totals = fold_slots(bounds, slots, tariffs, zone)
        return ConsumptionHistory(
            supply_account_id=account.id,
            currency=tenant.currency,
            timezone=tenant.timezone,
            resolution=resolution,
            start=datetime.fromtimestamp(bounds[0], UTC),
            end=datetime.fromtimestamp(bounds[-1], UTC),
            bands=names,
            buckets=buckets,
            totals=totals,
        )
