"""The Modbus driver against meter_sim over TCP: operations, identity checks, timing, back-off."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from firmware_protocol import modbus_map as mm
from firmware_protocol.status import TokenStatus
from gateway.config import DriverKind, MeterConfig, RetryPolicy, TcpAddress
from gateway.drivers.modbus import ModbusMeter, ModbusNetwork, silent_interval_s
from gateway.errors import MeterIdentityError, MeterProtocolError, MeterUnreachableError
from meter_sim.device import MeterDevice
from meter_sim.fleet import TcpLayout, serve
from tests.support.broker import free_port
from tests.support.gateway import silent_server, wall_meter
from tests.support.meters import credit_token

pytestmark = pytest.mark.integration

M1, M2 = 4_600_000_001, 4_600_000_002
POLICY = RetryPolicy(timeout_s=0.3, retries=1, backoff_min_s=0.5, backoff_max_s=1.0)


def meter(meter_id: int, port: int, unit: int, policy: RetryPolicy = POLICY) -> MeterConfig:
    return MeterConfig(
        id=meter_id,
        driver=DriverKind.MODBUS_TCP,
        address=TcpAddress(host="127.0.0.1", port=port, unit=unit),
        policy=policy,
    )


@pytest.fixture
async def fleet() -> AsyncIterator[tuple[int, list[MeterDevice]]]:
    devices = [wall_meter(M1, unit_id=1), wall_meter(M2, unit_id=2)]
    async with serve(devices, TcpLayout(port=0)) as f:
        yield f.ports[0], devices


async def test_meters_on_one_port_share_one_client(fleet: tuple[int, list[MeterDevice]]) -> None:
    port, devices = fleet
    net = ModbusNetwork([meter(M1, port, 1), meter(M2, port, 2)], token_result_timeout_s=3)
    try:
        assert len(net.endpoints) == 1
        a, b = net.drivers[M1], net.drivers[M2]
        assert not a.reachable
        snaps = await asyncio.gather(a.read_snapshot(), b.read_snapshot())
        assert [s.meter_id for s in snaps] == [M1, M2]
        assert a.reachable
        assert snaps[0].credit_milli == devices[0].state.credit_milli
    finally:
        net.close()


async def test_token_write_and_read_back(fleet: tuple[int, list[MeterDevice]]) -> None:
    port, devices = fleet
    net = ModbusNetwork([meter(M1, port, 1)], token_result_timeout_s=3)
    driver = net.drivers[M1]
    try:
        msg = credit_token(M1, 3, 250, now=int(time.time()))
        first = await driver.write_message(msg)
        assert (first.status, first.message_id) == (TokenStatus.ACCEPTED, 3)
        assert first.credit_after_milli == devices[0].state.credit_milli
        again = await driver.write_message(msg)
        assert again.status is TokenStatus.ALREADY_APPLIED
        assert again.credit_after_milli == first.credit_after_milli
    finally:
        net.close()


async def test_control_operations(fleet: tuple[int, list[MeterDevice]]) -> None:
    port, devices = fleet
    net = ModbusNetwork([meter(M1, port, 1)], token_result_timeout_s=3)
    driver, device = net.drivers[M1], devices[0]
    try:
        await driver.relay(mm.RelayCommand.DISCONNECT)
        assert device.state.relay is mm.RelayState.OPEN
        await driver.relay(mm.RelayCommand.CONNECT)
        assert device.state.relay is mm.RelayState.CLOSED
        target = int(time.time()) + 600
        await driver.set_clock(target)
        assert device.meter_now() >= target
        await driver.request_emergency_credit()  # accepted; availability is the meter's call
    finally:
        net.close()


async def test_another_meter_at_the_address_is_an_identity_error(
    fleet: tuple[int, list[MeterDevice]],
) -> None:
    port, _ = fleet
    net = ModbusNetwork([meter(M1 + 10, port, 1)], token_result_timeout_s=3)
    driver = net.drivers[M1 + 10]
    try:
        with pytest.raises(MeterIdentityError, match=f"unit 1 is meter {M1}"):
            await driver.read_snapshot()
        assert not driver.reachable
        with pytest.raises(MeterUnreachableError, match="backing off"):
            await driver.read_snapshot()
    finally:
        net.close()


async def test_a_modbus_exception_is_a_protocol_error(fleet: tuple[int, list[MeterDevice]]) -> None:
    port, _ = fleet
    net = ModbusNetwork([meter(M1, port, 1)], token_result_timeout_s=3)
    driver = net.drivers[M1]
    try:
        with pytest.raises(MeterProtocolError, match="Modbus exception 3"):
            # An unlisted relay command value: the meter answers ILLEGAL DATA VALUE.
            await driver._write(mm.register("remote_relay_command").address, [9], "bad write")
        assert driver.reachable
    finally:
        net.close()


async def test_unreachable_meter_backs_off_per_device() -> None:
    net = ModbusNetwork([meter(M1, free_port(), 1)], token_result_timeout_s=3)
    driver: ModbusMeter = net.drivers[M1]
    loop = asyncio.get_running_loop()
    try:
        with pytest.raises(MeterUnreachableError, match="cannot connect"):
            await driver.read_snapshot()
        assert driver.unreachable_until > loop.time()
        start = loop.time()
        with pytest.raises(MeterUnreachableError, match=r"cannot connect.*backing off"):
            await driver.write_message(b"\x01" * 96)
        assert loop.time() - start < 0.05  # fails at once while backing off
        await asyncio.sleep(driver.unreachable_until - loop.time() + 0.01)
        with pytest.raises(MeterUnreachableError, match="cannot connect to"):
            await driver.read_snapshot()  # tried again once the period was over
        with pytest.raises(MeterUnreachableError, match=r"after 2 failure\(s\)"):
            await driver.read_snapshot()
    finally:
        net.close()


async def test_a_silent_meter_costs_its_timeout_times_attempts() -> None:
    async with silent_server() as port:
        net = ModbusNetwork([meter(M1, port, 1)], token_result_timeout_s=3)
        loop = asyncio.get_running_loop()
        try:
            start = loop.time()
            with pytest.raises(MeterUnreachableError, match=r"no answer within 0\.3 s"):
                await net.drivers[M1].read_snapshot()
            # 2 attempts of 0.3 s and one short retry pause
            assert 0.6 <= loop.time() - start < 1.0
        finally:
            net.close()


def test_silent_interval_follows_the_serial_line_spec() -> None:
    assert silent_interval_s(9600) == pytest.approx(3.5 * 11 / 9600)  # ~4.01 ms
    assert silent_interval_s(19200) == pytest.approx(3.5 * 11 / 19200)
    assert silent_interval_s(38400) == 0.00175  # fixed above 19200 baud
