"""Consumption history and live events over HTTP, on SQLite and PostgreSQL.

Billed intervals, meter ingest state and ledger transfers are written straight into the
tables (as ingest would write them), so these tests depend only on the schema. The
world is :func:`tests.support.topups.provision`'s: tenant "Volta" in Europe/Berlin (DST),
two customers with a meter each.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.web import Application
from sqlalchemy import select

from backend.adapters.db.engine import Database
from backend.adapters.db.ingest_tables import ConsumptionIntervalRow, MeterIngestRow
from backend.adapters.db.ledger_repo import LedgerRepository
from backend.adapters.db.tables import PartnerRow, TariffRow, TenantRow, TokenRow
from backend.api.app import create_app
from backend.api.context import AUTH, DATABASE, LIVE_HUB
from backend.api.routes.consumption import LIVE_SETTINGS
from backend.api.routes.topups import TOPUP_SETTINGS
from backend.api.schemas import to_json
from backend.config import BackendConfig
from backend.domain.auth import Role, Scope
from backend.domain.ledger import AccountCode, AccountSpec, Transfer, TransferCode, derive_id
from backend.service.auth import NewApiKey
from backend.service.context import Call
from backend.service.dispatcher import Dispatcher, ResultOutcome
from backend.service.live import LiveService, LiveSettings
from backend.service.topup_runtime import SandboxMode, TopupSettings
from firmware_protocol import mqtt
from firmware_protocol.mqtt_topics import token_result_topic
from firmware_protocol.status import TokenStatus
from tests.support.topups import (
    GATEWAY,
    Clock,
    StaticSigners,
    Target,
    World,
    fresh_target,
    provision,
)

pytestmark = pytest.mark.integration

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
NOW = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)
TARIFF_WIRE_ID = 1
BANDS = ("night", "day")


def ts(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp())


def at(unix: int) -> datetime:
    return datetime.fromtimestamp(unix, UTC)


# ------------------------------------------------------------------------------ plumbing


@dataclass
class Env:
    """The app on a test client, the provisioned world and helpers to fill the tables."""

    client: TestClient[Any, Any]
    app: Application
    world: World
    clock: Clock
    tax_account: int = 0
    #: Per meter: the payer's running carry (milli), as ingest keeps it.
    carry: dict[int, int] = field(default_factory=dict)

    @property
    def db(self) -> Database:
        return self.app[DATABASE]

    def token(self, i: int = 0) -> str:
        c = self.world.customers[i]
        return (
            self.app[AUTH]
            .issue_customer_token(c.customer_id, self.world.tenant_id, self.clock())
            .token
        )

    def account(self, i: int = 0) -> int:
        return self.world.customers[i].account_id

    async def key(
        self, role: Role, tenant_id: int | None = None, reseller_id: int | None = None
    ) -> str:
        platform = Call(
            scope=Scope(role=Role.PLATFORM_ADMIN, actor="test"), request_id="t", now=self.clock()
        )
        new = NewApiKey(
            name=f"{role} {uuid.uuid4().hex[:6]}",
            role=role,
            tenant_id=tenant_id or self.world.tenant_id,
            reseller_id=reseller_id,
        )
        return (await self.app[AUTH].create_api_key(platform, new)).key

    async def get(self, path: str, auth: str | None) -> tuple[int, Any, Any]:
        headers = {} if auth is None else {"Authorization": f"Bearer {auth}"}
        async with self.client.get(path, headers=headers) as resp:
            raw = await resp.read()
            body: Any = raw.decode()
            if resp.content_type.endswith("json"):
                body = json.loads(raw)
            return resp.status, resp.headers, body

    async def post(self, *transfers: Transfer) -> None:
        async with self.db.write() as s:
            for t in transfers:
                await LedgerRepository(s).post([t])

    async def topup(self, i: int, amount: int, when: datetime) -> tuple[uuid.UUID, uuid.UUID]:
        """A TOPUP transfer clearing → prepaid as settlement posts it: (payment id, transfer id)."""
        payment = uuid.uuid4()
        transfer = derive_id("topup", str(payment))
        await self.post(
            Transfer(
                id=transfer,
                debit_account_id=self.world.clearing_id,
                credit_account_id=self.world.customers[i].prepaid_ledger_id,
                amount=amount,
                currency="EUR",
                code=TransferCode.TOPUP,
                reference=f"payment:{payment}",
                created_at=when,
            )
        )
        return payment, transfer

    async def bill(
        self,
        i: int,
        from_ts: int,
        to_ts: int,
        band_wh: Sequence[int],
        band_milli: Sequence[int],
        *,
        block: int = 0,
        days: int = 0,
        standing: int = 0,
        billed_at: datetime | None = None,
        post: bool = True,
        tariff: int = TARIFF_WIRE_ID,
    ) -> ConsumptionIntervalRow:
        """One billed interval as ingest writes it, with its payer transfer (and tax split)."""
        c = self.world.customers[i]
        assert c.meter_id is not None
        total = sum(band_milli) + block + standing
        carry = self.carry.get(c.meter_id, 0)
        payer, carry = divmod(carry + total, 1000)
        self.carry[c.meter_id] = carry
        tax = total * 19 // 119
        when = billed_at or at(to_ts)
        row = ConsumptionIntervalRow(
            tenant_id=self.world.tenant_id,
            supply_account_id=c.account_id,
            meter_id=c.meter_id,
            tariff_id=tariff,
            from_ts=from_ts,
            to_ts=to_ts,
            import_wh=sum(band_wh),
            band_wh=list(band_wh),
            band_milli=list(band_milli),
            block_milli=block,
            days=days,
            standing_milli=standing,
            total_milli=total,
            unrated_block_wh=0,
            shares=[[1, self.tax_account, tax], [2, self.world.utility_id, total - tax]],
            payer_minor=payer,
            carry_milli=carry,
            created_at=when,
        )
        async with self.db.write() as s:
            s.add(row)
            await s.flush()
            ref = f"consumption:{c.meter_id}:{to_ts}"
            if post and payer:
                await LedgerRepository(s).post(
                    [
                        Transfer(
                            id=derive_id("consumption", ref),
                            debit_account_id=c.prepaid_ledger_id,
                            credit_account_id=self.world.utility_id,
                            amount=payer,
                            currency="EUR",
                            code=TransferCode.CONSUMPTION,
                            reference=ref,
                            created_at=when,
                        )
                    ]
                )
            if post and tax >= 1000:
                await LedgerRepository(s).post(
                    [
                        Transfer(
                            id=derive_id("consumption-split", ref),
                            debit_account_id=self.world.utility_id,
                            credit_account_id=self.tax_account,
                            amount=tax // 1000,
                            currency="EUR",
                            code=TransferCode.SPLIT,
                            reference=ref,
                            created_at=when,
                        )
                    ]
                )
        return row

    async def ingest_state(
        self, i: int, *, last_ts: int, credit: int, relay: str = "CONNECTED", power: int = 0
    ) -> None:
        """The meter's newest live values, as ingest keeps them."""
        c = self.world.customers[i]
        assert c.meter_id is not None
        async with self.db.write() as s:
            row = await s.get(MeterIngestRow, c.meter_id)
            if row is None:
                row = MeterIngestRow(
                    meter_id=c.meter_id,
                    tenant_id=self.world.tenant_id,
                    supply_account_id=c.account_id,
                    state={},
                    rule_set="",
                    totals={},
                    carry={},
                    pending={},
                    updated_at=self.clock(),
                )
                s.add(row)
            row.last_ts = last_ts
            row.last_credit_milli = credit
            row.last_relay = relay
            row.last_power_w = power
            row.updated_at = self.clock()


async def setup_world(db: Database) -> tuple[World, int]:
    """The topups world plus a two-band tariff and a tax authority; returns the tax account."""
    world = await provision(db, customers=2)
    async with db.write() as s:
        tax_account = 9_999_001
        await LedgerRepository(s).create_accounts(
            [AccountSpec(id=tax_account, currency="EUR", code=AccountCode.TAX, min_balance=0)]
        )
        s.add_all(
            [
                PartnerRow(
                    tenant_id=world.tenant_id,
                    reseller_id=None,
                    name="Finanzamt",
                    kind="TAX_AUTHORITY",
                    ledger_account_id=tax_account,
                    created_at=NOW,
                ),
                TariffRow(
                    tenant_id=world.tenant_id,
                    code="HOME",
                    version=1,
                    wire_id=TARIFF_WIRE_ID,
                    body={
                        "bands": [
                            {"name": BANDS[0], "price_milli_per_kwh": 20_000},
                            {"name": BANDS[1], "price_milli_per_kwh": 30_000},
                        ]
                    },
                    activation_at=datetime(2026, 1, 1, tzinfo=UTC),
                    created_at=datetime(2026, 1, 1, tzinfo=UTC),
                ),
            ]
        )
    return world, tax_account


@contextlib.asynccontextmanager
async def served(target: Target, *, now: datetime = NOW) -> AsyncIterator[Env]:
    clock = Clock(now)
    config = BackendConfig(
        database_url=target.url, token_secret=b"t" * 32, mqtt_url="mqtt://127.0.0.1:1"
    )
    app = create_app(
        config, engine_kwargs=target.engine_kwargs, key_store=StaticSigners(), clock=clock
    )
    app[TOPUP_SETTINGS] = TopupSettings(dispatch=False, sandbox_mode=SandboxMode.INSTANT)
    app[LIVE_SETTINGS] = LiveSettings(poll_s=0.3, heartbeat_s=0.25, retry_ms=500)
    async with TestClient(TestServer(app)) as client:
        world, tax_account = await setup_world(app[DATABASE])
        yield Env(client, app, world, clock, tax_account)


@pytest.fixture(params=BACKENDS)
async def target(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Target]:
    dsn = request.getfixturevalue("postgres_dsn") if request.param == "postgresql" else None
    async with fresh_target(request.param, tmp_path, dsn) as t:
        yield t


@pytest.fixture
async def env(target: Target) -> AsyncIterator[Env]:
    async with served(target) as e:
        yield e


# ------------------------------------------------------------------------------ history


async def _autumn_readings(env: Env) -> None:
    """Readings around the DST change of 2026-10-25 (Berlin: 03:00 CEST → 02:00 CET)."""
    await env.bill(
        0, ts("2026-10-24T22:00:00+02:00"), ts("2026-10-25T00:00:00+02:00"), (100, 0), (2_000, 0)
    )
    await env.bill(
        0, ts("2026-10-25T00:00:00+02:00"), ts("2026-10-25T02:30:00+02:00"), (50, 10), (1_000, 300),
        days=1, standing=40_000,
    )  # fmt: skip
    await env.bill(
        0, ts("2026-10-25T02:30:00+02:00"), ts("2026-10-25T02:30:00+01:00"), (20, 0), (400, 0)
    )
    # A gap over most of the day, ending at midnight: all of it in the 25th, not pro-rated.
    await env.bill(
        0,
        ts("2026-10-25T02:30:00+01:00"),
        ts("2026-10-26T00:00:00+01:00"),
        (1_000, 2_000),
        (20_000, 60_000),
    )
    await env.bill(
        0, ts("2026-10-26T00:00:00+01:00"), ts("2026-10-26T06:00:00+01:00"), (300, 0), (6_000, 0),
        days=1, standing=40_000, block=123,
    )  # fmt: skip
    # Another customer's consumption never shows in customer 0's history.
    await env.bill(
        1, ts("2026-10-25T00:00:00+02:00"), ts("2026-10-25T12:00:00+01:00"), (9_999, 0), (99_999, 0)
    )


async def test_daily_history_in_local_days_across_dst(env: Env) -> None:
    await _autumn_readings(env)
    path = f"/v1/accounts/{env.account()}/consumption?resolution=day&from=2026-10-24&to=2026-10-27"
    status, _, body = await env.get(path, env.token())
    assert status == 200, body
    assert (body["timezone"], body["currency"], body["resolution"]) == (
        "Europe/Berlin",
        "EUR",
        "day",
    )
    assert body["bands"] == list(BANDS)
    days = body["buckets"]
    assert [d["local_start"] for d in days] == [
        "2026-10-24T00:00:00+02:00",
        "2026-10-25T00:00:00+02:00",
        "2026-10-26T00:00:00+01:00",
    ]
    assert days[1]["start"] == "2026-10-24T22:00:00Z"
    assert days[1]["end"] == "2026-10-25T23:00:00Z"  # a 25-hour day
    # The reading at midnight closes the 24th; the gap interval ending at midnight the 25th.
    assert [d["energy_wh"] for d in days] == [100, 3_080, 300]
    assert [d["readings"] for d in days] == [1, 3, 1]
    assert days[1]["band_wh"] == [1_070, 2_010]
    assert days[1]["band_milli"] == [21_400, 60_300]
    assert (days[1]["energy_milli"], days[1]["energy_minor"]) == (81_700, 82)
    assert (days[1]["standing_days"], days[1]["standing_milli"], days[1]["standing_minor"]) == (
        1,
        40_000,
        40,
    )
    assert (days[1]["total_milli"], days[1]["total_minor"]) == (121_700, 122)
    assert (days[2]["block_milli"], days[2]["energy_milli"]) == (123, 6_123)
    totals = body["totals"]
    assert totals["energy_wh"] == 3_480
    assert totals["total_milli"] == sum(d["total_milli"] for d in days)
    # What the ledger took for these readings: floors of the running total (carry 0 at start).
    assert totals["debited_minor"] == totals["total_milli"] // 1000
    assert sum(d["debited_minor"] for d in days) == totals["debited_minor"]


async def test_hourly_history_has_25_hours_on_the_autumn_day(env: Env) -> None:
    await _autumn_readings(env)
    path = f"/v1/accounts/{env.account()}/consumption?resolution=hour&from=2026-10-25&to=2026-10-26"
    status, _, body = await env.get(path, env.token())
    assert status == 200, body
    hours = body["buckets"]
    assert len(hours) == 25
    labels = [h["local_start"][11:] for h in hours]
    assert labels[:5] == [
        "00:00:00+02:00",
        "01:00:00+02:00",
        "02:00:00+02:00",
        "02:00:00+01:00",
        "03:00:00+01:00",
    ]
    assert [i for i, h in enumerate(hours) if h["readings"]] == [2, 3, 24]
    assert hours[2]["energy_wh"] == 60
    assert hours[3]["energy_wh"] == 20
    assert hours[24]["energy_wh"] == 3_000  # the gap: all in the hour of its end
    # Ranges are widened to whole buckets; to is exclusive.
    path = (
        f"/v1/accounts/{env.account()}/consumption?resolution=hour"
        "&from=2026-10-25T01:15:00%2B02:00&to=2026-10-25T01:00:01Z"
    )
    status, _, body = await env.get(path, env.token())
    assert status == 200, body
    assert [h["local_start"][11:] for h in body["buckets"]] == [
        "01:00:00+02:00",
        "02:00:00+02:00",
        "02:00:00+01:00",
    ]


async def test_monthly_history_and_defaults(env: Env) -> None:
    await _autumn_readings(env)
    await env.bill(
        0, ts("2026-10-26T06:00:00+01:00"), ts("2026-11-26T09:00:00+01:00"), (10, 10), (200, 300)
    )
    path = (
        f"/v1/accounts/{env.account()}/consumption?resolution=month"
        "&from=2026-09-01T00:00:00%2B02:00&to=2026-11-01"
    )
    status, _, body = await env.get(path, env.token())
    assert status == 200, body
    assert [m["local_start"] for m in body["buckets"]] == [
        "2026-09-01T00:00:00+02:00",
        "2026-10-01T00:00:00+02:00",
    ]
    assert [m["energy_wh"] for m in body["buckets"]] == [0, 3_480]
    # Defaults: days of the current local month up to now (NOW is 2026-11-26 10:00 local).
    status, _, body = await env.get(f"/v1/accounts/{env.account()}/consumption", env.token())
    assert status == 200, body
    assert body["resolution"] == "day"
    assert len(body["buckets"]) == 26
    assert body["buckets"][0]["local_start"] == "2026-11-01T00:00:00+01:00"
    assert body["totals"]["energy_wh"] == 20
    assert body["buckets"][25]["energy_wh"] == 20
    status, _, body = await env.get(
        f"/v1/accounts/{env.account()}/consumption?resolution=month", env.token()
    )
    assert status == 200
    assert [m["energy_wh"] for m in body["buckets"]] == [0] * 9 + [3_480, 20]


async def test_bad_queries_are_400_and_name_the_parameter(env: Env) -> None:
    base = f"/v1/accounts/{env.account()}/consumption"
    cases = {
        "?resolution=week": ("resolution", "must be one of hour, day, month"),
        "?from=yesterday": ("from", "RFC 3339"),
        "?from=2026-02-30": ("from", "not a date"),
        "?from=2026-10-01T00:00:00": ("from", "offset is required"),
        "?from=2026-10-01T00:00:00+02:00": ("from", "%2B"),
        "?resolution=hour&from=2026-09-01&to=2026-10-15": ("from", "at most 31 days"),
        "?resolution=day&from=2024-01-01&to=2026-01-01": ("from", "at most 366 days"),
        "?from=2026-10-05&to=2026-10-01": ("to", "must be after from"),
        "?from=1900-01-01&to=1900-02-01": ("from", "must fall in"),
        "?limit=5": ("limit", "unknown query parameter"),
        "?to=2026-10-01&to=2026-10-02": ("to", "more than once"),
    }
    for query, (name, text) in cases.items():
        status, headers, body = await env.get(base + query, env.token())
        assert status == 400, (query, body)
        assert headers["Content-Type"].startswith("application/problem+json")
        assert body["errors"][0]["field"] == name, (query, body)
        assert text in body["errors"][0]["problem"], (query, body)
    message = (await env.get(base + "?resolution=hour&from=2026-09-01&to=2026-10-15", env.token()))[
        2
    ]
    assert "resolution=day" in message["detail"]


async def test_who_may_read_a_history(env: Env, target: Target) -> None:
    await _autumn_readings(env)
    path = f"/v1/accounts/{env.account()}/consumption?from=2026-10-25&to=2026-10-26"
    status, _, body = await env.get(path, env.token(1))
    assert (status, body["type"]) == (404, "urn:voltcredit:problem:not-found")
    assert (await env.get(path, None))[0] == 401
    assert (await env.get("/v1/accounts/abc/consumption", env.token()))[0] == 404
    assert (await env.get("/v1/accounts/999999/consumption", env.token()))[0] == 404
    for role, reseller in (
        (Role.SUPPORT, None),
        (Role.UTILITY_ADMIN, None),
        (Role.RESELLER, env.world.reseller_id),
    ):
        key = await env.key(role, reseller_id=reseller)
        status, _, body = await env.get(path, key)
        assert status == 200, (role, body)
        assert body["totals"]["energy_wh"] == 3_080
    # Staff of another tenant: the account does not exist for them.
    async with env.db.write() as s:
        other_clearing = 9_999_002
        await LedgerRepository(s).create_accounts(
            [
                AccountSpec(
                    id=other_clearing, currency="EUR", code=AccountCode.CLEARING, min_balance=None
                )
            ]
        )
        other = TenantRow(
            name="Other",
            currency="EUR",
            timezone="UTC",
            min_topup_minor=100,
            max_topup_minor=1_000,
            clearing_account_id=other_clearing,
            created_at=NOW,
        )
        s.add(other)
        await s.flush()
        other_id = other.id
    foreign = await env.key(Role.UTILITY_ADMIN, tenant_id=other_id)
    assert (await env.get(path, foreign))[0] == 404


async def test_the_routes_are_in_the_openapi_document(env: Env) -> None:
    status, _, doc = await env.get("/openapi.json", None)
    assert status == 200
    paths = doc["paths"]
    consumption = paths["/v1/accounts/{account_id}/consumption"]["get"]
    assert consumption["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ConsumptionHistory"
    }
    assert "400" in consumption["responses"]
    events = paths["/v1/accounts/{account_id}/events"]["get"]
    assert "text/event-stream" in events["responses"]["200"]["content"]
    statement = paths["/v1/accounts/{account_id}/statements/{month}"]["get"]
    assert {"400", "401", "403", "404"} <= set(statement["responses"])
    assert "CUSTOMER" in statement["description"]


# ------------------------------------------------------------------------------ events


class Stream:
    """A server-sent-events response read event by event."""

    def __init__(self, resp: Any) -> None:
        self.resp = resp

    async def next(self, timeout: float = 3.0) -> tuple[str, Any]:  # noqa: ASYNC109
        """The next event ``(name, data)`` or comment ``(":", text)``."""
        lines: list[str] = []
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.resp.content.readline()
                if not raw:
                    return ("eof", None)
                line = raw.decode().rstrip("\n")
                if line == "":
                    if lines:
                        break
                    continue
                lines.append(line)
        if lines[0].startswith(":"):
            return (":", lines[0][1:].strip())
        fields = dict(line.split(": ", 1) for line in lines)
        if "event" not in fields:
            return ("retry", int(fields["retry"]))
        return (fields["event"], json.loads(fields["data"]))

    async def event(self, timeout: float = 3.0) -> Any:  # noqa: ASYNC109
        """The next event's data, skipping heartbeats."""
        async with asyncio.timeout(timeout):
            while True:
                name, data = await self.next()
                if name not in (":", "retry"):
                    assert name == "credit", (name, data)
                    return data


@contextlib.asynccontextmanager
async def events(env: Env, i: int = 0, auth: str | None = None) -> AsyncIterator[Stream]:
    headers = {"Authorization": f"Bearer {auth or env.token(i)}"}
    async with env.client.get(f"/v1/accounts/{env.account(i)}/events", headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"] == "text/event-stream"
        assert resp.headers["Cache-Control"] == "no-cache"
        assert resp.headers["X-Request-Id"]
        yield Stream(resp)


async def _wait_watchers(env: Env, account: int, n: int) -> None:
    async with asyncio.timeout(3):
        while env.app[LIVE_HUB].subscribers(account) != n:  # noqa: ASYNC110 - no event to wait on
            await asyncio.sleep(0.01)


async def test_events_start_with_the_current_credit_then_follow_changes(env: Env) -> None:
    t0 = ts("2026-11-26T09:59:00+01:00")
    await env.topup(0, 2_000, NOW - timedelta(days=1))
    await env.ingest_state(0, last_ts=t0, credit=1_500_000, power=800)
    async with events(env) as stream:
        assert await stream.next() == ("retry", 500)
        first = await stream.event()
        assert first == {
            "supply_account_id": env.account(),
            "currency": "EUR",
            "ledger_balance_minor": 2_000,
            "ledger_version": first["ledger_version"],
            "meter_id": env.world.customers[0].meter_id,
            "meter_credit_milli": 1_500_000,
            "meter_credit_at": "2026-11-26T08:59:00Z",
            "relay": "CONNECTED",
            "power_w": 800,
            "reading_at": "2026-11-26T08:59:00Z",
        }
        # A reading ingested and billed on this instance: ingest pokes the hub.
        await env.bill(0, t0, t0 + 60, (10, 0), (200_000, 0))
        await env.ingest_state(0, last_ts=t0 + 60, credit=1_300_000, relay="CONNECTED", power=900)
        loop = asyncio.get_running_loop()
        started = loop.time()
        env.app[LIVE_HUB].changed([type("Update", (), {"supply_account_id": env.account()})()])
        second = await stream.event()
        assert loop.time() - started < 0.25  # at once, not at the next poll
        assert (
            second["ledger_balance_minor"],
            second["meter_credit_milli"],
            second["power_w"],
        ) == (1_800, 1_300_000, 900)
        assert second["ledger_version"] > first["ledger_version"]
        # A change made elsewhere (another instance): found by the poll.
        await env.topup(0, 500, NOW)
        third = await stream.event()
        assert third["ledger_balance_minor"] == 2_300
        # Nothing new: heartbeats only; an older snapshot published late is not sent.
        stale = await LiveService(env.db).snapshot(
            Call(scope=env.world.admin, request_id="t", now=NOW), env.account()
        )
        assert to_json(stale) == third
        older = dataclasses.replace(stale, ledger_version=1, ledger_balance_minor=1)
        env.app[LIVE_HUB].publish(env.account(), older)
        for _ in range(3):
            name, text = await stream.next()
            assert (name, text) == (":", "keep-alive")
    await _wait_watchers(env, env.account(), 0)


async def test_an_applied_token_reaches_the_stream_through_the_dispatcher(env: Env) -> None:
    meter = env.world.customers[0].meter_id
    assert meter is not None
    async with env.db.write() as s:
        s.add(
            TokenRow(
                tenant_id=env.world.tenant_id,
                meter_id=meter,
                msg_id=1,
                kind="CREDIT",
                payment_id=None,
                amount_minor=1_000,
                message=b"signed bytes",
                status="SENT",
                attempts=1,
                next_attempt_at=NOW,
                created_at=NOW,
            )
        )

    class NoPublisher:
        def publish(
            self,
            topic: str,  # noqa: ARG002 - the Publisher protocol
            payload: bytes,  # noqa: ARG002
            *,
            retain: bool = False,  # noqa: ARG002
        ) -> asyncio.Future[None]:
            raise AssertionError("not publishing here")

    dispatcher = Dispatcher(env.db, NoPublisher(), clock=env.clock)
    poked: list[int] = []
    dispatcher.credit_listeners += [poked.append, env.app[LIVE_HUB].poke]
    async with events(env) as stream:
        first = await stream.event()
        assert first["meter_credit_milli"] is None
        result = mqtt.TokenResult(
            token_id=1,
            meter=meter,
            status=TokenStatus.ACCEPTED,
            credit_after_milli=7_000_000,
            ts=int(NOW.timestamp()),
        )
        outcome = await dispatcher.handle_result(
            token_result_topic(GATEWAY, meter), mqtt.encode(result)
        )
        assert outcome is ResultOutcome.APPLIED
        assert poked == [env.account()]
        update = await asyncio.wait_for(stream.event(), 0.25)
        assert (update["meter_credit_milli"], update["meter_credit_at"]) == (
            7_000_000,
            "2026-11-26T09:00:00Z",
        )
        # A duplicate result changes nothing and pokes nobody.
        assert await dispatcher.handle_result(
            token_result_topic(GATEWAY, meter), mqtt.encode(result)
        ) is (ResultOutcome.UNCHANGED)
        assert poked == [env.account()]
    async with env.db.read() as s:
        assert (await s.scalars(select(TokenRow.status))).one() == "APPLIED"


async def test_events_refuse_strangers_before_streaming_and_end_at_shutdown(env: Env) -> None:
    status, headers, body = await env.get(f"/v1/accounts/{env.account(0)}/events", env.token(1))
    assert status == 404
    assert headers["Content-Type"].startswith("application/problem+json")
    assert env.app[LIVE_HUB].watched() == []
    status, _, body = await env.get(f"/v1/accounts/{env.account(0)}/events?x=1", env.token(0))
    assert (status, body["errors"][0]["field"]) == (400, "x")
    assert (await env.get(f"/v1/accounts/{env.account(0)}/events", None))[0] == 401
    support = await env.key(Role.SUPPORT)
    async with events(env, 0) as a, events(env, 0, auth=support) as b:
        await a.event()
        await b.event()
        await _wait_watchers(env, env.account(), 2)
        env.app[LIVE_HUB].close()
        for stream in (a, b):
            while (name := (await stream.next())[0]) == ":":
                pass
            assert name == "eof"
