"""Partner settlement use cases: a partner's balance and its statement of a period (JSON, CSV).

A **statement** covers the local days ``[from, to)`` of the tenant's time zone (a
transfer at 23:30 UTC on 31 January belongs to 1 February in Europe/Berlin). It has two
halves that answer different questions:

* **Money** — the ledger, authoritative: the partner account's balance at the start of
  the period (opening) and at its end (closing), from the transfers' ``created_at``, and
  between them one line per transfer code, direction (IN: credited, OUT: debited) and
  source (``TOPUP``: a top-up's settlement, reference ``payment:…``; ``CONSUMPTION``:
  rated consumption, ``consumption:…``; ``OTHER``). Opening + Σ lines = closing, exactly:
  opening and lines come from one query, so from one snapshot of the ledger.
* **Energy** — the evidence behind the consumption money: for every billed interval that
  *ends* in the period (an interval ``(from_ts, to_ts]`` ending at midnight belongs to the
  day before), each of the partner's rules' shares in milli (1/1000 minor unit) and the
  energy (Wh) of the intervals it shared in. Rules replaced since keep their figures;
  their kind and value are then unknown (``null``).
* **Unposted** — milli are posted as whole minor units with the rest carried per meter
  (INGEST.md §8): ``accrued_milli`` (Σ shares of the period) less ``posted_milli`` (the
  period's consumption postings, times 1000) is ``difference_milli``; ``carry_milli`` and
  ``pending_minor`` are what the tenant's meters hold for the partner now (a fee
  partner's carry; money owed while a prepaid account sat at its debt limit).

Who may: ``partner.read`` (UTILITY_ADMIN, SUPPORT). A partner of another tenant answers
404 exactly like a missing one.
"""

from __future__ import annotations

import csv
import enum
import io
import zoneinfo
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from typing import Annotated, Final

from backend.adapters.db.engine import Database
from backend.adapters.db.settlement_repo import (
    IngestCarry,
    IntervalShares,
    LedgerGroup,
    SettlementRepository,
)
from backend.adapters.db.split_rule_repo import SplitRuleRepository
from backend.domain.auth import Action
from backend.domain.fields import Doc
from backend.domain.ledger import TransferCode
from backend.domain.split import MILLI_PER_MINOR, MinorCarry, RuleKind, SplitError
from backend.errors import StorageError
from backend.service.context import Call, require
from backend.service.refusals import InvalidInputError, NotFoundError

#: Longest statement period, in days (a year, leap or not).
MAX_PERIOD_DAYS: Final = 366
#: Columns of the CSV statement, in order.
CSV_COLUMNS: Final = (
    "record",
    "partner_id",
    "currency",
    "period_from",
    "period_to",
    "code",
    "direction",
    "source",
    "transfers",
    "rule_id",
    "tariff_code",
    "kind",
    "value",
    "intervals",
    "energy_wh",
    "amount_minor",
    "amount_milli",
)


class Direction(enum.StrEnum):
    """Which side of a transfer the partner's account was on."""

    IN = "IN"  #: credited
    OUT = "OUT"  #: debited


class LineSource(enum.StrEnum):
    """What a transfer settled, by its reference."""

    TOPUP = "TOPUP"  #: a top-up's settlement (``payment:…``)
    CONSUMPTION = "CONSUMPTION"  #: rated consumption (``consumption:…``)
    OTHER = "OTHER"


# ============================================================================ views


@dataclass(frozen=True, slots=True, kw_only=True)
class PartnerBalanceView:
    """A partner's ledger account now (minor units)."""

    partner_id: int
    partner_name: str
    ledger_account_id: int
    currency: str
    credits_posted_minor: int
    debits_posted_minor: int
    balance_minor: Annotated[int, Doc("credits - debits: what the partner is owed")]
    as_of: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class StatementLine:
    """The transfers of the period with one code, direction and source."""

    code: TransferCode
    direction: Direction
    source: LineSource
    transfers: int
    amount_minor: Annotated[int, Doc("signed: credits +, debits -")]


@dataclass(frozen=True, slots=True, kw_only=True)
class RuleShareLine:
    """One of the partner's CONSUMPTION rules in the period's billed intervals."""

    rule_id: int
    tariff_code: Annotated[str | None, Doc("null when the rule was replaced since")]
    kind: RuleKind | None
    value: int | None
    intervals: int
    energy_wh: Annotated[int, Doc("energy of the intervals the rule shared in")]
    amount_milli: Annotated[int, Doc("the rule's shares, 1/1000 minor unit")]


@dataclass(frozen=True, slots=True, kw_only=True)
class UnpostedView:
    """Consumption money of the partner not (yet) in whole minor units on the ledger."""

    accrued_milli: Annotated[int, Doc("Σ the partner's shares of the period's intervals")]
    posted_milli: Annotated[int, Doc("the period's consumption postings x 1000")]
    difference_milli: Annotated[int, Doc("accrued - posted")]
    carry_milli: Annotated[int, Doc("now: milli the meters carry for this (fee) partner")]
    pending_minor: Annotated[int, Doc("now: owed while a prepaid account was at its limit")]


@dataclass(frozen=True, slots=True, kw_only=True)
class StatementView:
    """A partner's settlement statement of the local days [period_from, period_to)."""

    partner_id: int
    partner_name: str
    partner_kind: str
    ledger_account_id: int
    currency: str
    timezone: Annotated[str, Doc("the tenant's: the days are its local days")]
    period_from: Annotated[str, Doc("first day, YYYY-MM-DD")]
    period_to: Annotated[str, Doc("day after the last, YYYY-MM-DD (exclusive)")]
    start_at: Annotated[datetime, Doc("period_from 00:00 local, in UTC")]
    end_at: Annotated[datetime, Doc("period_to 00:00 local, in UTC")]
    opening_balance_minor: int
    lines: list[StatementLine]
    total_minor: Annotated[int, Doc("Σ lines = closing - opening")]
    closing_balance_minor: int
    intervals: Annotated[int, Doc("billed intervals ending in the period with a share")]
    energy_wh: Annotated[int, Doc("their energy (each interval once)")]
    consumption_milli: Annotated[int, Doc("Σ the partner's shares of them")]
    rules: list[RuleShareLine]
    unposted: UnpostedView


# ============================================================================ pure core


def statement_period(first: date, end: date, timezone: str) -> tuple[datetime, datetime]:
    """``[first 00:00, end 00:00)`` local in ``timezone``, as aware UTC datetimes.

    Refuses (422) an empty or reversed period and one longer than :data:`MAX_PERIOD_DAYS`.
    A local midnight that falls in a DST gap resolves to the transition instant (zoneinfo's
    ``fold=0``), so consecutive days always tile without gap or overlap.
    """
    if end <= first:
        raise InvalidInputError.one("to", "must be after from (to is exclusive)")
    if (end - first).days > MAX_PERIOD_DAYS:
        raise InvalidInputError.one("to", f"a statement covers at most {MAX_PERIOD_DAYS} days")
    zone = zoneinfo.ZoneInfo(timezone)
    # In UTC: arithmetic on datetimes of one zoneinfo zone is wall-clock arithmetic.
    return (
        datetime.combine(first, time(), zone).astimezone(UTC),
        datetime.combine(end, time(), zone).astimezone(UTC),
    )


def ledger_lines(groups: Iterable[LedgerGroup]) -> tuple[int, list[StatementLine]]:
    """The opening balance and the period's lines (by code, source, IN before OUT)."""
    opening = 0
    lines: list[StatementLine] = []
    for g in groups:
        if g.before:
            opening += g.amount_minor
            continue
        lines.append(
            StatementLine(
                code=TransferCode(g.code),
                direction=Direction.IN if g.incoming else Direction.OUT,
                source=LineSource(g.source),
                transfers=g.transfers,
                amount_minor=g.amount_minor,
            )
        )
    codes = list(TransferCode)
    sources = list(LineSource)
    lines.sort(key=lambda x: (codes.index(x.code), sources.index(x.source), x.direction.value))
    return opening, lines


@dataclass(slots=True)
class _RuleTotals:
    intervals: int = 0
    energy_wh: int = 0
    amount_milli: int = 0


class Attribution:
    """Running sums of one partner account's shares over billed intervals."""

    def __init__(self, account_id: int) -> None:
        self.account_id = account_id
        self.intervals = 0
        self.energy_wh = 0
        self.amount_milli = 0
        self.rules: dict[int, _RuleTotals] = {}

    def add(self, interval: IntervalShares) -> None:
        """Count one interval: each of the partner's rules in its shares."""
        mine = False
        for share in interval.shares:
            if (
                not isinstance(share, list)
                or len(share) != 3
                or not all(type(x) is int for x in share)
            ):
                raise StorageError(f"consumption interval shares malformed: {share!r}")
            rule_id, account, milli = share
            if account != self.account_id:
                continue
            mine = True
            totals = self.rules.setdefault(rule_id, _RuleTotals())
            totals.intervals += 1
            totals.energy_wh += interval.import_wh
            totals.amount_milli += milli
            self.amount_milli += milli
        if mine:
            self.intervals += 1
            self.energy_wh += interval.import_wh


def unposted_now(carries: Sequence[IngestCarry], account_id: int) -> tuple[int, int]:
    """``(carry_milli, pending_minor)`` the tenant's meters hold for ``account_id`` now."""
    carry_milli = 0
    pending_minor = 0
    for row in carries:
        try:
            carry = MinorCarry.from_dict(row.carry)
        except SplitError as exc:
            raise StorageError(f"meter {row.meter_id}: stored carry malformed: {exc}") from exc
        carry_milli += dict(carry.partners).get(account_id, 0)
        owed = row.pending.get(str(account_id), 0)
        if type(owed) is not int:
            raise StorageError(f"meter {row.meter_id}: stored pending malformed: {owed!r}")
        pending_minor += owed
    return carry_milli, pending_minor


def statement_csv(view: StatementView) -> str:
    """The statement as CSV (RFC 4180, CRLF): one record per row, columns :data:`CSV_COLUMNS`.

    Records: ``opening_balance``, one ``line`` per statement line, ``total``,
    ``closing_balance``, one ``rule`` per rule, ``consumption`` (the energy totals), then
    ``unposted_accrued``, ``unposted_posted``, ``unposted_difference``, ``carry`` (milli)
    and ``pending`` (minor). Empty cells are blank.
    """
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\r\n")
    writer.writeheader()
    common = {
        "partner_id": view.partner_id,
        "currency": view.currency,
        "period_from": view.period_from,
        "period_to": view.period_to,
    }

    def row(record: str, **cells: object) -> None:
        writer.writerow({"record": record, **common, **cells})

    row("opening_balance", amount_minor=view.opening_balance_minor)
    for line in view.lines:
        row(
            "line",
            code=line.code.value,
            direction=line.direction.value,
            source=line.source.value,
            transfers=line.transfers,
            amount_minor=line.amount_minor,
        )
    row("total", transfers=sum(x.transfers for x in view.lines), amount_minor=view.total_minor)
    row("closing_balance", amount_minor=view.closing_balance_minor)
    for rule in view.rules:
        row(
            "rule",
            rule_id=rule.rule_id,
            tariff_code=rule.tariff_code or "",
            kind=rule.kind.value if rule.kind else "",
            value="" if rule.value is None else rule.value,
            intervals=rule.intervals,
            energy_wh=rule.energy_wh,
            amount_milli=rule.amount_milli,
        )
    row(
        "consumption",
        intervals=view.intervals,
        energy_wh=view.energy_wh,
        amount_milli=view.consumption_milli,
    )
    u = view.unposted
    row("unposted_accrued", amount_milli=u.accrued_milli)
    row("unposted_posted", amount_milli=u.posted_milli)
    row("unposted_difference", amount_milli=u.difference_milli)
    row("carry", amount_milli=u.carry_milli)
    row("pending", amount_minor=u.pending_minor)
    return out.getvalue()


# ============================================================================ service


class SettlementService:
    """Partner balances and statements (one read unit of work per method)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def balance(self, call: Call, partner_id: int) -> PartnerBalanceView:
        """The partner's ledger account as it stands."""
        require(call, Action.PARTNER_READ)
        async with self._db.read() as session:
            owner = await SettlementRepository(session).partner(call.scope, partner_id)
        if owner is None:
            raise NotFoundError(f"partner {partner_id} not found")
        account = owner.account
        return PartnerBalanceView(
            partner_id=owner.partner.id,
            partner_name=owner.partner.name,
            ledger_account_id=account.id,
            currency=account.currency,
            credits_posted_minor=account.credits_posted,
            debits_posted_minor=account.debits_posted,
            balance_minor=account.credits_posted - account.debits_posted,
            as_of=call.now,
        )

    async def statement(self, call: Call, partner_id: int, first: date, end: date) -> StatementView:
        """The partner's statement of the tenant's local days ``[first, end)``."""
        require(call, Action.PARTNER_READ)
        async with self._db.read() as session:
            repo = SettlementRepository(session)
            owner = await repo.partner(call.scope, partner_id)
            if owner is None:
                raise NotFoundError(f"partner {partner_id} not found")
            start, stop = statement_period(first, end, owner.tenant.timezone)
            opening, lines = ledger_lines(await repo.ledger_groups(owner, start, stop))
            attribution = Attribution(owner.account.id)
            async for interval in repo.intervals(
                owner, int(start.timestamp()), int(stop.timestamp())
            ):
                attribution.add(interval)
            rules = await SplitRuleRepository(session).by_ids(call.scope, list(attribution.rules))
            carry_milli, pending_minor = unposted_now(
                await repo.ingest_carries(owner), owner.account.id
            )
        total = sum(x.amount_minor for x in lines)
        closing = opening + total
        posted = sum(x.amount_minor for x in lines if x.source is LineSource.CONSUMPTION)
        return StatementView(
            partner_id=owner.partner.id,
            partner_name=owner.partner.name,
            partner_kind=owner.partner.kind,
            ledger_account_id=owner.account.id,
            currency=owner.account.currency,
            timezone=owner.tenant.timezone,
            period_from=first.isoformat(),
            period_to=end.isoformat(),
            start_at=start,
            end_at=stop,
            opening_balance_minor=opening,
            lines=lines,
            total_minor=total,
            closing_balance_minor=closing,
            intervals=attribution.intervals,
            energy_wh=attribution.energy_wh,
            consumption_milli=attribution.amount_milli,
            rules=[
                RuleShareLine(
                    rule_id=rule_id,
                    tariff_code=rules[rule_id].tariff_code if rule_id in rules else None,
                    kind=RuleKind(rules[rule_id].kind) if rule_id in rules else None,
                    value=rules[rule_id].value if rule_id in rules else None,
                    intervals=t.intervals,
                    energy_wh=t.energy_wh,
                    amount_milli=t.amount_milli,
                )
                for rule_id, t in sorted(attribution.rules.items())
            ],
            unposted=UnpostedView(
                accrued_milli=attribution.amount_milli,
                posted_milli=posted * MILLI_PER_MINOR,
                difference_milli=attribution.amount_milli - posted * MILLI_PER_MINOR,
                carry_milli=carry_milli,
                pending_minor=pending_minor,
            ),
        )


__all__ = [
    "CSV_COLUMNS",
    "MAX_PERIOD_DAYS",
    "Attribution",
    "Direction",
    "LineSource",
    "PartnerBalanceView",
    "RuleShareLine",
    "SettlementService",
    "StatementLine",
    "StatementView",
    "UnpostedView",
    "ledger_lines",
    "statement_csv",
    "statement_period",
    "unposted_now",
]
