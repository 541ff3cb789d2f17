"""One simulated meter behind a Modbus unit id: registers in, core operations, state out.

This is the thin shell between pymodbus and :mod:`meter_sim.core`. pymodbus calls
:meth:`MeterDevice.action` on every request before it reads or writes its register
list; the action brings the meter up to the current time, refreshes the input
registers from the meter state (so reads are live), and turns writes to the control
and token registers into core operations. Every change is persisted (atomically)
*before* the reply leaves, so whatever a client has seen survives a crash: a token
acknowledged by a status read is never lost and never applied twice, and a cumulative
register never goes backwards.

Writes are validated per register (SPEC/MODBUS.md): an unknown command value, a bad
token length or a commit word other than the magic is answered with Modbus exception
03 ILLEGAL DATA VALUE and changes nothing; addresses outside the map get exception 02
(pymodbus does that for the gaps we declare invalid). :class:`MeterBus` routes requests
to the units sharing one server and refuses what no unit can answer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Final, cast

from pymodbus.constants import ExcCodes
from pymodbus.exceptions import NoSuchIdException
from pymodbus.simulator import DataType, SimData, SimDevice
from pymodbus.simulator.simcore import SimCore

from firmware_protocol import modbus_map as mm
from firmware_protocol.errors import ProtocolError
from firmware_protocol.modbus_map import Group, RegisterTable
from firmware_protocol.rating import band_at
from firmware_protocol.tariff import MAX_BANDS
from meter_sim import core, persistence
from meter_sim.clock import Clock
from meter_sim.core import LoadProfile, MeterConfig, MeterState

log = logging.getLogger(__name__)

_FC_READ_INPUT: Final = 4
_FC_READ_HOLDING: Final = 3
_HOLDING_WRITES: Final = frozenset((6, 16, 23))
_FREQUENCY_CHZ: Final = 5000


def _blocks(table: RegisterTable) -> list[SimData]:
    """SimData runs covering exactly the map's registers of ``table``; gaps stay invalid."""
    out: list[SimData] = []
    for group in Group:
        if group.table is not table:
            continue
        start, count = mm.group_span(group)
        out.append(
            SimData(
                address=start,
                count=count,
                values=0,
                datatype=DataType.REGISTERS,
                readonly=table is RegisterTable.INPUT,
            )
        )
    # Merge back-to-back runs (POLL and TOKEN_RESULT are contiguous) to keep SimData happy.
    out.sort(key=lambda d: d.address)
    merged: list[SimData] = []
    for d in out:
        block = d
        if merged and merged[-1].address + merged[-1].count == d.address:
            last = merged.pop()
            block = SimData(
                address=last.address,
                count=last.count + d.count,
                values=0,
                datatype=DataType.REGISTERS,
                readonly=last.readonly,
            )
        merged.append(block)
    return merged


def _NO_BITS() -> list[SimData]:  # noqa: N802 - reads as a constant at the call site
    # pymodbus needs a non-empty coil/discrete block; the meter has none, so MeterBus
    # answers every bit function with ILLEGAL FUNCTION before this block is looked at
    # (pymodbus's own range check would answer 02 outside it, 01 inside).
    return [SimData(address=0, count=1, values=False, datatype=DataType.BITS)]


_BIT_FUNCTIONS: Final = frozenset((1, 2, 5, 15))


class MeterDevice:
    """A meter's registers, its core state, and the files that survive power loss."""

    def __init__(
        self,
        *,
        unit_id: int,
        config: MeterConfig,
        state: MeterState,
        profile: LoadProfile,
        clock: Clock,
        state_path: Path | None,
    ) -> None:
        if not 1 <= unit_id <= 247:
            raise ValueError(f"Modbus unit id must be 1..247, got {unit_id}")
        self.unit_id = unit_id
        self.config = config
        self.state = state
        self.profile = profile
        self.clock = clock
        self.state_path = state_path
        self._saved: MeterState | None = None
        self._clock_offset = 0
        self._lock = asyncio.Lock()
        # Saves of one meter never overlap: the fleet's periodic save and a request's save
        # would otherwise write the same temporary file (persistence.save) at once.
        self._save_lock = asyncio.Lock()
        self.requests = 0
        self.sim_device = SimDevice(
            id=unit_id,
            simdata=(
                _NO_BITS(),
                _NO_BITS(),
                _blocks(RegisterTable.HOLDING),
                _blocks(RegisterTable.INPUT),
            ),
            action=self.action,
        )

    # ----------------------------------------------------------------- time and state

    def meter_now(self) -> int:
        """The meter's clock: simulated time plus any offset a time sync applied."""
        return self.clock.now() + self._clock_offset

    def tick(self) -> None:
        """Bring the meter up to its clock (called by the fleet's ticker and by requests)."""
        self.state = core.advance(self.state, self.config, self.meter_now(), self.profile)

    async def persist(self) -> None:
        """Save the state if it changed since the last save (atomic, durable)."""
        async with self._save_lock:
            if self.state_path is None or self.state is self._saved:
                return
            state = self.state
            await asyncio.to_thread(persistence.save, self.state_path, state)
            self._saved = state

    # ----------------------------------------------------------------- register images

    def input_words(self, group: Group) -> list[int]:
        """Current words of an input group."""
        s = self.state
        if group is Group.POLL or group is Group.TOKEN_RESULT:
            return mm.encode_poll_block(self.snapshot())
        if group is Group.INFO:
            passive = s.passive
            return mm.encode_info_block(
                mm.MeterInfo(
                    firmware=core.FIRMWARE,
                    currency_numeric=self.config.currency.numeric,
                    emergency_limit_milli=self.config.emergency_limit_milli,
                    low_credit_milli=self.config.low_credit_milli,
                    passive_tariff_id=0 if passive is None else passive[0].tariff_id,
                    passive_tariff_at=0 if passive is None else passive[1],
                )
            )
        return mm.encode_event_log(mm.EventLog(s.event_count, core.event_log(s)))

    def snapshot(self) -> mm.MeterSnapshot:
        """The poll block's values now."""
        s = self.state
        bands = s.regs.band_wh + (0,) * (MAX_BANDS - len(s.regs.band_wh))
        flags = s.flags
        if s.ec_available(self.config):
            flags |= mm.StatusFlag.EMERGENCY_AVAILABLE
        voltage = self.config.nominal_voltage_dv
        return mm.MeterSnapshot(
            meter_id=self.config.meter_id,
            import_wh=s.import_wh,
            import_wh_bands=bands,
            power_w=s.power_w,
            voltage_dv=voltage,
            frequency_chz=_FREQUENCY_CHZ,
            # I = P / U; voltage in dV and current in mA: mA = W * 10_000 / dV.
            current_ma=s.power_w * 10_000 // voltage,
            credit_milli=s.credit_milli,
            emergency_used_milli=s.emergency_used_milli,
            credit_state=s.credit_state,
            relay_state=s.relay,
            status_flags=flags,
            active_band=band_at(s.tariff, s.now),
            clock_unix=s.now,
            active_tariff_id=s.tariff.tariff_id,
            block_period_index=s.regs.block_period,
            block_period_wh=s.regs.block_period_wh,
            token=mm.TokenResult(
                token_seq=s.token_seq,
                token_status=s.token_status,
                last_message_id=s.last_message_id,
                last_credit_token_id=s.last_credit_token_id,
            ),
        )

    def _refresh_inputs(self, start_address: int, registers: list[int], lo: int, hi: int) -> None:
        for group in (Group.POLL, Group.INFO, Group.EVENTS):
            g_lo, g_count = mm.group_span(group)
            if group is Group.POLL:
                g_count = mm.POLL_BLOCK_COUNT
            if g_lo < hi and lo < g_lo + g_count:
                words = self.input_words(group)
                registers[g_lo - start_address : g_lo - start_address + len(words)] = words

    # ----------------------------------------------------------------- pymodbus hook

    async def action(  # noqa: PLR0917 - pymodbus calls it with six positional arguments
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        current_registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        """pymodbus SimDevice action: runs before every access to this unit's registers."""
        if function_code in _BIT_FUNCTIONS:
            return ExcCodes.ILLEGAL_FUNCTION
        async with self._lock:
            self.requests += 1
            self.tick()
            if function_code == _FC_READ_INPUT:
                self._refresh_inputs(start_address, current_registers, address, address + count)
                await self.persist()
                return None
            if function_code in _HOLDING_WRITES and set_values is not None:
                words = [int(v) for v in set_values]
                result = self._write(start_address, address, current_registers, words)
                if isinstance(result, ExcCodes):
                    return result
                # A holding write carries registers (ints), never bits.
                cast("list[int]", set_values)[:] = result
                await self.persist()
            return None

    def _write(
        self, start_address: int, address: int, current: list[int], words: list[int]
    ) -> list[int] | ExcCodes:
        """Apply a holding write; returns the words pymodbus should store, or an exception."""
        image = current.copy()
        off = address - start_address
        image[off : off + len(words)] = words
        touched = range(address, address + len(words))
        actions = [
            r
            for r in mm.REGISTERS
            if r.table is RegisterTable.HOLDING
            and r.address < touched.stop
            and touched.start < r.end
        ]

        def value(name: str) -> int:
            r = mm.register(name)
            return r.decode(image[r.address - start_address : r.end - start_address])

        try:
            c_lo, c_count = mm.group_span(Group.CONTROL)
            control = mm.decode_control_block(
                image[c_lo - start_address : c_lo - start_address + c_count]
            )
            commit = mm.is_token_commit(value("token_commit"))
            length = value("token_length")
            if (
                any(r.name == "token_length" for r in actions)
                and not 1 <= length <= mm.TOKEN_BLOCK_BYTES
            ):
                return ExcCodes.ILLEGAL_VALUE
            message = None
            if commit:
                r = mm.register("token_block")
                message = mm.decode_token_write(
                    length, image[r.address - start_address : r.end - start_address]
                )
        except ProtocolError as exc:
            log.info("meter %s: refused write at %s: %s", self.config.meter_id, address, exc)
            return ExcCodes.ILLEGAL_VALUE
        state = self.state
        if control.remote_relay_command is not mm.RelayCommand.NONE:
            state = core.remote_command(state, self.config, control.remote_relay_command)
        if control.emergency_credit_request:
            state = core.request_emergency_credit(state, self.config)
        if control.button_press:
            state = core.press_button(state, self.config)
        if control.set_clock_commit:
            self._clock_offset += control.set_clock_unix - self.meter_now()
            state = core.set_clock(state, self.config, control.set_clock_unix)
        if message is not None:
            state = core.write_message(state, self.config, message)
        self.state = state
        # Action registers read back 0 once acted on (MODBUS.md, access W).
        for name in (
            "remote_relay_command",
            "emergency_credit_request",
            "button_press",
            "set_clock_commit",
            "token_commit",
        ):
            r = mm.register(name)
            image[r.address - start_address] = 0
        return image[off : off + len(words)]


def fleet_devices(devices: Sequence[MeterDevice]) -> list[SimDevice]:
    """The pymodbus devices of meters sharing one server (one TCP port or RS-485 line)."""
    ids = [d.unit_id for d in devices]
    if len(set(ids)) != len(ids):
        raise ValueError(f"unit ids on one server must be unique: {sorted(ids)}")
    return [d.sim_device for d in devices]


class MeterBus(SimCore):
    """The units on one server (a TCP port or an RS-485 line), routed strictly by unit id.

    Install it as the server's ``context``. pymodbus 3.16's SimCore hands a request for
    an unknown unit id to device 0 and, having none, fails with KeyError: the server logs
    a traceback and answers 04 SERVER DEVICE FAILURE, on an RS-485 line too, where a slave
    must stay silent when it is not addressed (Modbus over serial line V1.02 §2.2: the
    other slaves, or nobody, answer). Raising NoSuchIdException instead lets the server do
    what its ``ignore_missing_devices`` flag says: silence on an RTU line, 0B GATEWAY
    TARGET DEVICE FAILED TO RESPOND on a TCP port whose units sit behind it (Modbus
    application protocol V1.1b3 §7). Bit functions (FC1, 2, 5, 15) get 01 ILLEGAL
    FUNCTION at every address: the meter has no coils or discrete inputs at all.
    """

    def __init__(self, devices: Sequence[MeterDevice]) -> None:
        super().__init__(fleet_devices(devices))

    def _check_unit(self, device_id: int) -> None:
        if device_id not in self.devices:
            raise NoSuchIdException(f"no meter with unit id {device_id} on this server")

    async def async_getValues(  # noqa: N802 - pymodbus's name
        self, device_id: int, func_code: int, address: int, count: int = 1
    ) -> list[int] | list[bool] | ExcCodes:
        """Read through to the unit's registers, or refuse."""
        self._check_unit(device_id)
        if func_code in _BIT_FUNCTIONS:
            return ExcCodes.ILLEGAL_FUNCTION
        return await super().async_getValues(device_id, func_code, address, count)

    async def async_setValues(  # noqa: N802 - pymodbus's name
        self, device_id: int, func_code: int, address: int, values: list[int] | list[bool]
    ) -> ExcCodes | None:
        """Write through to the unit's registers, or refuse."""
        self._check_unit(device_id)
        if func_code in _BIT_FUNCTIONS:
            return ExcCodes.ILLEGAL_FUNCTION
        return await super().async_setValues(device_id, func_code, address, values)


def replace_state(device: MeterDevice, **changes: object) -> None:
    """Test/CLI helper: change state fields (e.g. credit for a demo) and mark it dirty."""
    device.state = dataclasses.replace(device.state, **changes)  # type: ignore[arg-type]
