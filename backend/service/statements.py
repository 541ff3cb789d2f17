"""Monthly statement of a supply account: balances, top-ups, consumption by band, taxes, and proof.

A statement is of money, so it follows the ledger: the month is ``[start, end)`` of the
tenant's local calendar (:func:`backend.service.history.day_start`), and everything in it
is what was *posted or billed* in that window (transfers by ``created_at``; billed
intervals by their ``created_at``, written in the same unit of work as their transfers).
A reading taken before midnight on the last day and billed after it (a gateway flushing
its outbox after an outage) is on the next month's statement, with its reading time in
its transfer's reference. The consumption history, by contrast, places energy by reading
time; both are exact, they answer different questions.

Every line is traceable:

- **Opening/closing balance**: the PREPAID account's balance from the transfers created
  before ``start`` / ``end``; ``opening + top-ups + other credits - consumption - other
  debits = closing`` is checked on every statement (``checks.balance``).
- **Top-ups**: each TOPUP transfer crediting the account, with its payment id (from the
  reference ``payment:{id}``) and transfer id.
- **Consumption** by tariff band (Wh, exact milli, minor units), block adders and
  standing charges (days, amount), summed from ``consumption_intervals`` in SQL. The minor
  units of these lines are the month's debited minor units (``consumption_minor``, the
  sum of the intervals' ``payer_minor``) apportioned by largest remainder (Hamilton), so
  the lines add up to what was taken, each within one minor unit of exact.
- **Consumption transfers**: every transfer debiting the account with reference
  ``consumption:{meter}:{ts}``; ``checks.posted`` says they equal ``consumption_minor`` and
  ``unposted_readings``/``unmatched_transfers`` name any reading or transfer without its
  counterpart (a charge still pending at the debt limit shows up there).
- **Milli to minor**: ``consumption_milli + carry_start_milli = consumption_minor * 1000 +
  carry_end_milli`` (``checks.milli``), where the carries are the payer's remainder after
  the last interval billed before ``start`` / ``end`` (INGEST.md §8).
- **Taxes**: the shares (``consumption_intervals.shares``) of rules paying a partner of
  kind ``TAX_AUTHORITY`` — a breakdown *of* the consumption charge, not an addition;
  their minor units are rounded half up for display (the authority's own postings are
  SPLIT transfers of the utility, not of the customer).
"""

from __future__ import annotations

import csv
import io
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Final
from zoneinfo import ZoneInfo

from backend.adapters.db.engine import Database
from backend.adapters.db.history_repo import (
    HistoryRepository,
    IntervalSums,
    PostedTransfer,
    TariffInfo,
)
from backend.domain.auth import Action
from backend.domain.ledger import TransferCode
from backend.domain.topups import TAX_PARTNER_KIND
from backend.errors import StorageError
from backend.service.context import Call, require
from backend.service.errors import NotFoundError
from backend.service.history import MAX_DATE, MIN_DATE, band_names, day_start, round_minor

_MONTH: Final = re.compile(r"(\d{4})-(0[1-9]|1[0-2])")
CONSUMPTION_REF: Final = "consumption:"
PAYMENT_REF: Final = "payment:"
#: Most readings or transfers named in the mismatch lists of one statement.
MAX_MISMATCHES: Final = 100


def parse_month(raw: str) -> date | None:
    """The first day of month ``YYYY-MM``, or ``None`` if ``raw`` names no month we serve."""
    match = _MONTH.fullmatch(raw)
    if match is None:
        return None
    first = date(int(match[1]), int(match[2]), 1)
    return first if MIN_DATE <= first <= MAX_DATE else None


def next_month(first: date) -> date:
    """The first day of the month after the one beginning ``first``."""
    return date(first.year + (first.month == 12), first.month % 12 + 1, 1)


def apportion(total: int, weights: Sequence[int]) -> list[int]:
    """``total`` split in proportion to ``weights`` by largest remainder (ties: earlier).

    Each part is within one of its exact share and the parts sum to ``total`` (all zero
    when the weights are).
    """
    if total < 0 or any(w < 0 for w in weights):
        raise ValueError("apportion needs a non-negative total and weights")
    whole = sum(weights)
    if whole == 0:
        return [0] * len(weights)
    parts = [total * w // whole for w in weights]
    left = total - sum(parts)
    order = sorted(range(len(weights)), key=lambda i: (-(total * weights[i] % whole), i))
    for i in order[:left]:
        parts[i] += 1
    return parts


def reading_reference(meter_id: int, ts: int) -> str:
    """The ledger reference of a billed reading (INGEST: ``consumption:{meter}:{ts}``)."""
    return f"{CONSUMPTION_REF}{meter_id}:{ts}"


# ------------------------------------------------------------------------------ views


@dataclass(frozen=True, slots=True, kw_only=True)
class TopupLine:
    """A top-up credited in the month."""

    payment_id: uuid.UUID | None
    transfer_id: uuid.UUID
    amount_minor: int
    posted_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class BandLine:
    """Energy of one band of one tariff version, and its charge."""

    tariff_id: int
    tariff_code: str
    tariff_version: int | None
    band: str
    energy_wh: int
    amount_milli: int
    #: Share of the month's debited minor units (largest remainder).
    amount_minor: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ChargeLine:
    """Block adders or standing charges of one tariff version."""

    tariff_id: int
    tariff_code: str
    tariff_version: int | None
    #: Local days begun (standing charges; 0 for block adders).
    days: int
    amount_milli: int
    amount_minor: int


@dataclass(frozen=True, slots=True, kw_only=True)
class TaxLine:
    """The share of the consumption charge collected for one tax authority."""

    partner: str
    amount_milli: int
    #: Rounded half up (display).
    amount_minor: int


@dataclass(frozen=True, slots=True, kw_only=True)
class TransferLine:
    """A ledger transfer on the prepaid account; ``amount_minor`` > 0 credits it."""

    transfer_id: uuid.UUID
    code: TransferCode
    reference: str
    amount_minor: int
    posted_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class StatementChecks:
    """The statement's own arithmetic, checked (all true on a consistent ledger)."""

    #: opening + top-ups + other credits - consumption - other debits = closing
    balance: bool
    #: consumption_milli + carry_start_milli = consumption_minor * 1000 + carry_end_milli
    milli: bool
    #: consumption_minor = consumption_posted_minor, every reading matched to its transfer
    posted: bool
    #: Readings charged in the month without a matching consumption transfer (first 100).
    unposted_readings: list[str]
    #: Consumption transfers of the month without a matching billed reading (first 100).
    unmatched_transfers: list[str]


@dataclass(frozen=True, slots=True, kw_only=True)
class Statement:
    """A supply account's monthly statement (module docstring)."""

    supply_account_id: int
    label: str
    currency: str
    timezone: str
    #: ``YYYY-MM``
    month: str
    start: datetime
    end: datetime
    #: Whether the month is over (else the statement runs to now).
    complete: bool
    opening_balance_minor: int
    topups: list[TopupLine]
    topups_minor: int
    readings: int
    energy_wh: int
    bands: list[BandLine]
    block_adders: list[ChargeLine]
    standing_charges: list[ChargeLine]
    standing_days: int
    #: Exact charge of the month's billed intervals (energy, blocks, standing).
    consumption_milli: int
    #: Minor units taken from the prepaid account for them.
    consumption_minor: int
    #: Energy whose block adder could not be rated (INGEST.md §6; not charged).
    unrated_block_wh: int
    taxes: list[TaxLine]
    taxes_milli: int
    consumption_transfers: list[TransferLine]
    consumption_posted_minor: int
    #: Other transfers on the account (refunds, adjustments, …), signed.
    other_transfers: list[TransferLine]
    closing_balance_minor: int
    carry_start_milli: int
    carry_end_milli: int
    checks: StatementChecks


# ------------------------------------------------------------------------------ assembly


@dataclass(frozen=True, slots=True, kw_only=True)
class StatementInputs:
    """Everything a statement is computed from (read in one transaction)."""

    supply_account_id: int
    label: str
    currency: str
    timezone: str
    month: date
    start: datetime
    end: datetime
    now: datetime
    prepaid_account_id: int
    opening_minor: int
    closing_minor: int
    transfers: list[PostedTransfer]
    sums: list[IntervalSums]
    tariffs: dict[int, TariffInfo]
    #: reference → minor units charged for that reading in the month
    charged: dict[str, int]
    #: partner name → milli
    taxes: dict[str, int]
    carry_start_milli: int
    carry_end_milli: int


def _payment_id(reference: str) -> uuid.UUID | None:
    if not reference.startswith(PAYMENT_REF):
        return None
    try:
        return uuid.UUID(reference.removeprefix(PAYMENT_REF))
    except ValueError:
        return None


def _code(raw: str) -> TransferCode:
    try:
        return TransferCode(raw)
    except ValueError as exc:
        raise StorageError(f"ledger transfer with unknown code {raw!r}") from exc


def assemble(x: StatementInputs) -> Statement:
    """The statement of ``x`` (pure)."""
    topups: list[TopupLine] = []
    consumption: list[TransferLine] = []
    other: list[TransferLine] = []
    for t in x.transfers:
        credit = t.credit_account_id == x.prepaid_account_id
        code = _code(t.code)
        line = TransferLine(
            transfer_id=t.id,
            code=code,
            reference=t.reference,
            amount_minor=t.amount if credit else -t.amount,
            posted_at=t.created_at,
        )
        if credit and code is TransferCode.TOPUP:
            topups.append(
                TopupLine(
                    payment_id=_payment_id(t.reference),
                    transfer_id=t.id,
                    amount_minor=t.amount,
                    posted_at=t.created_at,
                )
            )
        elif (
            not credit
            and code is TransferCode.CONSUMPTION
            and t.reference.startswith(CONSUMPTION_REF)
        ):
            consumption.append(line)
        else:
            other.append(line)

    def info(tariff_id: int) -> tuple[str, int | None]:
        known = x.tariffs.get(tariff_id)
        return ("", None) if known is None else (known.code, known.version)

    # Lines in a fixed order: bands of each tariff, then block adders, then standing.
    band_rows: list[tuple[int, str, int, int]] = []
    block_rows: list[tuple[int, int]] = []
    standing_rows: list[tuple[int, int, int]] = []
    for s in sorted(x.sums, key=lambda s: s.tariff_id):
        count = max(len(s.band_wh), len(s.band_milli))
        for b, name in enumerate(band_names(s.tariff_id, count, x.tariffs)):
            wh = s.band_wh[b] if b < len(s.band_wh) else 0
            milli = s.band_milli[b] if b < len(s.band_milli) else 0
            band_rows.append((s.tariff_id, name, wh, milli))
        if s.block_milli:
            block_rows.append((s.tariff_id, s.block_milli))
        if s.days or s.standing_milli:
            standing_rows.append((s.tariff_id, s.days, s.standing_milli))
    consumption_minor = sum(s.payer_minor for s in x.sums)
    weights = [r[3] for r in band_rows] + [r[1] for r in block_rows] + [r[2] for r in standing_rows]
    minors = apportion(consumption_minor, weights)
    bands = []
    for (tariff_id, name, wh, milli), minor in zip(band_rows, minors, strict=False):
        tariff_code, version = info(tariff_id)
        bands.append(
            BandLine(
                tariff_id=tariff_id,
                tariff_code=tariff_code,
                tariff_version=version,
                band=name,
                energy_wh=wh,
                amount_milli=milli,
                amount_minor=minor,
            )
        )
    rest = minors[len(band_rows) :]
    blocks = []
    for (tariff_id, milli), minor in zip(block_rows, rest, strict=False):
        tariff_code, version = info(tariff_id)
        blocks.append(
            ChargeLine(
                tariff_id=tariff_id,
                tariff_code=tariff_code,
                tariff_version=version,
                days=0,
                amount_milli=milli,
                amount_minor=minor,
            )
        )
    rest = rest[len(block_rows) :]
    standing = []
    for (tariff_id, days, milli), minor in zip(standing_rows, rest, strict=True):
        tariff_code, version = info(tariff_id)
        standing.append(
            ChargeLine(
                tariff_id=tariff_id,
                tariff_code=tariff_code,
                tariff_version=version,
                days=days,
                amount_milli=milli,
                amount_minor=minor,
            )
        )

    consumption_milli = sum(s.total_milli for s in x.sums)
    topups_minor = sum(u.amount_minor for u in topups)
    posted_minor = sum(-c.amount_minor for c in consumption)
    other_minor = sum(o.amount_minor for o in other)
    posted: dict[str, int] = {}
    for c in consumption:
        posted[c.reference] = posted.get(c.reference, 0) - c.amount_minor
    unposted = sorted(r for r, minor in x.charged.items() if minor and posted.get(r) != minor)
    unmatched = sorted(r for r, minor in posted.items() if x.charged.get(r) != minor)
    checks = StatementChecks(
        balance=x.opening_minor + topups_minor + other_minor - posted_minor == x.closing_minor,
        milli=consumption_milli + x.carry_start_milli
        == consumption_minor * 1000 + x.carry_end_milli,
        posted=consumption_minor == posted_minor and not unposted and not unmatched,
        unposted_readings=unposted[:MAX_MISMATCHES],
        unmatched_transfers=unmatched[:MAX_MISMATCHES],
    )
    taxes = [
        TaxLine(partner=name, amount_milli=milli, amount_minor=round_minor(milli))
        for name, milli in sorted(x.taxes.items())
    ]
    return Statement(
        supply_account_id=x.supply_account_id,
        label=x.label,
        currency=x.currency,
        timezone=x.timezone,
        month=f"{x.month.year:04d}-{x.month.month:02d}",
        start=x.start,
        end=x.end,
        complete=x.end <= x.now,
        opening_balance_minor=x.opening_minor,
        topups=topups,
        topups_minor=topups_minor,
        readings=sum(s.readings for s in x.sums),
        energy_wh=sum(s.import_wh for s in x.sums),
        bands=bands,
        block_adders=blocks,
        standing_charges=standing,
        standing_days=sum(s.days for s in x.sums),
        consumption_milli=consumption_milli,
        consumption_minor=consumption_minor,
        unrated_block_wh=sum(s.unrated_block_wh for s in x.sums),
        taxes=taxes,
        taxes_milli=sum(x.taxes.values()),
        consumption_transfers=consumption,
        consumption_posted_minor=posted_minor,
        other_transfers=other,
        closing_balance_minor=x.closing_minor,
        carry_start_milli=x.carry_start_milli,
        carry_end_milli=x.carry_end_milli,
        checks=checks,
    )


# ------------------------------------------------------------------------------ CSV

CSV_HEADER: Final = (
    "section",
    "item",
    "quantity",
    "unit",
    "amount_milli",
    "amount_minor",
    "reference",
    "posted_at",
)


def _cell(value: object) -> str:
    text = "" if value is None else str(value)
    # Spreadsheet formula injection (OWASP "CSV Injection"): a text cell starting with
    # = + - @ (or a tab/CR) is shown as text. Numbers are written as numbers.
    if isinstance(value, str) and text[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + text
    return text


def statement_csv(s: Statement) -> str:
    """The statement as CSV (RFC 4180, CRLF line ends), one line per statement line."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\r\n")
    w.writerow(CSV_HEADER)

    def row(*values: object) -> None:
        w.writerow([_cell(v) for v in values])

    def at(t: datetime) -> str:
        return t.astimezone(UTC).isoformat().replace("+00:00", "Z")

    row("statement", f"supply account {s.supply_account_id}", "", s.currency, "", "", "", "")
    row("statement", f"month {s.month} ({s.timezone})", "", "", "", "", "", "")
    row("balance", "opening", "", s.currency, "", s.opening_balance_minor, "", at(s.start))
    for u in s.topups:
        ref = "" if u.payment_id is None else f"payment:{u.payment_id}"
        row("topup", str(u.transfer_id), "", s.currency, "", u.amount_minor, ref, at(u.posted_at))
    for b in s.bands:
        item = f"{b.tariff_code or b.tariff_id} band {b.band}"
        row("energy", item, b.energy_wh, "Wh", b.amount_milli, b.amount_minor, "", "")
    for c in s.block_adders:
        item = f"{c.tariff_code or c.tariff_id} block adders"
        row("block", item, "", "", c.amount_milli, c.amount_minor, "", "")
    for c in s.standing_charges:
        item = f"{c.tariff_code or c.tariff_id} standing charge"
        row("standing", item, c.days, "days", c.amount_milli, c.amount_minor, "", "")
    row("consumption", "total", s.energy_wh, "Wh", s.consumption_milli, s.consumption_minor, "", "")
    for x in s.taxes:
        row("tax", f"of which {x.partner}", "", "", x.amount_milli, x.amount_minor, "", "")
    for t in s.consumption_transfers:
        row(
            "transfer",
            str(t.transfer_id),
            "",
            t.code.value,
            "",
            t.amount_minor,
            t.reference,
            at(t.posted_at),
        )
    for t in s.other_transfers:
        row(
            "other",
            str(t.transfer_id),
            "",
            t.code.value,
            "",
            t.amount_minor,
            t.reference,
            at(t.posted_at),
        )
    row("carry", "payer carry at start", "", "milli", s.carry_start_milli, "", "", at(s.start))
    row("carry", "payer carry at end", "", "milli", s.carry_end_milli, "", "", at(s.end))
    row("balance", "closing", "", s.currency, "", s.closing_balance_minor, "", at(s.end))
    return out.getvalue()


# ------------------------------------------------------------------------------ use case


class StatementService:
    """Builds monthly statements."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def statement(self, call: Call, supply_account_id: int, month: date) -> Statement:
        """The statement of the local month beginning ``month`` (its first day)."""
        require(call, Action.SUPPLY_ACCOUNT_READ)
        require(call, Action.TOPUP_READ)
        async with self._db.read() as session:
            repo = HistoryRepository(session)
            found = await repo.account(call.scope, supply_account_id)
            if found is None:
                raise NotFoundError(f"no supply account {supply_account_id}")
            account, tenant = found
            zone = ZoneInfo(tenant.timezone)
            start = datetime.fromtimestamp(day_start(month, zone), UTC)
            end = datetime.fromtimestamp(day_start(next_month(month), zone), UTC)
            if start > call.now:
                raise NotFoundError(f"no statement for {month:%Y-%m} yet")
            prepaid = account.ledger_account_id
            transfers = await repo.transfers(prepaid, start, end)
            opening = await repo.balance_at(prepaid, start)
            closing = await repo.balance_at(prepaid, end)
            sums = await repo.billed_sums(account.id, start, end)
            tariffs = await repo.tariffs(tenant.id, {s.tariff_id for s in sums})
            tax_accounts = await repo.tax_accounts(tenant.id, TAX_PARTNER_KIND)
            charged: dict[str, int] = {}
            taxes: dict[str, int] = {}
            async for row in repo.billed_shares(account.id, start, end):
                ref = reading_reference(row.meter_id, row.to_ts)
                charged[ref] = charged.get(ref, 0) + row.payer_minor
                for share in row.shares:
                    if not (isinstance(share, list) and len(share) == 3):
                        raise StorageError(f"malformed share {share!r} of reading {ref}")
                    name = tax_accounts.get(int(share[1]))
                    if name is not None:
                        taxes[name] = taxes.get(name, 0) + int(share[2])
            carry_start = await repo.payer_carry(account.id, start)
            carry_end = await repo.payer_carry(account.id, end)
        return assemble(
            StatementInputs(
                supply_account_id=account.id,
                label=account.label,
                currency=tenant.currency,
                timezone=tenant.timezone,
                month=month,
                start=start,
                end=end,
                now=call.now,
                prepaid_account_id=prepaid,
                opening_minor=opening,
                closing_minor=closing,
                transfers=transfers,
                sums=sums,
                tariffs=tariffs,
                charged=charged,
                taxes=taxes,
                carry_start_milli=carry_start,
                carry_end_milli=carry_end,
            )
        )
