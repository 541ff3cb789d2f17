"""The tariff a meter and the backend both rate with: bands, time-of-use calendar, blocks.

A tariff is pure data, validated on construction. How it is *evaluated* lives in
:mod:`firmware_protocol.rating`; how it travels lives in :mod:`firmware_protocol.messages`.

Model (DESIGN §3):

* ``bands``: up to :data:`MAX_BANDS` per-kWh prices in rating units (milli-minor per
  kWh, consumer price including VAT). The meter keeps one cumulative energy register
  per band (OBIS 1.8.1 … 1.8.n).
* ``weekday``/``weekend``/``holiday`` schedules: which band applies from which local
  minute of the day. Each schedule starts at minute 0. Saturday and Sunday are weekend
  days; ``holidays`` (local dates) use the holiday schedule.
* ``blocks`` (optional inclining blocks): per-kWh *adders* on top of the band price for
  energy above a threshold within a block period (the local calendar month). A pure
  block tariff has one band at price 0 and blocks starting at 0 Wh.
* ``standing_charge_milli_per_day``: taken once per local day at local midnight.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from dataclasses import dataclass
from typing import Any, Final

from firmware_protocol.errors import TariffError, UnitError
from firmware_protocol.units import Currency, check_int, currency

MAX_BANDS: Final = 8
MAX_SWITCHES_PER_DAY: Final = 12
MAX_HOLIDAYS: Final = 32
MAX_BLOCKS: Final = 4
MAX_BAND_NAME: Final = 8
MAX_TZ_NAME: Final = 64
MINUTES_PER_DAY: Final = 1440
U32_MAX: Final = 2**32 - 1


@dataclass(frozen=True, slots=True)
class Band:
    """One time-of-use band: a short name and its price in rating units per kWh."""

    name: str
    price_milli_per_kwh: int

    def __post_init__(self) -> None:
        if not self.name or len(self.name) > MAX_BAND_NAME or not self.name.isascii():
            raise TariffError(f"band name must be 1..{MAX_BAND_NAME} ASCII characters")
        if not self.name.isprintable():
            raise TariffError("band name must be printable")
        _check(self.price_milli_per_kwh, "band price", 0, U32_MAX)


@dataclass(frozen=True, slots=True)
class Switch:
    """From local minute ``minute`` of the day on, band index ``band`` applies."""

    minute: int
    band: int

    def __post_init__(self) -> None:
        _check(self.minute, "switch minute", 0, MINUTES_PER_DAY - 1)
        _check(self.band, "switch band", 0, MAX_BANDS - 1)


@dataclass(frozen=True, slots=True)
class Block:
    """Inclining block: energy above ``from_wh`` in the period costs ``adder`` more per kWh."""

    from_wh: int
    adder_milli_per_kwh: int

    def __post_init__(self) -> None:
        _check(self.from_wh, "block threshold", 0, U32_MAX)
        _check(self.adder_milli_per_kwh, "block adder", 0, U32_MAX)


@dataclass(frozen=True, slots=True)
class Tariff:
    """A complete tariff as agreed between backend and meter."""

    tariff_id: int
    currency: Currency
    timezone: str
    bands: tuple[Band, ...]
    weekday: tuple[Switch, ...]
    weekend: tuple[Switch, ...]
    holiday: tuple[Switch, ...]
    standing_charge_milli_per_day: int = 0
    holidays: tuple[dt.date, ...] = ()
    blocks: tuple[Block, ...] = ()

    def __post_init__(self) -> None:
        _check(self.tariff_id, "tariff_id", 1, U32_MAX)
        _check(self.standing_charge_milli_per_day, "standing charge", 0, U32_MAX)
        if (
            not self.timezone
            or len(self.timezone) > MAX_TZ_NAME
            or not self.timezone.isascii()
            or not self.timezone.isprintable()
        ):
            raise TariffError(f"time zone must be 1..{MAX_TZ_NAME} printable ASCII characters")
        try:
            zoneinfo.ZoneInfo(self.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
            raise TariffError(f"unknown time zone {self.timezone!r}") from exc
        if not 1 <= len(self.bands) <= MAX_BANDS:
            raise TariffError(f"a tariff has 1..{MAX_BANDS} bands, got {len(self.bands)}")
        for name, schedule in (
            ("weekday", self.weekday),
            ("weekend", self.weekend),
            ("holiday", self.holiday),
        ):
            _check_schedule(name, schedule, len(self.bands))
        if len(self.holidays) > MAX_HOLIDAYS:
            raise TariffError(f"at most {MAX_HOLIDAYS} holidays per tariff message")
        if list(self.holidays) != sorted(set(self.holidays)):
            raise TariffError("holidays must be strictly ascending dates")
        if any(d.year < 1970 or d.year > 2149 for d in self.holidays):
            raise TariffError("holidays must fall in 1970..2149")
        if len(self.blocks) > MAX_BLOCKS:
            raise TariffError(f"at most {MAX_BLOCKS} blocks")
        thresholds = [b.from_wh for b in self.blocks]
        if thresholds != sorted(set(thresholds)):
            raise TariffError("block thresholds must be strictly ascending")

    @property
    def zone(self) -> zoneinfo.ZoneInfo:
        """The tariff's time zone."""
        return zoneinfo.ZoneInfo(self.timezone)


def flat_tariff(
    *,
    tariff_id: int,
    currency: Currency,
    timezone: str,
    price_milli_per_kwh: int,
    standing_charge_milli_per_day: int = 0,
) -> Tariff:
    """A one-band tariff: the same price at all times."""
    all_day = (Switch(0, 0),)
    return Tariff(
        tariff_id=tariff_id,
        currency=currency,
        timezone=timezone,
        bands=(Band("all-day", price_milli_per_kwh),),
        weekday=all_day,
        weekend=all_day,
        holiday=all_day,
        standing_charge_milli_per_day=standing_charge_milli_per_day,
    )


def _check(value: object, name: str, lo: int, hi: int) -> None:
    try:
        check_int(value, name, minimum=lo, maximum=hi)
    except Exception as exc:
        raise TariffError(str(exc)) from exc


def _check_schedule(name: str, schedule: tuple[Switch, ...], n_bands: int) -> None:
    if not 1 <= len(schedule) <= MAX_SWITCHES_PER_DAY:
        raise TariffError(f"{name} schedule needs 1..{MAX_SWITCHES_PER_DAY} switch points")
    if schedule[0].minute != 0:
        raise TariffError(f"{name} schedule must start at minute 0")
    minutes = [s.minute for s in schedule]
    if minutes != sorted(set(minutes)):
        raise TariffError(f"{name} schedule minutes must be strictly ascending")
    for s in schedule:
        if s.band >= n_bands:
            raise TariffError(f"{name} schedule names band {s.band} but there are {n_bands}")


def tariff_to_dict(tariff: Tariff) -> dict[str, Any]:
    """A JSON-ready dict (used by configs, state files, the API and the vectors)."""

    def sched(s: tuple[Switch, ...]) -> list[list[int]]:
        return [[x.minute, x.band] for x in s]

    return {
        "tariff_id": tariff.tariff_id,
        "currency": tariff.currency.code,
        "timezone": tariff.timezone,
        "bands": [
            {"name": b.name, "price_milli_per_kwh": b.price_milli_per_kwh} for b in tariff.bands
        ],
        "weekday": sched(tariff.weekday),
        "weekend": sched(tariff.weekend),
        "holiday": sched(tariff.holiday),
        "standing_charge_milli_per_day": tariff.standing_charge_milli_per_day,
        "holidays": [d.isoformat() for d in tariff.holidays],
        "blocks": [[b.from_wh, b.adder_milli_per_kwh] for b in tariff.blocks],
    }


_TARIFF_KEYS: Final = frozenset(
    (
        "tariff_id",
        "currency",
        "timezone",
        "bands",
        "weekday",
        "weekend",
        "holiday",
        "standing_charge_milli_per_day",
        "holidays",
        "blocks",
    )
)


def tariff_from_dict(data: object) -> Tariff:
    """Inverse of :func:`tariff_to_dict`; anything malformed raises :class:`TariffError`."""
    if not isinstance(data, dict):
        raise TariffError("a tariff is a JSON object")
    unknown = set(data) - _TARIFF_KEYS
    if unknown:
        raise TariffError(f"unknown tariff fields: {', '.join(sorted(unknown))}")
    missing = {"tariff_id", "currency", "timezone", "bands", "weekday"} - set(data)
    if missing:
        raise TariffError(f"missing tariff fields: {', '.join(sorted(missing))}")
    try:
        weekday = _sched(data["weekday"])
        return Tariff(
            tariff_id=data["tariff_id"],
            currency=currency(data["currency"]),
            timezone=data["timezone"],
            bands=tuple(
                Band(_obj(b)["name"], _obj(b)["price_milli_per_kwh"]) for b in _list(data["bands"])
            ),
            weekday=weekday,
            weekend=_sched(data["weekend"]) if "weekend" in data else weekday,
            holiday=_sched(data["holiday"]) if "holiday" in data else weekday,
            standing_charge_milli_per_day=data.get("standing_charge_milli_per_day", 0),
            holidays=tuple(dt.date.fromisoformat(d) for d in _list(data.get("holidays", []))),
            blocks=tuple(Block(*_pair(b)) for b in _list(data.get("blocks", []))),
        )
    except TariffError:
        raise
    except (KeyError, TypeError, ValueError, UnitError) as exc:
        raise TariffError(f"malformed tariff: {exc}") from exc


def _list(value: object) -> list[Any]:
    if not isinstance(value, list):
        raise TariffError(f"expected a JSON array, got {type(value).__name__}")
    return value


def _obj(value: object) -> dict[str, Any]:
    if not isinstance(value, dict) or set(value) != {"name", "price_milli_per_kwh"}:
        raise TariffError("a band is an object with exactly name and price_milli_per_kwh")
    return value


def _pair(value: object) -> tuple[Any, Any]:
    if not isinstance(value, list) or len(value) != 2:
        raise TariffError("expected a [int, int] pair")
    return value[0], value[1]


def _sched(value: object) -> tuple[Switch, ...]:
    return tuple(Switch(*_pair(s)) for s in _list(value))
