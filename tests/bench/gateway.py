"""Gateway capacity: meters per gateway process at a 60 s poll over Modbus TCP, CPU per meter.

Set-up: a meter_sim fleet of ``N_METERS`` meters in its own process (``voltcredit
meter-sim run``, 247 units per TCP port), a Mosquitto broker in its own process (the
embedded amqtt broker, also in a subprocess, where Mosquitto is missing), the backend's
retained "online" state, and one gateway in *this* process polling every meter each
``POLL_S`` — reading, decoding, batching, storing in its SQLite outbox and publishing.
The figure is this process's CPU time (all threads: event loop, paho, SQLite) per poll
cycle, divided by the meters; meters per gateway at a 60 s poll = 60 s / (CPU per meter).

Baseline in the same run: the same poll-block reads done by bare pymodbus clients (one
per TCP port, as the gateway uses), with nothing else — the floor any Python gateway
pays for Modbus TCP.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import paho.mqtt.client as pm
from pymodbus.client import AsyncModbusTcpClient

from firmware_protocol import modbus_map as mm
from firmware_protocol import mqtt
from firmware_protocol.mqtt_topics import BACKEND_STATE_TOPIC
from gateway.config import load_config
from gateway.service import Gateway
from tests.bench.common import Report
from tests.support.broker import Mosquitto, free_port, mosquitto_binary, wait_port
from tests.support.gateway import wait_until
from tests.support.meters import SIGNER, voltcredit_command

N_METERS = 1000
POLL_S = 6.0
CYCLES = 6
UNITS_PER_PORT = 247


@contextlib.contextmanager
def fleet(tmp: Path, n: int) -> Iterator[tuple[list[int], int]]:
    """``n`` simulated meters in a subprocess; yields (ports, first meter id)."""
    keys = tmp / "keys.pub"
    keys.write_text(f"{SIGNER.key_id} {SIGNER.public_key_bytes().hex()}\n")
    first = 1_000_001
    proc = subprocess.Popen(
        [
            *voltcredit_command(),
            "meter-sim",
            "run",
            "--meters",
            str(n),
            "--port",
            "0",
            "--per-port",
            str(UNITS_PER_PORT),
            "--trusted-key",
            str(keys),
            "--json",
            "--status-every",
            "0",
            "--state-dir",
            str(tmp / "meters"),
            "--profile",
            "constant:500",
            "--meter-id",
            str(first),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("{"):
                event = json.loads(line)
                if event.get("event") == "ready":
                    yield event["ports"], first
                    break
        else:
            raise RuntimeError("meter-sim did not start")
    finally:
        proc.terminate()
        proc.wait(30)


@contextlib.contextmanager
def broker(tmp: Path) -> Iterator[int]:
    """Mosquitto in its own process, or the amqtt broker in a subprocess; yields the port."""
    binary = mosquitto_binary()
    if binary is not None:
        tmp.mkdir(exist_ok=True)
        m = Mosquitto(binary=binary, workdir=tmp)
        m.start()
        try:
            yield m.port
        finally:
            m.stop()
        return
    port = free_port()
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    script = (
        "import asyncio\nfrom amqtt.broker import Broker\n"
        f"async def main():\n    b = Broker({config!r})\n"
        "    await b.start()\n    await asyncio.Event().wait()\n"
        "asyncio.run(main())\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def backend_online(port: int) -> None:
    client = pm.Client(pm.CallbackAPIVersion.VERSION2, protocol=pm.MQTTv311)
    client.connect("127.0.0.1", port)
    client.loop_start()
    state = mqtt.encode(mqtt.BackendState(online=True, ts=int(time.time())))
    client.publish(BACKEND_STATE_TOPIC, state, qos=1, retain=True).wait_for_publish(10)
    client.loop_stop()
    client.disconnect()


def meter_addresses(ports: list[int], first: int, n: int) -> list[tuple[int, int, int]]:
    """(meter id, port, unit) of every meter, as meter_sim lays them out."""
    return [(first + i, ports[i // UNITS_PER_PORT], i % UNITS_PER_PORT + 1) for i in range(n)]


def write_config(tmp: Path, broker_port: int, meters: list[tuple[int, int, int]]) -> Path:
    lines = [
        'gateway_id = "bench"',
        f"poll_interval_s = {POLL_S}",
        "[mqtt]",
        f'url = "mqtt://127.0.0.1:{broker_port}"',
        "[store]",
        f'path = "{tmp / "gw.sqlite"}"',
        "[[trusted_keys]]",
        f"id = {SIGNER.key_id}",
        f'public_key = "{SIGNER.public_key_bytes().hex()}"',
        "[modbus]",
        "timeout_s = 5",
    ]
    for meter, port, unit in meters:
        lines += [
            "[[meters]]",
            f"id = {meter}",
            'driver = "modbus_tcp"',
            'host = "127.0.0.1"',
            f"port = {port}",
            f"unit = {unit}",
        ]
    path = tmp / "gw.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


async def gateway_cpu(config: Path, report: Report) -> tuple[float, float]:
    """(CPU s per poll cycle, longest cycle in wall s) of the gateway, after a warm-up cycle."""
    gw = Gateway(load_config(config))
    stop = asyncio.Event()
    task = asyncio.create_task(gw.run(stop))
    try:
        await asyncio.wait_for(gw.ready.wait(), 30)
        # one warm-up cycle (connections, identity reads)
        await wait_until(lambda: gw.poller.cycles >= 2, timeout=120)
        cpu0, cycles0, wall0 = time.process_time(), gw.poller.cycles, time.perf_counter()
        durations: list[float] = []

        def counted() -> bool:
            if gw.poller.cycles > cycles0 + len(durations):
                durations.append(gw.poller.last_cycle_s)
            return gw.poller.cycles >= cycles0 + CYCLES

        await wait_until(counted, timeout=600)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        delivered = gw.flusher.delivered
        answered = sum(gw.reachable.values())
    finally:
        stop.set()
        await task
    report.notes.append(
        f"{answered}/{len(gw.reachable)} meters answered; {delivered} batches published; "
        f"{CYCLES} cycles in {wall:.1f} s"
    )
    return cpu / CYCLES, max(durations)


async def baseline_cpu(meters: list[tuple[int, int, int]]) -> float:
    """CPU s for one poll-block read of every meter with bare pymodbus (one client per port)."""
    ports = sorted({p for _, p, _ in meters})
    clients = {p: AsyncModbusTcpClient("127.0.0.1", port=p, timeout=5) for p in ports}
    for c in clients.values():
        await c.connect()

    async def read_port(port: int) -> None:
        for _, p, unit in meters:
            if p == port:
                rr = await clients[port].read_input_registers(
                    mm.POLL_BLOCK_ADDRESS, count=mm.POLL_BLOCK_COUNT, device_id=unit
                )
                assert not rr.isError()

    try:
        await asyncio.gather(*(read_port(p) for p in ports))  # warm-up
        start = time.process_time()
        for _ in range(CYCLES):
            await asyncio.gather(*(read_port(p) for p in ports))
        return (time.process_time() - start) / CYCLES
    finally:
        for c in clients.values():
            c.close()


@contextlib.asynccontextmanager
async def _quiet() -> AsyncIterator[None]:
    for name in ("pymodbus", "gateway", "paho"):
        logging.getLogger(name).setLevel(logging.ERROR)
    yield


async def _bench(report: Report) -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        with fleet(tmp, N_METERS) as (ports, first), broker(tmp / "broker") as broker_port:
            backend_online(broker_port)
            meters = meter_addresses(ports, first, N_METERS)
            async with _quiet():
                base = await baseline_cpu(meters)
                cpu, wall = await gateway_cpu(write_config(tmp, broker_port, meters), report)
    per_meter = cpu / N_METERS
    report.add(
        f"baseline: bare pymodbus poll-block read, {N_METERS} meters",
        base / N_METERS * 1e6,
        "us CPU/meter",
    )
    report.add(
        "gateway CPU per meter per poll (read+decode+store+publish)",
        per_meter * 1e6,
        "us CPU/meter",
        vs_baseline=round(per_meter / (base / N_METERS), 2),
    )
    report.add("meters per gateway process at a 60 s poll (one core)", 60 / per_meter, "meters")
    report.add(
        f"longest poll cycle of {N_METERS} meters, wall time",
        wall,
        "s",
        poll_interval_s=POLL_S,
        note="mostly waiting for meter_sim's answers; a cycle waits at most 0.8 x the interval",
    )
    report.add(
        "CPU share of one core at the protocol's cap of 4096 meters, 60 s poll",
        4096 * per_meter / 60 * 100,
        "%",
    )


def run() -> Report:
    report = Report("gateway")
    print(f"gateway: {N_METERS} meters (meter_sim subprocess, Modbus TCP), poll every {POLL_S} s")
    os.environ.pop("VOLTCREDIT_GATEWAY_CRASH_AT", None)
    asyncio.run(_bench(report))
    report.notes.append(
        "`python -m tests.bench gateway`; CPU = this process (gateway: asyncio loop, paho "
        "thread, SQLite thread); meter_sim and the broker run in their own processes on the "
        "same 2-core machine"
    )
    return report
