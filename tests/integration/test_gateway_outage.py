"""Readings survive outages: broker down and back, backend offline and back; seq order kept.

The backend side de-duplicates on ``seq`` (QoS 1 and outbox replays may deliver a batch
twice) and must end up with every batch the gateway made — no gap, first arrivals in
``seq`` order, each batch with every meter's reading — and the held-back ones marked
historical.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.store import Store
from meter_sim.fleet import TcpLayout, serve
from tests.support.gateway import (
    Backend,
    gateway_toml,
    open_broker,
    running_backend,
    running_gateway,
    tcp_meter,
    wait_until,
    wall_meter,
    write_config,
)

pytestmark = pytest.mark.integration

METERS = (4_300_000_001, 4_300_000_002, 4_300_000_003)
POLL_S = 0.25


def check_complete(backend: Backend, first: int, still_held: list[int], next_seq: int) -> None:
    """Delivered (first arrivals, in order) + still in the outbox = every seq ever made."""
    seqs = backend.distinct_seqs()
    assert seqs == sorted(seqs), f"out of order: {seqs}"
    assert seqs + still_held == list(range(first, next_seq)), f"gap: {seqs} + {still_held}"
    by_seq = {b.seq: b for b in backend.batches}
    for seq in seqs:
        assert sorted(r.meter for r in by_seq[seq].readings) == list(METERS), seq


async def test_broker_outage_and_backend_offline_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    devices = [wall_meter(m, unit_id=i + 1, watts=2000) for i, m in enumerate(METERS)]
    async with (
        open_broker(tmp_path / "broker") as broker,
        serve(devices, TcpLayout(port=0)) as fleet,
        running_backend(broker.port) as backend,
    ):
        text = gateway_toml(
            broker_port=broker.port,
            store=tmp_path / "gw.sqlite",
            meters=[tcp_meter(m, fleet.ports[0], i + 1) for i, m in enumerate(METERS)],
            poll_interval_s=POLL_S,
        )
        async with running_gateway(write_config(tmp_path / "gw.toml", text)) as gw:
            await wait_until(lambda: len(backend.distinct_seqs()) >= 3, what="live batches")
            first = backend.distinct_seqs()[0]

            # 1. The broker goes away for a while; the gateway keeps polling into its outbox.
            await broker.stop()
            await asyncio.sleep(2.0)
            store = Store.open_readonly(gw.config.store.path)
            try:
                held, _ = store.outbox_size()
            finally:
                store.close()
            assert held >= 4, f"only {held} batches held during the outage"
            await broker.start()
            target = await wait_until(lambda: gw.poller.cycles + 3, what="cycles")
            await wait_until(
                lambda: len(backend.distinct_seqs()) >= target - 1, timeout=20, what="catch-up"
            )
            assert any(b.historical for b in backend.batches), "held-back batches not historical"

            # 2. The backend says it is offline: the gateway holds everything back again.
            backend.set_online(False)
            await wait_until(lambda: not gw.backend_online, what="gateway sees backend offline")
            await asyncio.sleep(0.3)  # batches in flight when the state changed may still land
            count = len(backend.distinct_seqs())
            await asyncio.sleep(1.5)
            assert len(backend.distinct_seqs()) == count, "published while the backend was offline"
            backend.set_online(True)
            await wait_until(lambda: len(backend.distinct_seqs()) >= count + 5, what="flush")

        # After a clean stop, every batch the gateway made has arrived once, in order — but
        # for the last few, which wait in the outbox for the next start.
        await asyncio.sleep(0.3)  # let PUBACKed batches reach the test backend
        store = Store.open_readonly(tmp_path / "gw.sqlite")
        try:
            held = [row.seq for row in store.pending_batches(after_seq=-1, limit=10_000)]
            next_seq = store.next_seq()
        finally:
            store.close()
        assert len(held) <= 1, held  # at most one cycle stored after the flusher drained
        check_complete(backend, first, held, next_seq)
        # Cumulative registers never go backwards across the outage, per meter.
        for meter in METERS:
            series = [
                r.import_wh
                for b in sorted({b.seq: b for b in backend.batches}.values(), key=lambda b: b.seq)
                for r in b.readings
                if r.meter == meter
            ]
            assert series == sorted(series)
