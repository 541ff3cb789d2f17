"""A gateway killed in the middle of the token path completes the token after a restart, once.

The gateway runs as a real process (``voltcredit gateway run``); the test-only hook
``VOLTCREDIT_GATEWAY_CRASH_AT`` makes it ``os._exit(137)`` — what a SIGKILL looks like —
at an exact point: after storing a token (before the meter sees it), after the meter
applied it (before the result is stored), or after the result is stored (before it is
published). Restarted without the hook, the gateway must report the token as applied
exactly once, and the meter's credit must have moved exactly once. A plain SIGKILL of an
idle gateway must leave its Will (offline) on the state topic.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from firmware_protocol.status import TokenStatus
from meter_sim.device import MeterDevice
from meter_sim.fleet import TcpLayout, serve
from tests.support.gateway import (
    Backend,
    GatewayProcess,
    gateway_toml,
    open_broker,
    running_backend,
    tcp_meter,
    wait_until,
    wall_meter,
)
from tests.support.meters import credit_token

pytestmark = pytest.mark.integration

METER = 4_200_000_101


@dataclass
class Rig:
    tmp: Path
    config: Path
    backend: Backend
    meter: MeterDevice

    def process(self, crash_at: str | None = None) -> GatewayProcess:
        return GatewayProcess(self.config, self.tmp / "gateway.log", crash_at=crash_at)

    def states(self) -> list[object]:
        return self.backend.snapshot()[2]

    async def wait_online(self, boot_seq: int) -> None:
        await wait_until(
            lambda: any(s.online and s.boot_seq == boot_seq for s in self.backend.snapshot()[2]),
            timeout=20,
            what=f"birth of boot {boot_seq}",
        )


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    meter = wall_meter(METER)
    async with (
        open_broker(tmp_path / "broker") as broker,
        serve([meter], TcpLayout(port=0)) as fleet,
        running_backend(broker.port) as backend,
    ):
        config = tmp_path / "gw.toml"
        config.write_text(
            gateway_toml(
                broker_port=broker.port,
                store=tmp_path / "gw.sqlite",
                meters=[tcp_meter(METER, fleet.ports[0])],
                poll_interval_s=5,
            )
        )
        yield Rig(tmp_path, config, backend, meter)


@pytest.mark.parametrize(
    ("crash_at", "applied_before_restart", "final_status"),
    [
        ("after_store", False, TokenStatus.ACCEPTED),
        ("after_write", True, TokenStatus.ALREADY_APPLIED),
        ("after_result", True, TokenStatus.ACCEPTED),
    ],
)
async def test_gateway_killed_in_the_token_path_completes_the_token_once(
    rig: Rig, crash_at: str, applied_before_restart: bool, final_status: TokenStatus
) -> None:
    credit_before = rig.meter.state.credit_milli
    amount_milli = 700 * 1000
    doomed = rig.process(crash_at)
    await doomed.start()
    try:
        await rig.wait_online(1)
        rig.backend.deliver(METER, credit_token(METER, 1, 700, now=int(time.time())), 1)
        assert await doomed.wait() == 137, doomed.log()
    finally:
        await doomed.kill()
    assert f"test hook: crashing at {crash_at}" in doomed.log()
    # Killed without a DISCONNECT: the broker publishes the Will.
    await wait_until(
        lambda: any(not s.online and s.boot_seq == 1 for s in rig.states()), what="the Will"
    )
    expected = credit_before + (amount_milli if applied_before_restart else 0)
    assert rig.meter.state.credit_milli == expected
    assert not [r for r in rig.backend.results_for(METER, 1) if r.status.final]

    survivor = rig.process()
    await survivor.start()
    try:
        await rig.wait_online(2)
        results = await wait_until(
            lambda: [r for r in rig.backend.results_for(METER, 1) if r.status.final],
            timeout=20,
            what="the token's final result",
        )
        # The broker may redeliver the token if its PUBACK did not leave before the kill:
        # the gateway then says "pending" (it has it), never applies it a second time.
        assert [r.status for r in results] == [final_status]
        assert results[0].credit_after_milli == credit_before + amount_milli
        assert rig.meter.state.credit_milli == credit_before + amount_milli
        assert rig.meter.state.last_credit_token_id == 1
    finally:
        assert await survivor.terminate() == 0, survivor.log()
    # A clean stop publishes the offline state itself.
    await wait_until(
        lambda: any(not s.online and s.boot_seq == 2 for s in rig.states()),
        what="offline state of the clean stop",
    )


async def test_sigkill_leaves_the_will_and_a_restart_counts_a_new_boot(rig: Rig) -> None:
    # Started as systemd would: the process reports READY=1 and feeds the watchdog.
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(rig.tmp / "notify"))
        notify.settimeout(10)
        first = GatewayProcess(
            rig.config,
            rig.tmp / "gateway.log",
            env={"NOTIFY_SOCKET": str(rig.tmp / "notify"), "WATCHDOG_USEC": "400000"},
        )
        await first.start()
        try:
            await rig.wait_online(1)
            got = [await asyncio.to_thread(notify.recv, 512) for _ in range(3)]
            assert got[0].startswith(b"READY=1\nSTATUS=gateway gw-test running, boot 1")
            assert b"WATCHDOG=1" in got[1:]
        finally:
            await first.kill()  # SIGKILL
    await wait_until(lambda: any(not s.online and s.boot_seq == 1 for s in rig.states()))
    second = rig.process()
    await second.start()
    try:
        await rig.wait_online(2)
    finally:
        assert await second.terminate() == 0, second.log()
