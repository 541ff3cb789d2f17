"""End to end: out of credit, emergency credit, disconnected; a top-up repays the debt, reconnects.

Every component is its own process (:mod:`tests.e2e.system`). The simulated meter draws
a constant 3 kW at x600 (half a kWh, about 18 ct, per real second) from 10:00 local time
on a weekday, with a friendly night of 22:00-06:00 that this span never reaches; its
emergency credit is 1.00 EUR. The supply account may go 0.50 EUR into debt in the
ledger, less than the meter's emergency credit, so the backend must hold consumption
back once the ledger is at that limit. On SQLite and PostgreSQL.

Observed over Modbus: the opening 1.50 EUR runs out → emergency credit offered, relay
open → the customer takes it → relay closed → emergency credit spent → relay open,
disconnected (outside friendly hours) → a 5.00 EUR top-up over HTTP: the meter repays
the debt first (its credit becomes debt + 5.00, less what it drew since) and reconnects.
Observed in the backend: the readings billed all along, the ledger at its debt limit
holding the rest while the meter is off (reconciliation still exact: it counts what is
held), and after the top-up the held postings posted, nothing held, the reconciliation
difference zero and the money billed equal to what the meter took.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from pathlib import Path

import pytest
from sqlalchemy import select

from backend.adapters.db.alert_tables import AlertKind, AlertRow
from firmware_protocol.modbus_map import CreditState, MeterSnapshot, RelayState, StatusFlag
from tests.e2e.system import (
    METER,
    TIMEZONE,
    AccountOptions,
    MeterOptions,
    System,
    database_url,
    interval_chain_ok,
    meter_charged,
    running_system,
)

pytestmark = pytest.mark.e2e

OPENING_MINOR = 150
TOPUP_MINOR = 500
EMERGENCY_MILLI = 100_000  # 1.00 EUR
DEBT_LIMIT_MINOR = 50
#: One meter minute of 3 kW on the peak price (50 Wh at 36.5 ct/kWh): how far credit can
#: pass a threshold before the meter settles at the minute's end.
MINUTE_MILLI = 1_825
#: What the meter can draw in the real second between applying a token and the gateway
#: reading its credit back (10 meter minutes of 3 kW at x600).
READBACK_MILLI = 20_000


async def _meter_until(
    system: System, what: str, state: CreditState, relay: RelayState, seen: list[MeterSnapshot]
) -> MeterSnapshot:
    async def reached() -> MeterSnapshot | None:
        snap = await system.meter()
        seen.append(snap)
        return snap if (snap.credit_state, snap.relay_state) == (state, relay) else None

    return await system.until(what, reached, within_s=30)


def _outside_friendly_hours(snap: MeterSnapshot) -> None:
    assert StatusFlag.FRIENDLY_HOURS not in snap.status_flags
    local = dt.datetime.fromtimestamp(snap.clock_unix, zoneinfo.ZoneInfo(TIMEZONE))
    assert dt.time(6) <= local.time() < dt.time(22), local


@pytest.mark.parametrize(
    "database", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
async def test_out_of_credit_emergency_disconnect_topup_reconnect(
    tmp_path: Path, database: str, request: pytest.FixtureRequest
) -> None:
    dsn = request.getfixturevalue("postgres_dsn") if database == "postgresql" else None
    seen: list[MeterSnapshot] = []
    meter = MeterOptions(
        load_w=3000,
        speed=600,
        emergency_limit="1.00",
        low_credit="1.00",
        friendly_night="22:00-06:00",
    )
    account = AccountOptions(debt_limit_minor=DEBT_LIMIT_MINOR, low_credit_minor=100)
    async with (
        database_url(database, tmp_path, dsn) as url,
        running_system(tmp_path, url=url, meter=meter, account=account) as system,
    ):
        await system.baseline()
        opening = await system.topup(OPENING_MINOR)
        assert (
            OPENING_MINOR * 1000 - READBACK_MILLI
            <= opening["credit_after_milli"]
            <= OPENING_MINOR * 1000
        )

        # Credit runs out: supply stops, emergency credit is offered.
        out = await _meter_until(
            system, "credit exhausted", CreditState.EMERGENCY_AVAILABLE, RelayState.OPEN, seen
        )
        assert -MINUTE_MILLI <= out.credit_milli <= 0
        assert StatusFlag.EMERGENCY_AVAILABLE in out.status_flags
        _outside_friendly_hours(out)

        # The customer takes emergency credit: supply returns until it is spent.
        await system.request_emergency_credit()
        on_ec = await _meter_until(
            system, "on emergency credit", CreditState.EMERGENCY_IN_USE, RelayState.CLOSED, seen
        )
        assert StatusFlag.EMERGENCY_IN_USE in on_ec.status_flags
        off = await _meter_until(
            system, "disconnected", CreditState.DISCONNECTED, RelayState.OPEN, seen
        )
        assert -EMERGENCY_MILLI - MINUTE_MILLI <= off.credit_milli <= -EMERGENCY_MILLI
        assert off.emergency_used_milli == -off.credit_milli
        _outside_friendly_hours(off)
        debt = off.credit_milli
        # Off supply, the meter's credit stands still (no midnight in this span).
        assert (await system.meter()).credit_milli == debt

        # The backend has billed it all: the ledger stops at the account's debt limit and
        # holds the rest, and its expectation of the meter's credit counts what it holds.
        async def held() -> bool:
            row = await system.ingest_row()
            return (
                row is not None
                and row.last_credit_milli == debt
                and row.last_relay == "open"
                and bool(row.pending)
            )

        await system.until("the backend holding consumption at the debt limit", held)
        row = await system.ingest_row()
        assert row is not None
        assert row.reconcile_diff_milli == 0
        balance = await system.balance()
        assert -DEBT_LIMIT_MINOR <= balance["ledger_balance_minor"] < 0
        held_minor = sum(row.pending.values())
        # Ledger + held = the meter's debt, to the carried fraction of a cent.
        assert 0 <= (balance["ledger_balance_minor"] - held_minor) * 1000 - debt < 1000

        # A top-up repays the debt first; what is left is credit and supply returns.
        topup = await system.topup(TOPUP_MINOR)
        assert (
            debt + TOPUP_MINOR * 1000 - READBACK_MILLI
            <= topup["credit_after_milli"]
            <= debt + TOPUP_MINOR * 1000
        )
        back = await _meter_until(
            system, "reconnected", CreditState.IN_CREDIT, RelayState.CLOSED, seen
        )
        assert back.token.last_credit_token_id == topup["msg_id"]
        assert back.credit_milli <= debt + TOPUP_MINOR * 1000
        assert back.emergency_used_milli == 0

        # The backend posts what it held once the top-up is in the ledger.
        async def settled() -> bool:
            row = await system.ingest_row()
            return (
                row is not None
                and row.last_token_id == topup["msg_id"]
                and row.last_relay == "closed"
                and row.pending == {}
            )

        await system.until("the held postings posted after the top-up", settled)
        await system.quiesce()
        row = await system.ingest_row()
        intervals = await system.intervals()
        balance = await system.balance()
        tokens = await system.tokens()
        async with system.db.read() as session:
            alerts = set(
                await session.scalars(select(AlertRow.kind).where(AlertRow.meter_id == METER))
            )

    # The meter went through every state of the cycle, in order.
    path = [(s.credit_state, s.relay_state) for s in seen]
    cycle = [
        (CreditState.EMERGENCY_AVAILABLE, RelayState.OPEN),
        (CreditState.EMERGENCY_IN_USE, RelayState.CLOSED),
        (CreditState.DISCONNECTED, RelayState.OPEN),
        (CreditState.IN_CREDIT, RelayState.CLOSED),
    ]
    at = 0
    for step in cycle:
        assert step in path[at:], (step, path)
        at = path.index(step, at)

    assert row is not None
    assert row.pending == {}
    assert row.reconcile_diff_milli == 0
    assert interval_chain_ok(intervals)
    first, last = system.log.at(intervals[0].from_ts), system.log.at(intervals[-1].to_ts)
    assert (first.credit_milli, first.import_wh) == (0, 0)
    # The readings the backend billed saw the relay open while the meter was off.
    assert any(system.log.at(iv.to_ts).relay.value == "open" for iv in intervals[1:])
    billed_milli = sum(iv.total_milli for iv in intervals)
    assert billed_milli == meter_charged(system.log, intervals, tokens)
    assert billed_milli > (OPENING_MINOR * 1000 + EMERGENCY_MILLI)
    debited = sum(iv.payer_minor for iv in intervals)
    assert debited * 1000 + intervals[-1].carry_milli == billed_milli
    assert balance["ledger_balance_minor"] == OPENING_MINOR + TOPUP_MINOR - debited
    assert balance["ledger_balance_minor"] * 1000 - intervals[-1].carry_milli == last.credit_milli
    assert {AlertKind.DEBT_LIMIT_REACHED.value} <= alerts
    assert AlertKind.RECONCILIATION.value not in alerts
