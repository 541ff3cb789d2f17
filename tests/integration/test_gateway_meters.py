"""Meters that fail, and meters on RS-485: against meter_sim over TCP and over a pseudo-terminal.

* One dead meter among live ones — one that never answers (a socket that accepts and stays
  silent) and one that refuses connections — must not slow the live ones' polls or their
  tokens; the dead ones are marked unreachable in the birth message and in the store
  (``voltcredit gateway status``), and a token for a dead meter waits, stored.
* Modbus RTU: two meters on one RS-485 line (meter_sim's serial server on one end of a
  null-modem pair of pseudo-terminals, the gateway on the other) are polled and take a
  token through the same shared bus.
* Commands: relay disconnect/connect, time sync, emergency credit, poll now, rebirth,
  a command that is too old, one for an unknown meter.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from firmware_protocol import modbus_map as mm
from firmware_protocol.mqtt import Command, CommandKind, TimeSyncArgs
from firmware_protocol.status import TokenStatus
from gateway.store import Store
from meter_sim.fleet import RtuLayout, TcpLayout, serve
from tests.support.broker import free_port
from tests.support.gateway import (
    gateway_toml,
    open_broker,
    running_backend,
    running_gateway,
    silent_server,
    tcp_meter,
    wait_until,
    wall_meter,
    write_config,
)
from tests.support.meters import credit_token, null_modem

pytestmark = pytest.mark.integration

LIVE = (4_400_000_001, 4_400_000_002)
SILENT, REFUSING = 4_400_000_098, 4_400_000_099
POLL_S = 0.4


@pytest.fixture
async def silent_port() -> AsyncIterator[int]:
    """A TCP port that accepts connections and never answers (a hung meter)."""
    async with silent_server() as port:
        yield port


async def test_dead_meters_do_not_stall_live_ones(tmp_path: Path, silent_port: int) -> None:
    devices = [wall_meter(m, unit_id=i + 1) for i, m in enumerate(LIVE)]
    async with (
        open_broker(tmp_path / "broker") as broker,
        serve(devices, TcpLayout(port=0)) as fleet,
        running_backend(broker.port) as backend,
    ):
        port = fleet.ports[0]
        meters = [
            tcp_meter(LIVE[0], port, 1),
            tcp_meter(SILENT, silent_port),
            tcp_meter(REFUSING, free_port()),
            tcp_meter(LIVE[1], port, 2),
        ]
        text = gateway_toml(
            broker_port=broker.port,
            store=tmp_path / "gw.sqlite",
            meters=meters,
            poll_interval_s=POLL_S,
            timeout_s=0.3,
            retries=1,
            backoff_min_s=1.0,
            backoff_max_s=2.0,
        )
        config_path = tmp_path / "gw.toml"
        async with running_gateway(write_config(config_path, text)) as gw:
            start = time.monotonic()
            await wait_until(lambda: len(backend.distinct_seqs()) >= 6, what="six batches")
            elapsed = time.monotonic() - start
            # Six cycles at 0.4 s; a stall of one timeout (0.3 s, retried) per cycle would show.
            assert elapsed < 6 * POLL_S + 1.5, elapsed
            for batch in backend.snapshot()[0]:
                assert sorted(r.meter for r in batch.readings) == sorted(LIVE)

            # The birth says who is reachable.
            def latest_birth() -> dict[int, bool] | None:
                births = [s for s in backend.snapshot()[2] if s.online and s.meters]
                return births and {p.meter: p.reachable for p in births[-1].meters}

            reach = await wait_until(
                lambda: (b := latest_birth()) and not b[SILENT] and b[LIVE[0]] and b,
                what="birth with reachability",
            )
            assert reach == {LIVE[0]: True, LIVE[1]: True, SILENT: False, REFUSING: False}

            # A token for a dead meter waits; one for a live meter is applied at once.
            now = int(time.time())
            backend.deliver(SILENT, credit_token(SILENT, 1, 100, now=now), 1)
            backend.deliver(LIVE[1], credit_token(LIVE[1], 1, 100, now=now), 1)
            (ok,) = await wait_until(lambda: backend.results_for(LIVE[1], 1), what="live token")
            assert ok.status is TokenStatus.ACCEPTED
            await asyncio.sleep(0.5)
            assert backend.results_for(SILENT, 1) == []
            assert gw.poller.cycles >= 6

        # The status command reads the same from the store.
        store = Store.open_readonly(tmp_path / "gw.sqlite")
        try:
            status = store.status()
        finally:
            store.close()
        rows = {m.meter: m for m in status.meters}
        assert rows[SILENT].reachable is False
        assert "no answer" in (rows[SILENT].last_error or "")
        assert rows[REFUSING].reachable is False
        assert rows[LIVE[0]].reachable
        assert rows[LIVE[0]].last_ok is not None
        assert status.tokens_open == {"stored": 1}

        from backend.cli import main

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["gateway", "status", "--config", str(config_path), "--json"]) == 0
        doc = json.loads(out.getvalue())
        assert doc["tokens_in_flight"] == {"stored": 1}
        assert {m["meter"]: m["reachable"] for m in doc["meters"]} == reach


async def test_two_meters_on_one_rs485_line(tmp_path: Path) -> None:
    devices = [wall_meter(m, unit_id=i + 1) for i, m in enumerate(LIVE)]
    with null_modem() as (server_end, client_end):
        async with (
            open_broker(tmp_path / "broker") as broker,
            serve(devices, RtuLayout(server_end, baudrate=38400)),
            running_backend(broker.port) as backend,
        ):
            meters = [
                {
                    "id": m,
                    "driver": "modbus_rtu",
                    "device": client_end,
                    "baudrate": 38400,
                    "unit": i + 1,
                }  # no parity: pseudo-terminals refuse to set one
                for i, m in enumerate(LIVE)
            ]
            text = gateway_toml(
                broker_port=broker.port,
                store=tmp_path / "gw.sqlite",
                meters=meters,
                poll_interval_s=POLL_S,
                timeout_s=1.0,
            )
            async with running_gateway(write_config(tmp_path / "gw.toml", text)):
                await wait_until(lambda: len(backend.distinct_seqs()) >= 3, what="batches")
                for batch in backend.snapshot()[0]:
                    assert sorted(r.meter for r in batch.readings) == sorted(LIVE)
                credit = devices[1].state.credit_milli
                backend.deliver(LIVE[1], credit_token(LIVE[1], 1, 250, now=int(time.time())), 1)
                (result,) = await wait_until(lambda: backend.results_for(LIVE[1], 1), what="token")
                assert result.status is TokenStatus.ACCEPTED
                assert (
                    result.credit_after_milli == credit + 250_000 == devices[1].state.credit_milli
                )


async def test_commands_reach_the_meter_and_are_answered(tmp_path: Path) -> None:
    device = wall_meter(LIVE[0])
    async with (
        open_broker(tmp_path / "broker") as broker,
        serve([device], TcpLayout(port=0)) as fleet,
        running_backend(broker.port) as backend,
    ):
        text = gateway_toml(
            broker_port=broker.port,
            store=tmp_path / "gw.sqlite",
            meters=[tcp_meter(LIVE[0], fleet.ports[0])],
            poll_interval_s=30,
        )
        async with running_gateway(write_config(tmp_path / "gw.toml", text)):
            # The birth follows the subscriptions on the gateway's connection: commands
            # published after it are delivered.
            await wait_until(lambda: backend.snapshot()[2], what="birth")
            now = int(time.time())

            async def run(cid: str, kind: CommandKind, **kw: object) -> tuple[bool, str]:
                backend.command(Command(id=cid, kind=kind, ts=kw.pop("ts", now), **kw))  # type: ignore[arg-type]
                found = await wait_until(
                    lambda: [r for r in backend.command_results if r.id == cid], what=cid
                )
                return found[0].ok, found[0].detail

            assert (await run("d", CommandKind.RELAY_DISCONNECT, meter=LIVE[0]))[0]
            assert device.state.relay is mm.RelayState.OPEN
            assert device.state.remote_disconnect
            # The meter is polled after a command, so the backend sees the open relay at once.
            await wait_until(
                lambda: any(r.relay.value == "open" for b in backend.batches for r in b.readings),
                what="reading with the relay open",
            )
            assert (await run("c", CommandKind.RELAY_CONNECT, meter=LIVE[0]))[0]
            assert device.state.relay is mm.RelayState.CLOSED
            target = now + 3600
            assert (
                await run("t", CommandKind.TIME_SYNC, meter=LIVE[0], args=TimeSyncArgs(ts=target))
            )[0]
            assert device.meter_now() >= target
            ok, _ = await run("e", CommandKind.EMERGENCY_CREDIT, meter=LIVE[0])
            assert ok  # written; the meter decides whether emergency credit is available
            before = len(backend.distinct_seqs())
            assert (await run("p", CommandKind.POLL_NOW))[0]
            assert len(backend.distinct_seqs()) > before or await wait_until(
                lambda: len(backend.distinct_seqs()) > before
            )
            births = len([s for s in backend.states if s.online])
            assert (await run("r", CommandKind.REBIRTH))[0]
            await wait_until(lambda: len([s for s in backend.states if s.online]) > births)
            ok, detail = await run(
                "old", CommandKind.RELAY_DISCONNECT, meter=LIVE[0], ts=now - 86_400
            )
            assert not ok
            assert "limit" in detail
            assert device.state.relay is mm.RelayState.CLOSED
            ok, detail = await run("x", CommandKind.RELAY_CONNECT, meter=12345)
            assert not ok
            assert "not served" in detail
