"""In-memory stand-ins for a meter driver and the MQTT link, scripted by the tests."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from firmware_protocol import modbus_map as mm
from firmware_protocol import mqtt
from firmware_protocol.mqtt_topics import parse_topic
from firmware_protocol.status import TokenStatus
from gateway.drivers.base import TokenOutcome
from gateway.errors import MeterUnreachableError


def snapshot(
    meter_id: int, *, clock: int = 1_790_000_000, credit: int = 1000, wh: int = 0
) -> mm.MeterSnapshot:
    return mm.MeterSnapshot(
        meter_id=meter_id,
        import_wh=wh,
        import_wh_bands=(wh, 0, 0, 0, 0, 0, 0, 0),
        power_w=10,
        voltage_dv=2300,
        frequency_chz=5000,
        current_ma=43,
        credit_milli=credit,
        emergency_used_milli=0,
        credit_state=mm.CreditState.IN_CREDIT,
        relay_state=mm.RelayState.CLOSED,
        status_flags=mm.StatusFlag(0),
        active_band=0,
        clock_unix=clock,
        active_tariff_id=1,
        block_period_index=24000,
        block_period_wh=wh,
        token=mm.TokenResult(
            token_seq=0, token_status=TokenStatus.NONE, last_message_id=0, last_credit_token_id=0
        ),
    )


@dataclass
class FakeDriver:
    """A meter: applies each message id once, answers already_applied after that."""

    meter_id: int
    credit: int = 1000
    up: bool = True
    reachable: bool = True
    writes: list[bytes] = field(default_factory=list)
    applied: set[bytes] = field(default_factory=set)
    refuse: TokenStatus | None = None
    commands: list[object] = field(default_factory=list)
    read_delay: float = 0.0

    def _check(self) -> None:
        self.reachable = self.up
        if not self.up:
            raise MeterUnreachableError(self.meter_id, "no answer")

    async def read_snapshot(self) -> mm.MeterSnapshot:
        if self.read_delay:
            await asyncio.sleep(self.read_delay)
        self._check()
        return snapshot(self.meter_id, credit=self.credit)

    async def write_message(self, message: bytes) -> TokenOutcome:
        self._check()
        self.writes.append(message)
        if self.refuse is not None:
            return TokenOutcome(status=self.refuse, credit_after_milli=self.credit, message_id=0)
        if message in self.applied:
            return TokenOutcome(
                status=TokenStatus.ALREADY_APPLIED, credit_after_milli=self.credit, message_id=0
            )
        self.applied.add(message)
        self.credit += 500_000
        return TokenOutcome(
            status=TokenStatus.ACCEPTED, credit_after_milli=self.credit, message_id=1
        )

    async def relay(self, command: mm.RelayCommand) -> None:
        self._check()
        self.commands.append(command)

    async def set_clock(self, unix_s: int) -> None:
        self._check()
        self.commands.append(("clock", unix_s))

    async def request_emergency_credit(self) -> None:
        self._check()
        self.commands.append("emergency")


class FakePublisher:
    """Records publishes; acknowledges them at once unless ``hold`` is set."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bool]] = []
        self.hold = False
        self.held: list[asyncio.Future[None]] = []

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> asyncio.Future[None]:
        self.sent.append((topic, payload, retain))
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.hold:
            self.held.append(fut)
        else:
            fut.set_result(None)
        return fut

    def release(self) -> None:
        for fut in self.held:
            if not fut.done():
                fut.set_result(None)
        self.held.clear()

    def decoded(self) -> list[object]:
        return [mqtt.decode_payload(parse_topic(t), p) for t, p, _ in self.sent]
