"""The interface every meter driver implements (Modbus today, DLMS/COSEM later).

A driver speaks for one meter. It hides the transport (TCP socket, shared RS-485 line)
and its timing (timeouts, retries, back-off), and reports failures only as
:class:`~gateway.errors.MeterError` subclasses: ``MeterUnreachableError`` when the meter
did not answer or is backing off, ``MeterProtocolError`` when it answered wrongly.
Values cross the interface as ``firmware_protocol`` types, whatever the wire protocol:
a DLMS driver fills the same :class:`~firmware_protocol.modbus_map.MeterSnapshot` from
its COSEM objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from firmware_protocol.modbus_map import MeterSnapshot, RelayCommand
from firmware_protocol.status import TokenStatus


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenOutcome:
    """What the meter did with a signed message, read back after the write.

    ``credit_after_milli`` is ``None`` when the status was read but the credit could not be.
    """

    status: TokenStatus
    credit_after_milli: int | None
    message_id: int


class MeterDriver(Protocol):
    """One meter, whatever the protocol. All methods may raise ``MeterError``."""

    @property
    def meter_id(self) -> int:
        """The meter's serial number (as configured, checked against the meter)."""
        ...

    @property
    def reachable(self) -> bool:
        """False after a failed operation, until the next one succeeds."""
        ...

    async def read_snapshot(self) -> MeterSnapshot:
        """Energy, power, credit, relay, status flags, clock and the last token result."""
        ...

    async def write_message(self, message: bytes) -> TokenOutcome:
        """Deliver a signed message (token, tariff, key change) and read back its outcome."""
        ...

    async def relay(self, command: RelayCommand) -> None:
        """Remote connect or disconnect."""
        ...

    async def set_clock(self, unix_s: int) -> None:
        """Set the meter's clock (time sync)."""
        ...

    async def request_emergency_credit(self) -> None:
        """Activate emergency credit (the meter decides whether it is available)."""
        ...
