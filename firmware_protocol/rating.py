"""The rating function: ToU band in force, cumulative band and block charges, standing charges.

One implementation, used identically by the meter (simulator and, as a port, firmware) and
the backend, so both sides agree to the rating unit (DESIGN §3). The normative text is
``RATING.md`` beside this module; this docstring is the map.

* **Time.** Everything follows the tariff's *local-time high-water mark* ``H(t)``: the
  latest local wall-clock time (date and time, as the tariff's IANA zone shows it) seen at
  any instant ``<= t``. ``H`` never goes backwards, so a fall-back hour repeats nothing
  (a switch applies at the *first* occurrence of its minute) and a spring-forward gap
  applies every switch inside it at the first instant after the gap. The *rating date*
  of ``t`` is ``H(t)``'s date; the band is the rating date's schedule entry for
  ``H(t)``'s minute of the day; the block period is ``H(t)``'s calendar month; a local
  day starts (and its standing charge is taken) at the first instant ``H`` reaches its
  midnight.
* **Money.** A band's charge is a function of its *cumulative* energy since the tariff's
  activation, ``floor(cum_wh * price / 1000)``; the inclining-block adder is a function of
  the energy since the block period began, floored once. An interval's charge is a
  difference of two such values, so any split of a stretch of consumption telescopes to
  the same total (the property the tests prove).
* **Registers.** :class:`Registers` is the meter's register snapshot (per-band Wh, block
  period and its energy, the previous period's closing energy, the block charge of closed
  periods); :func:`advance` is the meter's step, :func:`rate_interval` the shared interval
  rating, :func:`cumulative_charge_milli` the credit used since activation.

All functions are pure; the only state is memoisation of per-tariff, per-date tables.
"""

from __future__ import annotations

import bisect
import datetime as dt
import functools
import zoneinfo
from dataclasses import dataclass
from typing import Final

from firmware_protocol.errors import MalformedError, ProtocolError, UnitError
from firmware_protocol.tariff import (
    MAX_BANDS,
    U32_MAX,
    Band,
    Block,
    Switch,
    Tariff,
    flat_tariff,
)
from firmware_protocol.units import WH_PER_KWH, check_int, currency, energy_charge_milli

#: Upper bound of an energy register in Wh (the bound units.energy_charge_milli accepts).
MAX_REGISTER_WH: Final = 2**48
#: Upper bound of a money register in rating units (signed 64-bit, like the ledger).
MAX_REGISTER_MILLI: Final = 2**63 - 1
#: First and last block period (``year * 12 + month - 1``) an instant in u32 range can have.
MIN_PERIOD: Final = 1970 * 12 - 1  # 1969-12: zones west of UTC at t = 0
MAX_PERIOD: Final = 2106 * 12 + 1  # 2106-02: t = 2**32 - 1

_SECONDS_PER_DAY: Final = 86_400
_EPOCH_ORDINAL: Final = dt.date(1970, 1, 1).toordinal()
# Python bounds every UTC offset strictly inside +-24 h (datetime.tzinfo.utcoffset), so a
# window reaching 24 h past both ends of a local day holds every instant that can matter.
_OFFSET_MARGIN: Final = _SECONDS_PER_DAY
# Offset changes are found by sampling every 6 h and bisecting to the second. Sound while no
# two changes of a zone are closer than that: since 1970 the closest pair in tzdata 2026f is
# 6.96 days apart (America/Boa_Vista, 2000).
_SAMPLE_STEP: Final = 6 * 3600
_DAY_CACHE_LIMIT: Final = 4096
_RATER_CACHE_LIMIT: Final = 256


class RegisterError(MalformedError):
    """A register snapshot that is invalid, inconsistent, or older than the one before it."""


class RatingGapError(ProtocolError):
    """Two snapshots more than one block period apart: energy alone cannot rate the blocks.

    The closing energy of the periods in between is not in the snapshots; the caller uses
    the meter's own per-period values (:attr:`Registers.closed_block_milli`, i.e.
    :func:`cumulative_charge_milli` differences, or its billing profile) instead.
    """

    # Not anyone's fault: the readings are just too far apart for this method.
    peer_fault = False


# --------------------------------------------------------------------------- time


@functools.lru_cache(maxsize=64)
def _zone(key: str) -> zoneinfo.ZoneInfo:
    return zoneinfo.ZoneInfo(key)


def _offset(zone: zoneinfo.ZoneInfo, t: int) -> int:
    """UTC offset in seconds at instant ``t``: the wall clock as naive seconds, minus ``t``."""
    local = dt.datetime.fromtimestamp(t, zone)
    wall = (local.toordinal() - _EPOCH_ORDINAL) * _SECONDS_PER_DAY
    return wall + local.hour * 3600 + local.minute * 60 + local.second - t


@functools.lru_cache(maxsize=_DAY_CACHE_LIMIT)
def _pieces(key: str, ordinal: int) -> tuple[tuple[int, int, int], ...]:
    """Constant-offset pieces ``(start, end, offset)`` (UTC, half-open) around a local date.

    They cover ``[M - 24 h, M + 48 h]`` where ``M`` is the date's midnight as naive local
    seconds: every instant whose high-water mark can fall on the date, and all instants
    before it that could have pushed the mark there.
    """
    zone = _zone(key)
    midnight = (ordinal - _EPOCH_ORDINAL) * _SECONDS_PER_DAY
    lo = midnight - _OFFSET_MARGIN
    hi = midnight + _SECONDS_PER_DAY + _OFFSET_MARGIN
    samples = [*range(lo, hi, _SAMPLE_STEP), hi]
    offsets = [_offset(zone, s) for s in samples]
    pieces: list[tuple[int, int, int]] = []
    start = lo
    for i in range(len(samples) - 1):
        before, after = offsets[i], offsets[i + 1]
        if before != after:
            # Bisect for the first second with the new offset.
            a, b = samples[i], samples[i + 1]
            while b - a > 1:
                mid = (a + b) // 2
                if _offset(zone, mid) == before:
                    a = mid
                else:
                    b = mid
            pieces.append((start, b, before))
            start = b
    pieces.append((start, hi + 1, offsets[-1]))
    return tuple(pieces)


def _first_reaching(pieces: tuple[tuple[int, int, int], ...], local: int) -> int:
    """The first instant whose high-water mark is ``>= local`` (naive local seconds).

    Within a piece the wall clock is ``t + offset``; the mark first reaches ``local`` in the
    first piece whose last second shows ``>= local``: at ``local - offset``, or at the
    piece's start when the clock jumped over it (spring-forward gap).
    """
    for start, end, off in pieces[:-1]:
        if local <= end - 1 + off:
            return max(start, local - off)
    start, _, off = pieces[-1]
    return max(start, local - off)


@functools.lru_cache(maxsize=_DAY_CACHE_LIMIT)
def _day_bounds(key: str, ordinal: int) -> tuple[int, int]:
    """``[start, end)`` of a local date: the instants the mark first reaches its midnights."""
    pieces = _pieces(key, ordinal)
    midnight = (ordinal - _EPOCH_ORDINAL) * _SECONDS_PER_DAY
    return (
        _first_reaching(pieces, midnight),
        _first_reaching(pieces, midnight + _SECONDS_PER_DAY),
    )


@dataclass(frozen=True, slots=True)
class _Day:
    """One rating date of one tariff: its bounds, switch instants and bands."""

    ordinal: int
    start: int
    end: int
    effective: tuple[int, ...]  # instant each switch takes effect, ascending
    bands: tuple[int, ...]
    period: int


class _Rater:
    """A tariff compiled for fast evaluation (memoised per tariff object)."""

    __slots__ = ("days", "holidays", "key", "last", "prices", "tariff", "tiers")

    def __init__(self, tariff: Tariff) -> None:
        self.tariff = tariff
        self.key = tariff.timezone
        self.holidays = frozenset(d.toordinal() for d in tariff.holidays)
        self.prices = tuple(b.price_milli_per_kwh for b in tariff.bands)
        # Tier i spans [from_i, from_{i+1}); the last one is open-ended.
        uppers = [b.from_wh for b in tariff.blocks[1:]] + [MAX_REGISTER_WH]
        self.tiers = tuple(
            (b.from_wh, upper, b.adder_milli_per_kwh)
            for b, upper in zip(tariff.blocks, uppers, strict=False)
        )
        self.days: dict[int, _Day] = {}
        # An empty day, so the first lookup takes the slow path.
        self.last = _Day(ordinal=0, start=0, end=0, effective=(), bands=(), period=0)

    def _build(self, ordinal: int) -> _Day:
        date = dt.date.fromordinal(ordinal)
        if ordinal in self.holidays:
            schedule = self.tariff.holiday  # a holiday wins over a weekend
        elif date.weekday() >= 5:
            schedule = self.tariff.weekend
        else:
            schedule = self.tariff.weekday
        pieces = _pieces(self.key, ordinal)
        midnight = (ordinal - _EPOCH_ORDINAL) * _SECONDS_PER_DAY
        start, end = _day_bounds(self.key, ordinal)
        return _Day(
            ordinal=ordinal,
            start=start,
            end=end,
            effective=tuple(_first_reaching(pieces, midnight + 60 * s.minute) for s in schedule),
            bands=tuple(s.band for s in schedule),
            period=date.year * 12 + date.month - 1,
        )

    def day(self, ordinal: int) -> _Day:
        found = self.days.get(ordinal)
        if found is None:
            if len(self.days) >= _DAY_CACHE_LIMIT:
                self.days.clear()
            found = self.days[ordinal] = self._build(ordinal)
        return found

    def day_of(self, t: int) -> _Day:
        """The rating date in force at ``t``."""
        last = self.last
        if last.start <= t < last.end:
            return last
        day = self.day(dt.datetime.fromtimestamp(t, _zone(self.key)).toordinal())
        # The shown date's day starts at or before t (the mark is >= the clock); the mark
        # may already be on a later date after a fall-back across midnight.
        while t >= day.end:
            day = self.day(day.ordinal + 1)
        self.last = day
        return day

    def block_charge(self, period_wh: int) -> int:
        numerator = 0
        for lo, hi, adder in self.tiers:
            if period_wh <= lo:
                break
            numerator += (min(period_wh, hi) - lo) * adder
        return numerator // WH_PER_KWH


_RATERS: dict[int, _Rater] = {}


def _rater(tariff: Tariff) -> _Rater:
    # Keyed by identity: hashing a Tariff costs more than a whole rating. The entry holds
    # the tariff, so its id cannot be reused while cached.
    found = _RATERS.get(id(tariff))
    if found is not None and found.tariff is tariff:
        return found
    if not isinstance(tariff, Tariff):
        raise UnitError(f"tariff must be a Tariff, got {type(tariff).__name__}")
    if len(_RATERS) >= _RATER_CACHE_LIMIT:
        _RATERS.clear()
    found = _RATERS[id(tariff)] = _Rater(tariff)
    return found


def _instant(t: object, name: str = "t") -> int:
    return check_int(t, name, minimum=0, maximum=U32_MAX)


def band_at(tariff: Tariff, t: int) -> int:
    """Index of the band in force at instant ``t`` (Unix seconds)."""
    day = _rater(tariff).day_of(_instant(t))
    return day.bands[bisect.bisect_right(day.effective, t) - 1]


def next_band_change(tariff: Tariff, t: int) -> int:
    """The next instant ``> t`` at which :func:`band_at` may change (a switch or a day start).

    ``band_at`` is constant on ``[t, next_band_change(t))``. A result may be a switch to
    the same band or a day start with the same band; the meter just re-evaluates.
    """
    day = _rater(tariff).day_of(_instant(t))
    i = bisect.bisect_right(day.effective, t)
    if i < len(day.effective):
        return min(day.effective[i], day.end)
    return day.end


def rating_date(tariff: Tariff, t: int) -> dt.date:
    """The local date in force at ``t`` (the date of the local-time high-water mark)."""
    return dt.date.fromordinal(_rater(tariff).day_of(_instant(t)).ordinal)


def block_period_of(tariff: Tariff, t: int) -> int:
    """Block period (local calendar month, ``year * 12 + month - 1``) in force at ``t``."""
    return _rater(tariff).day_of(_instant(t)).period


def block_period_start(tariff: Tariff, period: int) -> int:
    """First instant of a block period: when the mark reaches the 1st of the month, 00:00."""
    check_int(period, "period", minimum=MIN_PERIOD, maximum=MAX_PERIOD)
    year, month0 = divmod(period, 12)
    return _day_bounds(tariff.timezone, dt.date(year, month0 + 1, 1).toordinal())[0]


def local_midnights(tariff: Tariff, start: int, end: int) -> list[int]:
    """Instants in ``(start, end]`` at which a local day begins, one per day, ascending.

    A day begins when the mark reaches its midnight: at 00:00, or at the first instant after
    a gap when midnight is skipped. A date skipped whole (Pacific/Apia, 2011-12-30) begins
    at the same instant as the next one and so appears twice.
    """
    _instant(start, "start")
    if _instant(end, "end") < start:
        raise UnitError(f"end {end} is before start {start}")
    rater = _rater(tariff)
    first = rater.day_of(start).ordinal
    last = rater.day_of(end).ordinal
    return [_day_bounds(rater.key, d)[0] for d in range(first + 1, last + 1)]


def standing_charges_milli(tariff: Tariff, start: int, end: int) -> int:
    """Standing charges due in ``(start, end]``: one daily charge per local day begun."""
    return len(local_midnights(tariff, start, end)) * tariff.standing_charge_milli_per_day


# --------------------------------------------------------------------------- money


def band_charge_milli(tariff: Tariff, band: int, cum_wh: int) -> int:
    """Charge of a band's cumulative energy since activation: ``floor(cum_wh * price / 1000)``."""
    check_int(band, "band", minimum=0, maximum=len(tariff.bands) - 1)
    return energy_charge_milli(cum_wh, tariff.bands[band].price_milli_per_kwh)


def block_charge_milli(tariff: Tariff, period_wh: int) -> int:
    """Inclining-block adder charge of the energy since the block period began, floored once.

    Energy in ``[blocks[i].from_wh, blocks[i+1].from_wh)`` costs ``blocks[i].adder`` per
    kWh; energy below the first threshold costs no adder.
    """
    check_int(period_wh, "period_wh", minimum=0, maximum=MAX_REGISTER_WH)
    return _rater(tariff).block_charge(period_wh)


def _register(value: object, name: str, maximum: int) -> int:
    try:
        return check_int(value, name, minimum=0, maximum=maximum)
    except UnitError as exc:
        raise RegisterError(str(exc)) from None


@dataclass(frozen=True, slots=True)
class Registers:
    """A meter's rating registers at one instant (per tariff activation).

    ``band_wh``: cumulative Wh per band since the tariff's activation (OBIS 1.8.1 … 1.8.n);
    ``block_period``: the block period in force; ``block_period_wh``: Wh since that period
    began (or since activation); ``prev_block_period_wh``: the closing Wh of the period just
    before ``block_period`` (0 if it saw none); ``closed_block_milli``: the block charge of
    all periods closed since activation (the meter's own value, used when snapshots are
    more than one period apart).
    """

    band_wh: tuple[int, ...]
    block_period: int
    block_period_wh: int = 0
    prev_block_period_wh: int = 0
    closed_block_milli: int = 0

    def __post_init__(self) -> None:
        if type(self.band_wh) is not tuple or not 1 <= len(self.band_wh) <= MAX_BANDS:
            raise RegisterError(f"band_wh must be a tuple of 1..{MAX_BANDS} registers")
        for i, wh in enumerate(self.band_wh):
            _register(wh, f"band_wh[{i}]", MAX_REGISTER_WH)
        try:
            check_int(self.block_period, "block_period", minimum=MIN_PERIOD, maximum=MAX_PERIOD)
        except UnitError as exc:
            raise RegisterError(str(exc)) from None
        _register(self.block_period_wh, "block_period_wh", MAX_REGISTER_WH)
        _register(self.prev_block_period_wh, "prev_block_period_wh", MAX_REGISTER_WH)
        _register(self.closed_block_milli, "closed_block_milli", MAX_REGISTER_MILLI)


@dataclass(frozen=True, slots=True)
class Charge:
    """The charge of an interval between two register snapshots, in rating units."""

    energy_wh: tuple[int, ...]  # per band
    energy_milli: tuple[int, ...]  # per band
    block_wh: int
    block_milli: int
    total_milli: int

    def __post_init__(self) -> None:
        if len(self.energy_wh) != len(self.energy_milli):
            raise UnitError("energy_wh and energy_milli need one entry per band")
        if self.total_milli != sum(self.energy_milli) + self.block_milli:
            raise UnitError("total_milli must be the band charges plus the block charge")


def start_registers(tariff: Tariff, activation: int) -> Registers:
    """All-zero registers of a tariff activated at ``activation`` (the meter resets them)."""
    return Registers((0,) * len(tariff.bands), block_period_of(tariff, activation))


def _check_fits(tariff: Tariff, regs: Registers, name: str) -> None:
    if len(regs.band_wh) != len(tariff.bands):
        raise RegisterError(
            f"{name} has {len(regs.band_wh)} band registers, the tariff {len(tariff.bands)}"
        )


def advance(tariff: Tariff, regs: Registers, t: int, wh: int) -> Registers:
    """The meter's step: add ``wh`` consumed at instant ``t`` to the band in force at ``t``.

    When ``t`` is in a later block period the period rolls first: the closing energy becomes
    ``prev_block_period_wh`` (0 if a whole period was skipped) and its block charge joins
    ``closed_block_milli``. ``wh = 0`` just rolls the period.
    """
    _check_fits(tariff, regs, "registers")
    check_int(wh, "wh", minimum=0, maximum=MAX_REGISTER_WH)
    rater = _rater(tariff)
    day = rater.day_of(_instant(t))
    if day.period < regs.block_period:
        raise RegisterError(
            f"t={t} is in block period {day.period}, before the registers' {regs.block_period}"
        )
    band_wh = list(regs.band_wh)
    band_wh[day.bands[bisect.bisect_right(day.effective, t) - 1]] += wh
    if day.period == regs.block_period:
        return Registers(
            tuple(band_wh),
            regs.block_period,
            regs.block_period_wh + wh,
            regs.prev_block_period_wh,
            regs.closed_block_milli,
        )
    return Registers(
        tuple(band_wh),
        day.period,
        wh,
        regs.block_period_wh if day.period == regs.block_period + 1 else 0,
        regs.closed_block_milli + rater.block_charge(regs.block_period_wh),
    )


def rate_interval(tariff: Tariff, before: Registers, after: Registers) -> Charge:
    """Charge of the consumption between two snapshots: a difference of cumulative charges.

    Band part: ``sum_b band_charge(after_b) - band_charge(before_b)``. Block part, with
    ``F = block_charge_milli``: same period ``F(after.wh) - F(before.wh)``; next period
    ``F(after.prev) - F(before.wh) + F(after.wh)``; further apart: :class:`RatingGapError`.
    """
    _check_fits(tariff, before, "before")
    _check_fits(tariff, after, "after")
    rater = _rater(tariff)
    energy_wh: list[int] = []
    energy_milli: list[int] = []
    for band, (b, a, price) in enumerate(
        zip(before.band_wh, after.band_wh, rater.prices, strict=True)
    ):
        if a < b:
            raise RegisterError(f"band_wh[{band}] went backwards: {b} -> {a}")
        energy_wh.append(a - b)
        energy_milli.append(a * price // WH_PER_KWH - b * price // WH_PER_KWH)
    if after.closed_block_milli < before.closed_block_milli:
        raise RegisterError("closed_block_milli went backwards")
    f = rater.block_charge
    step = after.block_period - before.block_period
    if step == 0:
        if after.block_period_wh < before.block_period_wh:
            raise RegisterError("block_period_wh went backwards within a period")
        block_wh = after.block_period_wh - before.block_period_wh
        block_milli = f(after.block_period_wh) - f(before.block_period_wh)
    elif step == 1:
        closing = after.prev_block_period_wh
        if closing < before.block_period_wh:
            raise RegisterError("prev_block_period_wh is below the period's earlier reading")
        block_wh = closing - before.block_period_wh + after.block_period_wh
        block_milli = f(closing) - f(before.block_period_wh) + f(after.block_period_wh)
    elif step > 1:
        raise RatingGapError(
            f"snapshots are {step} block periods apart; rate the blocks from the meter's "
            "closed_block_milli (cumulative_charge_milli) instead"
        )
    else:
        raise RegisterError(
            f"block_period went backwards: {before.block_period} -> {after.block_period}"
        )
    if block_wh != sum(energy_wh):
        raise RegisterError(
            f"block energy {block_wh} Wh differs from the band energy {sum(energy_wh)} Wh"
        )
    return Charge(
        energy_wh=tuple(energy_wh),
        energy_milli=tuple(energy_milli),
        block_wh=block_wh,
        block_milli=block_milli,
        total_milli=sum(energy_milli) + block_milli,
    )


def cumulative_charge_milli(tariff: Tariff, regs: Registers) -> int:
    """Credit used since the tariff's activation according to the registers (energy only).

    ``sum_b band_charge(band_wh[b]) + closed_block_milli + F(block_period_wh)``; standing
    charges are separate (:func:`standing_charges_milli`).
    """
    _check_fits(tariff, regs, "registers")
    rater = _rater(tariff)
    bands = sum(wh * p // WH_PER_KWH for wh, p in zip(regs.band_wh, rater.prices, strict=True))
    return bands + regs.closed_block_milli + rater.block_charge(regs.block_period_wh)


# --------------------------------------------------------------------------- known answers


@dataclass(frozen=True, slots=True)
class RatingCase:
    """A hand-computed rating case for the known-answer vectors (see RATING.md §8).

    Replay: ``regs = start_registers(tariff, activation)``, then ``advance`` for each
    ``(t, wh)`` event; ``cumulative_charge_milli`` of the result is
    ``expected_energy_milli``, ``standing_charges_milli(tariff, activation, end)`` is
    ``expected_standing_milli``, and their sum ``expected_total_milli``.
    """

    name: str
    tariff: Tariff
    activation: int
    events: tuple[tuple[int, int], ...]
    end: int
    expected_bands: tuple[int, ...]  # band_at of each event
    expected_band_wh: tuple[int, ...]
    expected_energy_milli: int
    expected_standing_milli: int

    @property
    def expected_total_milli(self) -> int:
        """Energy and standing charges together."""
        return self.expected_energy_milli + self.expected_standing_milli


_EUR = currency("EUR")
_USD = currency("USD")
_BERLIN_TOU = Tariff(
    tariff_id=7,
    currency=_EUR,
    timezone="Europe/Berlin",
    bands=(Band("night", 20_000), Band("day", 30_000), Band("peak", 45_000)),
    # 00:00 night, 02:30 day (inside the spring gap and the autumn repeat), 17:00 peak,
    # 21:00 night.
    weekday=(Switch(0, 0), Switch(150, 1), Switch(1020, 2), Switch(1260, 0)),
    weekend=(Switch(0, 0), Switch(150, 1), Switch(1260, 0)),
    holiday=(Switch(0, 0),),
    standing_charge_milli_per_day=45_000,
    holidays=(dt.date(2026, 12, 26),),
)

#: Hand-computed cases; RATING.md §8 shows the arithmetic.
RATING_CASES: Final[tuple[RatingCase, ...]] = (
    RatingCase(
        name="flat-telescoping",
        tariff=flat_tariff(
            tariff_id=1, currency=_EUR, timezone="Europe/Berlin", price_milli_per_kwh=31_270
        ),
        activation=1_767_222_000,  # 2026-01-01 00:00 CET
        # seven 1 Wh events: 7 * 31.27 = 218.89 -> 218 (per-event floors would give 217)
        events=tuple((1_767_222_000 + 600 * i, 1) for i in range(1, 8)),
        end=1_767_222_000 + 4_200,
        expected_bands=(0,) * 7,
        expected_band_wh=(7,),
        expected_energy_milli=218,
        expected_standing_milli=0,
    ),
    RatingCase(
        name="berlin-spring-forward-switch-in-gap",
        tariff=_BERLIN_TOU,
        activation=1_774_738_800,  # 2026-03-29 00:00 CET (Sunday, 23-hour day)
        events=(
            (1_774_745_999, 100),  # 01:59:59 CET: night
            (1_774_746_000, 100),  # 03:00:00 CEST, first instant after the gap: day
            (1_774_800_000, 10),  # 18:00 CEST Sunday: weekend has no peak -> day
        ),
        end=1_774_821_600,  # 2026-03-30 00:00 CEST: one day begun (the 30th)
        # night 100 Wh * 20 = 2000; day 110 Wh * 30 = 3300
        expected_bands=(0, 1, 1),
        expected_band_wh=(100, 110, 0),
        expected_energy_milli=5_300,
        expected_standing_milli=45_000,
    ),
    RatingCase(
        name="berlin-fall-back-switch-at-first-occurrence",
        tariff=_BERLIN_TOU,
        activation=1_792_879_200,  # 2026-10-25 00:00 CEST (Sunday, 25-hour day)
        events=(
            (1_792_886_399, 3),  # 01:59:59 CEST: night
            (1_792_888_200, 5),  # 02:30 CEST, first occurrence: day
            (1_792_890_000, 7),  # 02:00 CET, repeated hour after the switch: still day
            (1_792_969_200, 11),  # 2026-10-26 00:00 CET Monday: night
        ),
        end=1_792_969_200,
        # night 14 Wh * 20 = 280; day 12 Wh * 30 = 360
        expected_bands=(0, 1, 1, 0),
        expected_band_wh=(14, 12, 0),
        expected_energy_milli=640,
        expected_standing_milli=45_000,  # 2026-10-26 began 25 h after the 25th
    ),
    RatingCase(
        name="new-york-blocks-across-month-and-dst",
        tariff=Tariff(
            tariff_id=9,
            currency=_USD,
            timezone="America/New_York",
            bands=(Band("all-day", 100_000),),
            weekday=(Switch(0, 0),),
            weekend=(Switch(0, 0),),
            holiday=(Switch(0, 0),),
            standing_charge_milli_per_day=10_000,
            # 0..499 Wh +0, 500..999 Wh +20 000, from 1000 Wh +50 000 milli/kWh
            blocks=(Block(500, 20_000), Block(1_000, 50_000)),
        ),
        activation=1_793_160_000,  # 2026-10-28 00:00 EDT
        events=(
            (1_793_200_000, 400),
            (1_793_300_000, 333),  # period Oct: 733 Wh, adder on 233 Wh
            (1_793_505_599, 500),  # 2026-10-31 23:59:59 EDT: 1233 Wh, adders on 500+233
            (1_793_505_600, 1_001),  # 2026-11-01 00:00 EDT: new period (DST ends at 02:00)
        ),
        end=1_793_595_600,  # 2026-11-02 00:00 EST: days 29, 30, 31 Oct, 1, 2 Nov begun
        # bands 2234 Wh * 100 = 223_400; Oct blocks (500*20000 + 233*50000)/1000 = 21_650;
        # Nov blocks (500*20000 + 1*50000)/1000 = 10_050
        expected_bands=(0, 0, 0, 0),
        expected_band_wh=(2_234,),
        expected_energy_milli=255_100,
        expected_standing_milli=50_000,
    ),
    RatingCase(
        name="holiday-wins-over-weekend",
        tariff=_BERLIN_TOU,
        activation=1_798_239_600,  # 2026-12-26 00:00 CET, a Saturday and a holiday
        events=(
            (1_798_286_400, 1_234),  # 13:00 CET: holiday schedule, night all day
            (1_798_326_000, 1_000),  # 2026-12-27 00:00 Sunday: night
            (1_798_336_800, 999),  # 2026-12-27 03:00 Sunday: day
        ),
        end=1_798_336_800,
        # night 2234 Wh * 20 = 44_680; day 999 Wh * 30 = 29_970
        expected_bands=(0, 0, 1),
        expected_band_wh=(2_234, 999, 0),
        expected_energy_milli=74_650,
        expected_standing_milli=45_000,
    ),
)
