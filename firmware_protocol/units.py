"""Integer money and energy units, currencies, and the one rounding rule we use.

Money on the ledger is in a currency's *minor unit* (cents). Rating works in a
finer *rating unit*: 1/1000 of a minor unit (``milli``), so a price of 0.3127 EUR/kWh
is exactly 31_270 milli per kWh and one Wh costs 31.27 milli, not zero cents.
Energy is integer watt-hours. Nothing here is a float.

Rounding rule (the only one): conversions from rating units to minor units
**floor** (round toward minus infinity) and hand back the remainder, which the caller
carries forward; nothing is ever rounded away. ``floor`` is used rather than
half-even because carried remainders make the choice invisible over time and floor
is what firmware written in C gets from unsigned division.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from firmware_protocol.errors import UnitError

#: rating units per minor unit
MILLI_PER_MINOR: Final = 1000
#: Wh per kWh
WH_PER_KWH: Final = 1000


@dataclass(frozen=True, slots=True)
class Currency:
    """An ISO 4217 currency: alphabetic code, numeric code, minor-unit exponent."""

    code: str
    numeric: int
    exponent: int

    def __post_init__(self) -> None:
        if len(self.code) != 3 or not self.code.isascii() or not self.code.isupper():
            raise UnitError(f"currency code must be three upper-case letters, got {self.code!r}")
        if not 0 < self.numeric < 1000:
            raise UnitError(f"ISO 4217 numeric code must be 1..999, got {self.numeric}")
        if not 0 <= self.exponent <= 4:
            raise UnitError(f"minor-unit exponent must be 0..4, got {self.exponent}")


#: The currencies voltcredit ships with. Add by ISO 4217; the numeric code is the wire value.
CURRENCIES: Final[dict[str, Currency]] = {
    c.code: c
    for c in (
        Currency("EUR", 978, 2),
        Currency("USD", 840, 2),
        Currency("GBP", 826, 2),
        Currency("CHF", 756, 2),
        Currency("KES", 404, 2),
        Currency("NGN", 566, 2),
        Currency("TZS", 834, 2),
        Currency("UGX", 800, 0),
        Currency("ZAR", 710, 2),
        Currency("INR", 356, 2),
        Currency("XOF", 952, 0),
    )
}
_BY_NUMERIC: Final[dict[int, Currency]] = {c.numeric: c for c in CURRENCIES.values()}


def currency(code: str) -> Currency:
    """Look up a currency by alphabetic code; unknown codes raise :class:`UnitError`."""
    try:
        return CURRENCIES[code]
    except KeyError:
        raise UnitError(f"unknown currency {code!r}") from None


def currency_by_numeric(numeric: int) -> Currency:
    """Look up a currency by ISO 4217 numeric code (the wire value)."""
    try:
        return _BY_NUMERIC[numeric]
    except KeyError:
        raise UnitError(f"unknown ISO 4217 numeric currency code {numeric}") from None


def check_int(value: object, name: str, *, minimum: int, maximum: int) -> int:
    """Return ``value`` if it is a plain ``int`` (not bool) in ``[minimum, maximum]``."""
    if type(value) is not int:
        raise UnitError(f"{name} must be an integer, got {type(value).__name__}")
    if not minimum <= value <= maximum:
        raise UnitError(f"{name} must be in {minimum}..{maximum}, got {value}")
    return value


def milli_to_minor(amount_milli: int) -> tuple[int, int]:
    """Split rating units into whole minor units (floored) and the remainder ``0..999``."""
    check_int(amount_milli, "amount_milli", minimum=-(2**63), maximum=2**63 - 1)
    return divmod(amount_milli, MILLI_PER_MINOR)


def minor_to_milli(amount_minor: int) -> int:
    """Minor units to rating units (exact)."""
    check_int(amount_minor, "amount_minor", minimum=-(2**53), maximum=2**53)
    return amount_minor * MILLI_PER_MINOR


def energy_charge_milli(energy_wh: int, price_milli_per_kwh: int) -> int:
    """Charge of ``energy_wh`` at a per-kWh price, in rating units, floored.

    ``floor(energy_wh * price / 1000)``; callers rate *cumulative* energy and take
    differences so the floors telescope and nothing is lost (DESIGN §3).
    """
    check_int(energy_wh, "energy_wh", minimum=0, maximum=2**48)
    check_int(price_milli_per_kwh, "price_milli_per_kwh", minimum=0, maximum=2**32 - 1)
    return energy_wh * price_milli_per_kwh // WH_PER_KWH


def format_minor(amount_minor: int, cur: Currency) -> str:
    """Human text for an amount, e.g. ``12.05 EUR`` (for receipts and CLIs, never parsed)."""
    sign = "-" if amount_minor < 0 else ""
    whole, frac = divmod(abs(amount_minor), 10**cur.exponent)
    if cur.exponent == 0:
        return f"{sign}{whole} {cur.code}"
    return f"{sign}{whole}.{frac:0{cur.exponent}d} {cur.code}"
