"""The readings path's shell: the poller (meters → outbox) and the flusher (outbox → broker).

A poll cycle reads every meter concurrently but waits for them only
:data:`CYCLE_BUDGET` of the poll interval: a meter still busy then (timing out, retrying)
is left to finish in the background and lands in a later cycle's batch, and is not read
again while busy. So a dead meter never delays its neighbours' readings, whatever its
timeouts and retries.

Every batch goes through the outbox, live ones too: the poller stores each cycle's
batch (new ``seq``, same transaction) and the flusher publishes the outbox oldest first,
deleting a row only after its PUBACK. So batches reach the broker in ``seq`` order, and
a batch is lost only if the cap policy of :mod:`gateway.store` drops it.

The flusher publishes only while the link is connected **and** the backend's retained
state says online (MQTT.md §3.7). That holds back live batches too while the backend is
away — a deliberate choice over MQTT.md's "live readings are published regardless": a
live batch sent ahead of the held-back ones would arrive out of order, and one sent to a
backend without a session would be lost. A batch is marked ``historical`` when it waited
longer than one poll interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any, Final

from firmware_protocol import mqtt
from firmware_protocol.errors import ProtocolError
from firmware_protocol.mqtt_topics import readings_topic
from gateway.drivers.base import MeterDriver
from gateway.errors import MeterError
from gateway.readings import is_historical, reading_from_snapshot
from gateway.store import AsyncStore, OutboxRow, PollOutcome
from gateway.tokens import Publisher

log = logging.getLogger(__name__)

#: How often DONE tokens older than the retention are deleted.
PRUNE_EVERY_S: Final = 86_400.0
#: Share of the poll interval a cycle waits for its meters before storing the batch.
CYCLE_BUDGET: Final = 0.8


class Poller:
    """Polls every meter once per interval (or on demand) and stores the cycle."""

    def __init__(
        self,
        *,
        gw: str,
        store: AsyncStore,
        drivers: Mapping[int, MeterDriver],
        interval_s: float,
        cap_bytes: int,
        retention_s: int,
        now: Callable[[], int],
        on_cycle: Callable[[list[int], dict[int, bool]], Awaitable[None]],
    ) -> None:
        self._gw = gw
        self._store = store
        self._drivers = drivers
        self.interval_s = interval_s
        self._cap = cap_bytes
        self._retention_s = retention_s
        self._now = now
        self._on_cycle = on_cycle
        self._lock = asyncio.Lock()
        self._poll_now = asyncio.Event()
        #: event-loop time of the last completed cycle (or of the start): the watchdog's pulse
        self.last_progress = 0.0
        #: wall seconds the last cycle took (reads, then storing the batch)
        self.last_cycle_s = 0.0
        self.cycles = 0
        self._last_prune = float("-inf")
        #: reads in progress, at most one per meter; kept across cycles while a meter is slow
        self._reads: dict[int, asyncio.Task[PollOutcome]] = {}

    def poll_now(self) -> None:
        """Start the next full cycle at once."""
        self._poll_now.set()

    async def run(self) -> None:
        """Poll on a fixed schedule (missed slots are skipped, never bunched)."""
        loop = asyncio.get_running_loop()
        self.last_progress = loop.time()
        next_at = loop.time()
        try:
            while True:
                self._poll_now.clear()
                await self.cycle()
                next_at += self.interval_s
                if next_at <= loop.time():
                    next_at = loop.time() + self.interval_s
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._poll_now.wait(), max(0.0, next_at - loop.time()))
        finally:
            for task in self._reads.values():
                task.cancel()

    async def cycle(self, meters: Collection[int] | None = None) -> list[int]:
        """Read ``meters`` (default: all), store what answered in time; the new seqs.

        Outcomes of slow reads started by earlier cycles are stored with this one.
        """
        async with self._lock:
            started = asyncio.get_running_loop().time()
            for m in sorted(self._drivers if meters is None else meters):
                if m not in self._reads:
                    self._reads[m] = asyncio.create_task(self._read(m), name=f"poll-{m}")
            if self._reads:
                await asyncio.wait(self._reads.values(), timeout=self.interval_s * CYCLE_BUDGET)
            outcomes = sorted(
                (t.result() for t in self._reads.values() if t.done()), key=lambda o: o.meter
            )
            for o in outcomes:
                del self._reads[o.meter]
            s = self._store.store
            seqs = await self._store.run(
                s.record_poll, self._gw, outcomes, now=self._now(), cap_bytes=self._cap
            )
            loop = asyncio.get_running_loop()
            self.last_progress = loop.time()
            self.last_cycle_s = loop.time() - started
            self.cycles += 1
            if loop.time() - self._last_prune >= PRUNE_EVERY_S:
                self._last_prune = loop.time()
                pruned = await self._store.run(
                    s.prune_tokens, before=self._now() - self._retention_s
                )
                if pruned:
                    log.info("pruned %d completed token(s)", pruned)
        await self._on_cycle(seqs, {o.meter: o.reading is not None for o in outcomes})
        return seqs

    async def _read(self, meter: int) -> PollOutcome:
        try:
            snap = await self._drivers[meter].read_snapshot()
            return PollOutcome(meter=meter, reading=reading_from_snapshot(snap))
        except MeterError as exc:
            return PollOutcome(meter=meter, reading=None, error=str(exc))
        except ProtocolError as exc:  # registers outside what a Reading may carry
            log.warning("meter %d: reading not publishable: %s", meter, exc)
            return PollOutcome(meter=meter, reading=None, error=f"reading not publishable: {exc}")


class Flusher:
    """Publishes the outbox oldest first while the gate is open, ``window`` batches in flight."""

    def __init__(
        self,
        *,
        gw: str,
        store: AsyncStore,
        publisher: Publisher,
        window: int,
        interval_s: float,
        gate: Callable[[], bool],
        now: Callable[[], float],
    ) -> None:
        self._topic = readings_topic(gw)
        self._store = store
        self._publisher = publisher
        self._window = window
        self._interval_s = interval_s
        self._gate = gate
        self._now = now
        self._wake = asyncio.Event()
        self._inflight: dict[int, asyncio.Future[None]] = {}
        self._last_handed = -1
        self._draining = False
        self.delivered = 0

    def wake(self) -> None:
        """Something changed: a new batch, or the gate opened."""
        self._wake.set()

    def drain(self) -> None:
        """Stop handing out batches; :meth:`run` returns once those in flight are acknowledged
        and deleted (so a clean stop leaves no delivered batch behind to be sent twice)."""
        self._draining = True
        self._wake.set()

    async def run(self) -> None:
        """Fill the window from the outbox while the gate is open; delete on PUBACK.

        Runs until cancelled, or after :meth:`drain` until nothing is in flight.
        """
        while not (self._draining and not self._inflight):
            self._wake.clear()
            room = self._window - len(self._inflight)
            if self._gate() and room > 0 and not self._draining:
                rows = await self._store.run(
                    self._store.store.pending_batches, after_seq=self._last_handed, limit=room
                )
                for row in rows:
                    self._inflight[row.seq] = self._publisher.publish(
                        self._topic, self._payload(row)
                    )
                    self._last_handed = row.seq
                if rows:
                    continue  # there may be room for more
            await self._wait()
            done = [seq for seq, fut in self._inflight.items() if fut.done()]
            if done:
                for seq in done:
                    self._inflight.pop(seq).result()  # a LinkError here means we are stopping
                await self._store.run(self._store.store.delete_batches, done)
                self.delivered += len(done)

    async def _wait(self) -> None:
        waker = asyncio.ensure_future(self._wake.wait())
        waiting: set[asyncio.Future[Any]] = {waker, *self._inflight.values()}
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waker.cancel()

    def _payload(self, row: OutboxRow) -> bytes:
        if not is_historical(row.created, self._now(), self._interval_s):
            return row.payload
        batch = mqtt.decode_reading_batch(row.payload)
        return mqtt.encode(dataclasses.replace(batch, historical=True))

    @property
    def in_flight(self) -> int:
        """Batches handed to the link and not yet acknowledged."""
        return len(self._inflight)
