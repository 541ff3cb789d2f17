"""meter_sim capacity: meters one process sustains at a 1-second tick, Modbus requests/s.

Baselines in the same run: the bare rating step (``rating.advance``) per meter-tick, and
a plain pymodbus SimDevice (static registers, no meter behind them) for requests/s.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import resource
import time

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from firmware_protocol import messages, rating
from firmware_protocol import modbus_map as mm
from firmware_protocol.units import currency
from firmware_protocol.vectors import EXAMPLE_TOU, TEST_KEY_ID, TEST_SEED
from meter_sim import core
from meter_sim.clock import ManualClock
from meter_sim.device import MeterDevice
from meter_sim.fleet import TcpLayout, serve
from meter_sim.profiles import HouseholdProfile
from tests.bench.common import Report

T0 = 1_790_000_000
N_METERS = 2000
SIM_SECONDS = 30


def _devices(n: int, clock: ManualClock) -> list[MeterDevice]:
    pub = messages.Ed25519Signer(
        TEST_KEY_ID, messages.load_private_key(TEST_SEED)
    ).public_key_bytes()
    out = []
    for i in range(n):
        config = core.MeterConfig(meter_id=1_000_001 + i, currency=currency("EUR"))
        state = core.new_meter(
            config,
            tariff=EXAMPLE_TOU,
            trusted_keys={TEST_KEY_ID: pub},
            now=T0,
            credit_milli=50_000_000,
        )
        out.append(
            MeterDevice(
                unit_id=i % 247 + 1,
                config=config,
                state=state,
                profile=HouseholdProfile.default("Europe/Berlin", i),
                clock=clock,
                state_path=None,
            )
        )
    return out


def _ticks(report: Report) -> None:
    clock = ManualClock(T0)
    gc.collect()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    devices = _devices(N_METERS, clock)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.process_time()
    for _ in range(SIM_SECONDS):
        clock.advance(1)
        for d in devices:
            d.tick()
    cpu = time.process_time() - start
    per_tick = cpu / SIM_SECONDS
    regs = rating.start_registers(EXAMPLE_TOU, T0)
    start = time.process_time()
    for k in range(N_METERS * SIM_SECONDS):
        rating.advance(EXAMPLE_TOU, regs, T0 + k % 3600, 1)
    base = (time.process_time() - start) / SIM_SECONDS
    report.add("baseline: bare rating.advance per meter-tick", N_METERS / base, "meter-ticks/s")
    report.add(
        "meters sustained at a 1 s tick (one core)",
        N_METERS / per_tick,
        "meters",
        cpu_ms_per_tick=round(per_tick * 1000, 1),
        vs_baseline=round(base / per_tick, 3),
    )
    report.add("memory per meter (max RSS growth)", (rss1 - rss0) * 1024 / N_METERS, "bytes")


async def _requests(report: Report, *, clients: int, seconds: float) -> None:
    clock = ManualClock(T0)
    devices = _devices(10, clock)
    async with serve(devices, TcpLayout(port=0)) as fleet:
        port = fleet.ports[0]
        rate = await _hammer(port, clients, seconds, units=[d.unit_id for d in devices])
    # Baseline: pymodbus serving static registers of the same shape, no meter behind them.
    static = [
        SimDevice(
            id=u,
            simdata=(
                [SimData(0, 1, values=False, datatype=DataType.BITS)],
                [SimData(0, 1, values=False, datatype=DataType.BITS)],
                [SimData(0, 1, values=0, datatype=DataType.REGISTERS)],
                [SimData(0, mm.POLL_BLOCK_COUNT, values=0, datatype=DataType.REGISTERS)],
            ),
        )
        for u in range(1, 11)
    ]
    server = ModbusTcpServer(static, address=("127.0.0.1", 0))
    await server.serve_forever(background=True)
    try:
        bport = server.transport.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        base = await _hammer(bport, clients, seconds, units=list(range(1, 11)))
    finally:
        await server.shutdown()  # type: ignore[no-untyped-call]
    report.add(f"baseline: static pymodbus server, {clients} client(s)", base, "requests/s")
    report.add(
        f"poll-block reads served, {clients} client(s), 10 meters",
        rate,
        "requests/s",
        vs_baseline=round(rate / base, 3),
    )


async def _hammer(port: int, clients: int, seconds: float, units: list[int]) -> float:
    deadline = time.perf_counter() + seconds
    counts = [0] * clients

    async def one(i: int) -> None:
        client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=5)
        await client.connect()
        try:
            while time.perf_counter() < deadline:
                rr = await client.read_input_registers(
                    0, count=mm.POLL_BLOCK_COUNT, device_id=units[counts[i] % len(units)]
                )
                assert not rr.isError()
                counts[i] += 1
        finally:
            client.close()

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(clients)))
    return sum(counts) / (time.perf_counter() - start)


def run() -> Report:
    logging.getLogger("pymodbus").setLevel(logging.ERROR)
    report = Report("meter_sim")
    print(f"tick capacity: {N_METERS} meters, {SIM_SECONDS} one-second ticks")
    _ticks(report)
    print("Modbus TCP requests (76-register FC4 poll-block reads)")
    for clients in (1, 4):
        asyncio.run(_requests(report, clients=clients, seconds=3))
    report.notes.append(
        "`python -m tests.bench meter_sim`; CPU time of one process; client and server share "
        "the 2-core machine for requests/s"
    )
    return report
