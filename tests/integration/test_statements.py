"""Monthly statements over HTTP on SQLite and PostgreSQL: every line traced to ledger transfers.

The ledger and the billed intervals are written as settlement and ingest write them
(:class:`tests.integration.test_consumption_api.Env`): top-ups clearing → prepaid,
consumption prepaid → utility per reading with reference ``consumption:{meter}:{ts}``,
the payer's milli carry running across readings, a tax share split off to the tax
authority. The tenant's zone is Europe/Berlin, so March 2026 is
``[2026-02-28T23:00Z, 2026-03-31T22:00Z)`` and has a 23-hour day.
"""

from __future__ import annotations

import csv
import io
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from backend.adapters.db.ingest_tables import ConsumptionIntervalRow
from backend.adapters.db.ledger_tables import TransferRow
from backend.domain.auth import Role
from backend.domain.ledger import Transfer, TransferCode, derive_id
from tests.integration.test_consumption_api import Env, served, target, ts
from tests.support.topups import Target

pytestmark = pytest.mark.integration
__all__ = ["target"]  # the parametrised database fixture, shared with the history tests

APRIL_15 = datetime(2026, 4, 15, 10, 0, tzinfo=UTC)
MARCH_START = datetime(2026, 2, 28, 23, 0, tzinfo=UTC)
MARCH_END = datetime(2026, 3, 31, 22, 0, tzinfo=UTC)


@pytest.fixture
async def env(target: Target) -> AsyncIterator[Env]:
    async with served(target, now=APRIL_15) as e:
        yield e


async def balance_before(env: Env, when: datetime, i: int = 0) -> int:
    """The prepaid balance from the ledger's transfers before ``when``, summed here."""
    prepaid = env.world.customers[i].prepaid_ledger_id
    async with env.db.read() as s:
        rows = (await s.scalars(select(TransferRow).where(TransferRow.created_at < when))).all()
    return sum(t.amount for t in rows if t.credit_account_id == prepaid) - sum(
        t.amount for t in rows if t.debit_account_id == prepaid
    )


@dataclass
class Facts:
    """What :func:`history` wrote that the tests check against."""

    carry_start: int = 0
    carry_end: int = 0
    payment: uuid.UUID | None = None
    topup_id: uuid.UUID | None = None
    march: list[ConsumptionIntervalRow] = field(default_factory=list)
    april_first: ConsumptionIntervalRow | None = None


async def history(env: Env) -> Facts:
    """February, March (with both month edges) and April for customer 0; returns the facts."""
    facts = Facts()
    await env.topup(0, 5_000, datetime(2026, 2, 20, 12, 0, tzinfo=UTC))
    # February: billed before March began, leaves a carry.
    feb = await env.bill(
        0,
        ts("2026-02-27T00:00:00+01:00"),
        ts("2026-02-28T21:00:00+01:00"),
        (3_000, 1_000),
        (60_000, 30_400),
    )
    facts.carry_start = feb.carry_milli
    assert feb.carry_milli != 0
    # A reading at local midnight, billed half an hour into March: on March's statement.
    first = await env.bill(
        0,
        ts("2026-02-28T21:00:00+01:00"),
        ts("2026-03-01T00:00:00+01:00"),
        (100, 50),
        (2_000, 1_500),
        billed_at=datetime(2026, 2, 28, 23, 30, tzinfo=UTC),
    )
    payment, topup_id = await env.topup(0, 2_000, datetime(2026, 3, 10, 9, 0, tzinfo=UTC))
    facts.payment, facts.topup_id = payment, topup_id
    march = [first]
    t = ts("2026-03-01T00:00:00+01:00")
    for day in range(1, 31):  # a reading a day, each taking the day's standing charge
        end = int(datetime.fromisoformat(f"2026-03-{day + 1:02d}T00:00:00+01:00").timestamp())
        end = min(end, ts("2026-03-31T21:50:00+02:00"))
        march.append(
            await env.bill(
                0,
                t,
                end,
                (1_000 + day, 2_000),
                (20_000 + 20 * day, 60_000),
                days=1,
                standing=40_333,
                block=17 * day,
            )
        )
        t = end
    # The last reading of March billed after local midnight: on April's statement.
    april_first = await env.bill(
        0,
        t,
        ts("2026-03-31T23:55:00+02:00"),
        (10, 0),
        (200, 0),
        billed_at=datetime(2026, 3, 31, 22, 10, tzinfo=UTC),
    )
    facts.carry_end = march[-1].carry_milli
    facts.march = march
    facts.april_first = april_first
    # Customer 1 in March: never on customer 0's statement.
    await env.topup(1, 9_000, datetime(2026, 3, 5, tzinfo=UTC))
    await env.bill(
        1,
        ts("2026-03-01T00:00:00+01:00"),
        ts("2026-03-05T00:00:00+01:00"),
        (9_000, 0),
        (180_000, 0),
    )
    return facts


async def test_march_statement_reconciles_with_the_ledger(env: Env) -> None:
    facts = await history(env)
    march = facts.march
    status, _, s = await env.get(f"/v1/accounts/{env.account()}/statements/2026-03", env.token())
    assert status == 200, s
    assert (s["month"], s["timezone"], s["currency"], s["complete"]) == (
        "2026-03",
        "Europe/Berlin",
        "EUR",
        True,
    )
    assert (s["start"], s["end"]) == ("2026-02-28T23:00:00Z", "2026-03-31T22:00:00Z")

    # Balances are the ledger's, at the local month's edges.
    assert s["opening_balance_minor"] == await balance_before(env, MARCH_START)
    assert s["closing_balance_minor"] == await balance_before(env, MARCH_END)
    # Top-ups: payment id and ledger transfer.
    assert s["topups"] == [
        {
            "payment_id": str(facts.payment),
            "transfer_id": str(facts.topup_id),
            "amount_minor": 2_000,
            "posted_at": "2026-03-10T09:00:00Z",
        }
    ]
    # Every consumption transfer of the month, by reading reference, and nothing else.
    meter = env.world.customers[0].meter_id
    expected = [
        (
            str(derive_id("consumption", f"consumption:{meter}:{row.to_ts}")),
            f"consumption:{meter}:{row.to_ts}",
            -row.payer_minor,
        )
        for row in march
        if row.payer_minor
    ]
    got = [
        (t["transfer_id"], t["reference"], t["amount_minor"]) for t in s["consumption_transfers"]
    ]
    assert got == expected
    assert all(t["code"] == "CONSUMPTION" for t in s["consumption_transfers"])
    posted = sum(-t["amount_minor"] for t in s["consumption_transfers"])
    assert posted == s["consumption_posted_minor"] == s["consumption_minor"]
    # The statement's identity: opening + top-ups - consumption transfers = closing.
    assert s["other_transfers"] == []
    assert s["opening_balance_minor"] + s["topups_minor"] - posted == s["closing_balance_minor"]

    # Consumption by band, from the billed intervals (exact milli).
    assert s["readings"] == len(march) == 31
    night = sum(r.band_wh[0] for r in march)
    day = sum(r.band_wh[1] for r in march)
    assert s["energy_wh"] == night + day
    bands = {b["band"]: b for b in s["bands"]}
    assert set(bands) == {"night", "day"}
    assert (bands["night"]["energy_wh"], bands["day"]["energy_wh"]) == (night, day)
    assert bands["night"]["amount_milli"] == sum(r.band_milli[0] for r in march)
    assert bands["day"]["amount_milli"] == sum(r.band_milli[1] for r in march)
    assert (
        bands["day"]["tariff_code"],
        bands["day"]["tariff_version"],
        bands["day"]["tariff_id"],
    ) == ("HOME", 1, 1)
    [block] = s["block_adders"]
    assert block["amount_milli"] == sum(17 * d for d in range(1, 31))
    [standing] = s["standing_charges"]
    assert (standing["days"], standing["amount_milli"]) == (30, 30 * 40_333)
    assert s["standing_days"] == 30
    assert s["consumption_milli"] == sum(r.total_milli for r in march)
    # Lines in minor units add up to what was taken, each within a minor unit of exact.
    lines = [*s["bands"], *s["block_adders"], *s["standing_charges"]]
    assert sum(line["amount_minor"] for line in lines) == s["consumption_minor"]
    assert all(abs(line["amount_minor"] * 1000 - line["amount_milli"]) < 2_000 for line in lines)
    # Milli to minor through the payer's carry at both ends.
    assert (s["carry_start_milli"], s["carry_end_milli"]) == (
        facts.carry_start,
        facts.carry_end,
    )
    assert (
        s["consumption_milli"] + s["carry_start_milli"]
        == s["consumption_minor"] * 1000 + s["carry_end_milli"]
    )
    # Taxes: the TAX_AUTHORITY shares, within the charge.
    tax = sum(r.total_milli * 19 // 119 for r in march)
    assert s["taxes"] == [
        {"partner": "Finanzamt", "amount_milli": tax, "amount_minor": (tax + 500) // 1000}
    ]
    assert s["taxes_milli"] == tax
    assert s["checks"] == {
        "balance": True,
        "milli": True,
        "posted": True,
        "unposted_readings": [],
        "unmatched_transfers": [],
    }


async def test_the_current_month_runs_to_now_and_shows_what_is_not_posted(env: Env) -> None:
    facts = await history(env)
    april_first = facts.april_first
    assert april_first is not None
    meter = env.world.customers[0].meter_id
    # A charge at the debt limit stays pending (no transfer), and a goodwill credit.
    pending = await env.bill(
        0,
        april_first.to_ts,
        ts("2026-04-10T00:00:00+02:00"),
        (5_000, 0),
        (100_000, 0),
        post=False,
    )
    assert pending.payer_minor > 0
    goodwill = uuid.uuid4()
    await env.post(
        Transfer(
            id=goodwill,
            debit_account_id=env.world.utility_id,
            credit_account_id=env.world.customers[0].prepaid_ledger_id,
            amount=150,
            currency="EUR",
            code=TransferCode.ADJUSTMENT,
            reference="goodwill:outage",
            created_at=datetime(2026, 4, 11, tzinfo=UTC),
        )
    )
    status, _, s = await env.get(f"/v1/accounts/{env.account()}/statements/2026-04", env.token())
    assert status == 200, s
    assert s["complete"] is False
    assert s["opening_balance_minor"] == await balance_before(env, MARCH_END)
    assert s["closing_balance_minor"] == await balance_before(env, APRIL_15 + timedelta(days=30))
    assert s["other_transfers"] == [
        {
            "transfer_id": str(goodwill),
            "code": "ADJUSTMENT",
            "reference": "goodwill:outage",
            "amount_minor": 150,
            "posted_at": "2026-04-11T00:00:00Z",
        }
    ]
    assert s["readings"] == 2
    assert s["consumption_minor"] == april_first.payer_minor + pending.payer_minor
    assert s["consumption_posted_minor"] == april_first.payer_minor
    checks = s["checks"]
    assert (checks["balance"], checks["milli"], checks["posted"]) == (True, True, False)
    assert checks["unposted_readings"] == [f"consumption:{meter}:{pending.to_ts}"]
    assert checks["unmatched_transfers"] == []
    # A month without any activity.
    status, _, s = await env.get(f"/v1/accounts/{env.account()}/statements/2026-01", env.token())
    assert status == 200
    assert (s["opening_balance_minor"], s["closing_balance_minor"], s["readings"]) == (0, 0, 0)
    assert (s["bands"], s["topups"], s["consumption_transfers"], s["taxes"]) == ([], [], [], [])
    assert (s["checks"]["balance"], s["checks"]["milli"], s["checks"]["posted"]) == (True,) * 3


async def test_csv_statement(env: Env) -> None:
    facts = await history(env)
    status, headers, body = await env.get(
        f"/v1/accounts/{env.account()}/statements/2026-03?format=csv", env.token()
    )
    assert status == 200
    assert headers["Content-Type"] == "text/csv; charset=utf-8"
    assert (
        headers["Content-Disposition"]
        == f'attachment; filename="statement-{env.account()}-2026-03.csv"'
    )
    assert body.endswith("\r\n")
    rows = list(csv.reader(io.StringIO(body)))
    assert rows[0] == [
        "section",
        "item",
        "quantity",
        "unit",
        "amount_milli",
        "amount_minor",
        "reference",
        "posted_at",
    ]
    _, _, s = await env.get(f"/v1/accounts/{env.account()}/statements/2026-03", env.token())
    by_section: dict[str, list[list[str]]] = {}
    for row in rows[1:]:
        by_section.setdefault(row[0], []).append(row)
    [opening, closing] = by_section["balance"]
    assert (opening[1], int(opening[5])) == ("opening", s["opening_balance_minor"])
    assert (closing[1], int(closing[5])) == ("closing", s["closing_balance_minor"])
    [topup] = by_section["topup"]
    assert (topup[1], topup[5], topup[6]) == (
        str(facts.topup_id),
        "2000",
        f"payment:{facts.payment}",
    )
    assert [r[1] for r in by_section["transfer"]] == [
        t["transfer_id"] for t in s["consumption_transfers"]
    ]
    assert sum(int(r[5]) for r in by_section["transfer"]) == -s["consumption_posted_minor"]
    assert [(r[1], int(r[2]), int(r[4])) for r in by_section["energy"]] == [
        (f"HOME band {b['band']}", b["energy_wh"], b["amount_milli"]) for b in s["bands"]
    ]
    [standing] = by_section["standing"]
    assert (standing[2], standing[3]) == ("30", "days")
    [tax] = by_section["tax"]
    assert tax[1] == "of which Finanzamt"
    assert [int(r[4]) for r in by_section["carry"]] == [
        s["carry_start_milli"],
        s["carry_end_milli"],
    ]


async def test_who_may_read_a_statement_and_bad_months(env: Env) -> None:
    await history(env)
    base = f"/v1/accounts/{env.account()}/statements"
    for month in ("2026-13", "2026-3", "march", "1969-12", "2026-03-01"):
        status, _, body = await env.get(f"{base}/{month}", env.token())
        assert status == 404, (month, body)
    status, _, body = await env.get(f"{base}/2026-05", env.token())  # not begun yet
    assert (status, body["detail"]) == (404, "no statement for 2026-05 yet")
    status, _, body = await env.get(f"{base}/2026-03?format=pdf", env.token())
    assert (status, body["errors"][0]["field"]) == (400, "format")
    status, _, body = await env.get(f"{base}/2026-03?month=2026-02", env.token())
    assert (status, body["errors"][0]["field"]) == (400, "month")
    assert (await env.get(f"{base}/2026-03", env.token(1)))[0] == 404
    assert (await env.get(f"{base}/2026-03", None))[0] == 401
    for role, reseller in ((Role.SUPPORT, None), (Role.RESELLER, env.world.reseller_id)):
        key = await env.key(role, reseller_id=reseller)
        status, _, body = await env.get(f"{base}/2026-03", key)
        assert (status, body["readings"]) == (200, 31), (role, body)
    # Customer 1's own statement sees only their own month.
    status, _, body = await env.get(
        f"/v1/accounts/{env.account(1)}/statements/2026-03", env.token(1)
    )
    assert status == 200
    assert (body["topups_minor"], body["readings"], body["checks"]["balance"]) == (9_000, 1, True)
    assert body["energy_wh"] == 9_000
