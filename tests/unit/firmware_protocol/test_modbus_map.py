"""The Modbus register map: layout pinned, every block round-trips, bad replies are refused."""

from __future__ import annotations

import dataclasses
import itertools
import pathlib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware_protocol import modbus_map as mm
from firmware_protocol.errors import (
    MalformedError,
    PayloadTooLargeError,
    UnitError,
    UnknownVersionError,
)
from firmware_protocol.modbus_map import (
    Access,
    ControlBlock,
    CreditState,
    EventCode,
    EventLog,
    EventRecord,
    Group,
    MeterInfo,
    MeterSnapshot,
    Register,
    RegisterTable,
    RegType,
    RelayCommand,
    RelayState,
    StatusFlag,
    TokenResult,
    register,
)
from firmware_protocol.status import TokenStatus
from firmware_protocol.tariff import MAX_BANDS

MODBUS_MD = pathlib.Path(mm.__file__).with_name("MODBUS.md")
NUMERIC = [RegType.U16, RegType.U32, RegType.I32, RegType.U64, RegType.I64]

# ----------------------------------------------------------------- layout pins

#: Every address a firmware team builds against; a change here is a MAP_VERSION bump.
PINNED_INPUT = {
    "meter_id": 0,
    "import_wh": 4,
    **{f"import_wh_band{i}": 8 + 4 * i for i in range(MAX_BANDS)},
    "power_w": 40,
    "voltage_dv": 42,
    "frequency_chz": 43,
    "current_ma": 44,
    "credit_milli": 46,
    "emergency_used_milli": 50,
    "credit_state": 54,
    "relay_state": 55,
    "status_flags": 56,
    "active_band": 57,
    "clock_unix": 58,
    "active_tariff_id": 62,
    "block_period_index": 64,
    "block_period_wh": 66,
    "token_seq": 70,
    "token_status": 71,
    "last_message_id": 72,
    "last_credit_token_id": 74,
    "map_version": 100,
    "firmware_major": 101,
    "firmware_minor": 102,
    "firmware_patch": 103,
    "currency_numeric": 104,
    "emergency_limit_milli": 105,
    "low_credit_milli": 109,
    "passive_tariff_id": 113,
    "passive_tariff_at": 115,
    "event_count": 200,
    **{
        f"event_{i:02d}_{field}": 202 + 5 * i + offset
        for i in range(mm.EVENT_LOG_LEN)
        for field, offset in (("time", 0), ("code", 2), ("arg", 3))
    },
}
PINNED_HOLDING = {
    "remote_relay_command": 0,
    "emergency_credit_request": 1,
    "button_press": 2,
    "set_clock_unix": 3,
    "set_clock_commit": 7,
    "token_length": 100,
    "token_commit": 101,
    "token_block": 102,
}


def test_every_address_is_pinned() -> None:
    got = {(r.table, r.name): r.address for r in mm.REGISTERS}
    want = {(RegisterTable.INPUT, n): a for n, a in PINNED_INPUT.items()} | {
        (RegisterTable.HOLDING, n): a for n, a in PINNED_HOLDING.items()
    }
    assert got == want
    assert register("token_block").count == mm.TOKEN_BLOCK_WORDS == 256


def test_no_overlaps_and_groups_are_contiguous() -> None:
    mm.check_layout(mm.REGISTERS)
    for group in Group:
        regs = mm.group_registers(group)
        assert all(a.end == b.address for a, b in itertools.pairwise(regs))
        assert all(r.table is group.table for r in regs)


def test_poll_block_is_one_read() -> None:
    # the gateway's whole interval poll is ONE FC4 read (spec §6.4: at most 125 registers)
    poll_start, poll_count = mm.group_span(Group.POLL)
    assert (mm.POLL_BLOCK_ADDRESS, mm.POLL_BLOCK_COUNT) == (0, 76)
    assert poll_start + poll_count == mm.TOKEN_RESULT_ADDRESS
    assert mm.POLL_BLOCK_COUNT <= mm.MAX_READ_WORDS
    names = {r.name for r in mm.REGISTERS if r.address < mm.POLL_BLOCK_COUNT}
    names &= {r.name for r in mm.REGISTERS if r.table is RegisterTable.INPUT}
    for must in ("import_wh", "power_w", "credit_milli", "relay_state", "token_status"):
        assert must in names
    for group in (Group.INFO, Group.EVENTS, Group.CONTROL):
        assert mm.group_span(group)[1] <= mm.MAX_READ_WORDS


def test_token_block_holds_every_signed_message() -> None:
    from firmware_protocol.messages import MAX_MESSAGE_LEN

    assert mm.TOKEN_BLOCK_BYTES >= MAX_MESSAGE_LEN
    assert mm.MAX_CHUNK_WORDS <= 123  # spec §6.12: FC16 carries at most 123 registers


def test_tables_and_types() -> None:
    assert (RegisterTable.INPUT.read_function, RegisterTable.HOLDING.read_function) == (4, 3)
    assert (RegisterTable.INPUT.mbpoll_type, RegisterTable.HOLDING.mbpoll_type) == ("3", "4")
    assert [(k.words, k.signed, k.bounds) for k in NUMERIC] == [
        (1, False, (0, 0xFFFF)),
        (2, False, (0, 2**32 - 1)),
        (2, True, (-(2**31), 2**31 - 1)),
        (4, False, (0, 2**64 - 1)),
        (4, True, (-(2**63), 2**63 - 1)),
    ]
    assert all(r.access is Access.R for r in mm.REGISTERS if r.table is RegisterTable.INPUT)


def test_lookup() -> None:
    assert register("credit_milli") is mm.REGISTERS_BY_NAME["credit_milli"]
    assert register("credit_milli").type is RegType.I64
    with pytest.raises(KeyError, match="no Modbus register named 'credit'"):
        register("credit")


def _reg(**changes: Any) -> Register:
    base: dict[str, Any] = {
        "name": "x",
        "table": RegisterTable.INPUT,
        "address": 10,
        "count": 2,
        "type": RegType.U32,
        "scale": 0,
        "unit": "",
        "access": Access.R,
        "description": "",
        "group": Group.POLL,
    }
    return Register(**(base | changes))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"name": "Bad Name"}, "lower-case identifier"),
        ({"count": 1}, "takes 2 registers"),
        ({"address": 65535}, "out of range"),
        ({"address": -1}, "out of range"),
        ({"type": RegType.BYTES, "count": 0}, "out of range"),
        ({"group": Group.CONTROL}, "is not in input"),
        ({"access": Access.RW}, "read-only"),
    ],
)
def test_register_rejects_bad_entries(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _reg(**changes)


def test_check_layout_finds_overlaps_and_duplicate_names() -> None:
    with pytest.raises(ValueError, match="input registers a and b overlap"):
        mm.check_layout([_reg(name="a"), _reg(name="b", address=11)])
    with pytest.raises(ValueError, match="names repeat"):
        mm.check_layout([_reg(name="a"), _reg(name="a", address=50)])
    mm.check_layout([_reg(name="a"), _reg(name="b", address=12)])  # adjacent is fine


# ---------------------------------------------------------------- value codecs


@pytest.mark.parametrize("kind", NUMERIC)
@given(data=st.data())
def test_value_round_trip(kind: RegType, data: st.DataObject) -> None:
    lo, hi = kind.bounds
    value = data.draw(st.integers(lo, hi))
    words = mm.encode_value(kind, value)
    assert len(words) == kind.words
    assert all(0 <= w <= 0xFFFF for w in words)
    assert mm.decode_value(kind, words) == value


@pytest.mark.parametrize(
    ("kind", "value", "words"),
    [
        (RegType.U16, 0xC0DE, [0xC0DE]),
        (RegType.U32, 0x12345678, [0x1234, 0x5678]),  # high word first
        (RegType.I32, -2, [0xFFFF, 0xFFFE]),
        (RegType.U64, 0x0123456789ABCDEF, [0x0123, 0x4567, 0x89AB, 0xCDEF]),
        (RegType.I64, -1_234_567, [0xFFFF, 0xFFFF, 0xFFED, 0x2979]),
        (RegType.I64, 2**63 - 1, [0x7FFF, 0xFFFF, 0xFFFF, 0xFFFF]),
    ],
)
def test_exact_value_words(kind: RegType, value: int, words: list[int]) -> None:
    assert mm.encode_value(kind, value) == words
    assert mm.decode_value(kind, words) == value


@pytest.mark.parametrize("kind", NUMERIC)
def test_encode_rejects_out_of_range(kind: RegType) -> None:
    lo, hi = kind.bounds
    for bad in (lo - 1, hi + 1):
        with pytest.raises(UnitError, match=f"power_w must be in {lo}..{hi}"):
            mm.encode_value(kind, bad, "power_w")


@pytest.mark.parametrize("bad", [True, 1.0, "1", None])
def test_encode_rejects_non_integers(bad: object) -> None:
    with pytest.raises(UnitError, match="must be an integer"):
        mm.encode_value(RegType.U16, bad)  # type: ignore[arg-type]


def test_encode_accepts_int_enums() -> None:
    assert mm.encode_value(RegType.U16, CreditState.LOW_CREDIT) == [2]


def test_bytes_type_is_not_a_number() -> None:
    with pytest.raises(UnitError, match="not a number"):
        mm.encode_value(RegType.BYTES, 1)
    with pytest.raises(UnitError, match="not a number"):
        mm.decode_value(RegType.BYTES, [1])


@pytest.mark.parametrize(
    ("words", "message"),
    [
        ([1], "expected 2 registers, got 1"),
        ([1, 2, 3], "expected 2 registers, got 3"),
        ([1, 0x10000], "register 1 is not a 16-bit value"),
        ([-1, 0], "register 0 is not a 16-bit value"),
        ([True, 0], "register 0 is not a 16-bit value"),
        ([1.0, 0], "register 0 is not a 16-bit value"),
        (b"\x00\x01", "expected a sequence of 16-bit registers, got bytes/str"),
    ],
)
def test_decode_rejects_bad_replies(words: Any, message: str) -> None:
    with pytest.raises(MalformedError, match=f"power_w: {message}"):
        mm.decode_value(RegType.U32, words, "power_w")


def test_register_encode_decode_use_its_type() -> None:
    reg = register("credit_milli")
    assert reg.decode(reg.encode(-5)) == -5
    with pytest.raises(UnitError, match="credit_milli"):
        reg.encode(2**63)


# ------------------------------------------------------------------ poll block

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
i64 = st.integers(-(2**63), 2**63 - 1)

token_results = st.builds(
    TokenResult,
    token_seq=u16,
    token_status=st.sampled_from(TokenStatus),
    last_message_id=u32,
    last_credit_token_id=u32,
)
snapshots = st.builds(
    MeterSnapshot,
    meter_id=st.integers(1, 2**64 - 1),
    import_wh=u64,
    import_wh_bands=st.tuples(*[u64] * MAX_BANDS),
    power_w=u32,
    voltage_dv=u16,
    frequency_chz=u16,
    current_ma=u32,
    credit_milli=i64,
    emergency_used_milli=st.integers(0, 2**63 - 1),
    credit_state=st.sampled_from(CreditState),
    relay_state=st.sampled_from(RelayState),
    status_flags=st.integers(0, 0x1FF).map(StatusFlag),
    active_band=st.integers(0, MAX_BANDS - 1),
    clock_unix=u64,
    active_tariff_id=u32,
    block_period_index=u32,
    block_period_wh=u64,
    token=token_results,
)


@given(snapshots)
def test_poll_block_round_trip(snapshot: MeterSnapshot) -> None:
    words = mm.encode_poll_block(snapshot)
    assert len(words) == mm.POLL_BLOCK_COUNT
    assert mm.decode_poll_block(words) == snapshot


EXAMPLE = MeterSnapshot(
    meter_id=0x0123456789ABCDEF,
    import_wh=5_000_000_000,
    import_wh_bands=(3_000_000_000, 2_000_000_000, 0, 0, 0, 0, 0, 0),
    power_w=3_000_000_000,
    voltage_dv=2304,
    frequency_chz=5001,
    current_ma=13_040,
    credit_milli=-1_234_567,
    emergency_used_milli=0,
    credit_state=CreditState.LOW_CREDIT,
    relay_state=RelayState.CLOSED,
    status_flags=StatusFlag.LOW_CREDIT | StatusFlag.TARIFF_PENDING,
    active_band=1,
    clock_unix=1_767_225_600,
    active_tariff_id=7,
    block_period_index=672,
    block_period_wh=123_456,
    token=TokenResult(
        token_seq=3,
        token_status=TokenStatus.ACCEPTED,
        last_message_id=3_000_000_000,
        last_credit_token_id=41,
    ),
)
#: The words of EXAMPLE, address: word; every other register is 0 (as read with mbpoll).
EXAMPLE_WORDS = {
    0: 0x0123, 1: 0x4567, 2: 0x89AB, 3: 0xCDEF,  # meter_id
    5: 0x0001, 6: 0x2A05, 7: 0xF200,  # import_wh = 5e9
    10: 0xB2D0, 11: 0x5E00,  # band 0 = 3e9
    14: 0x7735, 15: 0x9400,  # band 1 = 2e9
    40: 0xB2D0, 41: 0x5E00,  # power_w = 3e9
    42: 2304, 43: 5001, 45: 13_040,
    46: 0xFFFF, 47: 0xFFFF, 48: 0xFFED, 49: 0x2979,  # credit_milli = -1234567
    54: 2, 55: 1, 56: 0x0041, 57: 1,
    60: 0x6955, 61: 0xB900,  # clock 2026-01-01T00:00:00Z
    63: 7, 65: 672, 68: 0x0001, 69: 0xE240,
    70: 3, 71: 1, 72: 0xB2D0, 73: 0x5E00, 75: 41,
}  # fmt: skip


def test_poll_block_exact_words() -> None:
    want = [EXAMPLE_WORDS.get(a, 0) for a in range(mm.POLL_BLOCK_COUNT)]
    assert mm.encode_poll_block(EXAMPLE) == want
    assert mm.decode_poll_block(want) == EXAMPLE


def _poll_with(**values: int) -> list[int]:
    """EXAMPLE's poll block with whole registers replaced by raw values."""
    out = mm.encode_poll_block(EXAMPLE)
    for name, value in values.items():
        reg = register(name)
        out[reg.address : reg.end] = mm.encode_value(reg.type, value)
    return out


@pytest.mark.parametrize(
    ("words", "message"),
    [
        (_poll_with(credit_state=0), "credit_state: 0 is not a CreditState"),
        (_poll_with(relay_state=2), "relay_state: 2 is not a RelayState"),
        (_poll_with(status_flags=0x8000), "status_flags: undefined bits 0x8000"),
        (_poll_with(active_band=MAX_BANDS), "active_band must be in 0..7"),
        (_poll_with(token_status=99), "token_status: 99 is not a TokenStatus"),
        (_poll_with(emergency_used_milli=-1), "emergency_used_milli must be in 0.."),
        (_poll_with(meter_id=0), "meter_id must be in 1.."),
        ([0] * (mm.POLL_BLOCK_COUNT - 1), "poll block: expected 76 registers, got 75"),
        ([0] * 125, "poll block: expected 76 registers, got 125"),
    ],
)
def test_poll_block_rejects(words: list[int], message: str) -> None:
    with pytest.raises(MalformedError, match=message):
        mm.decode_poll_block(words)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"meter_id": 0}, "meter_id must be in 1.."),
        ({"power_w": 2**32}, "power_w must be in 0.."),
        ({"voltage_dv": -1}, "voltage_dv must be in 0.."),
        ({"credit_milli": 2**63}, "credit_milli must be in"),
        ({"emergency_used_milli": -1}, "emergency_used_milli must be in 0.."),
        ({"active_band": 8}, "active_band must be in 0..7"),
        ({"import_wh_bands": (0,) * 7}, "import_wh_bands must be a tuple of 8"),
        ({"import_wh_bands": [0] * 8}, "import_wh_bands must be a tuple of 8"),
        ({"import_wh_bands": (0,) * 7 + (-1,)}, "import_wh_band7 must be in"),
        ({"credit_state": 1}, "credit_state must be a CreditState"),
        ({"relay_state": 1}, "relay_state must be a RelayState"),
        ({"status_flags": 1}, "status_flags must be a StatusFlag"),
        ({"token": None}, "token must be a TokenResult"),
        ({"clock_unix": True}, "clock_unix must be an integer"),
    ],
)
def test_snapshot_rejects_bad_fields(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(UnitError, match=message):
        dataclasses.replace(EXAMPLE, **changes)


# ---------------------------------------------------------------- token result


@given(token_results)
def test_token_result_round_trip(result: TokenResult) -> None:
    words = mm.encode_token_result(result)
    assert len(words) == mm.TOKEN_RESULT_COUNT == 6
    assert mm.decode_token_result(words) == result


def test_token_result_is_the_tail_of_the_poll_block() -> None:
    poll = mm.encode_poll_block(EXAMPLE)
    assert mm.decode_token_result(poll[mm.TOKEN_RESULT_ADDRESS :]) == EXAMPLE.token
    assert mm.encode_token_result(EXAMPLE.token) == [3, 1, 0xB2D0, 0x5E00, 0, 41]


def test_token_result_rejects() -> None:
    with pytest.raises(MalformedError, match="token result: expected 6 registers"):
        mm.decode_token_result([0] * 5)
    with pytest.raises(MalformedError, match="token_status: 13 is not a TokenStatus"):
        mm.decode_token_result([0, 13, 0, 0, 0, 0])
    with pytest.raises(UnitError, match="token_status must be a TokenStatus"):
        TokenResult(0, 1, 0, 0)  # type: ignore[arg-type]
    with pytest.raises(UnitError, match=r"token_seq must be in 0\.\.65535"):
        TokenResult(65536, TokenStatus.NONE, 0, 0)


# ------------------------------------------------------------------ info block

infos = st.builds(
    MeterInfo,
    firmware=st.tuples(u16, u16, u16),
    currency_numeric=st.integers(1, 999),
    emergency_limit_milli=st.integers(0, 2**63 - 1),
    low_credit_milli=st.integers(0, 2**63 - 1),
    passive_tariff_id=st.just(0),
    passive_tariff_at=st.just(0),
) | st.builds(
    MeterInfo,
    firmware=st.tuples(u16, u16, u16),
    currency_numeric=st.integers(1, 999),
    emergency_limit_milli=st.integers(0, 2**63 - 1),
    low_credit_milli=st.integers(0, 2**63 - 1),
    passive_tariff_id=st.integers(1, 2**32 - 1),
    passive_tariff_at=st.integers(1, 2**32 - 1),
)


@given(infos)
def test_info_round_trip(info: MeterInfo) -> None:
    words = mm.encode_info_block(info)
    assert len(words) == mm.INFO_COUNT == 17
    assert mm.decode_info_block(words) == info


INFO = MeterInfo(
    firmware=(1, 2, 3),
    currency_numeric=978,
    emergency_limit_milli=500_000,
    low_credit_milli=200_000,
    passive_tariff_id=8,
    passive_tariff_at=0x6955B900,
)


def test_info_exact_words() -> None:
    assert mm.encode_info_block(INFO) == [
        mm.MAP_VERSION, 1, 2, 3, 978,
        0, 0, 0x0007, 0xA120,  # 500_000
        0, 0, 0x0003, 0x0D40,  # 200_000
        0, 8, 0x6955, 0xB900,
    ]  # fmt: skip


def _info_with(**values: int) -> list[int]:
    """INFO's words with whole registers replaced by raw values."""
    out = mm.encode_info_block(INFO)
    for name, value in values.items():
        reg = register(name)
        start = reg.address - mm.INFO_ADDRESS
        out[start : start + reg.count] = mm.encode_value(reg.type, value)
    return out


def test_info_rejects() -> None:
    with pytest.raises(UnknownVersionError, match="meter speaks register map 2, we speak 1"):
        mm.decode_info_block(_info_with(map_version=2))
    with pytest.raises(MalformedError, match=r"currency_numeric must be in 1\.\.999"):
        mm.decode_info_block(_info_with(currency_numeric=0))
    with pytest.raises(MalformedError, match="both 0 or both set"):
        mm.decode_info_block(_info_with(passive_tariff_id=0))
    with pytest.raises(MalformedError, match="emergency_limit_milli must be in 0"):
        mm.decode_info_block(_info_with(emergency_limit_milli=-1))
    with pytest.raises(MalformedError, match="info block: expected 17 registers"):
        mm.decode_info_block([0] * 16)
    with pytest.raises(UnitError, match="firmware must be a"):
        dataclasses.replace(INFO, firmware=(1, 2))  # type: ignore[arg-type]
    with pytest.raises(UnitError, match="firmware must be a"):
        dataclasses.replace(INFO, firmware=[1, 2, 3])  # type: ignore[arg-type]
    with pytest.raises(UnitError, match=r"firmware_patch must be in 0\.\.65535"):
        dataclasses.replace(INFO, firmware=(1, 2, 70_000))
    with pytest.raises(UnitError, match="low_credit_milli must be in 0"):
        dataclasses.replace(INFO, low_credit_milli=-1)


# ------------------------------------------------------------------- event log

records = st.one_of(
    st.just(mm.EMPTY_EVENT),
    st.builds(
        EventRecord,
        time_unix=u32,
        code=st.sampled_from([c for c in EventCode if c is not EventCode.NONE]),
        arg=u32,
    ),
)
logs = st.builds(EventLog, event_count=u32, records=st.tuples(*[records] * mm.EVENT_LOG_LEN))


@given(logs)
def test_event_log_round_trip(log: EventLog) -> None:
    words = mm.encode_event_log(log)
    assert len(words) == mm.EVENTS_COUNT == 82
    assert mm.decode_event_log(words) == log


def _log(count: int, *recs: EventRecord) -> EventLog:
    return EventLog(count, recs + (mm.EMPTY_EVENT,) * (mm.EVENT_LOG_LEN - len(recs)))


NEWEST = EventRecord(0x6955B900, EventCode.RELAY_CLOSED, int(mm.RelayCause.BUTTON))
OLDER = EventRecord(0x6955B000, EventCode.TOKEN_ACCEPTED, 70_000)


def test_event_log_exact_words() -> None:
    words = mm.encode_event_log(_log(2, NEWEST, OLDER))
    assert words[:12] == [0, 2, 0x6955, 0xB900, 6, 0, 2, 0x6955, 0xB000, 3, 0x0001, 0x1170]
    assert words[12:] == [0] * (mm.EVENTS_COUNT - 12)


def test_event_log_since() -> None:
    log = _log(7, NEWEST, OLDER)
    assert log.since(7) == ()
    assert log.since(6) == (NEWEST,)
    assert log.since(5) == (NEWEST, OLDER)
    assert len(log.since(0)) == 7
    assert len(_log(100).since(0)) == mm.EVENT_LOG_LEN  # more than the log keeps
    assert _log(0, NEWEST).since(2**32 - 1) == (NEWEST,)  # event_count wrapped


def test_event_log_rejects() -> None:
    words = mm.encode_event_log(_log(1, NEWEST))
    bad_code = list(words)
    bad_code[4] = 99
    with pytest.raises(MalformedError, match="event_00_code: 99 is not a EventCode"):
        mm.decode_event_log(bad_code)
    ghost = list(words)
    ghost[4 + 5 * 1 + 1] = 1  # slot 1 is NONE but has a time
    with pytest.raises(MalformedError, match="event log: an empty event slot"):
        mm.decode_event_log(ghost)
    with pytest.raises(MalformedError, match="event log: expected 82 registers"):
        mm.decode_event_log(words[:-1])
    with pytest.raises(UnitError, match="records must be a tuple of 16"):
        EventLog(0, (mm.EMPTY_EVENT,))
    with pytest.raises(UnitError, match=r"records\[\] must be a EventRecord"):
        EventLog(0, (None,) * mm.EVENT_LOG_LEN)  # type: ignore[arg-type]
    with pytest.raises(UnitError, match="code must be a EventCode"):
        EventRecord(0, 3, 0)  # type: ignore[arg-type]
    with pytest.raises(UnitError, match=r"arg must be in 0\.\.4294967295"):
        EventRecord(0, EventCode.POWER_UP, -1)


# --------------------------------------------------------------- control block

controls = st.builds(
    ControlBlock,
    remote_relay_command=st.sampled_from(RelayCommand),
    emergency_credit_request=st.booleans(),
    button_press=st.booleans(),
    set_clock_unix=u64,
    set_clock_commit=st.booleans(),
)


@given(controls)
def test_control_round_trip(control: ControlBlock) -> None:
    words = mm.encode_control_block(control)
    assert len(words) == mm.CONTROL_COUNT == 8
    assert mm.decode_control_block(words) == control


def test_control_exact_words() -> None:
    assert mm.encode_control_block(ControlBlock()) == [0] * 8
    control = ControlBlock(
        remote_relay_command=RelayCommand.DISCONNECT,
        emergency_credit_request=True,
        button_press=False,
        set_clock_unix=1_767_225_600,
        set_clock_commit=True,
    )
    assert mm.encode_control_block(control) == [2, 1, 0, 0, 0, 0x6955, 0xB900, 0xC10C]


@pytest.mark.parametrize(
    ("words", "message"),
    [
        ([3, 0, 0, 0, 0, 0, 0, 0], "remote_relay_command: 3 is not a RelayCommand"),
        ([0, 2, 0, 0, 0, 0, 0, 0], "emergency_credit_request: request registers hold 0 or 1"),
        ([0, 0, 5, 0, 0, 0, 0, 0], "button_press: request registers hold 0 or 1"),
        ([0, 0, 0, 0, 0, 0, 0, 1], "set_clock_commit: holds 0 or 0xC10C, got 0x0001"),
        ([0] * 7, "control block: expected 8 registers, got 7"),
    ],
)
def test_control_rejects(words: list[int], message: str) -> None:
    with pytest.raises(MalformedError, match=message):
        mm.decode_control_block(words)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"remote_relay_command": 1}, "remote_relay_command must be a RelayCommand"),
        ({"emergency_credit_request": 1}, "emergency_credit_request must be a bool"),
        ({"button_press": None}, "button_press must be a bool"),
        ({"set_clock_commit": 0xC10C}, "set_clock_commit must be a bool"),
        ({"set_clock_unix": -1}, "set_clock_unix must be in 0.."),
    ],
)
def test_control_block_rejects_bad_fields(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(UnitError, match=message):
        ControlBlock(**changes)


def test_set_clock_plan() -> None:
    assert mm.set_clock_plan(1_767_225_600) == [(3, [0, 0, 0x6955, 0xB900]), (7, [0xC10C])]
    with pytest.raises(UnitError, match="set_clock_unix"):
        mm.set_clock_plan(-1)


# ----------------------------------------------------------------- token block


@given(st.binary(min_size=1, max_size=mm.TOKEN_BLOCK_BYTES))
def test_token_chunks_reassemble(message: bytes) -> None:
    chunks = mm.token_chunks(message)
    address = mm.TOKEN_BLOCK_ADDRESS
    for chunk_address, words in chunks:
        assert chunk_address == address  # contiguous, in order, from token_block
        assert 1 <= len(words) <= mm.MAX_CHUNK_WORDS
        address += len(words)
    assert address - mm.TOKEN_BLOCK_ADDRESS == (len(message) + 1) // 2
    assert address <= register("token_block").end
    words = [w for _, ws in chunks for w in ws]
    assert mm.decode_token_write(len(message), words) == message
    if len(message) % 2:
        assert words[-1] & 0xFF == 0  # the odd byte is padded with 0x00
    plan = mm.token_write_plan(message)
    assert plan[0] == (register("token_length").address, [len(message)])
    assert plan[1:-1] == chunks
    assert plan[-1] == (register("token_commit").address, [mm.TOKEN_COMMIT_MAGIC])


def test_token_chunks_exact() -> None:
    assert mm.token_chunks(b"\x01\x02\x03") == [(102, [0x0102, 0x0300])]
    sizes = [len(w) for _, w in mm.token_chunks(bytes(mm.TOKEN_BLOCK_BYTES))]
    assert sizes == [120, 120, 16]
    assert [a for a, _ in mm.token_chunks(bytes(mm.TOKEN_BLOCK_BYTES))] == [102, 222, 342]
    assert mm.token_write_plan(bytearray(b"\xab")) == [
        (100, [1]),
        (102, [0xAB00]),
        (101, [0xC0DE]),
    ]


def test_decode_token_write_ignores_stale_bytes_past_length() -> None:
    block = mm.bytes_to_words(b"new" + b"old message, longer")
    block += [0] * (mm.TOKEN_BLOCK_WORDS - len(block))
    assert mm.decode_token_write(3, block) == b"new"


def test_token_message_rejects() -> None:
    with pytest.raises(MalformedError, match="at least 1 byte"):
        mm.token_chunks(b"")
    with pytest.raises(PayloadTooLargeError, match="message is 513 bytes"):
        mm.token_write_plan(bytes(513))
    with pytest.raises(UnitError, match="a signed message is bytes, got str"):
        mm.token_chunks("abc")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("length", "words", "error", "message"),
    [
        (0, [0], MalformedError, "token_length: must be 1..512, got 0"),
        (True, [0], MalformedError, "token_length: must be 1..512, got True"),
        (513, [0] * 256, PayloadTooLargeError, "token_length: 513 bytes"),
        (5, [0, 0], MalformedError, "token_block: 5 bytes need 3 registers, got 2"),
        (1, [0] * 257, MalformedError, "token_block: at most 256 registers, got 257"),
        (2, [0x10000], MalformedError, "token_block: register 0 is not a 16-bit value"),
    ],
)
def test_decode_token_write_rejects(
    length: int, words: list[int], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        mm.decode_token_write(length, words)


def test_token_commit_register() -> None:
    assert mm.is_token_commit(0xC0DE) is True
    assert mm.is_token_commit(0) is False
    with pytest.raises(MalformedError, match="token_commit: holds 0 or 0xC0DE, got 0x0001"):
        mm.is_token_commit(1)
    with pytest.raises(MalformedError, match="token_commit: register 0 is not a 16-bit"):
        mm.is_token_commit(0x10000)


def test_words_to_bytes_and_back() -> None:
    assert mm.bytes_to_words(b"\x12\x34\x56") == [0x1234, 0x5600]
    assert mm.words_to_bytes([0x1234, 0x5600], 3) == b"\x12\x34\x56"
    assert mm.words_to_bytes([0x1234, 0x5600], 2) == b"\x12\x34"
    with pytest.raises(UnitError, match="length must be >= 0"):
        mm.words_to_bytes([0x1234], -1)


# ------------------------------------------------------------------- the doc


def test_modbus_md_is_generated_from_the_table() -> None:
    assert MODBUS_MD.read_text(encoding="utf-8") == mm.render_markdown(), (
        "MODBUS.md is stale: regenerate it as its header comment says"
    )


def test_doc_names_every_register_and_has_mbpoll_per_group() -> None:
    doc = mm.render_markdown()
    for reg in mm.REGISTERS:
        assert f"| {reg.address} | {reg.address + 1} | {reg.count} | {reg.type.value} |" in doc
        assert f"`{reg.name}`" in doc
    sections = doc.split("### ")[1:]
    assert len(sections) == len(Group)
    for section in sections:
        assert "\nmbpoll -a 1 -0 -t " in section
    assert "| 42 | 43 | 1 | u16 | 0.1 | V | R | `voltage_dv` |" in doc
    assert "| 44 | 45 | 2 | u32 | 0.001 | A | R | `current_ma` |" in doc
    assert "mbpoll -a 1 -t 3:hex -r 1 -c 76 -1 127.0.0.1 -p 5020" in doc  # 1-based form
    assert "mbpoll -a 1 -0 -t 4 -r 101 -1 127.0.0.1 -p 5020 49374" in doc  # commit
    assert "| 0x0100 | `REMOTE_DISCONNECT` |" in doc
    assert "| 5 | `RELAY_OPENED` | RelayCause |" in doc
