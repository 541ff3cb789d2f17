"""Units, currencies and tariff validation."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware_protocol import errors, units
from firmware_protocol.tariff import Band, Block, Switch, Tariff, flat_tariff

EUR = units.currency("EUR")


@given(st.integers(-(2**62), 2**62))
def test_milli_split_is_exact(amount: int) -> None:
    minor, rest = units.milli_to_minor(amount)
    assert 0 <= rest < 1000
    assert units.minor_to_milli(minor) + rest == amount


@given(st.integers(0, 10**9), st.integers(0, 10**9), st.integers(0, 2**32 - 1))
def test_cumulative_energy_charge_telescopes(a: int, b: int, price: int) -> None:
    lo, hi = sorted((a, b))
    part1 = units.energy_charge_milli(lo, price)
    part2 = units.energy_charge_milli(hi, price) - part1
    assert part1 + part2 == hi * price // 1000
    assert part2 >= 0


def test_currencies_and_formatting() -> None:
    assert units.currency_by_numeric(404).code == "KES"
    assert units.format_minor(-1205, EUR) == "-12.05 EUR"
    assert units.format_minor(7, units.currency("UGX")) == "7 UGX"
    for bad in ("XXX",):
        with pytest.raises(errors.UnitError):
            units.currency(bad)
    with pytest.raises(errors.UnitError):
        units.currency_by_numeric(1)
    for args in (("eur", 978, 2), ("EUR", 0, 2), ("EUR", 978, 5)):
        with pytest.raises(errors.UnitError):
            units.Currency(*args)


@pytest.mark.parametrize("bad", [1.5, True, "3", None])
def test_check_int_rejects_non_ints(bad: object) -> None:
    with pytest.raises(errors.UnitError, match="integer"):
        units.check_int(bad, "x", minimum=0, maximum=10)
    with pytest.raises(errors.UnitError, match=r"0\.\.10"):
        units.check_int(11, "x", minimum=0, maximum=10)


def tariff(**kw: object) -> Tariff:
    fields: dict[str, object] = {
        "tariff_id": 1,
        "currency": EUR,
        "timezone": "Europe/Berlin",
        "bands": (Band("a", 1), Band("b", 2)),
        "weekday": (Switch(0, 0), Switch(60, 1)),
        "weekend": (Switch(0, 1),),
        "holiday": (Switch(0, 0),),
    }
    fields.update(kw)
    return Tariff(**fields)  # type: ignore[arg-type]


def test_valid_tariffs() -> None:
    t = tariff(holidays=(dt.date(2026, 1, 1),), blocks=(Block(0, 0), Block(10, 1)))
    assert t.zone.key == "Europe/Berlin"
    assert (
        flat_tariff(tariff_id=2, currency=EUR, timezone="UTC", price_milli_per_kwh=5)
        .bands[0]
        .price_milli_per_kwh
        == 5
    )


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"tariff_id": 0}, "tariff_id"),
        ({"timezone": "Mars/Olympus"}, "unknown time zone"),
        ({"timezone": ""}, "time zone"),
        ({"timezone": "Europe/../etc"}, "unknown time zone"),
        ({"bands": ()}, "1..8 bands"),
        ({"weekday": ()}, "weekday schedule needs"),
        ({"weekday": (Switch(5, 0),)}, "start at minute 0"),
        ({"weekend": (Switch(0, 0), Switch(0, 1))}, "strictly ascending"),
        ({"holiday": (Switch(0, 3),)}, "names band 3"),
        ({"holidays": (dt.date(2026, 1, 2), dt.date(2026, 1, 1))}, "holidays"),
        ({"holidays": (dt.date(1969, 1, 2),)}, "1970"),
        (
            {"holidays": tuple(dt.date(2026, 1, 1) + dt.timedelta(days=i) for i in range(33))},
            "at most 32",
        ),
        ({"blocks": (Block(5, 1), Block(5, 2))}, "block thresholds"),
        ({"blocks": tuple(Block(i, 1) for i in range(5))}, "at most 4"),
        ({"standing_charge_milli_per_day": -1}, "standing charge"),
    ],
)
def test_invalid_tariffs(kw: dict[str, object], match: str) -> None:
    with pytest.raises(errors.TariffError, match=match):
        tariff(**kw)


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: Band("", 1), "band name"),
        (lambda: Band("waytoolong", 1), "band name"),
        (lambda: Band("a\n", 1), "printable"),
        (lambda: Band("a", -1), "band price"),
        (lambda: Switch(1440, 0), "switch minute"),
        (lambda: Switch(0, 8), "switch band"),
        (lambda: Block(-1, 0), "block threshold"),
        (lambda: Block(0, 2**32), "block adder"),
    ],
)
def test_invalid_parts(factory: object, match: str) -> None:
    with pytest.raises(errors.TariffError, match=match):
        factory()  # type: ignore[operator]
