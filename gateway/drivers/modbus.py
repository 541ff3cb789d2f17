"""Modbus TCP and RTU meter drivers over pymodbus: shared endpoints, per-device timing, back-off.

Shape:

* An :class:`Endpoint` owns one pymodbus client and an :class:`asyncio.Lock`: one
  request at a time, whoever asks. A :class:`TcpEndpoint` is one ``host:port`` (a meter,
  or a Modbus TCP gateway with many units behind it); an :class:`RtuBus` is one RS-485
  line, shared by every meter on it, and also keeps the silent interval of at least
  3.5 character times between frames (Modbus over Serial Line V1.02 §2.5.1.1: 11 bits
  per character; a fixed 1.75 ms above 19 200 baud).
* A :class:`ModbusMeter` is the :class:`~gateway.drivers.base.MeterDriver` of one unit:
  its own timeout per request (``asyncio.timeout`` around the endpoint's request), its
  own retries with a short jittered back-off, and after an operation that still failed,
  its own **unreachable period** (capped exponential back-off, ``unreachable_until``)
  during which calls fail at once — so one dead meter costs its neighbours on a shared
  line one timeout per back-off period, not one per poll.
* :class:`ModbusNetwork` builds the endpoints and drivers of a configuration.

Errors: pymodbus, serial and socket errors and timeouts become
:class:`MeterUnreachableError`; Modbus exception responses and registers that do not
decode become :class:`MeterProtocolError`; another meter id or register map at the
address :class:`MeterIdentityError` (MODBUS.md: check ``map_version`` at connect and
``meter_id`` on every poll).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, TypeVar

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException
from pymodbus.framer import FramerType

from firmware_protocol import modbus_map as mm
from firmware_protocol.errors import ProtocolError, UnknownVersionError
from gateway.backoff import backoff_delay
from gateway.config import MeterConfig, RetryPolicy, RtuAddress, TcpAddress
from gateway.drivers.base import TokenOutcome
from gateway.errors import (
    MeterError,
    MeterIdentityError,
    MeterProtocolError,
    MeterUnreachableError,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
#: Modbus exception codes 0x0A/0x0B: a gateway in front of the meter got no answer (spec §7).
_GATEWAY_NO_ANSWER: Final = frozenset({0x0A, 0x0B})
#: How often the token result is read while the meter processes a commit.
TOKEN_POLL_S: Final = 0.05
#: Seconds the pymodbus client itself waits beyond the longest per-device timeout: the
#: per-device ``asyncio.timeout`` always fires first, so one rule decides.
_CLIENT_SLACK_S: Final = 1.0


class _NoAnswerError(Exception):
    """Internal: one request got no (usable) answer; retried, then MeterUnreachableError."""


class _RefusedError(Exception):
    """Internal: the meter answered with a Modbus exception response."""


def silent_interval_s(baudrate: int) -> float:
    """t3.5 of Modbus over Serial Line V1.02 §2.5.1.1 (11-bit characters; 1.75 ms above 19200)."""
    if baudrate > 19_200:
        return 0.001_75
    return 3.5 * 11 / baudrate


Client = AsyncModbusTcpClient | AsyncModbusSerialClient
Op = Callable[[Any], Awaitable[Any]]


class Endpoint:
    """One pymodbus client, one request at a time, shared by the meters behind it."""

    def __init__(self, client: Client, *, name: str, gap_s: float) -> None:
        self.client = client
        self.name = name
        self.gap_s = gap_s
        self.lock = asyncio.Lock()
        self._quiet_until = 0.0

    async def request(self, op: Op, *, timeout_s: float) -> Any:
        """Run ``op(client)`` alone on the endpoint, within ``timeout_s`` (connecting if needed).

        Raises ``_NoAnswerError`` for silence or a broken connection, ``_RefusedError`` for an
        exception response; returns the response otherwise.
        """
        loop = asyncio.get_running_loop()
        async with self.lock:
            wait = self._quiet_until - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            answered = False
            try:
                async with asyncio.timeout(timeout_s):
                    if not self.client.connected and not await self.client.connect():
                        raise _NoAnswerError(f"cannot connect to {self.name}")
                    response = await op(self.client)
                answered = True
            except TimeoutError:
                raise _NoAnswerError(f"no answer within {timeout_s:g} s") from None
            except (ModbusException, OSError) as exc:
                raise _NoAnswerError(f"{type(exc).__name__}: {exc}") from exc
            finally:
                self._after(answered=answered)
        if response.isError():
            code = getattr(response, "exception_code", 0)
            if code in _GATEWAY_NO_ANSWER:
                raise _NoAnswerError(f"gateway {self.name} reports no answer (exception {code})")
            raise _RefusedError(f"Modbus exception {code}")
        return response

    def _after(self, *, answered: bool) -> None:
        self._quiet_until = asyncio.get_running_loop().time() + self.gap_s
        if not answered:
            self.on_silence()

    def on_silence(self) -> None:
        """What to do after a request got no answer (resynchronise the stream)."""

    def close(self) -> None:
        """Close the client."""
        self.client.close()


class TcpEndpoint(Endpoint):
    """A Modbus TCP server: a meter, or a gateway with units behind it."""

    def __init__(self, address: TcpAddress, *, timeout_s: float) -> None:
        client = AsyncModbusTcpClient(
            address.host,
            port=address.port,
            timeout=timeout_s + _CLIENT_SLACK_S,
            retries=0,
            reconnect_delay=0,  # we reconnect on demand, under our own back-off
        )
        super().__init__(client, name=f"{address.host}:{address.port}", gap_s=0.0)

    def on_silence(self) -> None:
        # A late answer to an abandoned request would arrive on the next one's connection:
        # start afresh (Modbus Messaging on TCP/IP Implementation Guide §4.3.1.3 lets a
        # client close and reopen after a timeout).
        self.client.close()


class RtuBus(Endpoint):
    """One RS-485 line: one serial client for all its meters, frames kept t3.5 apart."""

    def __init__(self, address: RtuAddress, *, timeout_s: float) -> None:
        client = AsyncModbusSerialClient(
            port=address.device,
            framer=FramerType.RTU,
            baudrate=address.baudrate,
            bytesize=8,
            parity=address.parity,
            stopbits=address.stopbits,
            timeout=timeout_s + _CLIENT_SLACK_S,
            retries=0,
            reconnect_delay=0,
        )
        super().__init__(client, name=address.device, gap_s=silent_interval_s(address.baudrate))

    def on_silence(self) -> None:
        # A slave that answers late must not have its frame taken for the next request's
        # answer: keep the line quiet a little longer than usual before the next frame.
        loop = asyncio.get_running_loop()
        self._quiet_until = max(self._quiet_until, loop.time() + max(self.gap_s, 0.05))


class ModbusMeter:
    """The :class:`~gateway.drivers.base.MeterDriver` of one Modbus unit."""

    def __init__(
        self,
        config: MeterConfig,
        endpoint: Endpoint,
        *,
        token_result_timeout_s: float,
        uniform: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self._config = config
        self._policy: RetryPolicy = config.policy
        self._unit = config.address.unit
        self.endpoint = endpoint
        self._token_timeout = token_result_timeout_s
        self._uniform = uniform
        self._failures = 0
        #: event-loop time before which calls fail at once (the back-off period)
        self.unreachable_until = 0.0
        self._reachable = False
        self._identified = False
        self._last_error = ""

    @property
    def meter_id(self) -> int:
        """The configured serial number."""
        return self._config.id

    @property
    def reachable(self) -> bool:
        """False until the first success and after any failed operation."""
        return self._reachable

    # ------------------------------------------------------------------ plumbing

    async def _call(self, what: str, op: Op, *, retries: int | None = None) -> Any:
        loop = asyncio.get_running_loop()
        wait = self.unreachable_until - loop.time()
        if wait > 0:
            raise MeterUnreachableError(
                self.meter_id,
                f"{self._last_error} (backing off {wait:.1f} s after {self._failures} failure(s))",
            )
        tries = self._policy.retries if retries is None else retries
        attempt = 0
        while True:
            try:
                response = await self.endpoint.request(op, timeout_s=self._policy.timeout_s)
            except _NoAnswerError as exc:
                if attempt < tries:
                    await asyncio.sleep(self._retry_delay(attempt))
                    attempt += 1
                    continue
                self._last_error = f"{what} at {self.endpoint.name} unit {self._unit}: {exc}"
                self._fail()
                raise MeterUnreachableError(self.meter_id, self._last_error) from exc
            except _RefusedError as exc:
                self._reachable = True  # it answered
                raise MeterProtocolError(self.meter_id, f"{what}: {exc}") from exc
            self._failures = 0
            self._reachable = True
            return response

    def _retry_delay(self, attempt: int) -> float:
        # Retries within one operation are quick: the back-off proper comes after it fails.
        base = min(0.05, self._policy.backoff_min_s)
        return backoff_delay(
            attempt, base=base, cap=self._policy.backoff_min_s, uniform=self._uniform
        )

    def _fail(self) -> None:
        self._reachable = False
        self._identified = False
        delay = backoff_delay(
            self._failures,
            base=self._policy.backoff_min_s,
            cap=self._policy.backoff_max_s,
            uniform=self._uniform,
        )
        self._failures += 1
        self.unreachable_until = asyncio.get_running_loop().time() + delay
        log.warning(
            "meter %d unreachable (%d failure(s)); next try in %.1f s",
            self.meter_id,
            self._failures,
            delay,
        )

    def _bad(self, exc: MeterError) -> MeterError:
        """A meter that answers as another meter: back off like a silent one."""
        self._last_error = str(exc).removeprefix(f"meter {self.meter_id}: ")
        self._fail()
        return exc

    async def _read_input(self, address: int, count: int, what: str) -> list[int]:
        unit = self._unit

        async def op(client: Any) -> Any:
            return await client.read_input_registers(address, count=count, device_id=unit)

        response = await self._call(what, op)
        return list(response.registers)

    async def _write(
        self, address: int, words: Sequence[int], what: str, *, retries: int | None = None
    ) -> None:
        unit = self._unit
        values = list(words)

        async def op(client: Any) -> Any:
            return await client.write_registers(address, values, device_id=unit)

        await self._call(what, op, retries=retries)

    def _decode(self, decode: Callable[[list[int]], T], words: list[int], what: str) -> T:
        try:
            return decode(words)
        except UnknownVersionError as exc:
            raise self._bad(MeterIdentityError(self.meter_id, f"{what}: {exc}")) from exc
        except ProtocolError as exc:
            raise MeterProtocolError(self.meter_id, f"{what}: {exc}") from exc

    async def _identify(self) -> None:
        if self._identified:
            return
        words = await self._read_input(mm.INFO_ADDRESS, mm.INFO_COUNT, "identity block")
        self._decode(mm.decode_info_block, words, "identity block")
        self._identified = True

    # ------------------------------------------------------------------ operations

    async def read_snapshot(self) -> mm.MeterSnapshot:
        """One FC4 read of the poll block (76 registers at 0), checked against the meter id."""
        await self._identify()
        words = await self._read_input(mm.POLL_BLOCK_ADDRESS, mm.POLL_BLOCK_COUNT, "poll block")
        snap = self._decode(mm.decode_poll_block, words, "poll block")
        if snap.meter_id != self.meter_id:
            raise self._bad(
                MeterIdentityError(
                    self.meter_id,
                    f"{self.endpoint.name} unit {self._unit} is meter {snap.meter_id}",
                )
            )
        return snap

    async def write_message(self, message: bytes) -> TokenOutcome:
        """MODBUS.md "Writing a signed message": note token_seq, write, commit, read the result."""
        *data_writes, (commit_address, commit_words) = mm.token_write_plan(message)
        before = (await self.read_snapshot()).token.token_seq
        for address, words in data_writes:
            await self._write(address, words, "token block write")
        try:
            # Not retried blindly: a commit whose reply was lost may have been processed,
            # and a second commit would process the block again (reporting already_applied).
            await self._write(commit_address, commit_words, "token commit", retries=0)
        except MeterUnreachableError:
            self.unreachable_until = 0.0  # find out at once whether it went through
            if (await self.read_snapshot()).token.token_seq == before:
                await self._write(commit_address, commit_words, "token commit")
        return await self._await_result(before)

    async def _await_result(self, before: int) -> TokenOutcome:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._token_timeout
        while True:
            snap = await self.read_snapshot()
            token = snap.token
            if token.token_seq != before and token.token_status.final:
                return TokenOutcome(
                    status=token.token_status,
                    credit_after_milli=snap.credit_milli,
                    message_id=token.last_message_id,
                )
            if loop.time() >= deadline:
                raise MeterUnreachableError(
                    self.meter_id,
                    f"no final token status within {self._token_timeout:g} s "
                    f"(token_seq {token.token_seq}, status {token.token_status.name.lower()})",
                )
            await asyncio.sleep(TOKEN_POLL_S)

    async def relay(self, command: mm.RelayCommand) -> None:
        """Write ``remote_relay_command``."""
        await self._identify()
        reg = mm.register("remote_relay_command")
        await self._write(reg.address, [int(command)], "relay command")

    async def set_clock(self, unix_s: int) -> None:
        """``set_clock_unix`` then the commit word (MODBUS.md)."""
        await self._identify()
        for address, words in mm.set_clock_plan(unix_s):
            await self._write(address, words, "set clock")

    async def request_emergency_credit(self) -> None:
        """Write 1 to ``emergency_credit_request``."""
        await self._identify()
        reg = mm.register("emergency_credit_request")
        await self._write(reg.address, [1], "emergency credit request")


class ModbusNetwork:
    """Every Modbus meter of a configuration, sharing one endpoint per TCP server or serial line."""

    def __init__(self, meters: Sequence[MeterConfig], *, token_result_timeout_s: float) -> None:
        self.endpoints: dict[tuple[str, ...], Endpoint] = {}
        self.drivers: dict[int, ModbusMeter] = {}
        timeouts: dict[tuple[str, ...], float] = {}
        for m in meters:
            key = _endpoint_key(m)
            timeouts[key] = max(timeouts.get(key, 0.0), m.policy.timeout_s)
        for m in meters:
            key = _endpoint_key(m)
            endpoint = self.endpoints.get(key)
            if endpoint is None:
                endpoint = self.endpoints[key] = _make_endpoint(m, timeouts[key])
            self.drivers[m.id] = ModbusMeter(
                m, endpoint, token_result_timeout_s=token_result_timeout_s
            )

    def close(self) -> None:
        """Close every client."""
        for endpoint in self.endpoints.values():
            endpoint.close()


def _endpoint_key(m: MeterConfig) -> tuple[str, ...]:
    a = m.address
    if isinstance(a, TcpAddress):
        return ("tcp", a.host, str(a.port))
    return ("rtu", a.device)


def _make_endpoint(m: MeterConfig, timeout_s: float) -> Endpoint:
    a = m.address
    if isinstance(a, TcpAddress):
        return TcpEndpoint(a, timeout_s=timeout_s)
    return RtuBus(a, timeout_s=timeout_s)
