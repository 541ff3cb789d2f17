"""Ingest benchmark: meter readings/s rated and posted to the ledger, SQLite and PostgreSQL.

``python -m tests.bench ingest``. A fleet of ``METERS`` meters on a time-of-use tariff with
a standing charge and three CONSUMPTION rules (grid fee per kWh, VAT in basis points,
utility remainder) reports a reading a minute; gateways batch 500 readings a message.
The first round (each meter's baseline) is ingested untimed; then ``ROUNDS`` rounds are
timed:

* **service**: :meth:`IngestService.ingest` called directly with 20 batches (10 000
  readings) per unit of work — rating, split, ledger postings, intervals, state;
* **end to end from MQTT**: the same batches published QoS 1 by a gateway-like paho
  client to a private Mosquitto and consumed by one backend ingest consumer (router,
  decode, one unit of work per drained queue, PUBACK after commit), from the first
  publish until the last batch is committed;
* **baseline** in the same run: raw ``sqlite3`` ``executemany`` of 1 000-row batches into
  a table as wide as ``consumption_intervals`` (the storage floor), and JSON-decoding +
  validating the same MQTT payloads (the codec floor).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from backend.adapters.db.engine import Database
from backend.adapters.db.migrate import upgrade
from backend.adapters.mqtt import BackendLink, MqttSettings
from backend.service.ingest import IncomingBatch, IngestService
from backend.service.ingest_runtime import (
    IngestConsumer,
    MessageRouter,
    Routes,
    ingest_subscriptions,
)
from firmware_protocol import mqtt, rating
from firmware_protocol.mqtt import Reading, ReadingBatch, Relay
from firmware_protocol.mqtt_topics import readings_topic
from tests.bench.common import Report
from tests.support.ingest import TOU, provision_ingest

METERS = 2_000
ROUNDS = 15
PER_BATCH = 500
START = int(datetime(2026, 10, 24, tzinfo=UTC).timestamp())
PG_DSN = os.environ.get("VOLTCREDIT_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def fleet_batches(meters: list[int]) -> list[list[ReadingBatch]]:
    """Per round, the gateway batches of every meter's reading (registers via rating)."""
    regs = {m: rating.start_registers(TOU, START - 60) for m in meters}
    imports = dict.fromkeys(meters, 0)
    out: list[list[ReadingBatch]] = []
    seq = 0
    for r in range(ROUNDS + 1):
        t = START + 60 * r
        readings = []
        for n, m in enumerate(meters):
            wh = (n % 7) + 3 if r else 0  # 180..540 W average
            if wh:
                regs[m] = rating.advance(TOU, regs[m], t - 30, wh)
                imports[m] += wh
            band = regs[m].band_wh
            end = len(band)
            while end > 1 and band[end - 1] == 0:
                end -= 1
            readings.append(
                Reading(
                    meter=m,
                    ts=t,
                    import_wh=imports[m],
                    band_wh=band[:end],
                    # What a real meter shows: its opening credit less what it charged.
                    credit_milli=50_000_000 - rating.cumulative_charge_milli(TOU, regs[m]),
                    relay=Relay.CLOSED,
                    power_w=wh * 60,
                    voltage_dv=2300,
                    current_ma=1000,
                    tariff_id=TOU.tariff_id,
                    last_token_id=0,
                    status_flags=0,
                    block_period=regs[m].block_period,
                    block_period_wh=regs[m].block_period_wh,
                )
            )
        batches = []
        for i in range(0, len(readings), PER_BATCH):
            seq += 1
            batches.append(
                ReadingBatch(
                    gw="gw-1",
                    seq=seq,
                    historical=False,
                    readings=tuple(readings[i : i + PER_BATCH]),
                )
            )
        out.append(batches)
    return out


def clock() -> datetime:
    return datetime.fromtimestamp(START + 60 * (ROUNDS + 1), UTC)


@contextlib.asynccontextmanager
async def database(kind: str, tmp: Path) -> AsyncIterator[Database]:
    if kind == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp / f'ingest-{uuid.uuid4().hex}.db'}"
        await upgrade(url)
        async with Database(url) as db:
            yield db
        return
    import asyncpg  # type: ignore[import-untyped]  # no stubs; benchmarks only

    schema = f"bench_ingest_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(PG_DSN)
    url = PG_DSN.replace("postgresql://", "postgresql+asyncpg://")
    kwargs: dict[str, Any] = {"connect_args": {"server_settings": {"search_path": schema}}}
    try:
        await admin.execute(f'CREATE SCHEMA "{schema}"')
        await upgrade(url, **kwargs)
        async with Database(url, **kwargs) as db:
            yield db
    finally:
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.close()


async def service_rate(kind: str, tmp: Path) -> tuple[float, int]:
    async with database(kind, tmp) as db:
        world = await provision_ingest(db, meters=METERS, opening_minor=50_000, debt_limit_minor=0)
        rounds = fleet_batches(world.meters)
        service = IngestService(db, clock=clock)
        await service.ingest([IncomingBatch(b, clock()) for b in rounds[0]])
        timed = [b for r in rounds[1:] for b in r]
        per_unit = 20
        start = time.perf_counter()
        transfers = 0
        for i in range(0, len(timed), per_unit):
            report = await service.ingest(
                [IncomingBatch(b, clock()) for b in timed[i : i + per_unit]]
            )
            transfers += report.transfers
        elapsed = time.perf_counter() - start
        return sum(len(b.readings) for b in timed) / elapsed, transfers


def _publish(port: int, payloads: list[tuple[str, bytes]]) -> None:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-gw", protocol=paho.MQTTv311)
    client.max_inflight_messages_set(100)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        infos = [client.publish(t, p, qos=1) for t, p in payloads]
        for info in infos:
            info.wait_for_publish(60)
    finally:
        client.loop_stop()
        client.disconnect()


async def mqtt_rate(kind: str, tmp: Path, port: int) -> float:
    async with database(kind, tmp) as db:
        world = await provision_ingest(db, meters=METERS, opening_minor=50_000, debt_limit_minor=0)
        rounds = fleet_batches(world.meters)
        await IngestService(db, clock=clock).ingest([IncomingBatch(b, clock()) for b in rounds[0]])
        timed = [b for r in rounds[1:] for b in r]
        payloads = [(readings_topic(b.gw), mqtt.encode(b)) for b in timed]
        settings = MqttSettings(port=port, client_id=f"bench-{kind}", reconnect_min_s=0.1)
        async with BackendLink(settings, subscriptions=ingest_subscriptions(shared=True)) as link:
            routes = Routes(results=asyncio.Queue(), readings=asyncio.Queue())
            consumer = IngestConsumer(
                IngestService(db, clock=clock), link, routes.readings, clock=clock
            )
            tasks = [
                asyncio.create_task(MessageRouter(link, routes).run(), name="router"),
                asyncio.create_task(consumer.run(), name="ingest"),
            ]
            await asyncio.wait_for(link.online.wait(), 10)
            start = time.perf_counter()
            publisher = asyncio.create_task(asyncio.to_thread(_publish, port, payloads))
            deadline = time.monotonic() + 300
            while consumer.totals.batches < len(timed):
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"only {consumer.totals.batches} of {len(timed)} batches in 300 s"
                    )
                await asyncio.sleep(0.01)
            elapsed = time.perf_counter() - start
            await publisher
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return sum(len(b.readings) for b in timed) / elapsed


def sqlite_floor(tmp: Path) -> float:
    conn = sqlite3.connect(tmp / "floor.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(
        "CREATE TABLE t (id INTEGER PRIMARY KEY, a INT, b INT, c INT, d INT, e INT, f INT, "
        "g TEXT, h TEXT, i INT, j INT, k INT, l INT, m INT, n TEXT, o INT, p INT, q TEXT)"
    )
    rows = [
        (i, i, 3, i, i + 60, 5, "[1,2,3]", "[10,20,30]", 0, 1, 38, 98, 0, "[[1,2,3]]", 0, 5, "x")
        for i in range(1000)
    ]
    n = 0
    start = time.perf_counter()
    while time.perf_counter() - start < 2:
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO t (a,b,c,d,e,f,g,h,i,j,k,l,m,n,o,p,q) VALUES "
            "(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            rows,
        )
        conn.execute("COMMIT")
        n += len(rows)
    elapsed = time.perf_counter() - start
    conn.close()
    return n / elapsed


def codec_floor() -> float:
    batch = fleet_batches(list(range(1, PER_BATCH + 1)))[1][0]
    payload = mqtt.encode(batch)
    n = 0
    start = time.perf_counter()
    while time.perf_counter() - start < 1:
        mqtt.decode_reading_batch(payload)
        n += PER_BATCH
    return n / (time.perf_counter() - start)


def run() -> Report:
    report = Report("ingest")
    report.notes.append(
        f"{METERS} meters, TOU tariff + standing charge, 3 CONSUMPTION rules, "
        f"{PER_BATCH} readings per MQTT batch, {ROUNDS} timed rounds of one reading per meter"
    )
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        floor = sqlite_floor(tmp)
        report.add("baseline: raw sqlite3 executemany, 17-column rows", floor, "rows/s")
        codec = codec_floor()
        report.add("baseline: decode + validate MQTT readings", codec, "readings/s")
        for kind in ("sqlite", "postgresql"):
            value, transfers = asyncio.run(service_rate(kind, tmp))
            report.add(
                f"{kind}: service, 10k readings per unit of work",
                value,
                "readings/s",
                vs_sqlite_floor=round(value / floor, 3),
                transfers=transfers,
            )
        from tests.support.broker import mosquitto, mosquitto_binary

        if mosquitto_binary() is None:
            report.notes.append("mosquitto not installed: no end-to-end MQTT figure")
            return report
        for kind in ("sqlite", "postgresql"):
            # A broker per run: the first run's persistent session stays a member of the
            # shared-subscription group and would be handed half of the next run's batches.
            workdir = tmp / f"mosquitto-{kind}"
            workdir.mkdir()
            with mosquitto(workdir) as broker:
                value = asyncio.run(mqtt_rate(kind, tmp, broker.port))
                report.add(
                    f"{kind}: end to end from MQTT (Mosquitto, one instance)",
                    value,
                    "readings/s",
                    vs_sqlite_floor=round(value / floor, 3),
                )
    return report
