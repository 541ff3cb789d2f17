"""Pure parts of split rules and settlement: rule-set checks, local periods, attribution, Accept."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest

from backend.adapters.db.settlement_repo import IngestCarry, IntervalShares, LedgerGroup
from backend.adapters.db.tables import PartnerRow
from backend.api.routes.split_rules import wants_csv
from backend.domain.split import RuleKind, SplitContext
from backend.errors import StorageError
from backend.service.refusals import InvalidInputError
from backend.service.settlement import (
    Attribution,
    Direction,
    LineSource,
    ledger_lines,
    statement_period,
    unposted_now,
)
from backend.service.split_rules import NewSplitRule, check_rule_set


def _partner(pid: int, account: int, reseller: int | None = None) -> PartnerRow:
    return PartnerRow(id=pid, tenant_id=1, reseller_id=reseller, ledger_account_id=account)


PARTNERS = {1: _partner(1, 101), 2: _partner(2, 102), 3: _partner(3, 103, reseller=9)}


def _fields(exc: pytest.ExceptionInfo[InvalidInputError]) -> list[str]:
    return [e.field for e in exc.value.errors]


def test_check_rule_set_maps_partners_to_ledger_accounts() -> None:
    rules = [
        NewSplitRule(kind=RuleKind.PER_KWH, partner_id=2, value=9000),
        NewSplitRule(kind=RuleKind.BASIS_POINTS, partner_id=3, value=300),
        NewSplitRule(kind=RuleKind.REMAINDER, partner_id=1),
    ]
    domain = check_rule_set(SplitContext.CONSUMPTION, rules, PARTNERS)
    assert [(r.kind, r.partner, r.value) for r in domain] == [
        (RuleKind.PER_KWH, 102, 9000),
        (RuleKind.BASIS_POINTS, 103, 300),
        (RuleKind.REMAINDER, 101, 0),
    ]


K = RuleKind
REST = (K.REMAINDER, 1, 0)


@pytest.mark.parametrize(
    ("context", "rules", "fields"),
    [
        (SplitContext.TOPUP, [(K.PER_KWH, 2, 1), REST], ["rules"]),
        (SplitContext.CONSUMPTION, [(K.FIXED_PER_TOPUP, 2, 1), REST], ["rules"]),
        (SplitContext.TOPUP, [REST, (K.REMAINDER, 2, 0)], ["rules"]),
        (SplitContext.TOPUP, [(K.BASIS_POINTS, 2, 10_001), REST], ["rules[0].value"]),
        (SplitContext.TOPUP, [(K.REMAINDER, 3, 0)], ["rules[0].partner_id"]),
        (
            SplitContext.TOPUP,
            [(K.PER_KWH, 7, 1), (K.REMAINDER, 8, 0)],
            ["rules[0].partner_id", "rules[1].partner_id"],
        ),
    ],
)
def test_check_rule_set_refuses_naming_the_field(
    context: SplitContext, rules: list[tuple[RuleKind, int, int]], fields: list[str]
) -> None:
    new = [NewSplitRule(kind=k, partner_id=p, value=v) for k, p, v in rules]
    with pytest.raises(InvalidInputError) as exc:
        check_rule_set(context, new, PARTNERS)
    assert _fields(exc) == fields


def test_statement_period_is_local_days() -> None:
    start, end = statement_period(date(2027, 1, 1), date(2027, 2, 1), "Europe/Berlin")
    assert start.astimezone(UTC) == datetime(2026, 12, 31, 23, tzinfo=UTC)
    assert end.astimezone(UTC) == datetime(2027, 1, 31, 23, tzinfo=UTC)
    # Santiago springs forward at midnight (00:00 -> 01:00): the day still starts at the
    # transition instant and lasts 23 hours; the fall-back day lasts 25.
    start, end = statement_period(date(2026, 9, 6), date(2026, 9, 7), "America/Santiago")
    assert start.astimezone(UTC) == datetime(2026, 9, 6, 4, tzinfo=UTC)
    assert (end - start).total_seconds() == 23 * 3600
    start, end = statement_period(date(2027, 4, 3), date(2027, 4, 4), "America/Santiago")
    assert (end - start).total_seconds() == 25 * 3600


@pytest.mark.parametrize(
    ("first", "end"),
    [(date(2027, 1, 2), date(2027, 1, 1)), (date(2027, 1, 1), date(2027, 1, 1)),
     (date(2027, 1, 1), date(2028, 1, 3))],
)  # fmt: skip
def test_statement_period_refuses_empty_reversed_and_long(first: date, end: date) -> None:
    with pytest.raises(InvalidInputError) as exc:
        statement_period(first, end, "UTC")
    assert _fields(exc) == ["to"]


def test_ledger_lines_split_opening_from_period_and_order_them() -> None:
    groups = [
        (True, "SPLIT", True, "CONSUMPTION", 4, 40),
        (False, "SPLIT", False, "TOPUP", 1, -3),
        (True, "SPLIT", False, "OTHER", 1, -5),
        (False, "CONSUMPTION", True, "CONSUMPTION", 2, 70),
        (False, "SPLIT", True, "CONSUMPTION", 1, 9),
    ]
    opening, lines = ledger_lines(
        LedgerGroup(
            before=before,
            code=code,
            incoming=incoming,
            source=source,
            transfers=n,
            amount_minor=amount,
        )
        for before, code, incoming, source, n, amount in groups
    )
    assert opening == 35
    assert [(x.code.value, x.source, x.direction) for x in lines] == [
        ("CONSUMPTION", LineSource.CONSUMPTION, Direction.IN),
        ("SPLIT", LineSource.TOPUP, Direction.OUT),
        ("SPLIT", LineSource.CONSUMPTION, Direction.IN),
    ]


def test_attribution_counts_each_interval_once_and_each_rule() -> None:
    a = Attribution(101)
    a.add(IntervalShares(import_wh=100, shares=[[1, 101, 5], [2, 101, 7], [3, 102, 9]]))
    a.add(IntervalShares(import_wh=50, shares=[[3, 102, 1]]))
    a.add(IntervalShares(import_wh=10, shares=[[1, 101, 2]]))
    assert (a.intervals, a.energy_wh, a.amount_milli) == (2, 110, 14)
    assert {k: (v.intervals, v.energy_wh, v.amount_milli) for k, v in a.rules.items()} == {
        1: (2, 110, 7),
        2: (1, 100, 7),
    }
    with pytest.raises(StorageError):
        a.add(IntervalShares(import_wh=1, shares=[[1, 101]]))


def test_unposted_now_sums_carries_and_pending() -> None:
    rows = [
        IngestCarry(meter_id=1, carry={"amount_milli": 5, "partners": [[101, 7]]}, pending={}),
        IngestCarry(
            meter_id=2,
            carry={"amount_milli": 0, "partners": [[100, 1], [101, 990]]},
            pending={"101": 4, "102": 1},
        ),
    ]
    assert unposted_now(rows, 101) == (997, 4)
    assert unposted_now(rows, 103) == (0, 0)
    bad = IngestCarry(meter_id=3, carry={"amount_milli": 5000, "partners": []}, pending={})
    with pytest.raises(StorageError):
        unposted_now([bad], 101)


@pytest.mark.parametrize(
    ("accept", "csv"),
    [
        ("text/csv", True),
        ("text/csv, application/json;q=0.9", True),
        ("application/json;q=0.5, text/csv", True),
        ("application/json, text/csv;q=0.5", False),
        ("application/json, text/csv", False),
        ("*/*", False),
        ("", False),
        ("text/csv;q=0", False),
        ("text/csv;q=oops", False),
    ],
)
def test_accept_prefers_csv_only_when_asked(accept: str, csv: bool) -> None:
    assert wants_csv(accept) is csv
