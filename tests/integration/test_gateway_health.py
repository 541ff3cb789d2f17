"""Health: READY, STATUS, WATCHDOG and STOPPING reach systemd's socket; no watchdog when stuck."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from gateway.config import RuntimeEnv
from meter_sim.fleet import TcpLayout, serve
from tests.support.gateway import (
    gateway_toml,
    open_broker,
    running_gateway,
    tcp_meter,
    wait_until,
    wall_meter,
    write_config,
)

pytestmark = pytest.mark.integration

METER = 4_800_000_001


async def test_systemd_notifications(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    got: list[bytes] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.setblocking(False)  # noqa: FBT003 - socket API

        def drain() -> list[bytes]:
            while True:
                try:
                    got.append(sock.recv(1024))
                except BlockingIOError:
                    return got

        async with (
            open_broker(tmp_path / "broker") as broker,
            serve([wall_meter(METER)], TcpLayout(port=0)) as fleet,
        ):
            text = gateway_toml(
                broker_port=broker.port,
                store=tmp_path / "gw.sqlite",
                meters=[tcp_meter(METER, fleet.ports[0])],
                poll_interval_s=0.2,
            )
            runtime = RuntimeEnv(notify_socket=path, watchdog_usec=100_000)
            async with running_gateway(write_config(tmp_path / "gw.toml", text), runtime) as gw:
                await wait_until(lambda: drain().count(b"WATCHDOG=1") >= 3, what="watchdog")
                assert gw.healthy()
                # A poller that stops making progress stops the watchdog (systemd kills it):
                # hold its lock (a cycle stuck), and pretend the last cycle was an hour ago.
                async with gw.poller._lock:
                    gw.poller.last_progress -= 3600
                    await asyncio.sleep(0.15)
                    fed = drain().count(b"WATCHDOG=1")
                    await asyncio.sleep(0.3)
                    assert drain().count(b"WATCHDOG=1") == fed
                    assert not gw.healthy()
            drain()
    assert got[0].startswith(b"READY=1\nSTATUS=gateway gw-test running")
    assert any(g.startswith(b"STATUS=meters 1/1 reachable; mqtt connected") for g in got)
    assert got[-1] == b"STOPPING=1" or b"STOPPING=1" in got
