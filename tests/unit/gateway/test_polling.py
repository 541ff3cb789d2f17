"""Poller and flusher with scripted meters and link: batches, budget, order, window, gate, drain."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from firmware_protocol import mqtt
from gateway.polling import Flusher, Poller
from gateway.store import AsyncStore, Store
from tests.support.gateway import wait_until
from tests.unit.gateway.fakes import FakeDriver, FakePublisher

NOW = 1_790_000_000


@pytest.fixture
async def astore(tmp_path: Path) -> AsyncIterator[AsyncStore]:
    astore = AsyncStore(Store.open(tmp_path / "gw.sqlite", now=NOW))
    yield astore
    await astore.aclose()


def poller(
    astore: AsyncStore, drivers: dict[int, FakeDriver], interval: float = 0.2
) -> tuple[Poller, list[tuple[list[int], dict[int, bool]]]]:
    seen: list[tuple[list[int], dict[int, bool]]] = []

    async def on_cycle(seqs: list[int], answered: dict[int, bool]) -> None:
        seen.append((seqs, answered))

    p = Poller(
        gw="gw-1",
        store=astore,
        drivers=drivers,
        interval_s=interval,
        cap_bytes=10**6,
        retention_s=86_400,
        now=lambda: NOW,
        on_cycle=on_cycle,
    )
    return p, seen


def batches(astore: AsyncStore) -> list[mqtt.ReadingBatch]:
    return [
        mqtt.decode_reading_batch(r.payload)
        for r in astore.store.pending_batches(after_seq=-1, limit=100)
    ]


async def test_a_cycle_stores_one_batch_of_every_answering_meter(astore: AsyncStore) -> None:
    drivers = {1: FakeDriver(1), 2: FakeDriver(2, up=False), 3: FakeDriver(3)}
    p, seen = poller(astore, drivers)
    (seq,) = await p.cycle()
    assert seen == [([seq], {1: True, 2: False, 3: True})]
    (batch,) = batches(astore)
    assert [r.meter for r in batch.readings] == [1, 3]
    assert astore.store.meter_rows()[2].last_error == "meter 2: no answer"
    assert p.cycles == 1


async def test_a_slow_meter_does_not_hold_up_the_batch(astore: AsyncStore) -> None:
    drivers = {1: FakeDriver(1), 2: FakeDriver(2, read_delay=0.5)}
    p, _ = poller(astore, drivers, interval=0.2)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await p.cycle()
    assert loop.time() - start < 0.3  # waited the budget (0.16 s), not the slow meter
    assert [r.meter for r in batches(astore)[0].readings] == [1]
    await asyncio.sleep(0.5)
    await p.cycle()  # the slow read finished meanwhile: it lands in this batch, not read twice
    assert [r.meter for r in batches(astore)[1].readings] == [1, 2]


async def test_run_polls_on_schedule_and_on_demand(astore: AsyncStore) -> None:
    p, seen = poller(astore, {1: FakeDriver(1)}, interval=10.0)
    task = asyncio.create_task(p.run())
    try:
        await wait_until(lambda: p.cycles >= 1)
        p.poll_now()
        await wait_until(lambda: p.cycles >= 2)
    finally:
        task.cancel()
    assert len(seen) == 2


def flusher(
    astore: AsyncStore, pub: FakePublisher, *, gate: list[bool], now: float = NOW, window: int = 2
) -> Flusher:
    return Flusher(
        gw="gw-1",
        store=astore,
        publisher=pub,
        window=window,
        interval_s=60,
        gate=lambda: gate[0],
        now=lambda: now,
    )


async def fill(astore: AsyncStore, n: int, created: int = NOW) -> list[int]:
    p, _ = poller(astore, {1: FakeDriver(1)})
    seqs = []
    for _ in range(n):
        seqs += await astore.run(
            astore.store.record_poll, "gw-1", [await p._read(1)], now=created, cap_bytes=10**6
        )
    return seqs


async def test_flusher_sends_oldest_first_within_the_window_and_deletes_after_puback(
    astore: AsyncStore,
) -> None:
    seqs = await fill(astore, 5)
    pub, gate = FakePublisher(), [True]
    pub.hold = True
    f = flusher(astore, pub, gate=gate)
    task = asyncio.create_task(f.run())
    try:
        await asyncio.sleep(0.05)
        assert [mqtt.decode_reading_batch(p).seq for _, p, _ in pub.sent] == seqs[:2]  # window of 2
        assert astore.store.outbox_size()[0] == 5  # nothing deleted before the PUBACK
        pub.hold = False
        pub.release()
        await wait_until(lambda: astore.store.outbox_size()[0] == 0)
    finally:
        task.cancel()
    assert [mqtt.decode_reading_batch(p).seq for _, p, _ in pub.sent] == seqs
    assert f.delivered == 5


async def test_flusher_holds_while_the_gate_is_closed(astore: AsyncStore) -> None:
    await fill(astore, 2)
    pub, gate = FakePublisher(), [False]
    f = flusher(astore, pub, gate=gate)
    task = asyncio.create_task(f.run())
    try:
        await asyncio.sleep(0.05)
        assert pub.sent == []
        gate[0] = True
        f.wake()
        await wait_until(lambda: astore.store.outbox_size()[0] == 0)
    finally:
        task.cancel()
    assert len(pub.sent) == 2


async def test_batches_that_waited_are_marked_historical(astore: AsyncStore) -> None:
    old = await fill(astore, 1, created=NOW - 3600)
    new = await fill(astore, 1, created=NOW)
    pub = FakePublisher()
    f = flusher(astore, pub, gate=[True])
    task = asyncio.create_task(f.run())
    try:
        await wait_until(lambda: astore.store.outbox_size()[0] == 0)
    finally:
        task.cancel()
    sent = {b.seq: b.historical for b in (mqtt.decode_reading_batch(p) for _, p, _ in pub.sent)}
    assert sent == {old[0]: True, new[0]: False}


async def test_drain_waits_for_in_flight_acks_then_returns(astore: AsyncStore) -> None:
    await fill(astore, 3)
    pub = FakePublisher()
    pub.hold = True
    f = flusher(astore, pub, gate=[True], window=2)
    task = asyncio.create_task(f.run())
    await asyncio.sleep(0.05)
    f.drain()
    await asyncio.sleep(0.05)
    assert not task.done()
    pub.release()
    await asyncio.wait_for(task, 1)
    assert len(pub.sent) == 2
    assert astore.store.outbox_size()[0] == 1
