"""The simulator's asyncio shell: many meters, their Modbus servers, the ticker, persistence.

One process runs a fleet: meters share a TCP port as unit ids 1..247 (more meters take
further ports), get a port each, or share one RS-485 line (Modbus RTU). A ticker moves
every meter to the clock once per real second (so relays open and standing charges fall
on time even when nobody polls) and saves changed states every ``save_every_s``; every
Modbus request also brings its meter up to date and saves before replying (see
:mod:`meter_sim.device`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from pymodbus.framer import FramerType
from pymodbus.server import ModbusSerialServer, ModbusTcpServer

from meter_sim.device import MeterBus, MeterDevice, fleet_devices

log = logging.getLogger(__name__)

MAX_UNITS_PER_LINE: Final = 247  # Modbus unit ids 1..247 (Modbus over serial line §2.2)


class FleetError(Exception):
    """The fleet cannot start: a port in use, a serial device missing, bad layout."""


@dataclass(frozen=True, slots=True)
class TcpLayout:
    """Meters on TCP: ``per_port`` meters share a port as units 1..per_port."""

    host: str = "127.0.0.1"
    port: int = 5020
    per_port: int = MAX_UNITS_PER_LINE

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise FleetError(f"TCP port must be 0..65535, got {self.port}")
        if not 1 <= self.per_port <= MAX_UNITS_PER_LINE:
            raise FleetError(f"meters per port must be 1..{MAX_UNITS_PER_LINE}")


@dataclass(frozen=True, slots=True)
class RtuLayout:
    """All meters on one RS-485 line (a serial device), units 1..n."""

    device: str
    baudrate: int = 9600
    parity: str = "N"
    stopbits: int = 1

    def __post_init__(self) -> None:
        if self.parity not in ("N", "E", "O"):
            raise FleetError(f"parity must be N, E or O, got {self.parity!r}")
        if self.baudrate not in (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200):
            raise FleetError(f"unsupported baud rate {self.baudrate}")


def tcp_groups(n_meters: int, layout: TcpLayout) -> list[tuple[int, list[int]]]:
    """(port, unit ids) per server for ``n_meters`` meters, in meter order."""
    groups = []
    for first in range(0, n_meters, layout.per_port):
        size = min(layout.per_port, n_meters - first)
        port = layout.port + first // layout.per_port if layout.port else 0
        groups.append((port, list(range(1, size + 1))))
    return groups


def check_port_free(host: str, port: int) -> None:
    """Fail early, with a clear message, if a TCP port cannot be bound."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise FleetError(
                    f"TCP port {port} on {host} is in use (another simulator or a real "
                    "Modbus server?): choose another with --port"
                ) from exc
            raise FleetError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc


def check_serial_device(device: str) -> None:
    """Fail early if the serial device is missing or not readable and writable."""
    if not Path(device).exists():
        raise FleetError(f"serial device {device} does not exist (is the adapter plugged in?)")
    if not os.access(device, os.R_OK | os.W_OK):
        raise FleetError(f"no permission to open serial device {device} (group dialout?)")


@dataclass
class Fleet:
    """Running servers and the ticker for a list of meter devices."""

    devices: Sequence[MeterDevice]
    servers: list[ModbusTcpServer | ModbusSerialServer] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)
    save_every_s: float = 30.0
    tick_s: float = 1.0
    ticks: int = 0

    async def tick_forever(self) -> None:
        """Advance every meter once per ``tick_s``; save changed states now and then."""
        loop = asyncio.get_running_loop()
        last_save = loop.time()
        while True:
            await asyncio.sleep(self.tick_s)
            for device in self.devices:
                device.tick()
            self.ticks += 1
            if loop.time() - last_save >= self.save_every_s:
                await self.save_all()
                last_save = loop.time()

    async def save_all(self) -> None:
        """Persist every meter whose state changed."""
        for device in self.devices:
            await device.persist()


@contextlib.asynccontextmanager
async def serve(
    devices: Sequence[MeterDevice], layout: TcpLayout | RtuLayout
) -> AsyncIterator[Fleet]:
    """Start the servers and the ticker; on exit stop them and save every meter.

    An exception raised in the ``async with`` body comes out as it was raised; one from
    the ticker cancels the body and comes out in an ExceptionGroup (asyncio.TaskGroup).
    A fleet that fails to start (FleetError) saves nothing: every change a request made
    is already saved by the request itself (:mod:`meter_sim.device`), and a new meter's
    first state must not outlive a start that failed (a retry with corrected options
    would otherwise load it and ignore them).
    """
    fleet = Fleet(devices)
    body_error: BaseException | None = None
    started = False
    try:
        if isinstance(layout, RtuLayout):
            if len(devices) > MAX_UNITS_PER_LINE:
                raise FleetError(f"one RS-485 line carries at most {MAX_UNITS_PER_LINE} meters")
            check_serial_device(layout.device)
            server: ModbusTcpServer | ModbusSerialServer = ModbusSerialServer(
                fleet_devices(devices),
                framer=FramerType.RTU,
                port=layout.device,
                baudrate=layout.baudrate,
                parity=layout.parity,
                stopbits=layout.stopbits,
                # A real RS-485 slave stays silent for a unit id that is not its own.
                ignore_missing_devices=True,
            )
            server.context = MeterBus(devices)
            await _start(server, f"serial device {layout.device}")
            fleet.servers.append(server)
        else:
            index = 0
            for port, units in tcp_groups(len(devices), layout):
                check_port_free(layout.host, port)
                group = devices[index : index + len(units)]
                index += len(units)
                server = ModbusTcpServer(fleet_devices(group), address=(layout.host, port))
                server.context = MeterBus(group)
                await _start(server, f"{layout.host}:{port}")
                fleet.servers.append(server)
                fleet.ports.append(_bound_port(server) or port)
        started = True
        async with asyncio.TaskGroup() as tg:
            ticker = tg.create_task(fleet.tick_forever(), name="meter-sim-ticker")
            try:
                yield fleet
            except BaseException as exc:
                body_error = exc
                raise
            finally:
                ticker.cancel()
    except BaseExceptionGroup as group:
        # The TaskGroup wraps whatever crosses it; the caller's own exception is theirs
        # to catch as it was raised (a context manager must not change it).
        if body_error is not None and group.exceptions == (body_error,):
            raise body_error from None
        raise
    finally:
        for server in fleet.servers:
            await server.shutdown()  # type: ignore[no-untyped-call]  # pymodbus leaves it unannotated
        if started:
            await fleet.save_all()


async def _start(server: ModbusTcpServer | ModbusSerialServer, where: str) -> None:
    try:
        await server.serve_forever(background=True)
    except (RuntimeError, OSError) as exc:
        raise FleetError(f"cannot serve Modbus on {where}: {exc}") from exc


def _bound_port(server: ModbusTcpServer | ModbusSerialServer) -> int | None:
    """The port a TCP server actually bound (useful with port 0 in tests)."""
    transport = getattr(server, "transport", None)
    sockets = getattr(transport, "sockets", None)
    if not sockets:
        return None
    return int(sockets[0].getsockname()[1])
