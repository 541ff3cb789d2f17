"""Commands from the backend (MQTT.md §3.6): relay, emergency credit, time sync, poll now, rebirth.

Commands are not signed; the broker's ACL is their authority. They wait in the
persistent session while the gateway is away, so one older than ``command_max_age_s``
(by its ``ts``) is refused rather than executed late. Every kind is idempotent, so a
QoS 1 redelivery is harmless; the message is acknowledged after its result is handed
to the link. Meter-level commands are followed by a poll of that meter, so the backend
sees their effect (relay state, credit, clock) at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping

from firmware_protocol import modbus_map as mm
from firmware_protocol import mqtt
from firmware_protocol.mqtt import Command, CommandKind, CommandResult
from firmware_protocol.mqtt_topics import command_result_topic
from gateway.drivers.base import MeterDriver
from gateway.errors import MeterError
from gateway.tokens import Publisher

log = logging.getLogger(__name__)


class CommandDesk:
    """Executes commands one at a time and publishes each result."""

    def __init__(
        self,
        *,
        gw: str,
        drivers: Mapping[int, MeterDriver],
        publisher: Publisher,
        now: Callable[[], int],
        max_age_s: int,
        poll: Callable[[list[int] | None], Awaitable[object]],
        rebirth: Callable[[], None],
    ) -> None:
        self._topic = command_result_topic(gw)
        self._drivers = drivers
        self._publisher = publisher
        self._now = now
        self._max_age_s = max_age_s
        self._poll = poll
        self._rebirth = rebirth
        self.queue: asyncio.Queue[tuple[Command, Callable[[], None]]] = asyncio.Queue()

    async def run(self) -> None:
        """Forever: take a command, execute it, publish the result, acknowledge the message."""
        while True:
            command, ack = await self.queue.get()
            result = await self.execute(command)
            fut = self._publisher.publish(self._topic, mqtt.encode(result))
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())
            ack()

    async def execute(self, command: Command) -> CommandResult:
        """Run one command; failures become ``ok: false`` with a reason, never an exception."""
        ok, detail = await self._execute(command)
        log.info(
            "command %s (%s): %s %s",
            command.id,
            command.kind.value,
            "ok" if ok else "failed",
            detail,
        )
        return CommandResult(
            id=command.id, ok=ok, detail=detail[: mqtt.MAX_DETAIL_LEN], ts=self._now()
        )

    async def _execute(self, command: Command) -> tuple[bool, str]:
        age = self._now() - command.ts
        if age > self._max_age_s:
            return False, f"refused: issued {age} s ago, the limit is {self._max_age_s} s"
        kind = command.kind
        if kind is CommandKind.REBIRTH:
            self._rebirth()
            return True, "birth published"
        meter = command.meter
        if meter is not None and meter not in self._drivers:
            return False, f"meter {meter} is not served by this gateway"
        if kind is CommandKind.POLL_NOW:
            seqs = await self._poll(None if meter is None else [meter])
            return (
                True,
                f"polled {'all meters' if meter is None else f'meter {meter}'}: batch {seqs}",
            )
        if meter is None:  # pragma: no cover - Command validates that meter-level kinds name one
            return False, f"a {kind.value} command names a meter"
        driver = self._drivers[meter]
        try:
            if kind is CommandKind.RELAY_CONNECT:
                await driver.relay(mm.RelayCommand.CONNECT)
            elif kind is CommandKind.RELAY_DISCONNECT:
                await driver.relay(mm.RelayCommand.DISCONNECT)
            elif kind is CommandKind.EMERGENCY_CREDIT:
                await driver.request_emergency_credit()
            else:  # TIME_SYNC, the last kind; Command guarantees its args
                ts = command.args.ts if command.args is not None else self._now()
                await driver.set_clock(ts)
        except MeterError as exc:
            return False, str(exc)
        await self._poll([meter])
        return True, f"{kind.value} done on meter {meter}"
