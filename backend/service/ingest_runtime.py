"""Feeds MQTT messages to consumption ingest: readings batches and gateway presence.

:class:`MessageRouter` reads the backend link's single message queue and hands each
message to the consumer of its topic (token results to the dispatcher, readings and
gateway states to :class:`IngestConsumer`). Unknown topics are acknowledged and logged.

:class:`IngestConsumer` takes every readings message waiting (up to ``max_messages``) into
one :meth:`~backend.service.ingest.IngestService.ingest` unit of work and acknowledges
them only after the commit (DESIGN §5: at-least-once delivery, idempotent consumer):

* a **malformed** payload (the gateway's fault) is logged, acknowledged and dropped —
  redelivery would not fix it, and cumulative registers make the next batch carry its
  energy anyway;
* a **database** failure (ours, usually passing) keeps the messages and retries the same
  unit of work after a capped, jittered back-off; nothing is acknowledged meanwhile, so a
  crash makes the broker redeliver them;
* a failure that is neither (a bug) is logged with the batch keys, and the messages are
  acknowledged so one poison batch cannot stop ingest for every meter; the energy is
  billed by the meter's next reading.

Readings come through ``$share/ingest/vc/v1/gw/+/readings`` when the broker has shared
subscriptions (Mosquitto, EMQX), so several backend instances split them; plainly on the
embedded amqtt broker (NOTES.md).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from backend.adapters.mqtt import BackendLink, Incoming
from backend.errors import StorageError
from backend.service.ingest import IncomingBatch, IngestReport, IngestService, LiveUpdate
from firmware_protocol.errors import ProtocolError
from firmware_protocol.mqtt import GatewayState, ReadingBatch, decode_payload
from firmware_protocol.mqtt_topics import (
    GATEWAY_STATE_FILTER,
    READINGS_FILTER,
    READINGS_SHARED_FILTER,
    GatewayStateTopic,
    ReadingsTopic,
    TokenResultTopic,
    parse_topic,
)

log = logging.getLogger(__name__)

#: Most readings messages in one unit of work (a gateway batch holds up to 500 readings).
DEFAULT_MAX_MESSAGES: Final = 40


def ingest_subscriptions(*, shared: bool) -> list[str]:
    """The filters ingest needs: readings (shared when the broker can) and gateway states."""
    return [READINGS_SHARED_FILTER if shared else READINGS_FILTER, GATEWAY_STATE_FILTER]


@dataclass(frozen=True, slots=True)
class Routes:
    """Where the router puts each kind of message."""

    results: asyncio.Queue[Incoming]
    readings: asyncio.Queue[Incoming]


class MessageRouter:
    """Splits the link's messages by topic (one task: ``await router.run()``)."""

    def __init__(self, link: BackendLink, routes: Routes) -> None:
        self._link = link
        self._routes = routes

    async def run(self) -> None:
        while True:
            message = await self._link.messages.get()
            try:
                topic = parse_topic(message.topic)
            except ProtocolError as exc:
                log.warning("message on an unexpected topic %r: %s", message.topic, exc)
                self._link.ack(message)
                continue
            match topic:
                case TokenResultTopic():
                    self._routes.results.put_nowait(message)
                case ReadingsTopic() | GatewayStateTopic():
                    self._routes.readings.put_nowait(message)
                case _:
                    log.warning("message on topic %s is not for the backend", message.topic)
                    self._link.ack(message)


class IngestConsumer:
    """Readings and gateway states from a queue into :class:`IngestService`."""

    def __init__(
        self,
        service: IngestService,
        link: BackendLink,
        queue: asyncio.Queue[Incoming],
        *,
        clock: Callable[[], datetime],
        on_live: Callable[[Sequence[LiveUpdate]], None] | None = None,
        max_messages: int = DEFAULT_MAX_MESSAGES,
        linger_s: float = 0.02,
        retry_min_s: float = 0.2,
        retry_max_s: float = 10.0,
    ) -> None:
        self._service = service
        self._link = link
        self._queue = queue
        self._clock = clock
        self._on_live = on_live
        self._max = max_messages
        self._linger_s = linger_s
        self._retry = (retry_min_s, retry_max_s)
        #: Totals since start (for logs and benchmarks).
        self.totals = IngestReport()

    async def run(self) -> None:
        while True:
            first = await self._queue.get()
            messages = [first]
            # Messages trickle in one by one from the network thread: give the queue a
            # moment to fill so a unit of work carries many batches (fewer, larger
            # commits), but never wait longer than ``linger_s`` after the first.
            deadline = asyncio.get_running_loop().time() + self._linger_s
            while len(messages) < self._max:
                if self._queue.empty():
                    remaining = deadline - asyncio.get_running_loop().time()
                    if remaining <= 0:
                        break
                    try:
                        async with asyncio.timeout(remaining):
                            messages.append(await self._queue.get())
                    except TimeoutError:
                        break
                    continue
                messages.append(self._queue.get_nowait())
            await self._handle(messages)

    async def _handle(self, messages: list[Incoming]) -> None:
        now = self._clock()
        batches: list[IncomingBatch] = []
        carriers: list[Incoming] = []
        for message in messages:
            try:
                topic = parse_topic(message.topic)
                decoded = decode_payload(topic, message.payload)
            except ProtocolError as exc:
                log.warning("malformed message on %s dropped: %s", message.topic, exc)
                self._link.ack(message)
                continue
            if isinstance(decoded, GatewayState) and isinstance(topic, GatewayStateTopic):
                await self._gateway_state(message, decoded, topic.gw)
            elif isinstance(decoded, ReadingBatch):
                batches.append(IncomingBatch(decoded, now))
                carriers.append(message)
            else:  # pragma: no cover - the router sends only these two topics here
                self._link.ack(message)
        if not batches:
            return
        report = await self._ingest(batches)
        for message in carriers:
            self._link.ack(message)
        if report is not None:
            self._count(report)
            if self._on_live is not None and report.live:
                self._on_live(report.live)

    async def _ingest(self, batches: list[IncomingBatch]) -> IngestReport | None:
        delay = self._retry[0]
        while True:
            try:
                return await self._service.ingest(batches)
            except StorageError:
                log.exception(
                    "ingest of %d batch(es) failed; retrying in %.1f s", len(batches), delay
                )
            except Exception:
                keys = [(b.batch.gw, b.batch.seq) for b in batches]
                log.exception("ingest failed on batches %s; dropped (a bug: report it)", keys)
                return None
            await asyncio.sleep(random.uniform(delay / 2, delay))  # noqa: S311 - jitter, not crypto
            delay = min(delay * 2, self._retry[1])

    async def _gateway_state(self, message: Incoming, state: GatewayState, gw: str) -> None:
        delay = self._retry[0]
        while True:
            try:
                await self._service.gateway_state(state, gw)
            except StorageError:
                log.exception("gateway state of %s not stored; retrying in %.1f s", gw, delay)
                await asyncio.sleep(random.uniform(delay / 2, delay))  # noqa: S311 - jitter
                delay = min(delay * 2, self._retry[1])
                continue
            self._link.ack(message)
            return

    def _count(self, report: IngestReport) -> None:
        t = self.totals
        t.batches += report.batches
        t.duplicate_batches += report.duplicate_batches
        t.readings += report.readings
        t.billed += report.billed
        t.first += report.first
        t.duplicates += report.duplicates
        t.historical += report.historical
        t.quarantined += report.quarantined
        t.unknown += report.unknown
        t.transfers += report.transfers
        t.alerts += report.alerts
