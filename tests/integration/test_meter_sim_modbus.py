"""The meter simulator as a Modbus server: pymodbus clients over TCP and over RTU (a pty line).

Each test serves real MeterDevices with :func:`meter_sim.fleet.serve` and talks to them
only through Modbus, the way a gateway does; expected values are worked out by hand from
the tariff (tests/support/meters.py), not read back from the simulator's own code.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pymodbus.constants import ExcCodes
from pymodbus.exceptions import ModbusIOException

from firmware_protocol import messages
from firmware_protocol import modbus_map as mm
from firmware_protocol.messages import Ed25519Signer
from firmware_protocol.modbus_map import CreditState, RelayState, StatusFlag
from firmware_protocol.status import TokenStatus
from firmware_protocol.vectors import TEST_KEY_ID_2, TEST_SEED_2
from meter_sim import persistence
from meter_sim.clock import ManualClock
from meter_sim.device import MeterDevice
from meter_sim.fleet import Fleet, RtuLayout, TcpLayout, serve
from tests.support.meters import (
    FORGER,
    PEAK_MILLI_PER_KWH,
    T0,
    Client,
    credit_token,
    long_tariff_message,
    make_meter,
    null_modem,
    read_holding,
    read_input,
    read_poll,
    rtu_client,
    send_token,
    tcp_client,
    write_plan,
)

pytestmark = pytest.mark.integration

#: A valid signature by a key the meter has never been given.
STRANGER = Ed25519Signer(TEST_KEY_ID_2, messages.load_private_key(TEST_SEED_2))

METER = 4_200_000_001  # the vectors' meter id


@dataclass
class Served:
    """One meter on a TCP port and a client connected to it."""

    clock: ManualClock
    meter: MeterDevice
    fleet: Fleet
    client: Client


@contextlib.asynccontextmanager
async def served(meter: MeterDevice, clock: ManualClock) -> AsyncIterator[Served]:
    async with serve([meter], TcpLayout(port=0)) as fleet, tcp_client(fleet.ports[0]) as client:
        yield Served(clock, meter, fleet, client)


@pytest.fixture
async def tcp() -> AsyncIterator[Served]:
    """A meter with 10.00 EUR credit and a 1 kW load, unit 1 on a free TCP port."""
    clock = ManualClock(T0)
    async with served(make_meter(clock, meter_id=METER), clock) as s:
        yield s


@pytest.fixture
async def broke() -> AsyncIterator[Served]:
    """A meter without credit that waits for the button after a top-up (relay open)."""
    clock = ManualClock(T0)
    meter = make_meter(clock, meter_id=METER, credit_milli=0, auto_reconnect=False)
    async with served(meter, clock) as s:
        yield s


# ----------------------------------------------------------------------- reading


async def test_poll_block_decodes_and_follows_the_clock(tcp: Served) -> None:
    snap = await read_poll(tcp.client)
    assert snap.meter_id == METER
    assert snap.clock_unix == T0
    assert (snap.import_wh, snap.credit_milli) == (0, 10_000_000)
    assert snap.relay_state is RelayState.CLOSED
    assert snap.credit_state is CreditState.IN_CREDIT
    assert snap.active_band == 1  # 16:13 Berlin on a Monday: peak
    assert snap.power_w == 1000
    assert snap.current_ma == 1000 * 10_000 // 2300  # I = P / U at the nominal 230.0 V
    assert snap.voltage_dv == 2300
    assert snap.token == mm.TokenResult(0, TokenStatus.NONE, 0, 0)

    tcp.clock.advance(3600)  # one hour at 1 kW, all of it in the peak band
    snap = await read_poll(tcp.client)
    assert snap.clock_unix == T0 + 3600
    assert snap.import_wh == 1000
    assert snap.import_wh_bands == (0, 1000, 0, 0, 0, 0, 0, 0)
    assert snap.block_period_wh == 1000
    assert snap.credit_milli == 10_000_000 - PEAK_MILLI_PER_KWH

    tcp.clock.advance(1800)
    snap = await read_poll(tcp.client)
    assert snap.import_wh == 1500
    assert snap.credit_milli == 10_000_000 - PEAK_MILLI_PER_KWH * 3 // 2


async def test_info_block_names_the_map_version_and_currency(tcp: Served) -> None:
    info = mm.decode_info_block(await read_input(tcp.client, 1, *mm.group_span(mm.Group.INFO)))
    assert info.currency_numeric == 978  # EUR
    assert info.emergency_limit_milli == tcp.meter.config.emergency_limit_milli
    words = await read_input(tcp.client, 1, mm.register("map_version").address, 1)
    assert words == [mm.MAP_VERSION]


# ----------------------------------------------------------------------- tokens


async def test_credit_token_applies_once(tcp: Served) -> None:
    token = credit_token(METER, 1, 500, now=T0)
    result = await send_token(tcp.client, 1, token)
    assert result == mm.TokenResult(1, TokenStatus.ACCEPTED, 1, 1)
    snap = await read_poll(tcp.client)
    assert snap.credit_milli == 10_000_000 + 500 * 1000
    assert snap.token == result  # the poll block ends with the token result

    result = await send_token(tcp.client, 1, token)
    assert result == mm.TokenResult(2, TokenStatus.ALREADY_APPLIED, 1, 1)
    assert (await read_poll(tcp.client)).credit_milli == 10_500_000


@pytest.mark.parametrize(
    ("token", "status"),
    [
        pytest.param(
            credit_token(METER, 5, 500, now=T0, signer=FORGER),
            TokenStatus.BAD_SIGNATURE,
            id="forged",
        ),
        pytest.param(credit_token(METER + 1, 5, 500, now=T0), TokenStatus.WRONG_METER, id="meter"),
        pytest.param(
            credit_token(METER, 5, 500, now=T0, valid_from=T0 - 2 * 86_400, valid_s=86_400),
            TokenStatus.EXPIRED,
            id="expired",
        ),
        pytest.param(
            credit_token(METER, 5, 500, now=T0, signer=STRANGER),
            TokenStatus.UNKNOWN_KEY,
            id="unknown-key",
        ),
        pytest.param(
            credit_token(METER, 5, 500, now=T0)[:20], TokenStatus.MALFORMED, id="truncated"
        ),
    ],
)
async def test_refused_token_changes_no_credit(
    tcp: Served, token: bytes, status: TokenStatus
) -> None:
    result = await send_token(tcp.client, 1, token)
    assert result == mm.TokenResult(1, status, 0, 0)
    snap = await read_poll(tcp.client)
    assert snap.credit_milli == 10_000_000
    # The refusal is logged with its status as the argument (MODBUS.md EventCode).
    log = mm.decode_event_log(await read_input(tcp.client, 1, *mm.group_span(mm.Group.EVENTS)))
    assert (log.records[0].code, log.records[0].arg) == (mm.EventCode.TOKEN_REJECTED, status)


async def test_message_in_several_writes_then_a_shorter_one_over_its_leftovers(
    tcp: Served,
) -> None:
    # A tariff message too long for one FC16 write (MODBUS.md: at most 120 registers each).
    tariff_msg = long_tariff_message(METER, 3, now=T0, activation_at=T0 + 7200)
    assert len(mm.token_chunks(tariff_msg)) == 2
    result = await send_token(tcp.client, 1, tariff_msg)
    assert result == mm.TokenResult(1, TokenStatus.ACCEPTED, 3, 0)
    snap = await read_poll(tcp.client)
    assert StatusFlag.TARIFF_PENDING in snap.status_flags
    info = mm.decode_info_block(await read_input(tcp.client, 1, *mm.group_span(mm.Group.INFO)))
    assert (info.passive_tariff_id, info.passive_tariff_at) == (43, T0 + 7200)

    # The credit token is shorter: the tariff's bytes after it stay in the block but
    # are not part of the new message (token_length says where it ends).
    result = await send_token(tcp.client, 1, credit_token(METER, 4, 100, now=T0))
    assert result == mm.TokenResult(2, TokenStatus.ACCEPTED, 4, 4)
    assert (await read_poll(tcp.client)).credit_milli == 10_100_000
    leftover = await read_holding(tcp.client, 1, mm.TOKEN_BLOCK_ADDRESS + 150, 8)
    assert leftover == mm.bytes_to_words(tariff_msg[300:316])


async def test_a_token_is_on_disk_before_its_commit_is_acknowledged(tmp_path: Path) -> None:
    clock = ManualClock(T0)
    path = tmp_path / f"{METER}.json"
    meter = make_meter(clock, meter_id=METER, state_path=path)
    async with serve([meter], TcpLayout(port=0)) as fleet, tcp_client(fleet.ports[0]) as client:
        await write_plan(client, 1, mm.token_write_plan(credit_token(METER, 1, 500, now=T0)))
        # The commit's reply is in; nothing else ran (the ticker saves every 30 s).
        saved = persistence.load(path)
        assert saved is not None
        assert (saved.credit_milli, saved.last_credit_token_id) == (10_500_000, 1)
        assert saved.token_status is TokenStatus.ACCEPTED


# ----------------------------------------------------------------------- control


async def test_emergency_credit_closes_the_relay(broke: Served) -> None:
    snap = await read_poll(broke.client)
    assert (snap.credit_state, snap.relay_state) == (
        CreditState.EMERGENCY_AVAILABLE,
        RelayState.OPEN,
    )
    assert StatusFlag.EMERGENCY_AVAILABLE in snap.status_flags
    await write_plan(broke.client, 1, [(mm.register("emergency_credit_request").address, [1])])
    snap = await read_poll(broke.client)
    assert (snap.credit_state, snap.relay_state) == (
        CreditState.EMERGENCY_IN_USE,
        RelayState.CLOSED,
    )
    # The request register reads back 0 once the meter has acted (access W).
    assert await read_holding(broke.client, 1, 0, 8) == [0] * 8
    broke.clock.advance(3600)
    snap = await read_poll(broke.client)
    assert snap.credit_milli == -PEAK_MILLI_PER_KWH
    assert snap.emergency_used_milli == PEAK_MILLI_PER_KWH


async def test_top_up_arms_and_the_button_reconnects(broke: Served) -> None:
    button = [(mm.register("button_press").address, [1])]
    await write_plan(broke.client, 1, button)  # not armed: nothing happens
    assert (await read_poll(broke.client)).relay_state is RelayState.OPEN

    await send_token(broke.client, 1, credit_token(METER, 1, 2000, now=T0))
    snap = await read_poll(broke.client)
    assert snap.credit_milli == 2_000_000
    assert snap.relay_state is RelayState.OPEN  # auto_reconnect off: wait for the customer
    assert StatusFlag.RELAY_ARMED in snap.status_flags

    await write_plan(broke.client, 1, button)
    snap = await read_poll(broke.client)
    assert snap.relay_state is RelayState.CLOSED
    assert StatusFlag.RELAY_ARMED not in snap.status_flags
    log = mm.decode_event_log(await read_input(broke.client, 1, *mm.group_span(mm.Group.EVENTS)))
    assert (log.records[0].code, log.records[0].arg) == (
        mm.EventCode.RELAY_CLOSED,
        mm.RelayCause.BUTTON,
    )


async def test_remote_disconnect_and_connect(tcp: Served) -> None:
    command = mm.register("remote_relay_command").address
    await write_plan(tcp.client, 1, [(command, [mm.RelayCommand.DISCONNECT])])
    snap = await read_poll(tcp.client)
    assert snap.relay_state is RelayState.OPEN
    assert StatusFlag.REMOTE_DISCONNECT in snap.status_flags
    assert snap.power_w == 0
    tcp.clock.advance(600)  # no energy flows through an open relay
    assert (await read_poll(tcp.client)).import_wh == 0

    await write_plan(tcp.client, 1, [(command, [mm.RelayCommand.CONNECT])])
    snap = await read_poll(tcp.client)
    assert snap.relay_state is RelayState.CLOSED
    assert StatusFlag.REMOTE_DISCONNECT not in snap.status_flags
    assert await read_holding(tcp.client, 1, command, 1) == [0]


async def test_set_clock(tcp: Served) -> None:
    target = T0 - 30 * 86_400  # an RTC correction backwards: only the clock moves
    await write_plan(tcp.client, 1, mm.set_clock_plan(target))
    snap = await read_poll(tcp.client)
    assert snap.clock_unix == target
    assert (snap.import_wh, snap.credit_milli) == (0, 10_000_000)
    log = mm.decode_event_log(await read_input(tcp.client, 1, *mm.group_span(mm.Group.EVENTS)))
    assert (log.records[0].code, log.records[0].time_unix, log.records[0].arg) == (
        mm.EventCode.CLOCK_SET,
        target,
        T0,
    )
    tcp.clock.advance(120)  # the meter's clock keeps the offset the sync applied
    assert (await read_poll(tcp.client)).clock_unix == target + 120
    # set_clock_unix is RW and keeps the value; the commit reads back 0.
    words = await read_holding(tcp.client, 1, 3, 5)
    assert words == [*mm.register("set_clock_unix").encode(target), 0]


# ----------------------------------------------------------------------- exceptions


@pytest.mark.parametrize(
    ("address", "count"),
    [(76, 1), (70, 10), (99, 2), (117, 1), (282, 1), (300, 1), (60_000, 1)],
)
async def test_unmapped_input_address_is_exception_02(
    tcp: Served, address: int, count: int
) -> None:
    rr = await tcp.client.read_input_registers(address, count=count, device_id=1)
    assert rr.isError()
    assert rr.exception_code == ExcCodes.ILLEGAL_ADDRESS


async def test_unmapped_holding_address_is_exception_02_and_changes_nothing(tcp: Served) -> None:
    before = await read_poll(tcp.client)
    for address, words in [(8, [1]), (50, [1]), (358, [1]), (6, [0, 0, 0, 0])]:
        rr = await tcp.client.write_registers(address, words, device_id=1)
        assert rr.isError(), address
        assert rr.exception_code == ExcCodes.ILLEGAL_ADDRESS, address
    # An input-register address (the poll block) is not writable: FC6/FC16 reach the
    # holding table only, where address 40 is a gap.
    rr = await tcp.client.write_register(40, 1, device_id=1)
    assert rr.exception_code == ExcCodes.ILLEGAL_ADDRESS
    assert await read_poll(tcp.client) == before


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("remote_relay_command", 7),
        ("emergency_credit_request", 2),
        ("button_press", 0xFFFF),
        ("set_clock_commit", 1),
        ("token_commit", 1),
        ("token_length", 0),
        ("token_length", mm.TOKEN_BLOCK_BYTES + 1),
    ],
)
async def test_invalid_control_value_is_exception_03_and_changes_nothing(
    tcp: Served, name: str, value: int
) -> None:
    before = await read_poll(tcp.client)
    holding_before = await read_holding(tcp.client, 1, 0, 8)
    rr = await tcp.client.write_register(mm.register(name).address, value, device_id=1)
    assert rr.isError()
    assert rr.exception_code == ExcCodes.ILLEGAL_VALUE
    assert await read_poll(tcp.client) == before
    assert await read_holding(tcp.client, 1, 0, 8) == holding_before
    assert await read_holding(tcp.client, 1, 100, 1) == [0]


async def test_a_refused_multi_register_write_stores_none_of_it(tcp: Served) -> None:
    # A valid relay command packed with an invalid EC request: the meter acts on neither.
    rr = await tcp.client.write_registers(0, [mm.RelayCommand.DISCONNECT, 9], device_id=1)
    assert rr.exception_code == ExcCodes.ILLEGAL_VALUE
    assert (await read_poll(tcp.client)).relay_state is RelayState.CLOSED
    assert await read_holding(tcp.client, 1, 0, 2) == [0, 0]


@pytest.mark.parametrize("address", [0, 1, 100, 5000])
async def test_bit_functions_are_exception_01(tcp: Served, address: int) -> None:
    client = tcp.client
    for rr in (
        await client.read_coils(address, count=1, device_id=1),
        await client.read_discrete_inputs(address, count=8, device_id=1),
        await client.write_coil(address, value=True, device_id=1),
        await client.write_coils(address, [True, False], device_id=1),
    ):
        assert rr.isError(), rr
        assert rr.exception_code == ExcCodes.ILLEGAL_FUNCTION, rr


async def test_unknown_unit_on_a_tcp_port_is_exception_0b(tcp: Served) -> None:
    # The port is a gateway to its units (Modbus over TCP): an absent one does not answer.
    rr = await tcp.client.read_input_registers(0, count=1, device_id=9)
    assert rr.isError()
    assert rr.exception_code == ExcCodes.GATEWAY_NO_RESPONSE
    assert (await read_poll(tcp.client)).meter_id == METER  # the port still serves unit 1


async def test_an_error_inside_serve_comes_out_unchanged() -> None:
    clock = ManualClock(T0)
    with pytest.raises(LookupError, match="from the body"):
        async with serve([make_meter(clock, meter_id=METER)], TcpLayout(port=0)):
            raise LookupError("from the body")


# ----------------------------------------------------------------------- fleets


async def test_the_ticker_opens_the_relay_when_nobody_polls() -> None:
    clock = ManualClock(T0)
    meter = make_meter(clock, meter_id=METER, credit_milli=10_000)  # 0.10 EUR at 1 kW
    async with serve([meter], TcpLayout(port=0)) as fleet:
        clock.advance(3600)  # credit runs out after about 16 minutes
        for _ in range(100):  # the ticker runs once per real second
            if fleet.ticks:
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the fleet's ticker did not run within 5 s")
        assert meter.requests == 0
        assert meter.state.relay is RelayState.OPEN
        assert meter.state.credit_state is CreditState.EMERGENCY_AVAILABLE
        async with tcp_client(fleet.ports[0]) as client:
            snap = await read_poll(client)
        assert snap.relay_state is RelayState.OPEN
        assert snap.import_wh < 1000  # supply stopped when the credit did
        assert snap.credit_milli <= 0


async def test_fleet_on_one_port_answers_per_unit() -> None:
    clock = ManualClock(T0)
    meters = [
        make_meter(clock, meter_id=METER + i, unit_id=i + 1, watts=500 * (i + 1)) for i in range(3)
    ]
    async with serve(meters, TcpLayout(port=0)) as fleet, tcp_client(fleet.ports[0]) as client:
        assert len(fleet.ports) == 1
        clock.advance(3600)
        for i in range(3):
            snap = await read_poll(client, i + 1)
            assert (snap.meter_id, snap.import_wh) == (METER + i, 500 * (i + 1))
        # A token for unit 2's meter, sent to unit 2, changes only that meter.
        await send_token(client, 2, credit_token(METER + 1, 1, 300, now=T0 + 3600))
        credit = [(await read_poll(client, u)).credit_milli for u in (1, 2, 3)]
        assert credit == [
            10_000_000 - PEAK_MILLI_PER_KWH // 2,
            10_000_000 - PEAK_MILLI_PER_KWH + 300_000,
            10_000_000 - PEAK_MILLI_PER_KWH * 3 // 2,
        ]


async def test_fleet_with_a_port_per_meter() -> None:
    clock = ManualClock(T0)
    meters = [make_meter(clock, meter_id=METER + i) for i in range(3)]
    async with serve(meters, TcpLayout(port=0, per_port=1)) as fleet:
        assert len(set(fleet.ports)) == 3
        for port, meter_id in zip(fleet.ports, (METER, METER + 1, METER + 2), strict=True):
            async with tcp_client(port) as client:
                assert (await read_poll(client, 1)).meter_id == meter_id
                rr = await client.read_input_registers(0, count=1, device_id=2)
                assert rr.exception_code == ExcCodes.GATEWAY_NO_RESPONSE


# ----------------------------------------------------------------------- RTU


async def test_rtu_line_with_three_meters() -> None:
    clock = ManualClock(T0)
    meters = [make_meter(clock, meter_id=METER + i, unit_id=i + 1) for i in range(3)]
    with null_modem() as (server_end, client_end):
        async with serve(meters, RtuLayout(server_end)), rtu_client(client_end) as client:
            clock.advance(3600)
            for unit in (1, 2, 3):
                snap = await read_poll(client, unit)
                assert (snap.meter_id, snap.clock_unix) == (METER + unit - 1, T0 + 3600)
                assert snap.import_wh == 1000

            result = await send_token(client, 3, credit_token(METER + 2, 1, 700, now=T0))
            assert result == mm.TokenResult(1, TokenStatus.ACCEPTED, 1, 1)
            credit = 10_000_000 - PEAK_MILLI_PER_KWH + 700_000
            assert (await read_poll(client, 3)).credit_milli == credit
            assert (await read_poll(client, 1)).token.token_seq == 0

            # Exceptions travel over RTU as over TCP.
            rr = await client.read_input_registers(300, count=1, device_id=2)
            assert rr.exception_code == ExcCodes.ILLEGAL_ADDRESS


async def test_rtu_unit_not_on_the_line_gets_no_answer() -> None:
    clock = ManualClock(T0)
    meters = [make_meter(clock, meter_id=METER + i, unit_id=i + 1) for i in range(3)]
    with null_modem() as (server_end, client_end):
        async with (
            serve(meters, RtuLayout(server_end)),
            rtu_client(client_end, wait_s=0.5) as client,
        ):
            with pytest.raises(ModbusIOException):
                await client.read_input_registers(0, count=1, device_id=4)
            # The line is still in step afterwards: the next request gets its own answer.
            assert (await read_poll(client, 2)).meter_id == METER + 1
            assert sum(m.requests for m in meters) == 1
