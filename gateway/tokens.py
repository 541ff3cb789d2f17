"""The token path's shell: intake of deliveries, and the worker that writes, reads back and reports.

The decisions are :mod:`gateway.token_flow`'s; this module stores, talks to meters and
publishes, in the order DESIGN §6 step 4 asks: verify → store → (PUBACK, by the caller)
→ write to the meter → read status and credit → store the result → publish it → done.
Every step is persisted before the next begins, so a restart resumes from the store
(:data:`~gateway.token_flow.RESUME`). Deliveries to different meters proceed
concurrently; those to one meter in arrival order.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable, Mapping
from typing import Final, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from firmware_protocol import mqtt
from firmware_protocol.mqtt import TokenDelivery, TokenResult
from firmware_protocol.mqtt_topics import token_result_topic
from firmware_protocol.status import TokenStatus
from gateway.config import CrashPoint
from gateway.drivers.base import MeterDriver
from gateway.errors import MeterError, TokenFlowError
from gateway.store import AsyncStore, TokenRow
from gateway.token_flow import (
    RESUME,
    Action,
    Intake,
    IntakeKind,
    Known,
    TokenEvent,
    decide_intake,
    next_state,
    window_after,
)

log = logging.getLogger(__name__)

#: Exit status of the test-only crash hook: what a SIGKILL'd process reports (128 + 9).
CRASH_EXIT: Final = 137


class Publisher(Protocol):
    """What the desks need of the MQTT link: a QoS 1 publish whose future resolves on PUBACK."""

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> asyncio.Future[None]:
        """Hand a message over for delivery."""
        ...


def _forget(fut: asyncio.Future[None]) -> None:
    # A publish nobody waits for (a re-sent result): retrieve its outcome so a failure at
    # shutdown is not reported as "exception never retrieved".
    fut.add_done_callback(lambda f: f.cancelled() or f.exception())


class TokenDesk:
    """Receives deliveries and drives each stored one to DONE."""

    def __init__(
        self,
        *,
        gw: str,
        store: AsyncStore,
        drivers: Mapping[int, MeterDriver],
        publisher: Publisher,
        trusted: Mapping[int, Ed25519PublicKey],
        now: Callable[[], int],
        retry_s: float,
        crash_at: CrashPoint | None = None,
    ) -> None:
        self._gw = gw
        self._store = store
        self._drivers = drivers
        self._publisher = publisher
        self._trusted = trusted
        self._now = now
        self._retry_s = retry_s
        self._crash_at = crash_at
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Look at open deliveries now (a new one, or a meter came back)."""
        self._wake.set()

    # ------------------------------------------------------------------ intake

    async def receive(self, delivery: TokenDelivery) -> Intake:
        """Decide on a delivery and store it; when this returns the caller may PUBACK it."""
        s = self._store.store
        row = await self._store.run(s.find_token, delivery.meter, delivery.msg)
        known = None
        if row is not None:
            known = Known(
                state=row.state, status=row.status, credit_after_milli=row.credit_after_milli
            )
        served = delivery.meter in self._drivers
        window = await self._store.run(s.replay_window, delivery.meter)
        intake = decide_intake(
            delivery,
            meter_served=served,
            known=known,
            trusted=self._trusted,
            window=window,
            now=self._now(),
        )
        log.info(
            "token %d for meter %d: %s%s",
            intake.token_id,
            delivery.meter,
            intake.kind.value,
            f" ({intake.status.name.lower()}: {intake.reason})"
            if intake.status is not None
            else "",
        )
        if intake.kind is IntakeKind.STORE or intake.kind is IntakeKind.ANSWER:
            event = TokenEvent.ACCEPT if intake.kind is IntakeKind.STORE else TokenEvent.ANSWER
            await self._store.run(
                s.insert_token,
                meter=delivery.meter,
                token_id=intake.token_id,
                msg=delivery.msg,
                state=next_state(None, event),
                status=intake.status,
                credit_after_milli=None,
                now=self._now(),
            )
            self.wake()
        else:
            # A repeat: answer it again (the backend retries until it hears a result), but
            # change nothing; the stored delivery follows its own course.
            status = TokenStatus.PENDING if intake.status is None else intake.status
            _forget(
                self._publish_result(
                    delivery.meter, intake.token_id, status, intake.credit_after_milli
                )
            )
        return intake

    # ------------------------------------------------------------------ worker

    async def run(self) -> None:
        """Forever: drive every open delivery; retry unreachable meters every ``retry_s``."""
        while True:
            self._wake.clear()
            waiting = await self.process_open()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._retry_s if waiting else None)

    async def process_open(self) -> bool:
        """One round over the open deliveries; True if some still wait for their meter."""
        rows = await self._store.run(self._store.store.open_tokens)
        by_meter: dict[int, list[TokenRow]] = {}
        for row in rows:
            by_meter.setdefault(row.meter, []).append(row)
        async with asyncio.TaskGroup() as tg:
            tasks = [
                tg.create_task(self._drive_meter(meter_rows), name=f"token-meter-{meter}")
                for meter, meter_rows in by_meter.items()
            ]
        return any(t.result() for t in tasks)

    async def _drive_meter(self, rows: list[TokenRow]) -> bool:
        """Drive one meter's deliveries in order; True if stopped at an unreachable meter."""
        for row in rows:
            current = row
            while (action := RESUME[current.state]) is not Action.NOTHING:
                if action is Action.WRITE:
                    written = await self._write(current)
                    if written is None:
                        return True
                    current = written
                else:
                    current = await self._publish(current)
        return False

    async def _write(self, row: TokenRow) -> TokenRow | None:
        driver = self._drivers.get(row.meter)
        if driver is None:  # pragma: no cover - only served meters' deliveries are STORED
            raise TokenFlowError(f"stored token {row.token_id} for unserved meter {row.meter}")
        self._crash(CrashPoint.AFTER_STORE)
        try:
            outcome = await driver.write_message(row.msg)
        except MeterError as exc:
            next_state(row.state, TokenEvent.METER_UNREACHABLE)
            log.warning("token %d for meter %d stays stored: %s", row.token_id, row.meter, exc)
            return None
        self._crash(CrashPoint.AFTER_WRITE)
        state = next_state(row.state, TokenEvent.METER_ANSWERED)
        s = self._store.store
        window = window_after(
            await self._store.run(s.replay_window, row.meter), row.token_id, outcome.status
        )
        await self._store.run(
            s.set_token_result,
            row.id,
            status=outcome.status,
            credit_after_milli=outcome.credit_after_milli,
            window=window,
            now=self._now(),
        )
        log.info(
            "token %d for meter %d: meter says %s, credit %s milli",
            row.token_id,
            row.meter,
            outcome.status.name.lower(),
            outcome.credit_after_milli,
        )
        self._crash(CrashPoint.AFTER_RESULT)
        return dataclasses.replace(
            row, state=state, status=outcome.status, credit_after_milli=outcome.credit_after_milli
        )

    async def _publish(self, row: TokenRow) -> TokenRow:
        state = next_state(row.state, TokenEvent.PUBLISHED)
        if row.status is None:  # pragma: no cover - RESULT_READ rows always carry a status
            raise TokenFlowError(f"token row {row.id} has a result state but no status")
        await self._publish_result(row.meter, row.token_id, row.status, row.credit_after_milli)
        await self._store.run(self._store.store.mark_token_done, row.id, now=self._now())
        return dataclasses.replace(row, state=state)

    def _publish_result(
        self, meter: int, token_id: int, status: TokenStatus, credit: int | None
    ) -> asyncio.Future[None]:
        result = TokenResult(
            token_id=token_id, meter=meter, status=status, credit_after_milli=credit, ts=self._now()
        )
        return self._publisher.publish(token_result_topic(self._gw, meter), mqtt.encode(result))

    def _crash(self, point: CrashPoint) -> None:
        """TEST HOOK (``VOLTCREDIT_GATEWAY_CRASH_AT``): die here as if SIGKILLed."""
        if self._crash_at is point:
            log.critical("test hook: crashing at %s", point.value)
            os._exit(CRASH_EXIT)
