"""Ingest through the broker: two backend instances on a shared subscription, and amqtt.

Batches are published by a paho client standing in for a gateway (QoS 1, like
``gateway/mqtt_link.py``); the backends consume ``$share/ingest/vc/v1/gw/+/readings``
on a private Mosquitto. Every batch must reach the ledger exactly once, whichever
instance took it, and the ledger must equal a direct, in-process ingest of the same
batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import func, select

from backend.adapters.db.engine import Database
from backend.adapters.db.ingest_tables import ReadingBatchRow
from backend.adapters.db.ledger_repo import LedgerRepository
from backend.adapters.db.tables import GatewayRow
from backend.adapters.mqtt import BackendLink, MqttSettings
from backend.service.ingest import IncomingBatch, IngestService
from backend.service.ingest_runtime import (
    IngestConsumer,
    MessageRouter,
    Routes,
    ingest_subscriptions,
)
from firmware_protocol import mqtt
from firmware_protocol.mqtt_topics import gateway_state_topic, readings_topic
from tests.support.broker import free_port
from tests.support.db import BACKENDS
from tests.support.ingest import SimMeters, batches, provision_ingest
from tests.support.topups import Target, fresh_target

pytestmark = pytest.mark.integration

START = int(datetime(2026, 10, 24, tzinfo=UTC).timestamp())


@pytest.fixture(params=BACKENDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def _target(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    dsn = request.getfixturevalue("postgres_dsn") if kind == "postgresql" else None
    return fresh_target(kind, tmp_path, dsn)


@pytest.fixture
async def target(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Target]:
    async with await _target(kind, request, tmp_path) as t:
        yield t


@pytest.fixture
async def reference(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Target]:
    async with await _target(kind, request, tmp_path) as t:
        yield t


def late_clock() -> datetime:
    # Readings are from October 2026; the backend receives them "now" (later): fine.
    return datetime.now(UTC)


@contextlib.asynccontextmanager
async def instance(
    db: Database, port: int, *, client_id: str, shared: bool
) -> AsyncIterator[IngestConsumer]:
    """One backend's ingest: a link with the ingest subscriptions, router and consumer."""
    settings = MqttSettings(port=port, client_id=client_id, reconnect_min_s=0.1)
    async with BackendLink(settings, subscriptions=ingest_subscriptions(shared=shared)) as link:
        routes = Routes(results=asyncio.Queue(), readings=asyncio.Queue())
        consumer = IngestConsumer(
            IngestService(db, clock=late_clock),
            link,
            routes.readings,
            clock=late_clock,
            max_messages=5,
        )
        tasks = [
            asyncio.create_task(MessageRouter(link, routes).run(), name=f"router-{client_id}"),
            asyncio.create_task(consumer.run(), name=f"ingest-{client_id}"),
        ]
        try:
            await asyncio.wait_for(link.online.wait(), 10)
            yield consumer
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def publish_all(port: int, payloads: list[tuple[str, bytes, bool]]) -> None:
    """A gateway-like paho client publishing QoS 1 messages, waiting for every PUBACK."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="gw-1", protocol=paho.MQTTv311)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        infos = [client.publish(t, p, qos=1, retain=r) for t, p, r in payloads]
        for info in infos:
            info.wait_for_publish(10)
    finally:
        client.loop_stop()
        client.disconnect()


async def wait_batches(db: Database, n: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        async with db.read() as s:
            got = await s.scalar(select(func.count()).select_from(ReadingBatchRow))
        if got == n:
            return
        assert got is not None
        assert got < n, f"{got} batches stored, expected {n}"
        assert time.monotonic() < deadline, f"only {got} of {n} batches ingested"
        await asyncio.sleep(0.1)


async def make_world(db: Database) -> list[mqtt.ReadingBatch]:
    world = await provision_ingest(db, meters=4, opening_minor=5_000)
    sim = SimMeters(world.meters, START, 5_000_000)
    rounds = [[sim.reading(m) for m in world.meters], *sim.run(START + 2 * 86_400, 1_800)]
    return batches(rounds)


async def test_two_instances_on_a_shared_subscription_ingest_every_batch_once(
    target: Target, reference: Target, mosquitto_factory: Any
) -> None:
    broker = mosquitto_factory()
    async with target.database() as db:
        items = await make_world(db)
        payloads = [(readings_topic(b.gw), mqtt.encode(b), False) for b in items]
        # Redeliveries and a retained presence message too.
        payloads += payloads[5:9]
        state = mqtt.GatewayState(online=True, boot_seq=3, ts=START, fw="test-1.0", meters=())
        payloads.append((gateway_state_topic("gw-1"), mqtt.encode(state), True))
        # Each instance with its own engine and pool, as two processes would have.
        async with (
            target.database() as db_a,
            target.database() as db_b,
            instance(db_a, broker.port, client_id="backend-a", shared=True) as a,
            instance(db_b, broker.port, client_id="backend-b", shared=True) as b,
        ):
            # The first batch must be the first billed (it is each meter's baseline).
            await asyncio.to_thread(publish_all, broker.port, payloads[:1])
            await wait_batches(db, 1)
            await asyncio.to_thread(publish_all, broker.port, payloads[1:])
            await wait_batches(db, len(items))
            deadline = time.monotonic() + 10
            while a.totals.duplicate_batches + b.totals.duplicate_batches < 4:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
        # Both instances took a share; together they ingested each batch once.
        assert a.totals.batches > 0
        assert b.totals.batches > 0
        assert a.totals.batches + b.totals.batches == len(items)
        async with db.read() as s:
            via_broker = await LedgerRepository(s).balances()
            assert await LedgerRepository(s).sum_of_balances() == 0
            gw = await s.get(GatewayRow, "gw-1")
            assert gw is not None
            assert (gw.online, gw.boot_seq) == (True, 3)
    async with reference.database() as db:
        items2 = await make_world(db)
        assert items2 == items
        await IngestService(db, clock=late_clock).ingest(
            [IncomingBatch(b, late_clock()) for b in items2]
        )
        async with db.read() as s:
            assert await LedgerRepository(s).balances() == via_broker


async def test_plain_subscription_on_the_embedded_broker(target: Target) -> None:
    from amqtt.broker import Broker

    port = free_port()
    broker = Broker(
        {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
    )
    await broker.start()
    try:
        async with target.database() as db:
            items = (await make_world(db))[:10]
            payloads = [(readings_topic(b.gw), mqtt.encode(b), False) for b in items]
            payloads.append((readings_topic("gw-1"), b'{"not": "a batch"}', False))
            async with instance(db, port, client_id="backend-solo", shared=False) as solo:
                await asyncio.to_thread(publish_all, port, payloads)
                await wait_batches(db, len(items))
            assert solo.totals.batches == len(items)
            assert solo.totals.billed == (len(items) - 1) * 4
    finally:
        await broker.shutdown()
