"""Scheduled alert checks, webhook notifications and their API, on SQLite and PostgreSQL.

The checks read what ingest writes (``meter_ingest``, ``consumption_intervals``) and what
the gateway-state consumer writes (``gateways.online/state_at``); the tests write those
rows directly. Webhooks go to a real local aiohttp server that verifies the signature.
The app's own background loops are stopped where a test drives the checks and the
deliverer itself with a settable clock, so every step is deterministic.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from sqlalchemy import func, select, update

from backend.adapters.db.alert_tables import AlertRow
from backend.adapters.db.engine import Database
from backend.adapters.db.ingest_tables import ConsumptionIntervalRow, MeterIngestRow
from backend.adapters.db.notify_tables import (
    GatewayAlertStateRow,
    MeterAlertStateRow,
    NotificationRow,
    NotifyCursorRow,
    WebhookEndpointRow,
)
from backend.adapters.db.tables import GatewayRow, SupplyAccountRow
from backend.api.routes.alerts import ALERTING
from backend.domain.alerting import DAY_S
from backend.payments.webhooks import verify_signature
from backend.service.alerting import (
    AlertingRuntime,
    AlertingService,
    AlertingSettings,
    estimate_days_left,
)
from backend.service.notify import (
    ATTEMPT_HEADER,
    EVENT_ID_HEADER,
    DeliverySettings,
    NotificationDeliverer,
)
from tests.support.api import (
    ADMIN_KEY,
    T0,
    Api,
    Tenant,
    World,
    api_client,
    build_world,
    snapshot,
)
from tests.support.db import BACKENDS, Target, target_factory

pytestmark = pytest.mark.integration

NOW_S = int(T0.timestamp())
SIGNATURE = "Voltcredit-Signature"


@pytest.fixture(params=BACKENDS)
def target_of(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    return target_factory(request.param, tmp_path, request, prefix="alerts")


@pytest.fixture
async def target(target_of: Any) -> AsyncIterator[Target]:
    async with target_of() as t:
        yield t


@pytest.fixture
async def api(target: Target) -> AsyncIterator[Api]:
    async with api_client(target) as client:
        yield client


@pytest.fixture
async def world(api: Api) -> World:
    return await build_world(api)


async def stop_loops(api: Api) -> AlertingRuntime:
    """The app's alerting runtime with its background tasks stopped (the test drives it)."""
    app = api.client.app
    assert app is not None
    runtime: AlertingRuntime = app[ALERTING]
    for task in runtime.tasks:
        task.cancel()
    await asyncio.gather(*runtime.tasks, return_exceptions=True)
    return runtime


# ------------------------------------------------------------------ rows ingest would write


async def set_threshold(db: Database, account_id: int, minor: int) -> None:
    async with db.write() as s:
        await s.execute(
            update(SupplyAccountRow)
            .where(SupplyAccountRow.id == account_id)
            .values(low_credit_minor=minor)
        )


@dataclass(frozen=True)
class Spot:
    """A metered supply account: its meter, tenant and account ids."""

    meter_id: int
    tenant_id: int
    account_id: int


def spot(tenant: Tenant, customer: str) -> Spot:
    return Spot(tenant.meters[customer], tenant.id, tenant.accounts[customer])


async def put_reading(
    db: Database,
    where: Spot,
    *,
    last_ts: int,
    credit_milli: int | None,
    relay: str = "CONNECTED",
) -> None:
    """Upsert the meter's ``meter_ingest`` row as ingest would after a reading."""
    async with db.write() as s:
        row = await s.get(MeterIngestRow, where.meter_id)
        if row is None:
            row = MeterIngestRow(
                meter_id=where.meter_id,
                tenant_id=where.tenant_id,
                supply_account_id=where.account_id,
                state={},
                rule_set="none",
                totals={},
                carry={},
                pending={},
            )
            s.add(row)
        row.last_ts = last_ts
        row.last_credit_milli = credit_milli
        row.last_relay = relay
        row.updated_at = T0


async def put_usage(
    db: Database,
    where: Spot,
    *,
    hours: int,
    milli_per_hour: int,
    end_ts: int = NOW_S,
) -> None:
    """Hourly billed intervals ending at ``end_ts``."""
    async with db.write() as s:
        for h in range(hours):
            s.add(
                ConsumptionIntervalRow(
                    tenant_id=where.tenant_id,
                    supply_account_id=where.account_id,
                    meter_id=where.meter_id,
                    tariff_id=1,
                    from_ts=end_ts - (h + 1) * 3600,
                    to_ts=end_ts - h * 3600,
                    import_wh=1000,
                    band_wh=[1000],
                    band_milli=[milli_per_hour],
                    block_milli=0,
                    days=0,
                    standing_milli=0,
                    total_milli=milli_per_hour,
                    unrated_block_wh=0,
                    shares=[],
                    payer_minor=milli_per_hour // 1000,
                    carry_milli=0,
                    created_at=T0,
                )
            )


async def set_gateway(db: Database, gateway_id: str, *, online: bool, state_at: datetime) -> None:
    async with db.write() as s:
        await s.execute(
            update(GatewayRow)
            .where(GatewayRow.id == gateway_id)
            .values(online=online, state_at=state_at)
        )


async def all_alerts(db: Database) -> list[AlertRow]:
    async with db.read() as s:
        return list((await s.scalars(select(AlertRow).order_by(AlertRow.id))).all())


async def all_notifications(db: Database) -> list[NotificationRow]:
    async with db.read() as s:
        stmt = select(NotificationRow).order_by(NotificationRow.id)
        return list((await s.scalars(stmt)).all())


def kinds_of(alerts: list[AlertRow]) -> list[tuple[str, int | None]]:
    return [(a.kind, a.meter_id) for a in alerts]


def at(seconds: int) -> datetime:
    return T0 + timedelta(seconds=seconds)


# ------------------------------------------------------------------ checks


async def test_credit_alerts_once_per_crossing_with_days_left(api: Api, world: World) -> None:
    checks = (await stop_loops(api)).checks
    db, a, b = api.database, world.a, world.b
    c1 = spot(a, "c1")
    other = spot(b, "c1")
    await set_threshold(db, a.accounts["c1"], 500)  # 5.00: 500_000 milli
    await set_threshold(db, b.accounts["c1"], 500)
    await put_usage(db, c1, hours=48, milli_per_hour=10_000)  # 240_000 milli a day
    await put_reading(db, c1, last_ts=NOW_S - 60, credit_milli=900_000)
    await put_reading(db, other, last_ts=NOW_S - 60, credit_milli=600_000)

    report = await checks.run_checks(T0)
    assert report.raised == ()
    assert report.meters == 2
    async with db.read() as s:  # nothing to remember while all is well
        assert await s.scalar(select(func.count()).select_from(MeterAlertStateRow)) == 0

    await put_reading(db, c1, last_ts=NOW_S, credit_milli=480_000)
    report = await checks.run_checks(at(60))
    assert [(r.kind.value, r.subject) for r in report.raised] == [
        ("LOW_CREDIT", f"meter:{a.meters['c1']}")
    ]
    (low,) = await all_alerts(db)
    assert (low.tenant_id, low.kind, low.meter_id) == (a.id, "LOW_CREDIT", a.meters["c1"])
    assert low.detail["days_left"] == 2.0  # 480_000 / 240_000 a day
    assert low.detail["daily_milli"] == 240_000
    assert low.detail["credit_milli"] == 480_000
    assert low.detail["low_credit_milli"] == 500_000
    assert low.detail["supply_account_id"] == a.accounts["c1"]

    # Still low, lower, checked again and again: no second alert.
    for n, credit in enumerate((470_000, 200_000, 1)):
        await put_reading(db, c1, last_ts=NOW_S + n, credit_milli=credit)
        assert (await checks.run_checks(at(120 + n))).raised == ()
    await put_reading(db, c1, last_ts=NOW_S + 10, credit_milli=0)
    assert [r.kind.value for r in (await checks.run_checks(at(200))).raised] == ["OUT_OF_CREDIT"]
    assert (await checks.run_checks(at(260))).raised == ()
    # A top-up re-arms both; the next fall alerts again.
    await put_reading(db, c1, last_ts=NOW_S + 20, credit_milli=2_000_000)
    assert (await checks.run_checks(at(300))).raised == ()
    await put_reading(db, c1, last_ts=NOW_S + 30, credit_milli=499_999)
    assert [r.kind.value for r in (await checks.run_checks(at(360))).raised] == ["LOW_CREDIT"]
    # Tenant B's meter fell too: its alert is tenant B's.
    await put_reading(db, other, last_ts=NOW_S + 30, credit_milli=-10)
    (out,) = (await checks.run_checks(at(420))).raised
    assert (out.kind.value, out.tenant_id) == ("OUT_OF_CREDIT", b.id)
    alerts = await all_alerts(db)
    assert kinds_of(alerts) == [
        ("LOW_CREDIT", a.meters["c1"]),
        ("OUT_OF_CREDIT", a.meters["c1"]),
        ("LOW_CREDIT", a.meters["c1"]),
        ("OUT_OF_CREDIT", b.meters["c1"]),
    ]
    assert alerts[3].tenant_id == b.id
    assert alerts[2].created_at == at(360)


async def test_stale_meters_and_offline_gateways_alert_once_per_episode(
    api: Api, world: World
) -> None:
    checks = (await stop_loops(api)).checks
    db, a = api.database, world.a
    c1 = spot(a, "c1")
    c2 = spot(a, "c2")
    await put_reading(db, c1, last_ts=NOW_S - 900, credit_milli=None)  # exactly 15 min
    await put_reading(db, c2, last_ts=NOW_S - 60, credit_milli=None)
    await set_gateway(db, a.gateway, online=True, state_at=at(-86_400))
    await set_gateway(db, world.b.gateway, online=False, state_at=at(-60))  # just restarting
    assert (await checks.run_checks(T0)).raised == ()

    # One second later c1 is stale; the gateway still hears c2.
    raised = (await checks.run_checks(at(1))).raised
    assert [(r.kind.value, r.subject) for r in raised] == [
        ("METER_STALE", f"meter:{a.meters['c1']}")
    ]
    assert (await checks.run_checks(at(120))).raised == ()
    # c1 reports again (re-armed), then goes quiet again: a second episode.
    await put_reading(db, c1, last_ts=NOW_S + 130, credit_milli=None)
    assert (await checks.run_checks(at(140))).raised == ()
    raised = (await checks.run_checks(at(130 + 901))).raised
    subjects = sorted((r.kind.value, r.subject) for r in raised)
    # By then c2 is stale too, gateway A silent (nothing since c1's reading at +130
    # is more than 900 s), and gateway B has been offline for over 15 minutes.
    assert subjects == sorted(
        [
            ("METER_STALE", f"meter:{a.meters['c1']}"),
            ("METER_STALE", f"meter:{a.meters['c2']}"),
            ("GATEWAY_OFFLINE", f"gateway:{a.gateway}"),
            ("GATEWAY_OFFLINE", f"gateway:{world.b.gateway}"),
        ]
    )
    assert (await checks.run_checks(at(3000))).raised == ()
    gateway_alerts = [x for x in await all_alerts(db) if x.kind == "GATEWAY_OFFLINE"]
    assert {(x.tenant_id, x.detail["gateway_id"]) for x in gateway_alerts} == {
        (a.id, a.gateway),
        (world.b.id, world.b.gateway),
    }
    # Gateway B reconnects (re-armed) and drops again: a new episode, after the threshold.
    await set_gateway(db, world.b.gateway, online=True, state_at=at(3100))
    assert (await checks.run_checks(at(3110))).raised == ()
    async with db.read() as s:
        state = await s.get(GatewayAlertStateRow, world.b.gateway)
        assert state is not None
        assert state.offline is False
    await set_gateway(db, world.b.gateway, online=False, state_at=at(3200))
    assert (await checks.run_checks(at(3300))).raised == ()
    (again,) = (await checks.run_checks(at(3200 + 900))).raised
    assert again.subject == f"gateway:{world.b.gateway}"


async def test_two_instances_checking_at_once_raise_each_alert_once(
    api: Api, world: World, target: Target
) -> None:
    await stop_loops(api)
    db, a = api.database, world.a
    for c in ("c1", "c2", "c0"):
        await set_threshold(db, a.accounts[c], 100)
        await put_reading(
            db,
            spot(a, c),
            last_ts=NOW_S - 5000,
            credit_milli=50_000,
        )
    async with target.database() as db2:
        first = AlertingService(db, AlertingSettings(page=1))
        second = AlertingService(db2, AlertingSettings(page=2))
        reports = await asyncio.gather(*(c.run_checks(at(10)) for c in (first, second, first)))
    # 3 meters x (LOW_CREDIT, METER_STALE), and their gateway silent for as long.
    assert sum(len(r.raised) for r in reports) == 7
    expected = [(k, a.meters[c]) for c in ("c1", "c2", "c0") for k in ("LOW_CREDIT", "METER_STALE")]
    assert sorted(kinds_of(await all_alerts(db)), key=str) == sorted(
        [*expected, ("GATEWAY_OFFLINE", None)], key=str
    )


async def test_days_left_for_the_customer_view(api: Api, world: World) -> None:
    await stop_loops(api)
    db, a = api.database, world.a
    c0 = spot(a, "c0")
    async with db.read() as s:
        nothing = await estimate_days_left(s, a.accounts["c0"], T0)
    assert (nothing.credit_milli, nothing.daily_milli, nothing.days_left) == (None, None, None)
    # Ten days of history; only the last seven count (and the older days were heavier).
    await put_usage(db, c0, hours=72, milli_per_hour=90_000, end_ts=NOW_S - 7 * DAY_S)
    await put_usage(db, c0, hours=7 * 24, milli_per_hour=25_000)
    await put_reading(db, c0, last_ts=NOW_S, credit_milli=1_500_000)
    async with db.read() as s:
        estimate = await estimate_days_left(s, a.accounts["c0"], T0)
    assert (estimate.credit_milli, estimate.daily_milli, estimate.days_left) == (
        1_500_000,
        600_000,
        2.5,
    )


# ------------------------------------------------------------------ webhook receiver


@dataclass
class Receiver:
    """A local webhook endpoint: answers ``script`` statuses in turn, then 200; records all."""

    secret: str = ""
    script: list[int] = field(default_factory=list)
    now: Callable[[], datetime] = lambda: T0
    hang: asyncio.Event | None = None
    got: list[tuple[dict[str, str], bytes, int]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        # The signature covers the exact bytes with the endpoint's secret, and is fresh.
        verify_signature(
            request.headers.get(SIGNATURE), raw, secrets=[self.secret.encode()], now=self.now()
        )
        status = self.script.pop(0) if self.script else 200
        self.got.append((dict(request.headers), raw, status))
        self.arrived.set()
        if self.hang is not None:
            await self.hang.wait()
        return web.Response(status=status)


@contextlib.asynccontextmanager
async def serve(receiver: Receiver) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    server = TestServer(app)
    await server.start_server()
    try:
        yield str(server.make_url("/hook"))
    finally:
        await server.close()


def upper(lo: float, hi: float) -> float:
    return hi


@contextlib.asynccontextmanager
async def deliverer_on(
    db: Database, clock: Callable[[], datetime], **settings: Any
) -> AsyncIterator[NotificationDeliverer]:
    async with aiohttp.ClientSession() as http:
        yield NotificationDeliverer(
            db,
            http,
            settings=DeliverySettings(**{"retry_base_s": 10.0, "retry_cap_s": 60.0, **settings}),
            clock=clock,
            uniform=upper,
        )


async def low_credit(api: Api, world: World, checks: AlertingService, when: datetime) -> None:
    """Make tenant A's c1 fall below its threshold and run the checks at ``when``."""
    a = world.a
    await set_threshold(api.database, a.accounts["c1"], 500)
    await put_reading(
        api.database,
        spot(a, "c1"),
        last_ts=int(when.timestamp()),
        credit_milli=100_000,
    )
    await checks.run_checks(when)


async def test_webhook_signed_retried_and_delivered_exactly_once(
    api: Api, world: World, target: Target
) -> None:
    checks = (await stop_loops(api)).checks
    receiver = Receiver(script=[500, 503], now=api.clock)
    async with serve(receiver) as url:
        created = await api.ok(
            "POST",
            "/v1/webhook-endpoints",
            world.a.admin,
            {"url": url, "kinds": ["LOW_CREDIT", "OUT_OF_CREDIT"], "description": "ops"},
        )
        receiver.secret = created["secret"]
        assert created["secret"].startswith("whsec_")
        # Another endpoint of A that wants other kinds, and one of B that wants LOW_CREDIT:
        # neither hears of A's low credit.
        await api.ok(
            "POST", "/v1/webhook-endpoints", world.a.admin, {"url": url, "kinds": ["METER_STALE"]}
        )
        await api.ok(
            "POST", "/v1/webhook-endpoints", world.b.admin, {"url": url, "kinds": ["LOW_CREDIT"]}
        )
        api.clock.advance(60)
        await low_credit(api, world, checks, api.clock())
        (alert,) = await all_alerts(api.database)

        async with deliverer_on(api.database, api.clock) as deliverer:
            assert await deliverer.fan_out() == 1
            assert await deliverer.fan_out() == 0  # de-duplicated
            api.clock.advance(1)
            assert (await checks.run_checks(api.clock())).raised == ()  # a check run again
            assert await deliverer.fan_out() == 0
            assert await deliverer.deliver_once() == 1  # attempt 1: 500
            assert await deliverer.deliver_once() == 0  # not due before its back-off
            (row,) = await all_notifications(api.database)
            assert (row.status, row.attempts, row.last_status) == ("PENDING", 1, 500)
            assert row.next_attempt_at == api.clock() + timedelta(seconds=10)
            assert row.endpoint_id == created["id"]
        # The process restarts: the outbox is in the database, the next one carries on.
        async with target.database() as db2, deliverer_on(db2, api.clock) as deliverer:
            api.clock.advance(10)
            assert await deliverer.deliver_once() == 1  # attempt 2: 503
            api.clock.advance(19)
            assert await deliverer.deliver_once() == 0
            api.clock.advance(1)
            assert await deliverer.deliver_once() == 1  # attempt 3: 200
            api.clock.advance(3600)
            assert await deliverer.deliver_once() == 0
            # A fresh process fans out again, after the cursor's grace: nothing new.
            assert await deliverer.fan_out() == 0
    (row,) = await all_notifications(api.database)
    assert (row.status, row.attempts, row.last_status, row.last_error) == (
        "DELIVERED",
        3,
        200,
        None,
    )
    assert row.delivered_at == api.clock() - timedelta(seconds=3600)
    assert [status for _, _, status in receiver.got] == [500, 503, 200]
    headers = [h for h, _, _ in receiver.got]
    bodies = {raw for _, raw, _ in receiver.got}
    assert len(bodies) == 1  # the same bytes every time; only the signature is re-made
    assert {h[EVENT_ID_HEADER] for h in headers} == {str(row.event_id)}
    assert [h[ATTEMPT_HEADER] for h in headers] == ["1", "2", "3"]
    assert len({h[SIGNATURE] for h in headers}) == 3  # fresh timestamps
    assert all(h["Content-Type"] == "application/json" for h in headers)
    body = json.loads(bodies.pop())
    assert body["id"] == str(row.event_id)
    assert body["type"] == "alert.raised"
    assert body["tenant_id"] == world.a.id
    assert body["alert"]["id"] == alert.id
    assert body["alert"]["kind"] == "LOW_CREDIT"
    assert body["alert"]["meter_id"] == world.a.meters["c1"]
    assert body["alert"]["detail"]["credit_milli"] == 100_000


async def test_webhook_gives_up_after_the_last_attempt(
    api: Api, world: World, caplog: pytest.LogCaptureFixture
) -> None:
    checks = (await stop_loops(api)).checks
    receiver = Receiver(script=[500] * 10, now=api.clock)
    async with serve(receiver) as url:
        created = await api.ok(
            "POST", "/v1/webhook-endpoints", world.a.admin, {"url": url, "kinds": ["LOW_CREDIT"]}
        )
        receiver.secret = created["secret"]
        await low_credit(api, world, checks, api.clock())
        async with deliverer_on(api.database, api.clock, max_attempts=3) as deliverer:
            await deliverer.fan_out()
            caplog.set_level(logging.INFO, logger="backend.service.notify")
            for _ in range(3):
                assert await deliverer.deliver_once() == 1
                api.clock.advance(60)
            assert await deliverer.deliver_once() == 0
    (row,) = await all_notifications(api.database)
    assert (row.status, row.attempts, row.last_error) == ("FAILED", 3, "HTTP 500")
    assert len(receiver.got) == 3
    assert any(
        r.levelno == logging.ERROR and "giving up after 3 attempts" in r.getMessage()
        for r in caplog.records
    )


async def test_unreachable_endpoint_and_a_crash_mid_attempt_are_retried(
    api: Api, world: World
) -> None:
    checks = (await stop_loops(api)).checks
    hang = asyncio.Event()
    receiver = Receiver(now=api.clock, hang=hang)
    async with serve(receiver) as url:
        created = await api.ok(
            "POST", "/v1/webhook-endpoints", world.a.admin, {"url": url, "kinds": ["LOW_CREDIT"]}
        )
        receiver.secret = created["secret"]
        await low_credit(api, world, checks, api.clock())
        async with deliverer_on(api.database, api.clock, attempt_timeout_s=30.0) as deliverer:
            await deliverer.fan_out()
            # The process dies while the endpoint is still answering attempt 1.
            attempt = asyncio.ensure_future(deliverer.deliver_once())
            await asyncio.wait_for(receiver.arrived.wait(), 10)
            attempt.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await attempt
            hang.set()
        (row,) = await all_notifications(api.database)
        assert (row.status, row.attempts) == ("PENDING", 1)
        async with deliverer_on(api.database, api.clock) as deliverer:
            assert await deliverer.deliver_once() == 0  # the lease holds
            api.clock.advance(30 + 60)
            assert await deliverer.deliver_once() == 1  # taken again after it ran out
    (row,) = await all_notifications(api.database)
    assert (row.status, row.attempts) == ("DELIVERED", 2)
    assert [h[ATTEMPT_HEADER] for h, _, _ in receiver.got] == ["1", "2"]
    # A refused connection is a failed attempt like any other.
    async with serve(Receiver()) as gone:
        pass
    await api.ok(
        "POST", "/v1/webhook-endpoints", world.a.admin, {"url": gone, "kinds": ["OUT_OF_CREDIT"]}
    )
    api.clock.advance(1)
    await put_reading(
        api.database,
        spot(world.a, "c1"),
        last_ts=int(api.clock().timestamp()),
        credit_milli=0,
    )
    await checks.run_checks(api.clock())
    async with deliverer_on(api.database, api.clock) as deliverer:
        assert await deliverer.fan_out() == 1
        assert await deliverer.deliver_once() == 1
    last = (await all_notifications(api.database))[-1]
    assert (last.status, last.attempts, last.last_status) == ("PENDING", 1, None)
    assert last.last_error is not None
    assert "Connect" in last.last_error


async def test_deleting_an_endpoint_cancels_what_it_has_not_received(
    api: Api, world: World
) -> None:
    checks = (await stop_loops(api)).checks
    receiver = Receiver(script=[500] * 5, now=api.clock)
    async with serve(receiver) as url:
        created = await api.ok(
            "POST", "/v1/webhook-endpoints", world.a.admin, {"url": url, "kinds": ["LOW_CREDIT"]}
        )
        receiver.secret = created["secret"]
        await low_credit(api, world, checks, api.clock())
        async with deliverer_on(api.database, api.clock) as deliverer:
            await deliverer.fan_out()
            assert await deliverer.deliver_once() == 1
            path = f"/v1/webhook-endpoints/{created['id']}"
            deleted = await api.ok("DELETE", path, world.a.admin)
            assert deleted["deleted_at"] is not None
            again = await api.ok("DELETE", path, world.a.admin)
            assert again["deleted_at"] == deleted["deleted_at"]
            api.clock.advance(3600)
            assert await deliverer.deliver_once() == 0
    (row,) = await all_notifications(api.database)
    assert row.status == "CANCELLED"
    assert len(receiver.got) == 1


async def add_alerts(db: Database, tenant_id: int, created_at: datetime, n: int) -> None:
    async with db.write() as s:
        for _ in range(n):
            s.add(
                AlertRow(tenant_id=tenant_id, kind="LOW_CREDIT", detail={}, created_at=created_at)
            )


async def cursor_at(db: Database) -> int:
    async with db.read() as s:
        return int(await s.scalar(select(NotifyCursorRow.alert_id)) or 0)


async def test_fan_out_works_off_backlogs_and_new_endpoints_hear_only_new_alerts(
    api: Api, world: World
) -> None:
    await stop_loops(api)
    db, a, b = api.database, world.a, world.b
    first = await api.ok(
        "POST",
        "/v1/webhook-endpoints",
        a.admin,
        {"url": "http://127.0.0.1:9/x", "kinds": ["LOW_CREDIT", "METER_STALE"]},
    )
    await add_alerts(db, a.id, at(-10), 1)  # before the endpoint existed
    await add_alerts(db, a.id, at(10), 7)
    await add_alerts(db, b.id, at(10), 3)  # tenant B listens to nothing
    api.clock.advance(20)
    async with deliverer_on(db, api.clock, fanout_batch=2) as deliverer:
        assert await deliverer.fan_out() == 7  # several batches in one pass
        assert await cursor_at(db) == 0  # every alert is still young: the cursor waits
        assert await deliverer.fan_out() == 0
        api.clock.advance(400)
        assert await deliverer.fan_out() == 0
        assert await cursor_at(db) == 11  # all old now: past every alert, B's too
        second = await api.ok(
            "POST",
            "/v1/webhook-endpoints",
            a.admin,
            {"url": "http://127.0.0.1:9/y", "kinds": ["LOW_CREDIT"]},
        )
        api.clock.advance(1)
        assert await deliverer.fan_out() == 0  # the past is not replayed to it
        await add_alerts(db, a.id, api.clock(), 1)
        assert await deliverer.fan_out() == 2  # one each
    rows = await all_notifications(db)
    assert [n.endpoint_id for n in rows] == [first["id"]] * 8 + [second["id"]]
    assert len({n.alert_id for n in rows}) == 8
    assert len({n.event_id for n in rows}) == 9


async def test_the_apps_own_loops_check_and_deliver(target: Target) -> None:
    receiver = Receiver()
    async with serve(receiver) as url, api_client(target, alert_check_every_s=1) as api:
        receiver.now = api.clock
        world = await build_world(api)
        created = await api.ok(
            "POST",
            "/v1/webhook-endpoints",
            world.a.admin,
            {"url": url, "kinds": ["OUT_OF_CREDIT"]},
        )
        receiver.secret = created["secret"]
        await put_reading(
            api.database,
            spot(world.a, "c2"),
            last_ts=NOW_S,
            credit_milli=-1,
        )
        await asyncio.wait_for(receiver.arrived.wait(), 15)
        await wait_for(lambda: delivered(api.database), 10)
    ((_, raw, status),) = receiver.got
    assert status == 200
    assert b'"kind":"OUT_OF_CREDIT"' in raw


async def delivered(db: Database) -> bool:
    return [n.status for n in await all_notifications(db)] == ["DELIVERED"]


async def wait_for(check: Callable[[], Awaitable[bool]], timeout_s: float) -> None:
    for _ in range(int(timeout_s / 0.05)):
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s")


# ------------------------------------------------------------------ API


async def count_rows(db: Database) -> tuple[int, ...]:
    models = (WebhookEndpointRow, NotificationRow, AlertRow)
    async with db.read() as s:
        counts = [await s.scalar(select(func.count()).select_from(m)) for m in models]
    return tuple(int(c or 0) for c in counts)


async def test_webhook_endpoint_api_roles_tenants_and_bad_input(api: Api, world: World) -> None:
    await stop_loops(api)
    a, b = world.a, world.b
    body = {"url": "https://ops.example.org/hook", "kinds": ["LOW_CREDIT"]}
    mine = await api.ok("POST", "/v1/webhook-endpoints", a.admin, body)
    assert mine["tenant_id"] == a.id
    assert mine["kinds"] == ["LOW_CREDIT"]
    assert (mine["description"], mine["deleted_at"]) == ("", None)
    theirs = await api.ok("POST", "/v1/webhook-endpoints", ADMIN_KEY, {**body, "tenant_id": b.id})
    assert theirs["tenant_id"] == b.id
    # The secret is shown once: never in a read.
    shown = await api.ok("GET", f"/v1/webhook-endpoints/{mine['id']}", a.admin)
    assert "secret" not in shown
    assert shown == {k: v for k, v in mine.items() if k != "secret"}
    listed = await api.ok("GET", "/v1/webhook-endpoints", a.admin)
    assert [e["id"] for e in listed["items"]] == [mine["id"]]
    assert all("secret" not in e for e in listed["items"])
    platform = await api.ok("GET", "/v1/webhook-endpoints", ADMIN_KEY)
    assert [e["id"] for e in platform["items"]] == [mine["id"], theirs["id"]]
    # Another tenant's endpoint is not found, whether read or deleted.
    for method in ("GET", "DELETE"):
        reply = await api.call(method, f"/v1/webhook-endpoints/{theirs['id']}", a.admin)
        assert reply.status == 404, reply.body
        assert reply.content_type == "application/problem+json"
    # Support, resellers and customers may not touch endpoints (they hold secrets).
    for who in (a.support, a.reseller_keys["r1"], a.tokens["c1"]):
        for method, path, payload in (
            ("GET", "/v1/webhook-endpoints", None),
            ("POST", "/v1/webhook-endpoints", body),
            ("DELETE", f"/v1/webhook-endpoints/{mine['id']}", None),
        ):
            reply = await api.call(method, path, who, payload)
            assert reply.status == 403, (method, path, reply.body)
    before = await count_rows(api.database)
    snap = await snapshot(api)
    bad = [
        ({**body, "url": "ftp://ops.example.org/hook"}, "url"),
        ({**body, "url": "https://user:pw@ops.example.org/hook"}, "url"),
        ({**body, "url": "https:///no-host"}, "url"),
        ({**body, "url": "https://ops.example.org/a b"}, "url"),
        ({**body, "url": "https://ops.example.org:99999/"}, "url"),
        ({**body, "url": "https://ops.example.org/#frag"}, "url"),
        ({**body, "url": "not a url"}, "url"),
        ({**body, "kinds": []}, "kinds"),
        ({**body, "kinds": ["LOW_CREDIT", "LOW_CREDIT"]}, "kinds"),
        ({**body, "kinds": ["NOPE"]}, "kinds[0]"),
        ({**body, "kinds": "LOW_CREDIT"}, "kinds"),
        ({**body, "description": "x" * 201}, "description"),
    ]
    for payload, problem_field in bad:
        reply = await api.call("POST", "/v1/webhook-endpoints", a.admin, payload)
        assert reply.status == 422, (payload, reply.body)
        assert problem_field in {e["field"] for e in reply.body["errors"]}, reply.body
    reply = await api.call("POST", "/v1/webhook-endpoints", ADMIN_KEY, body)
    assert reply.status == 422  # the platform must say which tenant
    assert reply.body["errors"][0]["field"] == "tenant_id"
    reply = await api.call("POST", "/v1/webhook-endpoints", a.admin, {**body, "tenant_id": b.id})
    assert reply.status == 404  # a utility admin cannot name another tenant
    reply = await api.call("POST", "/v1/webhook-endpoints", ADMIN_KEY, {**body, "tenant_id": 999})
    assert reply.status == 404
    for path in ("abc", "0", "-1", "99999999999999999999"):
        reply = await api.call("GET", f"/v1/webhook-endpoints/{path}", a.admin)
        assert reply.status == 404, path
    assert await count_rows(api.database) == before
    assert await snapshot(api) == snap
    # At most 16 endpoints per tenant; deleting one frees its place.
    for _ in range(15):
        await api.ok("POST", "/v1/webhook-endpoints", a.admin, body)
    reply = await api.call("POST", "/v1/webhook-endpoints", a.admin, body)
    assert reply.status == 409, reply.body
    await api.ok("DELETE", f"/v1/webhook-endpoints/{mine['id']}", a.admin)
    await api.ok("POST", "/v1/webhook-endpoints", a.admin, body)
    listed = await api.ok("GET", "/v1/webhook-endpoints?limit=10", a.admin)
    assert len(listed["items"]) == 10
    assert listed["next_after"] == listed["items"][-1]["id"]
    assert mine["id"] not in {e["id"] for e in listed["items"]}
    deleted = await api.ok("GET", f"/v1/webhook-endpoints/{mine['id']}", a.admin)
    assert deleted["deleted_at"] is not None


async def test_alert_api_lists_filters_resolves_within_the_tenant(api: Api, world: World) -> None:
    checks = (await stop_loops(api)).checks
    a, b = world.a, world.b
    for t in (a, b):
        await set_gateway(api.database, t.gateway, online=True, state_at=T0)
        await set_threshold(api.database, t.accounts["c1"], 500)
        await put_reading(
            api.database,
            spot(t, "c1"),
            last_ts=NOW_S - 5000,
            credit_milli=100_000,
        )
    await checks.run_checks(T0)  # LOW_CREDIT and METER_STALE for each tenant's c1
    listed = await api.ok("GET", "/v1/alerts", a.support)  # support may read
    assert {(x["kind"], x["meter_id"]) for x in listed["items"]} == {
        ("LOW_CREDIT", a.meters["c1"]),
        ("METER_STALE", a.meters["c1"]),
    }
    assert {x["tenant_id"] for x in listed["items"]} == {a.id}
    low = next(x for x in listed["items"] if x["kind"] == "LOW_CREDIT")
    assert low["resolved_at"] is None
    assert low["detail"]["low_credit_milli"] == 500_000
    only = await api.ok("GET", "/v1/alerts?kind=METER_STALE&open=true", a.admin)
    assert [x["kind"] for x in only["items"]] == ["METER_STALE"]
    page = await api.ok("GET", "/v1/alerts?limit=1", a.admin)
    assert len(page["items"]) == 1
    rest = await api.ok("GET", f"/v1/alerts?after={page['next_after']}", a.admin)
    assert [x["id"] for x in page["items"] + rest["items"]] == [x["id"] for x in listed["items"]]
    # Resolve: support may not; the admin may, once (again is harmless); B's is not found.
    path = f"/v1/alerts/{low['id']}/resolve"
    assert (await api.call("POST", path, a.support)).status == 403
    api.clock.advance(30)
    resolved = await api.ok("POST", path, a.admin)
    assert resolved["resolved_at"] is not None
    api.clock.advance(30)
    assert (await api.ok("POST", path, a.admin))["resolved_at"] == resolved["resolved_at"]
    assert (await api.ok("GET", "/v1/alerts?open=false", a.admin))["items"] == [resolved]
    assert [x["kind"] for x in (await api.ok("GET", "/v1/alerts?open=true", a.admin))["items"]] == [
        "METER_STALE"
    ]
    b_alerts = (await api.ok("GET", "/v1/alerts", b.admin))["items"]
    assert {x["tenant_id"] for x in b_alerts} == {b.id}
    reply = await api.call("POST", f"/v1/alerts/{b_alerts[0]['id']}/resolve", a.admin)
    assert reply.status == 404
    assert (await api.ok("GET", "/v1/alerts?open=true", b.admin))["items"] == b_alerts
    # Customers, resellers and the platform do not read a utility's alerts.
    for who in (a.tokens["c1"], a.reseller_keys["r1"], ADMIN_KEY):
        assert (await api.call("GET", "/v1/alerts", who)).status == 403
        assert (await api.call("POST", path, who)).status == 403
    before = await count_rows(api.database)
    for query in (
        "kind=NOPE",
        "kind=low_credit",
        "open=maybe",
        "open=1",
        "kind=LOW_CREDIT&kind=METER_STALE",
        "open=true&open=false",
        "limit=0",
        "after=x",
        "surprise=1",
    ):
        reply = await api.call("GET", f"/v1/alerts?{query}", a.admin)
        assert reply.status == 400, (query, reply.body)
        assert reply.body["type"] == "urn:voltcredit:problem:malformed-request"
    for bad in ("abc", "0", "99999999999999999999"):
        assert (await api.call("POST", f"/v1/alerts/{bad}/resolve", a.admin)).status == 404
    assert await count_rows(api.database) == before
