"""End to end: a top-up reaches the meter, and the backend bills exactly what the meter charged.

Every component is its own process (:mod:`tests.e2e.system`): the backend provisions a
utility over its API; a customer tops up 10.00 EUR over HTTP; the sandbox settles it, the
dispatcher sends the signed credit token over the broker, the gateway writes it to the
simulated meter — read back here over Modbus. The meter then draws 2.4 kW at x60 (40 Wh,
about 1.5 ct, per real second) and the backend ingests a reading a second. The
consumption the backend rated between its baseline and its newest billed reading
(``consumption_intervals.total_milli``, read from its database) must equal the meter's
own credit drop over the same readings (seen on the broker) plus the top-up applied in
between, to the rating unit; the ledger must hold the same money (balance, carry) and
the backend's reconciliation difference must be zero. On SQLite and PostgreSQL.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from firmware_protocol.modbus_map import CreditState, RelayState
from tests.e2e.system import (
    PEAK_MILLI_PER_KWH,
    MeterOptions,
    database_url,
    interval_chain_ok,
    meter_charged,
    running_system,
)

pytestmark = pytest.mark.e2e

TOPUP_MINOR = 1000
#: Billed readings after the top-up that the test waits for.
READINGS_AFTER_TOPUP = 5


@pytest.mark.parametrize(
    "database", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
async def test_backend_bills_what_the_meter_charged(
    tmp_path: Path, database: str, request: pytest.FixtureRequest
) -> None:
    dsn = request.getfixturevalue("postgres_dsn") if database == "postgresql" else None
    async with (
        database_url(database, tmp_path, dsn) as url,
        running_system(tmp_path, url=url, meter=MeterOptions(load_w=2400, speed=60)) as system,
    ):
        # The meter starts without credit and with its relay open: nothing flows before the
        # backend's first reading (its baseline), which sees exactly that.
        baseline = await system.baseline()
        assert (baseline.last_credit_milli, baseline.last_import_wh) == (0, 0)
        before = await system.meter()
        assert before.credit_milli == 0
        assert before.relay_state is RelayState.OPEN
        assert before.credit_state is CreditState.EMERGENCY_AVAILABLE

        token = await system.topup(TOPUP_MINOR)
        assert token["result_status"] == "ACCEPTED"
        # Read back by the gateway a moment after the meter applied it, with its relay
        # already closed: at most a few meter seconds of 2.4 kW less.
        assert TOPUP_MINOR * 1000 - 20_000 <= token["credit_after_milli"] <= TOPUP_MINOR * 1000
        after = await system.meter()
        assert after.token.last_credit_token_id == token["msg_id"]
        assert after.relay_state is RelayState.CLOSED
        # At most a few seconds of 2.4 kW at x60 on the peak price since the token.
        assert TOPUP_MINOR * 1000 - 20_000 <= after.credit_milli <= TOPUP_MINOR * 1000

        async def billed() -> bool:
            intervals = await system.intervals()
            done = [
                iv
                for iv in intervals
                if system.log.at(iv.to_ts).last_token_id >= token["msg_id"] and iv.import_wh > 0
            ]
            return len(done) >= READINGS_AFTER_TOPUP

        await system.until("readings billed after the top-up", billed, within_s=30)
        await system.quiesce()
        intervals = await system.intervals()
        row = await system.ingest_row()
        balance = await system.balance()
        tokens = await system.tokens()

    # The chain of billed readings starts at the backend's first reading of the meter,
    # taken before the top-up: nothing consumed, nothing charged.
    assert interval_chain_ok(intervals)
    first, last = system.log.at(intervals[0].from_ts), system.log.at(intervals[-1].to_ts)
    assert (first.credit_milli, first.import_wh, first.relay.value) == (0, 0, "open")
    billed_milli = sum(iv.total_milli for iv in intervals)
    # What the backend rated is what the meter took, to the rating unit.
    assert billed_milli == meter_charged(system.log, intervals, tokens)
    assert billed_milli > 0
    assert sum(iv.import_wh for iv in intervals) == last.import_wh - first.import_wh
    # All on weekday peak (10:00 onwards, far from midnight): one price, no standing charge.
    assert sum(iv.standing_milli for iv in intervals) == 0
    assert billed_milli == sum(iv.import_wh for iv in intervals) * PEAK_MILLI_PER_KWH // 1000
    # Every rule's share adds up to the interval's charge.
    for iv in intervals:
        assert sum(share[2] for share in iv.shares) == iv.total_milli
    # The ledger took it from the prepaid account in whole cents, carrying the rest.
    debited = sum(iv.payer_minor for iv in intervals)
    assert debited * 1000 + intervals[-1].carry_milli == billed_milli
    assert balance["ledger_balance_minor"] == TOPUP_MINOR - debited
    assert balance["ledger_balance_minor"] * 1000 - intervals[-1].carry_milli == last.credit_milli
    # The backend's own reconciliation agrees, and nothing is held back.
    assert row is not None
    assert row.reconcile_diff_milli == 0
    assert row.pending == {}
    assert row.quarantine is None
