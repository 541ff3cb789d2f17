"""Simulated meters for integration tests: keyed meters on a hand-moved clock, Modbus helpers,
a pseudo-terminal null-modem cable, and the outside programs (mbpoll, the CLI) they talk to.

Every meter trusts the published test key of ``firmware_protocol.vectors`` (TEST_SEED,
key id TEST_KEY_ID), runs the vectors' time-of-use tariff (EXAMPLE_TOU, Europe/Berlin) and
starts at ``T0`` = vectors.NOW, a Monday 16:13:20 local time: inside the 07:00-21:00 peak
band (index 1, 36 500 milli per kWh) and far from a local midnight, so an hour of load is
charged at exactly one price and no standing charge falls due.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
import select
import shutil
import sys
import threading
import tty
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Final

import pytest
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.framer import FramerType

from firmware_protocol import messages
from firmware_protocol import modbus_map as mm
from firmware_protocol.messages import CreditToken, Ed25519Signer, Header, TariffMessage
from firmware_protocol.tariff import Switch
from firmware_protocol.vectors import EXAMPLE_TOU, NOW, TEST_KEY_ID, TEST_SEED, TEST_SEED_2
from meter_sim import core
from meter_sim.clock import ManualClock
from meter_sim.core import MeterConfig
from meter_sim.device import MeterDevice
from meter_sim.profiles import ConstantProfile
from tests.support.broker import in_ci

ROOT: Final = Path(__file__).resolve().parents[2]
T0: Final = NOW
TARIFF: Final = EXAMPLE_TOU
PEAK_MILLI_PER_KWH: Final = 36_500
EUR: Final = EXAMPLE_TOU.currency
#: The backend's signing key as the meters know it.
SIGNER: Final = Ed25519Signer(TEST_KEY_ID, messages.load_private_key(TEST_SEED))
#: Another private key claiming the same key id: what a forger without our key can make.
FORGER: Final = Ed25519Signer(TEST_KEY_ID, messages.load_private_key(TEST_SEED_2))
#: Seconds a Modbus client waits for an answer in these tests.
TIMEOUT_S: Final = 2.0


def make_meter(
    clock: ManualClock,
    *,
    meter_id: int,
    unit_id: int = 1,
    credit_milli: int = 10_000_000,
    watts: int = 1000,
    auto_reconnect: bool = True,
    state_path: Path | None = None,
) -> MeterDevice:
    """A meter installed at ``clock.now()`` with the test key, EXAMPLE_TOU and a constant load."""
    config = MeterConfig(meter_id=meter_id, currency=EUR, auto_reconnect=auto_reconnect)
    state = core.new_meter(
        config,
        tariff=TARIFF,
        trusted_keys={TEST_KEY_ID: SIGNER.public_key_bytes()},
        now=clock.now(),
        credit_milli=credit_milli,
    )
    return MeterDevice(
        unit_id=unit_id,
        config=config,
        state=state,
        profile=ConstantProfile(watts),
        clock=clock,
        state_path=state_path,
    )


def credit_token(
    meter_id: int,
    msg_id: int,
    amount_minor: int,
    *,
    now: int,
    signer: Ed25519Signer = SIGNER,
    valid_from: int | None = None,
    valid_s: int = 86_400,
) -> bytes:
    """A signed EUR credit token, issued a minute before ``now`` unless ``valid_from`` says."""
    issued = now - 60 if valid_from is None else valid_from
    header = Header(
        key_id=signer.key_id,
        meter_id=meter_id,
        msg_id=msg_id,
        issued_at=issued,
        expires_at=issued + valid_s,
    )
    return messages.encode(CreditToken(header, EUR, amount_minor), signer)


def long_tariff_message(meter_id: int, msg_id: int, *, now: int, activation_at: int) -> bytes:
    """A signed tariff message of 317 bytes: more than one FC16 write (120 registers), and
    an odd length, so the last register is padded. Tariff id 43, EXAMPLE_TOU's prices."""
    switches = tuple(Switch(i * 120, i % 2) for i in range(12))
    tariff = dataclasses.replace(
        TARIFF,
        tariff_id=43,
        weekday=switches,
        weekend=switches,
        holiday=switches,
        holidays=tuple(dt.date(2027, 1, 1) + dt.timedelta(days=i) for i in range(32)),
    )
    header = Header(
        key_id=SIGNER.key_id,
        meter_id=meter_id,
        msg_id=msg_id,
        issued_at=now - 60,
        expires_at=now + 3600,
    )
    return messages.encode(TariffMessage(header, tariff, activation_at), SIGNER)


# ----------------------------------------------------------------------- Modbus helpers


@contextlib.asynccontextmanager
async def tcp_client(port: int) -> AsyncIterator[AsyncModbusTcpClient]:
    """A connected pymodbus TCP client that does not retry (a test wants the first answer)."""
    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=TIMEOUT_S, retries=0)
    assert await client.connect(), f"no Modbus TCP server on port {port}"
    try:
        yield client
    finally:
        client.close()


@contextlib.asynccontextmanager
async def rtu_client(
    device: str, *, wait_s: float = TIMEOUT_S
) -> AsyncIterator[AsyncModbusSerialClient]:
    """A connected pymodbus RTU client on a serial device (here: one end of a null modem)."""
    client = AsyncModbusSerialClient(
        port=device, framer=FramerType.RTU, baudrate=9600, timeout=wait_s, retries=0
    )
    assert await client.connect(), f"cannot open serial device {device}"
    try:
        yield client
    finally:
        client.close()


Client = AsyncModbusTcpClient | AsyncModbusSerialClient


async def read_input(client: Client, unit: int, address: int, count: int) -> list[int]:
    """FC4 read that must succeed."""
    rr = await client.read_input_registers(address, count=count, device_id=unit)
    assert not rr.isError(), f"unit {unit}: FC4 {count}@{address} answered {rr}"
    return list(rr.registers)


async def read_poll(client: Client, unit: int = 1) -> mm.MeterSnapshot:
    """The gateway's poll: one FC4 read of the poll block, decoded."""
    words = await read_input(client, unit, mm.POLL_BLOCK_ADDRESS, mm.POLL_BLOCK_COUNT)
    return mm.decode_poll_block(words)


async def read_holding(client: Client, unit: int, address: int, count: int) -> list[int]:
    """FC3 read that must succeed."""
    rr = await client.read_holding_registers(address, count=count, device_id=unit)
    assert not rr.isError(), f"unit {unit}: FC3 {count}@{address} answered {rr}"
    return list(rr.registers)


async def write_plan(client: Client, unit: int, plan: Sequence[mm.Write]) -> None:
    """Perform a write plan (FC16 each step), every write acknowledged."""
    for address, words in plan:
        rr = await client.write_registers(address, words, device_id=unit)
        assert not rr.isError(), f"unit {unit}: FC16 at {address} answered {rr}"


async def send_token(client: Client, unit: int, data: bytes) -> mm.TokenResult:
    """Deliver a signed message as MODBUS.md 'Writing a signed message' says; its result."""
    span = mm.group_span(mm.Group.TOKEN_RESULT)
    before = mm.decode_token_result(await read_input(client, unit, *span))
    await write_plan(client, unit, mm.token_write_plan(data))
    for _ in range(20):
        result = mm.decode_token_result(await read_input(client, unit, *span))
        if result.token_seq == (before.token_seq + 1) % 2**16 and result.token_status.final:
            return result
    raise AssertionError(f"unit {unit}: no final token result after the commit")


# ------------------------------------------------------------------ null-modem cable


@contextlib.contextmanager
def null_modem() -> Iterator[tuple[str, str]]:
    """Two pseudo-terminals wired like a null-modem cable: bytes written to one come out of
    the other. Yields their device names (e.g. /dev/pts/3, /dev/pts/4).

    A single pty pair will not do: its master end has no name a serial client could
    open, and pymodbus opens ports by name. So a relay thread copies between the masters
    of two pairs (what ``socat pty,raw pty,raw`` does, without needing socat). Both
    slaves stay open here as well, so a client or server closing its end never
    hangs the line up under the relay.
    """
    master_a, slave_a = os.openpty()
    master_b, slave_b = os.openpty()
    stop_r, stop_w = os.pipe()
    fds = (master_a, slave_a, master_b, slave_b, stop_r, stop_w)
    for fd in (slave_a, slave_b):
        tty.setraw(fd)  # no echo, no line editing, no CR/LF mangling: RTU frames are binary
    peer = {master_a: master_b, master_b: master_a}

    def relay() -> None:
        while True:
            ready, _, _ = select.select([master_a, master_b, stop_r], [], [])
            if stop_r in ready:
                return
            for fd in ready:
                try:
                    data = os.read(fd, 4096)
                except OSError:  # EIO: no process has the slave open right now
                    continue
                os.write(peer[fd], data)

    thread = threading.Thread(target=relay, name="null-modem", daemon=True)
    thread.start()
    try:
        yield os.ttyname(slave_a), os.ttyname(slave_b)
    finally:
        os.write(stop_w, b"x")
        thread.join(timeout=5)
        for fd in fds:
            os.close(fd)


# ------------------------------------------------------------------ outside programs


def require_binary(name: str) -> str:
    """Path of ``name``; skip the test without it, or fail it with CI=true (CI installs it)."""
    found = shutil.which(name)
    if found is None:
        why = f"{name} is not on PATH (Debian/Ubuntu: apt-get install {name})"
        if in_ci():
            pytest.fail(f"CI=true and {why}")
        pytest.skip(why)
    return found


def voltcredit_command() -> list[str]:
    """How to run the installed ``voltcredit`` console script (entry point backend.cli:main).

    The script beside this interpreter is what ``pip install -e .`` made; running it also
    proves the entry point and the ``voltcredit.commands`` plugin registration. Where
    there is none (a venv without console scripts), ``python -m backend.cli`` runs the
    same ``main``; it still needs the project's metadata installed to find meter-sim.
    """
    script = Path(sys.executable).parent / "voltcredit"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "backend.cli"]
