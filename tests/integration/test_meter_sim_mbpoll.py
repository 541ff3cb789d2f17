"""mbpoll, an outside Modbus master, against the simulator: proves firmware_protocol/MODBUS.md.

Every mbpoll command here is taken from MODBUS.md word for word (the test fails if the
document stops showing it); only the port of the documented ``127.0.0.1 -p 5020`` is
swapped for the test server's. The values mbpoll prints are decoded with the arithmetic
the document gives and compared with the meter's own state.
"""

from __future__ import annotations

import asyncio
import re
import shlex
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

from firmware_protocol import modbus_map as mm
from firmware_protocol.modbus_map import CreditState, RelayState
from firmware_protocol.status import TokenStatus
from meter_sim.clock import ManualClock
from meter_sim.device import MeterDevice, replace_state
from meter_sim.fleet import Fleet, RtuLayout, TcpLayout, serve
from tests.support.meters import (
    PEAK_MILLI_PER_KWH,
    ROOT,
    T0,
    credit_token,
    long_tariff_message,
    make_meter,
    null_modem,
    require_binary,
)

pytestmark = pytest.mark.integration

DOC: Final = (ROOT / "firmware_protocol" / "MODBUS.md").read_text(encoding="utf-8")
DOC_HOST: Final = "127.0.0.1 -p 5020"
METER: Final = 4_200_000_001
#: Past 2**32 Wh, with bit 31 of the low half set: mbpoll prints that half as negative.
BIG_WH: Final = 2**32 + 2**31 + 12_345
_VALUE = re.compile(r"^\[(\d+)\]:\s+(\S+)", re.MULTILINE)


def documented(command: str) -> str:
    """``command`` after checking that MODBUS.md shows exactly it."""
    assert command in DOC, f"MODBUS.md no longer documents: {command}"
    return command


def documented_register(name: str, address: int, kind: str) -> None:
    """Check the register table row: ``name`` at 0-based ``address``, ref address + 1."""
    pattern = rf"^\| {address} \| {address + 1} \| \d+ \| {kind} \|.*`{name}`"
    row = re.search(pattern, DOC, re.MULTILINE)
    assert row, f"MODBUS.md has no row for {name} at {address} ({kind})"


@dataclass
class Mbpoll:
    """Runs documented mbpoll commands against one served meter."""

    binary: str
    port: int
    meter: MeterDevice
    clock: ManualClock

    async def run(self, command: str) -> str:
        """Run a documented command line, which must succeed; its output."""
        argv = shlex.split(documented(command).replace(DOC_HOST, f"127.0.0.1 -p {self.port}"))
        assert argv[0] == "mbpoll"
        code, out, err = await run_mbpoll(self.binary, argv[1:])
        assert code == 0, f"{command}: exit {code}: {err}"
        return out

    async def read(self, command: str) -> dict[int, str]:
        """The ``[ref]: value`` lines mbpoll prints for a read, by reference."""
        return printed(await self.run(command))

    async def read_args(self, args: list[str]) -> dict[int, str]:
        """A read with options not shown verbatim in MODBUS.md, once, at this server."""
        code, out, err = await run_mbpoll(
            self.binary, [*args, "-1", "127.0.0.1", "-p", str(self.port)]
        )
        assert code == 0, f"{args}: exit {code}: {err}"
        return printed(out)


async def run_mbpoll(binary: str, args: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of one mbpoll run."""
    proc = await asyncio.create_subprocess_exec(
        binary, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 10)
    return await proc.wait(), out.decode(), err.decode()


def printed(out: str) -> dict[int, str]:
    """The ``[ref]: value`` lines of mbpoll's output, by reference."""
    return {int(ref): value for ref, value in _VALUE.findall(out)}


def words(values: dict[int, str], start: int, count: int) -> list[int]:
    """Registers ``start``..``start+count`` as printed by ``-t 3`` or ``-t 3:hex``."""
    return [int(values[ref], 0) for ref in range(start, start + count)]


def u64_from_words(w: list[int]) -> int:
    """MODBUS.md: value = w0*2^48 + w1*2^32 + w2*2^16 + w3."""
    return w[0] * 2**48 + w[1] * 2**32 + w[2] * 2**16 + w[3]


def i64_from_words(w: list[int]) -> int:
    """MODBUS.md: as u64, minus 2^64 when w0 >= 32768."""
    return u64_from_words(w) - (2**64 if w[0] >= 32768 else 0)


@pytest.fixture
async def mbpoll() -> AsyncIterator[Mbpoll]:
    """A meter in debt (EC available, relay open) on a free port; mbpoll aimed at it."""
    binary = require_binary("mbpoll")
    clock = ManualClock(T0)
    meter = make_meter(clock, meter_id=METER, credit_milli=-123_456, watts=2500)
    replace_state(meter, import_wh=BIG_WH)
    fleet: Fleet
    async with serve([meter], TcpLayout(port=0)) as fleet:
        yield Mbpoll(binary, fleet.ports[0], meter, clock)


async def test_whole_poll_block_with_0_and_1_based_references(mbpoll: Mbpoll) -> None:
    zero = await mbpoll.read("mbpoll -a 1 -0 -t 3:hex -r 0 -c 76 -1 127.0.0.1 -p 5020")
    one = await mbpoll.read("mbpoll -a 1 -t 3:hex -r 1 -c 76 -1 127.0.0.1 -p 5020")
    assert sorted(zero) == list(range(76))
    assert sorted(one) == list(range(1, 77))  # the 'ref' column: address + 1
    assert [zero[a] for a in range(76)] == [one[a + 1] for a in range(76)]
    snap = mm.decode_poll_block(words(zero, 0, 76))
    assert snap == mbpoll.meter.snapshot()
    assert (snap.meter_id, snap.import_wh, snap.credit_milli) == (METER, BIG_WH, -123_456)


async def test_energy_credit_and_relay_as_documented(mbpoll: Mbpoll) -> None:
    halves = await mbpoll.read("mbpoll -a 1 -0 -t 3:int -B -r 4 -c 2 -1 127.0.0.1 -p 5020")
    hi, lo = int(halves[4]), int(halves[6])  # -c counts 32-bit values: refs 4 and 6
    assert lo < 0  # bit 31 set: printed signed, as the document warns
    assert hi * 2**32 + (lo % 2**32) == BIG_WH == mbpoll.meter.state.import_wh

    four = await mbpoll.read("mbpoll -a 1 -0 -t 3:hex -r 46 -c 4 -1 127.0.0.1 -p 5020")
    credit = i64_from_words(words(four, 46, 4))
    assert credit == -123_456 == mbpoll.meter.state.credit_milli

    # No example reads these two alone; the table and the -t 3 / -0 rules say how.
    documented_register("credit_state", 54, "u16")
    documented_register("relay_state", 55, "u16")
    state = await mbpoll.read_args(["-a", "1", "-0", "-t", "3", "-r", "54", "-c", "2"])
    assert state == {54: "3", 55: "0"}  # EMERGENCY_AVAILABLE, relay OPEN (MODBUS.md enums)
    one_based = await mbpoll.read_args(["-a", "1", "-t", "3", "-r", "56"])  # ref = address + 1
    assert one_based == {56: "0"}
    assert mbpoll.meter.state.credit_state is CreditState.EMERGENCY_AVAILABLE
    assert mbpoll.meter.state.relay is RelayState.OPEN


async def test_emergency_credit_written_with_mbpoll(mbpoll: Mbpoll) -> None:
    pending = "mbpoll -a 1 -0 -t 4 -r 0 -c 8 -1 127.0.0.1 -p 5020"
    assert await mbpoll.read(pending) == dict.fromkeys(range(8), "0")
    out = await mbpoll.run("mbpoll -a 1 -0 -t 4 -r 1 -1 127.0.0.1 -p 5020 1")
    assert "Written 1 references" in out
    assert mbpoll.meter.state.credit_state is CreditState.EMERGENCY_IN_USE
    assert mbpoll.meter.state.relay is RelayState.CLOSED
    state = await mbpoll.read_args(["-a", "1", "-0", "-t", "3", "-r", "54", "-c", "2"])
    assert state == {54: "4", 55: "1"}
    assert await mbpoll.read(pending) == dict.fromkeys(range(8), "0")  # W: acted, reads 0

    mbpoll.clock.advance(3600)  # an hour at 2.5 kW on emergency credit, all in peak
    power = await mbpoll.read("mbpoll -a 1 -0 -t 3:int -B -r 40 -c 1 -1 127.0.0.1 -p 5020")
    assert power == {40: "2500"}
    four = await mbpoll.read("mbpoll -a 1 -0 -t 3:hex -r 46 -c 4 -1 127.0.0.1 -p 5020")
    expected = -123_456 - 2500 * PEAK_MILLI_PER_KWH // 1000
    assert i64_from_words(words(four, 46, 4)) == expected == mbpoll.meter.state.credit_milli
    halves = await mbpoll.read("mbpoll -a 1 -0 -t 3:int -B -r 4 -c 2 -1 127.0.0.1 -p 5020")
    assert int(halves[4]) * 2**32 + int(halves[6]) % 2**32 == BIG_WH + 2500


async def test_remote_disconnect_and_set_clock_with_mbpoll(mbpoll: Mbpoll) -> None:
    await mbpoll.run("mbpoll -a 1 -0 -t 4 -r 1 -1 127.0.0.1 -p 5020 1")  # supply on (EC)
    await mbpoll.run("mbpoll -a 1 -0 -t 4 -r 0 -1 127.0.0.1 -p 5020 2")
    assert mbpoll.meter.state.relay is RelayState.OPEN
    assert mbpoll.meter.state.remote_disconnect

    await mbpoll.run("mbpoll -a 1 -0 -t 4 -r 3 -1 127.0.0.1 -p 5020 0 0 26965 47360")
    await mbpoll.run("mbpoll -a 1 -0 -t 4 -r 7 -1 127.0.0.1 -p 5020 49420")
    assert mbpoll.meter.snapshot().clock_unix == 1_767_225_600  # 2026-01-01T00:00:00Z


async def test_refused_write_and_read_make_mbpoll_fail(mbpoll: Mbpoll) -> None:
    await mbpoll.run("mbpoll -a 1 -0 -t 4 -r 0 -1 127.0.0.1 -p 5020 2")
    host = ["-1", "127.0.0.1", "-p", str(mbpoll.port)]
    # A relay command 7 does not exist: exception 03, and the DISCONNECT still holds.
    code, _, err = await run_mbpoll(
        mbpoll.binary, ["-a", "1", "-0", "-t", "4", "-r", "0", *host, "7"]
    )
    assert code != 0
    assert "Illegal data value" in err
    assert mbpoll.meter.state.remote_disconnect
    # Past the poll block and the token result: exception 02.
    code, _, err = await run_mbpoll(mbpoll.binary, ["-a", "1", "-0", "-t", "3", "-r", "76", *host])
    assert code != 0
    assert "Illegal data address" in err


async def test_token_delivered_with_the_documented_shell_recipe(
    mbpoll: Mbpoll, tmp_path: Path
) -> None:
    recipe = documented(
        "mbpoll -a 1 -0 -t 4 -r 100 -1 127.0.0.1 -p 5020 $(stat -c %s msg.bin)\n"
        "# 2. the bytes as big-endian words, 120 per FC16 write (od pads an odd\n"
        "#    last byte with 0x00)\n"
        "od -An -v -tu2 --endian=big msg.bin | xargs -n 120 | {\n"
        "  ref=102; while read -r words; do\n"
        "    mbpoll -a 1 -0 -t 4 -r $ref -1 127.0.0.1 -p 5020 $words; ref=$((ref + 120))\n"
        "  done; }\n"
        "# 3. commit (0xC0DE = 49374)\n"
        "mbpoll -a 1 -0 -t 4 -r 101 -1 127.0.0.1 -p 5020 49374\n"
    )
    script = "set -e\n" + recipe.replace(DOC_HOST, f"127.0.0.1 -p {mbpoll.port}").replace(
        "mbpoll ", f"{shlex.quote(mbpoll.binary)} "
    )
    read_result = "mbpoll -a 1 -0 -t 3 -r 70 -c 6 -1 127.0.0.1 -p 5020"

    async def deliver(message: bytes) -> list[int]:
        (tmp_path / "msg.bin").write_bytes(message)
        proc = await asyncio.create_subprocess_exec(
            "bash",
            "-c",
            script,
            cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(proc.communicate(), 20)
        assert await proc.wait() == 0, err.decode()
        return words(await mbpoll.read(read_result), 70, 6)

    # 317 bytes: two FC16 writes from the xargs loop, and an odd last byte od pads.
    tariff = long_tariff_message(METER, 1, now=T0, activation_at=T0 + 86_400)
    assert len(tariff) % 2 == 1
    assert len(mm.token_chunks(tariff)) == 2
    assert await deliver(tariff) == [1, TokenStatus.ACCEPTED, 0, 1, 0, 0]
    assert mbpoll.meter.state.passive is not None
    assert mbpoll.meter.state.passive[0].tariff_id == 43

    # Then a shorter credit token over the tariff's leftovers in the block.
    assert await deliver(credit_token(METER, 2, 2000, now=T0)) == [
        2,
        TokenStatus.ACCEPTED,
        0,
        2,
        0,
        2,
    ]
    ids = await mbpoll.read("mbpoll -a 1 -0 -t 3:int -B -r 72 -c 2 -1 127.0.0.1 -p 5020")
    assert ids == {72: "2", 74: "2"}
    assert mbpoll.meter.state.credit_milli == -123_456 + 2000 * 1000


async def test_mbpoll_over_rtu_on_a_pty_line() -> None:
    binary = require_binary("mbpoll")
    clock = ManualClock(T0)
    meters = [make_meter(clock, meter_id=METER + i, unit_id=i + 1) for i in range(2)]
    with null_modem() as (server_end, client_end):
        async with serve(meters, RtuLayout(server_end)):
            # MODBUS.md: over RS-485 give e.g. `-m rtu -b 9600 -P none /dev/ttyUSB0`.
            assert "`-m rtu -b 9600 -P none /dev/ttyUSB0`" in DOC
            argv = ["-m", "rtu", "-b", "9600", "-P", "none", "-a", "2", "-0", "-t", "3:hex"]
            argv += ["-r", "0", "-c", "4", "-1", client_end]
            proc = await asyncio.create_subprocess_exec(
                binary, *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
            )
            out, err = await asyncio.wait_for(proc.communicate(), 10)
            assert await proc.wait() == 0, err.decode()
            assert u64_from_words(words(printed(out.decode()), 0, 4)) == METER + 1
