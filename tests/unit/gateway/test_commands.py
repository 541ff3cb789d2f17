"""The command desk with scripted meters: each kind, age limit, unknown meter, meter failure."""

from __future__ import annotations

import pytest

from firmware_protocol import modbus_map as mm
from firmware_protocol.mqtt import Command, CommandKind, TimeSyncArgs
from gateway.commands import CommandDesk
from tests.unit.gateway.fakes import FakeDriver, FakePublisher

NOW = 1_790_000_000
M = 7


@pytest.fixture
def rig() -> tuple[CommandDesk, FakeDriver, list[object], list[int]]:
    driver = FakeDriver(M)
    polls: list[object] = []
    births: list[int] = []

    async def poll(meters: list[int] | None) -> list[int]:
        polls.append(meters)
        return [99]

    desk = CommandDesk(
        gw="gw-1",
        drivers={M: driver},
        publisher=FakePublisher(),
        now=lambda: NOW,
        max_age_s=600,
        poll=poll,
        rebirth=lambda: births.append(1),
    )
    return desk, driver, polls, births


def cmd(kind: CommandKind, ts: int = NOW, **kw: object) -> Command:
    return Command(id="c-1", kind=kind, ts=ts, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("command", "effect"),
    [
        (cmd(CommandKind.RELAY_CONNECT, meter=M), mm.RelayCommand.CONNECT),
        (cmd(CommandKind.RELAY_DISCONNECT, meter=M), mm.RelayCommand.DISCONNECT),
        (cmd(CommandKind.EMERGENCY_CREDIT, meter=M), "emergency"),
        (cmd(CommandKind.TIME_SYNC, meter=M, args=TimeSyncArgs(ts=NOW + 5)), ("clock", NOW + 5)),
    ],
)
async def test_meter_commands_reach_the_meter_then_poll_it(
    rig, command: Command, effect: object
) -> None:  # type: ignore[no-untyped-def]
    desk, driver, polls, _ = rig
    result = await desk.execute(command)
    assert (result.id, result.ok, result.ts) == ("c-1", True, NOW)
    assert driver.commands == [effect]
    assert polls == [[M]]


async def test_gateway_commands(rig) -> None:  # type: ignore[no-untyped-def]
    desk, _, polls, births = rig
    assert (await desk.execute(cmd(CommandKind.POLL_NOW))).ok
    assert (await desk.execute(cmd(CommandKind.POLL_NOW, meter=M))).ok
    assert polls == [None, [M]]
    assert (await desk.execute(cmd(CommandKind.REBIRTH))).ok
    assert births == [1]


async def test_refusals(rig) -> None:  # type: ignore[no-untyped-def]
    desk, driver, polls, _ = rig
    old = await desk.execute(cmd(CommandKind.RELAY_DISCONNECT, ts=NOW - 601, meter=M))
    assert not old.ok
    assert "issued 601 s ago, the limit is 600 s" in old.detail
    unknown = await desk.execute(cmd(CommandKind.RELAY_CONNECT, meter=8))
    assert not unknown.ok
    assert unknown.detail == "meter 8 is not served by this gateway"
    driver.up = False
    dead = await desk.execute(cmd(CommandKind.RELAY_CONNECT, meter=M))
    assert not dead.ok
    assert dead.detail == "meter 7: no answer"
    assert driver.commands == []
    assert polls == []
