"""The voltcredit prepaid meter's Modbus register map as data, with the word codecs of every block.

This module is the single source of truth for addresses and encodings: the meter
simulator serves its registers with the ``encode_*`` functions, the gateway reads them
with the ``decode_*`` functions, and ``MODBUS.md`` is :func:`render_markdown` of the
same table (a test keeps them equal).

Conventions (Modbus Application Protocol Specification V1.1b3, "the spec"):

* Registers are 16-bit and big-endian (spec §4.2). The spec defines nothing wider;
  for 32- and 64-bit values we put the **high word first** (so the bytes of a value
  read in address order are its big-endian encoding, as in SunSpec).
* Addresses are 0-based PDU addresses (spec §4.4: the data model numbers elements
  from 1, the PDU addresses element X as X-1); mbpoll's default 1-based *reference*
  is ``address + 1``.
* Measurements are **input registers** (read with FC4); everything a client may write
  is a **holding register** (read FC3, write FC6/FC16). A read carries at most 125
  registers (spec §6.3, §6.4), a write-multiple at most 123 (spec §6.12).
* Scaling follows the DLMS/COSEM register *scaler* (IEC 62056-6-2, IC 3
  ``scaler_unit``): value in ``unit`` = raw * 10**scale. Money is in rating units
  (``milli`` = 1/1000 of a currency minor unit, see :mod:`firmware_protocol.units`).

Values the meter must not take from an unauthenticated Modbus write (credit, tariff,
emergency-credit limit, low-credit threshold, keys) are read-only here: they change only
through signed messages written to the token block.
"""

from __future__ import annotations

import enum
import functools
import itertools
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, TypeVar

from firmware_protocol.errors import (
    MalformedError,
    PayloadTooLargeError,
    UnitError,
    UnknownVersionError,
)
from firmware_protocol.status import TokenStatus
from firmware_protocol.tariff import MAX_BANDS

#: Version of this register layout, readable at input register ``map_version``. Any
#: change of an address, type or enum value bumps it; gateways refuse other versions.
MAP_VERSION: Final = 1
#: Bytes the token block holds. Must be >= messages.MAX_MESSAGE_LEN (a test checks it).
TOKEN_BLOCK_BYTES: Final = 512
TOKEN_BLOCK_WORDS: Final = TOKEN_BLOCK_BYTES // 2
#: Registers per FC16 chunk of the token block: under the spec's 123 (§6.12), a round number.
MAX_CHUNK_WORDS: Final = 120
#: Most registers one FC3/FC4 read returns (spec §6.3, §6.4).
MAX_READ_WORDS: Final = 125
#: Written to ``token_commit`` to make the meter process the token block ("CODE").
TOKEN_COMMIT_MAGIC: Final = 0xC0DE
#: Written to ``set_clock_commit`` to make the meter take ``set_clock_unix`` ("CLOC").
CLOCK_COMMIT_MAGIC: Final = 0xC10C
#: Events the meter keeps readable, newest first.
EVENT_LOG_LEN: Final = 16
_WORD_MAX: Final = 0xFFFF


# --------------------------------------------------------------------------- enums


class CreditState(enum.IntEnum):
    """Where the meter's credit logic stands (``credit_state``; 0 is invalid); see CREDIT_STATE."""

    IN_CREDIT = 1
    LOW_CREDIT = 2
    EMERGENCY_AVAILABLE = 3
    EMERGENCY_IN_USE = 4
    FRIENDLY_HOURS_DEBT = 5
    OUT_OF_CREDIT = 6
    DISCONNECTED = 7


CREDIT_STATE: Final[Mapping[CreditState, str]] = MappingProxyType(
    {
        CreditState.IN_CREDIT: "credit above the low-credit threshold",
        CreditState.LOW_CREDIT: "0 < credit <= low-credit threshold",
        CreditState.EMERGENCY_AVAILABLE: "credit exhausted or nearly; emergency credit offered",
        CreditState.EMERGENCY_IN_USE: "supply continues on emergency credit",
        CreditState.FRIENDLY_HOURS_DEBT: "out of credit in friendly hours: supply on, debt grows",
        CreditState.OUT_OF_CREDIT: "credit and emergency credit exhausted; disconnection due",
        CreditState.DISCONNECTED: "supply disconnected for lack of credit",
    }
)


class RelayState(enum.IntEnum):
    """Position of the supply relay (``relay_state``)."""

    OPEN = 0  #: supply off
    CLOSED = 1  #: supply on


class RelayCommand(enum.IntEnum):
    """Remote (utility) relay command written to ``remote_relay_command``; see RELAY_COMMAND."""

    NONE = 0
    CONNECT = 1
    DISCONNECT = 2


RELAY_COMMAND: Final[Mapping[RelayCommand, str]] = MappingProxyType(
    {
        RelayCommand.NONE: "no command pending (the meter writes 0 back once it has acted)",
        RelayCommand.CONNECT: "lift a remote disconnect; the credit rules still decide supply",
        RelayCommand.DISCONNECT: "open the relay and hold it open until a remote CONNECT",
    }
)


class RelayCause(enum.IntEnum):
    """Why the relay moved: the ``arg`` of RELAY_OPENED / RELAY_CLOSED events."""

    CREDIT = 1
    BUTTON = 2
    REMOTE = 3
    TAMPER = 4


RELAY_CAUSE: Final[Mapping[RelayCause, str]] = MappingProxyType(
    {
        RelayCause.CREDIT: "the meter's own credit rules",
        RelayCause.BUTTON: "the customer's button (button_press)",
        RelayCause.REMOTE: "a remote command (remote_relay_command)",
        RelayCause.TAMPER: "tamper protection",
    }
)


class StatusFlag(enum.IntFlag):
    """Bits of ``status_flags`` (bit 0 = least significant); see STATUS_FLAG. Others are 0."""

    LOW_CREDIT = 1 << 0
    EMERGENCY_IN_USE = 1 << 1
    FRIENDLY_HOURS = 1 << 2
    RELAY_ARMED = 1 << 3
    TAMPER = 1 << 4
    CLOCK_NOT_SET = 1 << 5
    TARIFF_PENDING = 1 << 6
    EMERGENCY_AVAILABLE = 1 << 7
    REMOTE_DISCONNECT = 1 << 8


STATUS_FLAG: Final[Mapping[StatusFlag, str]] = MappingProxyType(
    {
        StatusFlag.LOW_CREDIT: "credit at or below the low-credit threshold",
        StatusFlag.EMERGENCY_IN_USE: "running on emergency credit",
        StatusFlag.FRIENDLY_HOURS: "a friendly (non-disconnect) period is active now",
        StatusFlag.RELAY_ARMED: "supply may return: waiting for the customer's button",
        StatusFlag.TAMPER: "a tamper condition was detected and not cleared",
        StatusFlag.CLOCK_NOT_SET: "clock never set (or lost): time-of-use bands unreliable",
        StatusFlag.TARIFF_PENDING: "a passive tariff waits for its activation time",
        StatusFlag.EMERGENCY_AVAILABLE: "emergency credit can be activated now",
        StatusFlag.REMOTE_DISCONNECT: "the relay is held open by a remote DISCONNECT",
    }
)


_FLAG_MASK: Final = functools.reduce(operator.or_, (int(f) for f in StatusFlag), 0)


class EventCode(enum.IntEnum):
    """Code of an event-log record; :data:`EVENT_ARG` says what its ``arg`` holds."""

    NONE = 0
    POWER_UP = 1
    POWER_DOWN = 2
    TOKEN_ACCEPTED = 3
    TOKEN_REJECTED = 4
    RELAY_OPENED = 5
    RELAY_CLOSED = 6
    EMERGENCY_CREDIT_ACTIVATED = 7
    TARIFF_ACTIVATED = 8
    KEY_CHANGED = 9
    STANDING_CHARGE = 10
    CLOCK_SET = 11
    TAMPER_DETECTED = 12


#: Meaning of an event record's u32 ``arg``, per code (rendered into MODBUS.md).
EVENT_ARG: Final[Mapping[EventCode, str]] = MappingProxyType(
    {
        EventCode.NONE: "empty slot: time and arg are 0",
        EventCode.POWER_UP: "0",
        EventCode.POWER_DOWN: "0",
        EventCode.TOKEN_ACCEPTED: "message id of the accepted signed message",
        EventCode.TOKEN_REJECTED: "TokenStatus of the refusal",
        EventCode.RELAY_OPENED: "RelayCause",
        EventCode.RELAY_CLOSED: "RelayCause",
        EventCode.EMERGENCY_CREDIT_ACTIVATED: "emergency credit granted, rating units (milli)",
        EventCode.TARIFF_ACTIVATED: "id of the tariff now active",
        EventCode.KEY_CHANGED: "key id added or revoked",
        EventCode.STANDING_CHARGE: "standing charge taken, rating units (milli)",
        EventCode.CLOCK_SET: "clock before the change, Unix seconds",
        EventCode.TAMPER_DETECTED: "0",
    }
)


# ------------------------------------------------------------------ value codecs


class RegType(enum.Enum):
    """Wire type of a register entry: integers of 1, 2 or 4 words, or a byte block."""

    U16 = "u16"
    U32 = "u32"
    I32 = "i32"
    U64 = "u64"
    I64 = "i64"
    BYTES = "bytes"  #: two bytes per word, first byte in the high half

    @property
    def words(self) -> int:
        """Registers one value occupies (0 for BYTES, whose length is the entry's count)."""
        return _WIDTH[self][0]

    @property
    def signed(self) -> bool:
        """True for two's-complement types."""
        return _WIDTH[self][1]

    @property
    def bounds(self) -> tuple[int, int]:
        """Smallest and largest value of a numeric type."""
        bits = 16 * self.words
        if self.signed:
            return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        return 0, (1 << bits) - 1


_WIDTH: Final[Mapping[RegType, tuple[int, bool]]] = {
    RegType.U16: (1, False),
    RegType.U32: (2, False),
    RegType.I32: (2, True),
    RegType.U64: (4, False),
    RegType.I64: (4, True),
    RegType.BYTES: (0, False),
}


def _numeric(kind: RegType) -> RegType:
    if kind is RegType.BYTES:
        raise UnitError("the token block is bytes, not a number: use the token helpers")
    return kind


def check_words(words: Sequence[int], count: int, what: str) -> list[int]:
    """Return ``words`` as a list after checking a peer's reply: exactly ``count`` u16 values.

    A Modbus reply of the wrong length or with non-16-bit values is the peer's fault,
    so this raises :class:`MalformedError` naming ``what``.
    """
    if isinstance(words, (bytes, bytearray, str)):
        raise MalformedError(f"{what}: expected a sequence of 16-bit registers, got bytes/str")
    out = list(words)
    if len(out) != count:
        raise MalformedError(f"{what}: expected {count} registers, got {len(out)}")
    for i, w in enumerate(out):
        if type(w) is not int or not 0 <= w <= _WORD_MAX:
            raise MalformedError(f"{what}: register {i} is not a 16-bit value: {w!r}")
    return out


def _check_value(kind: RegType, value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UnitError(f"{name} must be an integer, got {type(value).__name__}")
    lo, hi = _numeric(kind).bounds
    if not lo <= value <= hi:
        raise UnitError(f"{name} must be in {lo}..{hi} ({kind.value}), got {value}")
    return int(value)


def encode_value(kind: RegType, value: int, name: str = "value") -> list[int]:
    """Words of ``value`` as ``kind``, high word first; out of range raises :class:`UnitError`."""
    v = _check_value(kind, value, name)
    raw = v.to_bytes(2 * kind.words, "big", signed=kind.signed)
    return [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]


def decode_value(kind: RegType, words: Sequence[int], name: str = "value") -> int:
    """The integer in ``words`` (high word first); a wrong count raises :class:`MalformedError`."""
    checked = check_words(words, _numeric(kind).words, name)
    raw = b"".join(w.to_bytes(2, "big") for w in checked)
    return int.from_bytes(raw, "big", signed=kind.signed)


def bytes_to_words(data: bytes) -> list[int]:
    """Pack bytes two per register, first byte high (spec §4.2); an odd tail is padded with 0x00."""
    padded = bytes(data) + b"\x00" * (len(data) % 2)
    return [int.from_bytes(padded[i : i + 2], "big") for i in range(0, len(padded), 2)]


def words_to_bytes(words: Sequence[int], length: int, what: str = "token block") -> bytes:
    """The first ``length`` bytes packed in ``words`` (the inverse of :func:`bytes_to_words`)."""
    if length < 0:
        raise UnitError(f"{what}: length must be >= 0, got {length}")
    need = (length + 1) // 2
    checked = check_words(words, len(words), what)
    if len(checked) < need:
        raise MalformedError(f"{what}: {length} bytes need {need} registers, got {len(checked)}")
    return b"".join(w.to_bytes(2, "big") for w in checked[:need])[:length]


# ------------------------------------------------------------------- the table


class RegisterTable(enum.Enum):
    """Modbus data table (spec §4.3) and the function codes that reach it."""

    INPUT = "input"
    HOLDING = "holding"

    @property
    def read_function(self) -> int:
        """FC4 Read Input Registers or FC3 Read Holding Registers."""
        return 4 if self is RegisterTable.INPUT else 3

    @property
    def mbpoll_type(self) -> str:
        """mbpoll ``-t`` value of the table (3 = input registers, 4 = holding registers)."""
        return "3" if self is RegisterTable.INPUT else "4"


class Access(enum.Enum):
    """What a client may do with a register."""

    R = "R"  #: read only
    RW = "RW"  #: read and write; reads return what was written
    W = "W"  #: write to request an action; reads return the pending value, 0 once acted on


class Group(enum.Enum):
    """A contiguous run of registers read or written together."""

    POLL = "poll"
    TOKEN_RESULT = "token_result"  # noqa: S105 - a group name, not a password
    INFO = "info"
    EVENTS = "events"
    CONTROL = "control"
    TOKEN = "token"  # noqa: S105 - a group name, not a password

    @property
    def table(self) -> RegisterTable:
        """The table the group lives in."""
        if self in (Group.CONTROL, Group.TOKEN):
            return RegisterTable.HOLDING
        return RegisterTable.INPUT


@dataclass(frozen=True, slots=True)
class Register:
    """One entry of the map: where a value lives and how its words encode it."""

    name: str
    table: RegisterTable
    address: int
    count: int
    type: RegType
    scale: int
    unit: str
    access: Access
    description: str
    group: Group

    def __post_init__(self) -> None:
        if not self.name.isidentifier() or not self.name.islower():
            raise ValueError(f"register name must be a lower-case identifier: {self.name!r}")
        if self.type is not RegType.BYTES and self.count != self.type.words:
            raise ValueError(f"{self.name}: {self.type.value} takes {self.type.words} registers")
        if self.count < 1 or not 0 <= self.address <= self.address + self.count <= _WORD_MAX + 1:
            raise ValueError(f"{self.name}: registers {self.address}+{self.count} out of range")
        if self.group.table is not self.table:
            raise ValueError(f"{self.name}: group {self.group.value} is not in {self.table.value}")
        if self.table is RegisterTable.INPUT and self.access is not Access.R:
            raise ValueError(f"{self.name}: input registers are read-only (spec §4.3)")

    @property
    def end(self) -> int:
        """First address after the entry."""
        return self.address + self.count

    def encode(self, value: int) -> list[int]:
        """Words of ``value`` for this register (:func:`encode_value`)."""
        return encode_value(self.type, value, self.name)

    def decode(self, words: Sequence[int]) -> int:
        """Value of this register's words (:func:`decode_value`)."""
        return decode_value(self.type, words, self.name)


def _group(
    group: Group, start: int, rows: Iterable[tuple[str, RegType, int, str, Access, str]]
) -> tuple[Register, ...]:
    """Lay ``rows`` out back to back from ``start``: one group, no gaps, by construction."""
    out: list[Register] = []
    address = start
    for name, kind, scale, unit, access, description in rows:
        count = TOKEN_BLOCK_WORDS if kind is RegType.BYTES else kind.words
        out.append(
            Register(
                name, group.table, address, count, kind, scale, unit, access, description, group
            )
        )
        address += count
    return tuple(out)


_R, _RW, _W = Access.R, Access.RW, Access.W
_U16, _U32, _U64, _I64 = RegType.U16, RegType.U32, RegType.U64, RegType.I64
_MONEY = "minor unit"  # with scale -3: rating units (milli)

#: Input 0..: everything a gateway polls every interval, in one FC4 read (with TOKEN_RESULT).
_POLL = _group(
    Group.POLL,
    0,
    [
        ("meter_id", _U64, 0, "", _R, "serial number; check it on every poll (RS-485 mix-ups)"),
        ("import_wh", _U64, 0, "Wh", _R, "cumulative import energy, all bands (OBIS 1.8.0)"),
        *(
            (
                f"import_wh_band{i}",
                _U64,
                0,
                "Wh",
                _R,
                f"cumulative import in tariff band index {i} (OBIS 1.8.{i + 1})",
            )
            for i in range(MAX_BANDS)
        ),
        ("power_w", _U32, 0, "W", _R, "instantaneous active import power"),
        ("voltage_dv", _U16, -1, "V", _R, "RMS voltage, deci-volts"),
        ("frequency_chz", _U16, -2, "Hz", _R, "mains frequency, centi-hertz"),
        ("current_ma", _U32, -3, "A", _R, "RMS current, milliamperes"),
        ("credit_milli", _I64, -3, _MONEY, _R, "credit in rating units; negative = debt"),
        ("emergency_used_milli", _I64, -3, _MONEY, _R, "emergency credit used, rating units"),
        ("credit_state", _U16, 0, "", _R, "CreditState"),
        ("relay_state", _U16, 0, "", _R, "RelayState: 0 open, 1 closed"),
        ("status_flags", _U16, 0, "", _R, "StatusFlag bits"),
        ("active_band", _U16, 0, "", _R, "tariff band index energy is counted in now"),
        ("clock_unix", _U64, 0, "s", _R, "meter clock, Unix seconds (UTC)"),
        ("active_tariff_id", _U32, 0, "", _R, "id of the active tariff; 0 = none"),
        (
            "block_period_index",
            _U32,
            0,
            "",
            _R,
            "block period: year*12 + month-1, local (rating.block_period_of)",
        ),
        ("block_period_wh", _U64, 0, "Wh", _R, "import energy in the current block period"),
    ],
)
#: Input registers right after POLL: the outcome of the last committed signed message.
_TOKEN_RESULT = _group(
    Group.TOKEN_RESULT,
    _POLL[-1].end,
    [
        ("token_seq", _U16, 0, "", _R, "+1 (mod 65536) on every token commit"),
        ("token_status", _U16, 0, "", _R, "TokenStatus of the commit numbered token_seq"),
        ("last_message_id", _U32, 0, "", _R, "message id of the last processed message"),
        ("last_credit_token_id", _U32, 0, "", _R, "message id of the last accepted credit token"),
    ],
)
#: Input 100..: identity and parameters that change rarely (read at connect and hourly).
_INFO = _group(
    Group.INFO,
    100,
    [
        ("map_version", _U16, 0, "", _R, f"layout version of this map, {MAP_VERSION}"),
        ("firmware_major", _U16, 0, "", _R, "firmware version, major"),
        ("firmware_minor", _U16, 0, "", _R, "firmware version, minor"),
        ("firmware_patch", _U16, 0, "", _R, "firmware version, patch"),
        ("currency_numeric", _U16, 0, "", _R, "ISO 4217 numeric code of the credit"),
        ("emergency_limit_milli", _I64, -3, _MONEY, _R, "emergency credit limit, rating units"),
        ("low_credit_milli", _I64, -3, _MONEY, _R, "low-credit threshold, rating units"),
        ("passive_tariff_id", _U32, 0, "", _R, "tariff waiting for activation; 0 = none"),
        ("passive_tariff_at", _U32, 0, "s", _R, "its activation time, Unix seconds; 0 = none"),
    ],
)
#: Input 200..: event count and the last EVENT_LOG_LEN events, newest first (event_00).
_EVENTS = _group(
    Group.EVENTS,
    200,
    [
        ("event_count", _U32, 0, "", _R, "events ever logged (mod 2**32)"),
        *(
            row
            for i in range(EVENT_LOG_LEN)
            for row in (
                (f"event_{i:02d}_time", _U32, 0, "s", _R, f"event {i}: Unix seconds"),
                (f"event_{i:02d}_code", _U16, 0, "", _R, f"event {i}: EventCode"),
                (f"event_{i:02d}_arg", _U32, 0, "", _R, f"event {i}: argument (see EventCode)"),
            )
        ),
    ],
)
#: Holding 0..: requests to the meter.
_CONTROL = _group(
    Group.CONTROL,
    0,
    [
        ("remote_relay_command", _U16, 0, "", _W, "RelayCommand from the utility (not the button)"),
        ("emergency_credit_request", _U16, 0, "", _W, "write 1: activate emergency credit"),
        ("button_press", _U16, 0, "", _W, "write 1: customer's button (reconnect when armed)"),
        ("set_clock_unix", _U64, 0, "s", _RW, "new clock, Unix seconds; taken on commit"),
        ("set_clock_commit", _U16, 0, "", _W, f"write 0x{CLOCK_COMMIT_MAGIC:04X}: set the clock"),
    ],
)
#: Holding 100..: the signed-message write block.
_TOKEN = _group(
    Group.TOKEN,
    100,
    [
        ("token_length", _U16, 0, "B", _RW, f"message length in bytes, 1..{TOKEN_BLOCK_BYTES}"),
        ("token_commit", _U16, 0, "", _W, f"write 0x{TOKEN_COMMIT_MAGIC:04X}: process the block"),
        ("token_block", RegType.BYTES, 0, "", _RW, "message bytes, 2 per register, high first"),
    ],
)

#: Every register, in document order.
REGISTERS: Final[tuple[Register, ...]] = (
    *_POLL,
    *_TOKEN_RESULT,
    *_INFO,
    *_EVENTS,
    *_CONTROL,
    *_TOKEN,
)
#: Registers by name.
REGISTERS_BY_NAME: Final[Mapping[str, Register]] = MappingProxyType({r.name: r for r in REGISTERS})


def register(name: str) -> Register:
    """The register called ``name``; an unknown name raises :class:`KeyError`."""
    try:
        return REGISTERS_BY_NAME[name]
    except KeyError:
        raise KeyError(f"no Modbus register named {name!r}") from None


def group_registers(group: Group) -> tuple[Register, ...]:
    """The registers of ``group`` in address order."""
    return tuple(r for r in REGISTERS if r.group is group)


def group_span(group: Group) -> tuple[int, int]:
    """``(first address, register count)`` of ``group``."""
    regs = group_registers(group)
    return regs[0].address, regs[-1].end - regs[0].address


def check_layout(registers: Sequence[Register]) -> None:
    """Raise :class:`ValueError` if names repeat or two entries of one table overlap."""
    names = [r.name for r in registers]
    if len(set(names)) != len(names):
        raise ValueError("register names repeat")
    for table in RegisterTable:
        ordered = sorted((r for r in registers if r.table is table), key=lambda r: r.address)
        for a, b in itertools.pairwise(ordered):
            if b.address < a.end:
                raise ValueError(f"{table.value} registers {a.name} and {b.name} overlap")


check_layout(REGISTERS)

POLL_BLOCK_ADDRESS: Final = _POLL[0].address
#: One FC4 read of POLL and TOKEN_RESULT together.
POLL_BLOCK_COUNT: Final = _TOKEN_RESULT[-1].end - POLL_BLOCK_ADDRESS
TOKEN_RESULT_ADDRESS, TOKEN_RESULT_COUNT = group_span(Group.TOKEN_RESULT)
INFO_ADDRESS, INFO_COUNT = group_span(Group.INFO)
EVENTS_ADDRESS, EVENTS_COUNT = group_span(Group.EVENTS)
CONTROL_ADDRESS, CONTROL_COUNT = group_span(Group.CONTROL)
TOKEN_BLOCK_ADDRESS: Final = register("token_block").address


# --------------------------------------------------------------- block helpers

_E = TypeVar("_E", bound=enum.IntEnum)
_M = TypeVar("_M", bound=enum.Enum)


def _decode_regs(regs: Sequence[Register], words: Sequence[int], what: str) -> dict[str, int]:
    start = regs[0].address
    checked = check_words(words, regs[-1].end - start, what)
    return {r.name: r.decode(checked[r.address - start : r.end - start]) for r in regs}


def _encode_regs(regs: Sequence[Register], values: Mapping[str, int]) -> list[int]:
    start = regs[0].address
    out = [0] * (regs[-1].end - start)
    for r in regs:
        out[r.address - start : r.end - start] = r.encode(values[r.name])
    return out


def _enum(cls: type[_E], raw: int, name: str) -> _E:
    try:
        return cls(raw)
    except ValueError:
        raise MalformedError(f"{name}: {raw} is not a {cls.__name__}") from None


def _flag(raw: int, name: str) -> bool:
    if raw not in (0, 1):
        raise MalformedError(f"{name}: request registers hold 0 or 1, got {raw}")
    return raw == 1


def _magic(raw: int, magic: int, name: str) -> bool:
    if raw not in (0, magic):
        raise MalformedError(f"{name}: holds 0 or 0x{magic:04X}, got 0x{raw:04X}")
    return raw == magic


def _range(
    value: object, name: str, kind: RegType, *, lo: int | None = None, hi: int | None = None
) -> None:
    """Check a field against its wire type and an optional tighter bound (our own error)."""
    v = _check_value(kind, value, name)
    low, high = kind.bounds
    low, high = low if lo is None else lo, high if hi is None else hi
    if not low <= v <= high:
        raise UnitError(f"{name} must be in {low}..{high}, got {v}")


def _field(value: object, name: str, *, lo: int | None = None, hi: int | None = None) -> None:
    """:func:`_range` with the wire type of the register called ``name``."""
    _range(value, name, register(name).type, lo=lo, hi=hi)


def _is(value: object, cls: type, name: str) -> None:
    if not isinstance(value, cls):
        raise UnitError(f"{name} must be a {cls.__name__}, got {type(value).__name__}")


def _as_peer_error(exc: UnitError, what: str) -> MalformedError:
    # A value that decoded fine word by word but breaks a field rule came from the
    # peer, so it is reported as malformed input, not as our own argument error.
    return MalformedError(f"{what}: {exc}")


# ---------------------------------------------------------------- token result


@dataclass(frozen=True, slots=True)
class TokenResult:
    """Outcome registers of the last committed signed message (input TOKEN_RESULT group)."""

    token_seq: int
    token_status: TokenStatus
    last_message_id: int
    last_credit_token_id: int

    def __post_init__(self) -> None:
        _field(self.token_seq, "token_seq")
        _is(self.token_status, TokenStatus, "token_status")
        _field(self.last_message_id, "last_message_id")
        _field(self.last_credit_token_id, "last_credit_token_id")


def encode_token_result(result: TokenResult) -> list[int]:
    """The TOKEN_RESULT registers (input ``TOKEN_RESULT_ADDRESS``.., 6 words)."""
    return _encode_regs(_TOKEN_RESULT, _token_values(result))


def decode_token_result(words: Sequence[int]) -> TokenResult:
    """Parse an FC4 read of ``TOKEN_RESULT_COUNT`` registers at ``TOKEN_RESULT_ADDRESS``."""
    v = _decode_regs(_TOKEN_RESULT, words, "token result")
    return TokenResult(
        token_seq=v["token_seq"],
        token_status=_enum(TokenStatus, v["token_status"], "token_status"),
        last_message_id=v["last_message_id"],
        last_credit_token_id=v["last_credit_token_id"],
    )


def _token_values(result: TokenResult) -> dict[str, int]:
    return {
        "token_seq": result.token_seq,
        "token_status": int(result.token_status),
        "last_message_id": result.last_message_id,
        "last_credit_token_id": result.last_credit_token_id,
    }


# ------------------------------------------------------------------ poll block


@dataclass(frozen=True, slots=True)
class MeterSnapshot:
    """Everything in the poll block: one FC4 read of ``POLL_BLOCK_COUNT`` registers at 0."""

    meter_id: int
    import_wh: int
    import_wh_bands: tuple[int, ...]  #: index = tariff band index, always MAX_BANDS long
    power_w: int
    voltage_dv: int
    frequency_chz: int
    current_ma: int
    credit_milli: int
    emergency_used_milli: int
    credit_state: CreditState
    relay_state: RelayState
    status_flags: StatusFlag
    active_band: int
    clock_unix: int
    active_tariff_id: int
    block_period_index: int
    block_period_wh: int
    token: TokenResult

    def __post_init__(self) -> None:
        for name in _SNAPSHOT_INTS:
            _field(getattr(self, name), name)
        _field(self.meter_id, "meter_id", lo=1)
        _field(self.emergency_used_milli, "emergency_used_milli", lo=0)
        _field(self.active_band, "active_band", hi=MAX_BANDS - 1)
        if not isinstance(self.import_wh_bands, tuple) or len(self.import_wh_bands) != MAX_BANDS:
            raise UnitError(f"import_wh_bands must be a tuple of {MAX_BANDS} values")
        for i, wh in enumerate(self.import_wh_bands):
            _field(wh, f"import_wh_band{i}")
        _is(self.credit_state, CreditState, "credit_state")
        _is(self.relay_state, RelayState, "relay_state")
        _is(self.status_flags, StatusFlag, "status_flags")
        _is(self.token, TokenResult, "token")


_SNAPSHOT_INTS: Final = (
    "import_wh",
    "power_w",
    "voltage_dv",
    "frequency_chz",
    "current_ma",
    "credit_milli",
    "clock_unix",
    "active_tariff_id",
    "block_period_index",
    "block_period_wh",
)


def encode_poll_block(snapshot: MeterSnapshot) -> list[int]:
    """The ``POLL_BLOCK_COUNT`` input registers from address 0 (what a meter serves)."""
    values = {name: getattr(snapshot, name) for name in _SNAPSHOT_INTS}
    values |= {f"import_wh_band{i}": wh for i, wh in enumerate(snapshot.import_wh_bands)}
    values |= {
        "meter_id": snapshot.meter_id,
        "emergency_used_milli": snapshot.emergency_used_milli,
        "credit_state": int(snapshot.credit_state),
        "relay_state": int(snapshot.relay_state),
        "status_flags": int(snapshot.status_flags),
        "active_band": snapshot.active_band,
    }
    return _encode_regs(_POLL, values) + encode_token_result(snapshot.token)


def decode_poll_block(words: Sequence[int]) -> MeterSnapshot:
    """Parse one FC4 read of ``POLL_BLOCK_COUNT`` registers at ``POLL_BLOCK_ADDRESS``."""
    checked = check_words(words, POLL_BLOCK_COUNT, "poll block")
    split = len(checked) - TOKEN_RESULT_COUNT
    v = _decode_regs(_POLL, checked[:split], "poll block")
    token = decode_token_result(checked[split:])
    flags = v["status_flags"]
    if flags & ~_FLAG_MASK:
        raise MalformedError(f"status_flags: undefined bits 0x{flags & ~_FLAG_MASK:04X} set")
    try:
        return MeterSnapshot(
            **{name: v[name] for name in _SNAPSHOT_INTS},
            meter_id=v["meter_id"],
            import_wh_bands=tuple(v[f"import_wh_band{i}"] for i in range(MAX_BANDS)),
            emergency_used_milli=v["emergency_used_milli"],
            credit_state=_enum(CreditState, v["credit_state"], "credit_state"),
            relay_state=_enum(RelayState, v["relay_state"], "relay_state"),
            status_flags=StatusFlag(flags),
            active_band=v["active_band"],
            token=token,
        )
    except UnitError as exc:
        raise _as_peer_error(exc, "poll block") from exc


# ------------------------------------------------------------------ info block


@dataclass(frozen=True, slots=True)
class MeterInfo:
    """The INFO group (input ``INFO_ADDRESS``..): identity and rarely changing parameters."""

    firmware: tuple[int, int, int]  #: (major, minor, patch)
    currency_numeric: int
    emergency_limit_milli: int
    low_credit_milli: int
    passive_tariff_id: int = 0
    passive_tariff_at: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.firmware, tuple) or len(self.firmware) != 3:
            raise UnitError("firmware must be a (major, minor, patch) tuple")
        for part, value in zip(("major", "minor", "patch"), self.firmware, strict=True):
            _field(value, f"firmware_{part}")
        _field(self.currency_numeric, "currency_numeric", lo=1, hi=999)
        _field(self.emergency_limit_milli, "emergency_limit_milli", lo=0)
        _field(self.low_credit_milli, "low_credit_milli", lo=0)
        _field(self.passive_tariff_id, "passive_tariff_id")
        _field(self.passive_tariff_at, "passive_tariff_at")
        if (self.passive_tariff_id == 0) is not (self.passive_tariff_at == 0):
            raise UnitError("passive_tariff_id and passive_tariff_at are both 0 or both set")


def encode_info_block(info: MeterInfo) -> list[int]:
    """The ``INFO_COUNT`` input registers from ``INFO_ADDRESS``; writes :data:`MAP_VERSION`."""
    major, minor, patch = info.firmware
    return _encode_regs(
        _INFO,
        {
            "map_version": MAP_VERSION,
            "firmware_major": major,
            "firmware_minor": minor,
            "firmware_patch": patch,
            "currency_numeric": info.currency_numeric,
            "emergency_limit_milli": info.emergency_limit_milli,
            "low_credit_milli": info.low_credit_milli,
            "passive_tariff_id": info.passive_tariff_id,
            "passive_tariff_at": info.passive_tariff_at,
        },
    )


def decode_info_block(words: Sequence[int]) -> MeterInfo:
    """Parse an FC4 read of the INFO group; another ``map_version`` raises UnknownVersionError."""
    v = _decode_regs(_INFO, words, "info block")
    if v["map_version"] != MAP_VERSION:
        raise UnknownVersionError(
            f"map_version: meter speaks register map {v['map_version']}, we speak {MAP_VERSION}"
        )
    try:
        return MeterInfo(
            firmware=(v["firmware_major"], v["firmware_minor"], v["firmware_patch"]),
            currency_numeric=v["currency_numeric"],
            emergency_limit_milli=v["emergency_limit_milli"],
            low_credit_milli=v["low_credit_milli"],
            passive_tariff_id=v["passive_tariff_id"],
            passive_tariff_at=v["passive_tariff_at"],
        )
    except UnitError as exc:
        raise _as_peer_error(exc, "info block") from exc


# ------------------------------------------------------------------- event log


@dataclass(frozen=True, slots=True)
class EventRecord:
    """One event-log record: when, what, and a code-specific argument (u32)."""

    time_unix: int
    code: EventCode
    arg: int

    def __post_init__(self) -> None:
        _range(self.time_unix, "time_unix", RegType.U32)
        _is(self.code, EventCode, "code")
        _range(self.arg, "arg", RegType.U32)
        if self.code is EventCode.NONE and (self.time_unix or self.arg):
            raise UnitError("an empty event slot (EventCode.NONE) has time and arg 0")


EMPTY_EVENT: Final = EventRecord(0, EventCode.NONE, 0)


@dataclass(frozen=True, slots=True)
class EventLog:
    """The EVENTS group: events ever logged and the last ``EVENT_LOG_LEN``, newest first."""

    event_count: int
    records: tuple[EventRecord, ...]

    def __post_init__(self) -> None:
        _field(self.event_count, "event_count")
        if not isinstance(self.records, tuple) or len(self.records) != EVENT_LOG_LEN:
            raise UnitError(f"records must be a tuple of {EVENT_LOG_LEN} EventRecord")
        for r in self.records:
            _is(r, EventRecord, "records[]")

    def since(self, previous_count: int) -> tuple[EventRecord, ...]:
        """Records logged after a reader saw ``previous_count``, newest first.

        At most ``EVENT_LOG_LEN``: if more were logged, the oldest of them are gone and
        the reader can tell because ``event_count - previous_count`` is larger.
        """
        new = (self.event_count - previous_count) % (1 << 32)
        return self.records[: min(new, EVENT_LOG_LEN)]


def encode_event_log(log: EventLog) -> list[int]:
    """The ``EVENTS_COUNT`` input registers from ``EVENTS_ADDRESS``."""
    values = {"event_count": log.event_count}
    for i, rec in enumerate(log.records):
        values |= {
            f"event_{i:02d}_time": rec.time_unix,
            f"event_{i:02d}_code": int(rec.code),
            f"event_{i:02d}_arg": rec.arg,
        }
    return _encode_regs(_EVENTS, values)


def decode_event_log(words: Sequence[int]) -> EventLog:
    """Parse one FC4 read of the EVENTS group."""
    v = _decode_regs(_EVENTS, words, "event log")
    try:
        records = tuple(
            EventRecord(
                time_unix=v[f"event_{i:02d}_time"],
                code=_enum(EventCode, v[f"event_{i:02d}_code"], f"event_{i:02d}_code"),
                arg=v[f"event_{i:02d}_arg"],
            )
            for i in range(EVENT_LOG_LEN)
        )
    except UnitError as exc:
        raise _as_peer_error(exc, "event log") from exc
    return EventLog(event_count=v["event_count"], records=records)


# --------------------------------------------------------------- control block


@dataclass(frozen=True, slots=True)
class ControlBlock:
    """The CONTROL group (holding ``CONTROL_ADDRESS``..): requests a client writes."""

    remote_relay_command: RelayCommand = RelayCommand.NONE
    emergency_credit_request: bool = False
    button_press: bool = False
    set_clock_unix: int = 0
    set_clock_commit: bool = False

    def __post_init__(self) -> None:
        _is(self.remote_relay_command, RelayCommand, "remote_relay_command")
        _is(self.emergency_credit_request, bool, "emergency_credit_request")
        _is(self.button_press, bool, "button_press")
        _field(self.set_clock_unix, "set_clock_unix")
        _is(self.set_clock_commit, bool, "set_clock_commit")


def encode_control_block(control: ControlBlock) -> list[int]:
    """The ``CONTROL_COUNT`` holding registers from ``CONTROL_ADDRESS``."""
    return _encode_regs(
        _CONTROL,
        {
            "remote_relay_command": int(control.remote_relay_command),
            "emergency_credit_request": int(control.emergency_credit_request),
            "button_press": int(control.button_press),
            "set_clock_unix": control.set_clock_unix,
            "set_clock_commit": CLOCK_COMMIT_MAGIC if control.set_clock_commit else 0,
        },
    )


def decode_control_block(words: Sequence[int]) -> ControlBlock:
    """Parse the CONTROL group; values other than those listed raise MalformedError.

    A meter answers such a write with exception 03 ILLEGAL DATA VALUE (spec §7).
    """
    v = _decode_regs(_CONTROL, words, "control block")
    return ControlBlock(
        remote_relay_command=_enum(RelayCommand, v["remote_relay_command"], "remote_relay_command"),
        emergency_credit_request=_flag(v["emergency_credit_request"], "emergency_credit_request"),
        button_press=_flag(v["button_press"], "button_press"),
        set_clock_unix=v["set_clock_unix"],
        set_clock_commit=_magic(v["set_clock_commit"], CLOCK_COMMIT_MAGIC, "set_clock_commit"),
    )


#: One Modbus write: (0-based holding address, register values) for FC16 (or FC6 if one).
Write = tuple[int, list[int]]


def set_clock_plan(clock_unix: int) -> list[Write]:
    """The writes that set the meter clock: the value, then the commit register."""
    return [
        (register("set_clock_unix").address, register("set_clock_unix").encode(clock_unix)),
        (register("set_clock_commit").address, [CLOCK_COMMIT_MAGIC]),
    ]


# ---------------------------------------------------------------- token block


def _check_message(message: bytes | bytearray) -> bytes:
    if not isinstance(message, (bytes, bytearray)):
        raise UnitError(f"a signed message is bytes, got {type(message).__name__}")
    if not message:
        raise MalformedError("token_length: a signed message has at least 1 byte")
    if len(message) > TOKEN_BLOCK_BYTES:
        raise PayloadTooLargeError(
            f"token_length: message is {len(message)} bytes, the block holds {TOKEN_BLOCK_BYTES}"
        )
    return bytes(message)


def token_chunks(message: bytes | bytearray) -> list[Write]:
    """Split ``message`` into FC16 writes of at most MAX_CHUNK_WORDS registers from token_block.

    Bytes go two per register, first byte high; an odd last byte is padded with 0x00.
    Chunks are contiguous and in address order.
    """
    words = bytes_to_words(_check_message(message))
    return [
        (TOKEN_BLOCK_ADDRESS + i, words[i : i + MAX_CHUNK_WORDS])
        for i in range(0, len(words), MAX_CHUNK_WORDS)
    ]


def token_write_plan(message: bytes | bytearray) -> list[Write]:
    """Every write that delivers ``message``: length, the chunks, then the commit magic.

    After the last write, poll TOKEN_RESULT until ``token_seq`` has moved on from the
    value read before the commit and ``token_status`` is final (TokenStatus.final).
    """
    chunks = token_chunks(message)
    return [
        (register("token_length").address, [len(message)]),
        *chunks,
        (register("token_commit").address, [TOKEN_COMMIT_MAGIC]),
    ]


def decode_token_write(length: int, block_words: Sequence[int]) -> bytes:
    """The message a client wrote (meter side): ``token_length`` and the token_block words.

    ``block_words`` may be the whole block or only its first ``ceil(length / 2)``
    registers; bytes past ``length`` are left over from earlier, longer messages and are
    not part of this one.
    """
    if type(length) is not int or length < 1:
        raise MalformedError(f"token_length: must be 1..{TOKEN_BLOCK_BYTES}, got {length!r}")
    if length > TOKEN_BLOCK_BYTES:
        raise PayloadTooLargeError(
            f"token_length: {length} bytes, the block holds {TOKEN_BLOCK_BYTES}"
        )
    if len(block_words) > TOKEN_BLOCK_WORDS:
        raise MalformedError(
            f"token_block: at most {TOKEN_BLOCK_WORDS} registers, got {len(block_words)}"
        )
    return words_to_bytes(block_words, length, "token_block")


def is_token_commit(word: int) -> bool:
    """True if ``token_commit`` holds the magic; 0 is False; anything else is malformed."""
    return _magic(check_words([word], 1, "token_commit")[0], TOKEN_COMMIT_MAGIC, "token_commit")


# ------------------------------------------------------------------ the doc

_HOST = "127.0.0.1 -p 5020"
_TABLE_TITLES: Final[Mapping[Group, str]] = {
    Group.POLL: "Poll block (input registers, FC4)",
    Group.TOKEN_RESULT: "Token result (input registers, FC4; the end of the poll block)",
    Group.INFO: "Identity and parameters (input registers, FC4)",
    Group.EVENTS: "Event log (input registers, FC4)",
    Group.CONTROL: "Control (holding registers, FC3 / FC6 / FC16)",
    Group.TOKEN: "Signed-message write block (holding registers, FC3 / FC6 / FC16)",
}


def _mb(reg: Register | int, *, table: RegisterTable, tail: str = "", count: int = 1) -> str:
    address = reg.address if isinstance(reg, Register) else reg
    return f"mbpoll -a 1 -0 -t {table.mbpoll_type}{tail} -r {address} -c {count} -1 {_HOST}"


def _write(reg: Register, values: Sequence[int | str]) -> str:
    joined = " ".join(str(v) for v in values)
    return f"mbpoll -a 1 -0 -t 4 -r {reg.address} -1 {_HOST} {joined}"


def _scale(scale: int) -> str:
    if scale >= 0:
        return "1" + "0" * scale
    return "0." + "0" * (-scale - 1) + "1"


def _examples(group: Group) -> list[str]:
    inp, hold = RegisterTable.INPUT, RegisterTable.HOLDING
    r = register
    start, count = group_span(group)
    if group is Group.POLL:
        return [
            f"# the whole poll block ({POLL_BLOCK_COUNT} words, token result included), hex",
            _mb(POLL_BLOCK_ADDRESS, table=inp, tail=":hex", count=POLL_BLOCK_COUNT),
            "# the same with mbpoll's default 1-based references (no -0): -r is address + 1",
            _mb(POLL_BLOCK_ADDRESS, table=inp, tail=":hex", count=POLL_BLOCK_COUNT).replace(
                f"-0 -t 3:hex -r {POLL_BLOCK_ADDRESS}", f"-t 3:hex -r {POLL_BLOCK_ADDRESS + 1}"
            ),
            "# power_w (u32) as one value: -B = high word first; -c counts 32-bit values",
            _mb(r("power_w"), table=inp, tail=":int -B"),
            "# voltage_dv (u16): 2304 means 230.4 V",
            _mb(r("voltage_dv"), table=inp),
            "# credit_milli (i64): 4 words w0..w3, value = w0*2^48 + w1*2^32 + w2*2^16 + w3,",
            "# minus 2^64 if w0 >= 32768",
            _mb(r("credit_milli"), table=inp, tail=":hex", count=4),
            "# import_wh (u64) as two 32-bit halves: value = hi*2^32 + (lo mod 2^32)",
            "# (mbpoll shows each half as a signed int32)",
            _mb(r("import_wh"), table=inp, tail=":int -B", count=2),
        ]
    if group is Group.TOKEN_RESULT:
        return [
            "# token_seq, token_status, last_message_id (2 words), last_credit_token_id (2 words)",
            _mb(start, table=inp, count=count),
            "# the two message ids as 32-bit values",
            _mb(r("last_message_id"), table=inp, tail=":int -B", count=2),
        ]
    if group is Group.INFO:
        return [
            f"# map_version (must be {MAP_VERSION}), firmware, currency, limits, passive tariff",
            _mb(start, table=inp, count=count),
        ]
    if group is Group.EVENTS:
        return [
            "# event_count and 16 records of 5 words (time u32, code u16, arg u32), newest first",
            _mb(start, table=inp, count=count),
        ]
    if group is Group.CONTROL:
        clock = r("set_clock_unix")
        example_clock = 1_767_225_600  # 2026-01-01T00:00:00Z
        return [
            "# read the pending requests (0 = none pending)",
            _mb(start, table=hold, count=count),
            "# remote disconnect (2); remote connect is 1 - one FC6 write each",
            _write(r("remote_relay_command"), [int(RelayCommand.DISCONNECT)]),
            "# the customer's button; activate emergency credit",
            _write(r("button_press"), [1]),
            _write(r("emergency_credit_request"), [1]),
            f"# set the clock to {example_clock} (2026-01-01T00:00:00Z): 4 words, then commit",
            _write(clock, clock.encode(example_clock)),
            _write(r("set_clock_commit"), [CLOCK_COMMIT_MAGIC]),
        ]
    length, commit, block = r("token_length"), r("token_commit"), r("token_block")
    return [
        "# read back the length and the first 120 bytes of the block",
        _mb(length, table=hold, count=1),
        _mb(block, table=hold, tail=":hex", count=60),
        "# deliver the message in the file msg.bin (see 'Writing a signed message'):",
        "# 0. note token_seq",
        _mb(r("token_seq"), table=inp),
        "# 1. the length in bytes",
        _write(length, ["$(stat -c %s msg.bin)"]),
        f"# 2. the bytes as big-endian words, {MAX_CHUNK_WORDS} per FC16 write (od pads an odd",
        "#    last byte with 0x00)",
        f"od -An -v -tu2 --endian=big msg.bin | xargs -n {MAX_CHUNK_WORDS} | {{",
        f"  ref={block.address}; while read -r words; do",
        f"    mbpoll -a 1 -0 -t 4 -r $ref -1 {_HOST} $words; ref=$((ref + {MAX_CHUNK_WORDS}))",
        "  done; }",
        f"# 3. commit (0x{TOKEN_COMMIT_MAGIC:04X} = {TOKEN_COMMIT_MAGIC})",
        _write(commit, [TOKEN_COMMIT_MAGIC]),
        "# 4. read the token result until token_seq has moved on and token_status is final",
        _mb(TOKEN_RESULT_ADDRESS, table=inp, count=TOKEN_RESULT_COUNT),
    ]


def _enum_table(
    cls: type[_M],
    what: str,
    notes: Mapping[_M, str] | None = None,
    column: str = "meaning",
) -> list[str]:
    head, rule = "| value | name |", "|---:|---|"
    if notes is not None:
        head, rule = f"{head} {column} |", f"{rule}---|"
    lines = [f"**{cls.__name__}** ({what})", "", head, rule]
    for member in cls:
        value = f"0x{member.value:04X}" if issubclass(cls, enum.IntFlag) else str(member.value)
        note = "" if notes is None else f" {notes[member]} |"
        lines.append(f"| {value} | `{member.name}` |{note}")
    return [*lines, ""]


_INTRO = """\
# voltcredit meter — Modbus register map

<!-- Generated by firmware_protocol.modbus_map.render_markdown(); do not edit by hand.
     Regenerate: .venv/bin/python -c "from firmware_protocol.modbus_map import
     render_markdown as r; print(r(), end='')" > firmware_protocol/MODBUS.md -->

Register map version **{version}** (input register `map_version`). The same table, as
data, is `firmware_protocol/modbus_map.py`; the simulator and the gateway use only it.

## Conventions

* **Byte and word order.** Every register is 16 bits, big-endian (Modbus Application
  Protocol Specification V1.1b3, §4.2). 32- and 64-bit values take 2 and 4 consecutive
  registers, **high word first** (the spec does not define wider values; this is our
  choice). Signed types are two's complement.
* **Addresses** in the tables are 0-based protocol (PDU) addresses (spec §4.4).
  mbpoll numbers registers from 1 by default: pass `-0` to use the addresses below
  as they are, or add 1 (column *ref*).
* **Tables.** Measurements are input registers: read with FC4 (`mbpoll -t 3`).
  What a client writes is a holding register: FC3 reads, FC6 or FC16 writes, both
  accepted on every holding register (`mbpoll -t 4`). A read carries at most
  {max_read} registers (spec §6.3, §6.4), an FC16 write at most 123 (§6.12).
* **Scaling** as in the DLMS/COSEM register scaler: value in *unit* = raw * *scale*.
  Money is signed, in rating units (1/1000 of the currency's minor unit, scale 0.001
  of a minor unit); energy is whole Wh, never rolled over.
* **Access.** R read only; RW reads back what was written; W requests an action:
  the meter acts, then writes 0 back. A write of a value not listed is refused with
  exception 03 ILLEGAL DATA VALUE. Credit, tariffs, limits and keys change only through
  signed messages written to the token block, never by a plain register write.
* A gateway polls with **one FC4 read of {poll} registers at address 0** (the poll block
  and the token result), reads the identity block at connect and refuses a meter whose
  `map_version` differs, and compares `meter_id` on every poll.

## mbpoll

Checked with mbpoll 1.4.11 (Debian 12: `apt-get install mbpoll`). The examples talk to
unit 1 (`-a 1`) of a meter at 127.0.0.1:5020 (the simulator; a real meter listens on
502: drop `-p`); over RS-485 give e.g. `-m rtu -b 9600 -P none /dev/ttyUSB0` instead of
the host. `-1` polls once; `-c` is at most 125.

* `-t 3` reads input registers (FC4), `-t 4` holding registers (FC3). Each 16-bit
  register prints unsigned, followed by its signed value in parentheses when the top
  bit is set: `65535 (-1)`. `:hex` prints `0xFFFF`.
* `-t 3:int` reads 32-bit values; **add `-B`**, or mbpoll assumes low word first.
  `-c` then counts 32-bit values, and each prints as a *signed* int32: add 2^32 to a
  negative u32. mbpoll has no 64-bit type: read a u64/i64 as four words
  (value = w0*2^48 + w1*2^32 + w2*2^16 + w3; minus 2^64 for an i64 when w0 >= 32768)
  or as two halves with `-B -t 3:int -c 2` (value = hi*2^32 + (lo mod 2^32)).
* Writing: values follow the host; one value is sent as FC6, several as FC16 to
  consecutive registers. Hex values (`0xC0DE`) are accepted; put `--` before
  negative ones.
"""

_MESSAGE_PROTOCOL = """\
## Writing a signed message

Credit tokens, tariff messages and key-change messages (1..{block_bytes} bytes, binary,
as produced by `firmware_protocol.messages`; the block holds {block_bytes} bytes, at least
`MAX_MESSAGE_LEN`) are delivered the same way:

1. Read `token_seq` (input {seq}).
2. Write `token_length` (holding {length}) = the message length in bytes.
3. Write the bytes to `token_block` (holding {block}..{block_end}), two per register, first
   byte in the high half, an odd last byte padded with 0x00, in FC16 writes of at most
   {chunk} registers at contiguous addresses. Bytes past `token_length` (left from an
   earlier, longer message) are not part of the message.
4. Write `token_commit` (holding {commit}) = 0x{magic:04X} ({magic}).
5. The meter verifies and applies the message, increments `token_seq` (mod 65536) and
   sets `token_status` (`PENDING` while it works). Read the token result
   (input {seq}..{result_end}) until `token_seq` has moved on and `token_status` is final.
   `last_message_id` is the id of the message the status belongs to;
   `last_credit_token_id` only moves when a credit token is accepted.

Setting the clock works the same way: write `set_clock_unix` (holding {clock}..{clock_end},
Unix seconds, high word first), then `set_clock_commit` (holding {clock_commit}) =
0x{clock_magic:04X} ({clock_magic}).

Remote relay commands (`remote_relay_command`) and the customer's button (`button_press`)
are separate registers, so the meter can tell them apart; relay events record which
one caused a move (`RelayCause`). A remote CONNECT only lifts a remote DISCONNECT: the
credit rules still decide whether supply returns.
"""


def render_markdown() -> str:
    """MODBUS.md: conventions, every register group as a table with mbpoll examples, enums."""
    r = register
    out = [
        _INTRO.format(version=MAP_VERSION, max_read=MAX_READ_WORDS, poll=POLL_BLOCK_COUNT),
        "## Registers",
        "",
    ]
    for group in Group:
        start, count = group_span(group)
        out += [
            f"### {_TABLE_TITLES[group]}",
            "",
            f"Group `{group.value}`: addresses {start}..{start + count - 1} ({count} registers).",
            "",
            "| address | ref | words | type | scale | unit | access | name | description |",
            "|---:|---:|---:|---|---:|---|---|---|---|",
        ]
        out += [
            f"| {g.address} | {g.address + 1} | {g.count} | {g.type.value} | {_scale(g.scale)} "
            f"| {g.unit} | {g.access.value} | `{g.name}` | {g.description} |"
            for g in group_registers(group)
        ]
        out += ["", "```sh", *_examples(group), "```", ""]
    out.append(
        _MESSAGE_PROTOCOL.format(
            block_bytes=TOKEN_BLOCK_BYTES,
            seq=r("token_seq").address,
            length=r("token_length").address,
            block=TOKEN_BLOCK_ADDRESS,
            block_end=r("token_block").end - 1,
            chunk=MAX_CHUNK_WORDS,
            commit=r("token_commit").address,
            magic=TOKEN_COMMIT_MAGIC,
            result_end=TOKEN_RESULT_ADDRESS + TOKEN_RESULT_COUNT - 1,
            clock=r("set_clock_unix").address,
            clock_end=r("set_clock_unix").end - 1,
            clock_commit=r("set_clock_commit").address,
            clock_magic=CLOCK_COMMIT_MAGIC,
        )
    )
    out += ["## Enumerations", ""]
    out += _enum_table(CreditState, "`credit_state`", CREDIT_STATE)
    out += _enum_table(RelayState, "`relay_state`")
    out += _enum_table(StatusFlag, "bits of `status_flags`", STATUS_FLAG)
    out += _enum_table(RelayCommand, "`remote_relay_command`", RELAY_COMMAND)
    out += _enum_table(RelayCause, "`arg` of relay events", RELAY_CAUSE)
    out += _enum_table(EventCode, "`event_NN_code`; `event_NN_arg` holds", EVENT_ARG, "arg")
    out += _enum_table(TokenStatus, "`token_status`, from firmware_protocol.status")
    return "\n".join(out).rstrip("\n") + "\n"
