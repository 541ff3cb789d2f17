"""MQTT payloads of the voltcredit contract (DESIGN §5, MQTT.md): messages and strict JSON codecs.

One frozen dataclass per payload, validated on construction (bad arguments are our
fault: :class:`UnitError`). :func:`encode` writes canonical JSON (sorted keys, compact
separators, UTF-8, no NaN) so the bytes of a message are a function of the message;
the ``decode_*`` functions accept exactly what MQTT.md §3 allows and raise
:class:`MalformedError` (peer's fault) naming the field for anything else. Decoding
is on the hot path (reading batches, ~20k readings/s backend-wide), so checks are
inline type tests and set comparisons, not a schema engine.

The topic scheme (names, filters, QoS, which topics are retained) lives in
:mod:`firmware_protocol.mqtt_topics`; :func:`decode_payload` joins the two.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from firmware_protocol.errors import (
    MalformedError,
    PayloadTooLargeError,
    UnitError,
    UnknownVersionError,
)
from firmware_protocol.messages import MAX_MESSAGE_LEN
from firmware_protocol.mqtt_topics import (
    CommandResultTopic,
    CommandTopic,
    GatewayStateTopic,
    ReadingsTopic,
    TokenResultTopic,
    TokenTopic,
    Topic,
    check_gateway_id,
)
from firmware_protocol.status import TokenStatus
from firmware_protocol.tariff import MAX_BANDS

#: Value of the ``v`` field of every payload of this contract version.
VERSION: Final = 1
#: No payload is larger (checked before parsing). The bounds below keep the largest
#: valid message (1000 readings with every field at its widest) near 0.5 MiB.
MAX_PAYLOAD_BYTES: Final = 1024 * 1024
MAX_READINGS_PER_BATCH: Final = 1000
#: Bounds the birth message (about 200 KiB at this size); split bigger sites over gateways.
MAX_METERS_PER_GATEWAY: Final = 4096
MAX_DETAIL_LEN: Final = 256
U16_MAX: Final = 2**16 - 1
U32_MAX: Final = 2**32 - 1
U64_MAX: Final = 2**64 - 1
I64_MIN: Final = -(2**63)
I64_MAX: Final = 2**63 - 1
#: Largest energy register value, the bound units.energy_charge_milli rates (2**48 Wh).
MAX_WH: Final = 2**48

# Firmware version: printable ASCII incl. space. Command ids: visible ASCII, no space,
# so they are safe in log lines and as database keys.
_FW = re.compile(r"[ -~]{1,64}")
_COMMAND_ID = re.compile(r"[!-~]{1,64}")


class Relay(enum.StrEnum):
    """State of the meter's supply relay (``closed`` = supply on)."""

    CLOSED = "closed"
    OPEN = "open"


class CommandKind(enum.StrEnum):
    """What a :class:`Command` asks for; the wire value is the member's value."""

    RELAY_CONNECT = "relay_connect"  #: close the relay (meter-level)
    RELAY_DISCONNECT = "relay_disconnect"  #: open the relay (meter-level)
    POLL_NOW = "poll_now"  #: read one meter (``meter`` given) or all meters now
    REBIRTH = "rebirth"  #: re-publish the gateway's birth state
    TIME_SYNC = "time_sync"  #: set the meter's clock to ``args.ts`` (meter-level)
    EMERGENCY_CREDIT = "emergency_credit"  #: activate emergency credit (meter-level)


# Whether a command kind needs, allows or forbids ``meter`` (MQTT.md §3.5).
_METER_REQUIRED: Final = frozenset(
    {
        CommandKind.RELAY_CONNECT,
        CommandKind.RELAY_DISCONNECT,
        CommandKind.TIME_SYNC,
        CommandKind.EMERGENCY_CREDIT,
    }
)
_METER_OPTIONAL: Final = frozenset({CommandKind.POLL_NOW})

_RELAY_BY_NAME: Final = {r.value: r for r in Relay}
_KIND_BY_NAME: Final = {k.value: k for k in CommandKind}
_STATUS_NAME: Final = {s: s.name.lower() for s in TokenStatus}
_STATUS_BY_NAME: Final = {name: s for s, name in _STATUS_NAME.items()}


# ------------------------------------------------------------------ construction checks


def _type_name(value: object) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    if value is None:
        return "null"
    if type(value) is float:
        return "a number with a fraction or exponent"
    return {
        bool: "a boolean",
        int: "an integer",
        str: "a string",
        list: "an array",
        dict: "an object",
    }.get(type(value), type(value).__name__)


def _int_error(name: str, value: object, lo: int, hi: int) -> UnitError:
    if type(value) is not int:
        return UnitError(f"{name} must be an integer, got {_type_name(value)}")
    return UnitError(f"{name} must be in {lo}..{hi}, got {value}")


def _int(value: object, name: str, lo: int, hi: int) -> None:
    # type() rather than isinstance(): bool is an int subclass and must not pass.
    if type(value) is not int or not lo <= value <= hi:
        raise _int_error(name, value, lo, hi)


def _bool(value: object, name: str) -> None:
    if type(value) is not bool:
        raise UnitError(f"{name} must be a boolean, got {_type_name(value)}")


def _member(value: object, cls: type[enum.Enum], name: str) -> None:
    if not isinstance(value, cls):
        raise UnitError(f"{name} must be a {cls.__name__}, got {value!r}")


def _ts(value: object, name: str = "ts") -> None:
    _int(value, name, 0, U32_MAX)


# ------------------------------------------------------------------ messages


@dataclass(frozen=True, slots=True, kw_only=True)
class MeterPresence:
    """One meter a gateway serves, and whether its last poll got an answer."""

    meter: int
    reachable: bool

    def __post_init__(self) -> None:
        _int(self.meter, "meter", 1, U64_MAX)
        _bool(self.reachable, "reachable")


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayState:
    """Retained on ``gw/{gw}/state``: birth (online, with ``fw`` and ``meters``) or offline.

    Offline is published by the broker as the gateway's Will, or by the gateway itself on
    a clean stop; it carries ``boot_seq`` (and may carry ``fw``) but never ``meters``, which
    would be stale. ``boot_seq`` counts gateway starts, so a consumer can tell a Will of an
    old session from the state of the current one.
    """

    online: bool
    boot_seq: int
    ts: int
    fw: str | None = None
    meters: tuple[MeterPresence, ...] | None = None

    def __post_init__(self) -> None:
        _bool(self.online, "online")
        _int(self.boot_seq, "boot_seq", 0, U32_MAX)
        _ts(self.ts)
        if self.fw is not None and (type(self.fw) is not str or not _FW.fullmatch(self.fw)):
            raise UnitError(f"fw must be 1..64 printable ASCII characters, got {self.fw!r}")
        if self.online and (self.fw is None or self.meters is None):
            raise UnitError("an online (birth) state carries fw and meters")
        if self.meters is not None:
            if not self.online:
                raise UnitError("an offline state carries no meters")
            _meter_list(self.meters)


def _meter_list(meters: object) -> None:
    if type(meters) is not tuple:
        raise UnitError(f"meters must be a tuple of MeterPresence, got {type(meters).__name__}")
    if len(meters) > MAX_METERS_PER_GATEWAY:
        raise UnitError(f"at most {MAX_METERS_PER_GATEWAY} meters, got {len(meters)}")
    previous = 0
    for item in meters:
        _member_of(item, MeterPresence, "meters[]")
        # Ascending ids: one canonical order, and uniqueness in the same pass.
        if item.meter <= previous:
            raise UnitError("meters must be in strictly ascending meter id order")
        previous = item.meter


def _member_of(value: object, cls: type, name: str) -> None:
    if type(value) is not cls:
        raise UnitError(f"{name} must be a {cls.__name__}, got {type(value).__name__}")


# (field, min, max) of every integer field of a Reading, checked in one loop (hot path).
_READING_INTS: Final = (
    ("meter", 1, U64_MAX),
    ("ts", 0, U32_MAX),
    ("import_wh", 0, MAX_WH),
    ("credit_milli", I64_MIN, I64_MAX),
    ("power_w", 0, U32_MAX),
    ("voltage_dv", 0, U32_MAX),
    ("current_ma", 0, U32_MAX),
    ("tariff_id", 0, U32_MAX),
    ("last_token_id", 0, U32_MAX),
    ("status_flags", 0, U16_MAX),
    ("block_period", 0, U32_MAX),
    ("block_period_wh", 0, MAX_WH),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Reading:
    """One meter's registers at one instant (MQTT.md §3.2 gives each field's meaning)."""

    meter: int
    ts: int
    import_wh: int
    band_wh: tuple[int, ...]
    credit_milli: int
    relay: Relay
    power_w: int
    voltage_dv: int
    current_ma: int
    tariff_id: int
    last_token_id: int
    status_flags: int
    block_period: int
    block_period_wh: int

    def __post_init__(self) -> None:
        for name, lo, hi in _READING_INTS:
            value = getattr(self, name)
            if type(value) is not int or not lo <= value <= hi:
                raise _int_error(name, value, lo, hi)
        bands = self.band_wh
        if type(bands) is not tuple or not 1 <= len(bands) <= MAX_BANDS:
            raise UnitError(f"band_wh must be a tuple of 1..{MAX_BANDS} integers, got {bands!r}")
        for i, value in enumerate(bands):
            if type(value) is not int or not 0 <= value <= MAX_WH:
                raise _int_error(f"band_wh[{i}]", value, 0, MAX_WH)
        _member(self.relay, Relay, "relay")


@dataclass(frozen=True, slots=True, kw_only=True)
class ReadingBatch:
    """Readings from one gateway; de-duplicated on (gw, seq) and on (meter, ts)."""

    gw: str
    seq: int
    historical: bool
    readings: tuple[Reading, ...]

    def __post_init__(self) -> None:
        check_gateway_id(self.gw)
        # i64, not u64: fits a signed 64-bit database column (PostgreSQL BIGINT, SQLite).
        _int(self.seq, "seq", 0, I64_MAX)
        _bool(self.historical, "historical")
        readings = self.readings
        if type(readings) is not tuple or not 1 <= len(readings) <= MAX_READINGS_PER_BATCH:
            raise UnitError(f"a batch holds 1..{MAX_READINGS_PER_BATCH} readings")
        for reading in readings:
            _member_of(reading, Reading, "readings[]")
        if len({(r.meter, r.ts) for r in readings}) != len(readings):
            raise UnitError("a batch holds at most one reading per (meter, ts)")


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenDelivery:
    """A signed message (credit token, tariff or key change) for one meter, opaque here.

    ``token_id`` and ``meter`` are for routing and logs only: the gateway and the meter
    trust nothing until they have verified the signed bytes (:mod:`firmware_protocol.messages`).
    """

    msg: bytes
    token_id: int
    meter: int

    def __post_init__(self) -> None:
        if type(self.msg) is not bytes or not 1 <= len(self.msg) <= MAX_MESSAGE_LEN:
            raise UnitError(f"msg must be 1..{MAX_MESSAGE_LEN} bytes")
        _int(self.token_id, "token_id", 0, U32_MAX)
        _int(self.meter, "meter", 1, U64_MAX)


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenResult:
    """What a meter did with a delivered message; ``credit_after_milli`` is None if unread."""

    token_id: int
    meter: int
    status: TokenStatus
    credit_after_milli: int | None
    ts: int

    def __post_init__(self) -> None:
        _int(self.token_id, "token_id", 0, U32_MAX)
        _int(self.meter, "meter", 1, U64_MAX)
        _member(self.status, TokenStatus, "status")
        if self.credit_after_milli is not None:
            _int(self.credit_after_milli, "credit_after_milli", I64_MIN, I64_MAX)
        _ts(self.ts)


@dataclass(frozen=True, slots=True, kw_only=True)
class TimeSyncArgs:
    """Arguments of a ``time_sync`` command: the Unix time to set."""

    ts: int

    def __post_init__(self) -> None:
        _ts(self.ts, "args.ts")


@dataclass(frozen=True, slots=True, kw_only=True)
class Command:
    """A command to a gateway (or one of its meters); ``id`` correlates the result.

    ``ts`` is when the backend issued it: commands wait in the gateway's persistent
    session while it is offline, and a gateway refuses ones older than its configured
    limit rather than, say, disconnecting a meter days late.
    """

    id: str
    kind: CommandKind
    ts: int
    meter: int | None = None
    args: TimeSyncArgs | None = None

    def __post_init__(self) -> None:
        _command_id(self.id)
        _member(self.kind, CommandKind, "kind")
        _ts(self.ts)
        if self.meter is None:
            if self.kind in _METER_REQUIRED:
                raise UnitError(f"a {self.kind.value} command names a meter")
        elif self.kind in _METER_REQUIRED or self.kind in _METER_OPTIONAL:
            _int(self.meter, "meter", 1, U64_MAX)
        else:
            raise UnitError(f"a {self.kind.value} command names no meter")
        if self.kind is CommandKind.TIME_SYNC:
            if type(self.args) is not TimeSyncArgs:
                raise UnitError("a time_sync command carries args with ts")
        elif self.args is not None:
            raise UnitError(f"a {self.kind.value} command has no args")


def _command_id(value: object) -> None:
    if type(value) is not str or not _COMMAND_ID.fullmatch(value):
        raise UnitError(f"id must be 1..64 visible ASCII characters, got {value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandResult:
    """The outcome of the command with the same ``id``; ``detail`` is for people."""

    id: str
    ok: bool
    detail: str
    ts: int

    def __post_init__(self) -> None:
        _command_id(self.id)
        _bool(self.ok, "ok")
        # isprintable() refuses control characters, line separators and lone surrogates
        # (which UTF-8 cannot encode), so every valid detail encodes and logs safely.
        if (
            type(self.detail) is not str
            or len(self.detail) > MAX_DETAIL_LEN
            or not self.detail.isprintable()
        ):
            raise UnitError(f"detail must be 0..{MAX_DETAIL_LEN} printable characters")
        _ts(self.ts)


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendState:
    """Retained on ``backend/state``; ``online=False`` is the backend's Will."""

    online: bool
    ts: int

    def __post_init__(self) -> None:
        _bool(self.online, "online")
        _ts(self.ts)


Message = (
    GatewayState
    | ReadingBatch
    | TokenDelivery
    | TokenResult
    | Command
    | CommandResult
    | BackendState
)

# ------------------------------------------------------------------ encoding

# Canonical form (MQTT.md §3.1): sorted keys, no whitespace, raw UTF-8 (not \u escapes),
# NaN/Infinity refused. One encoder instance so the C accelerator is set up once.
_ENCODER: Final = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, sort_keys=True, separators=(",", ":")
)


def _reading_json(r: Reading) -> dict[str, object]:
    return {
        "meter": r.meter,
        "ts": r.ts,
        "import_wh": r.import_wh,
        "band_wh": list(r.band_wh),
        "credit_milli": r.credit_milli,
        "relay": r.relay.value,
        "power_w": r.power_w,
        "voltage_dv": r.voltage_dv,
        "current_ma": r.current_ma,
        "tariff_id": r.tariff_id,
        "last_token_id": r.last_token_id,
        "status_flags": r.status_flags,
        "block_period": r.block_period,
        "block_period_wh": r.block_period_wh,
    }


def _to_json(msg: Message) -> dict[str, object]:
    obj: dict[str, object]
    match msg:
        case ReadingBatch():
            obj = {
                "gw": msg.gw,
                "seq": msg.seq,
                "historical": msg.historical,
                "readings": [_reading_json(r) for r in msg.readings],
            }
        case GatewayState():
            obj = {"online": msg.online, "boot_seq": msg.boot_seq, "ts": msg.ts}
            if msg.fw is not None:
                obj["fw"] = msg.fw
            if msg.meters is not None:
                obj["meters"] = [{"meter": m.meter, "reachable": m.reachable} for m in msg.meters]
        case TokenDelivery():
            obj = {
                "msg": base64.b64encode(msg.msg).decode("ascii"),
                "token_id": msg.token_id,
                "meter": msg.meter,
            }
        case TokenResult():
            obj = {
                "token_id": msg.token_id,
                "meter": msg.meter,
                "status": _STATUS_NAME[msg.status],
                "credit_after_milli": msg.credit_after_milli,
                "ts": msg.ts,
            }
        case Command():
            obj = {"id": msg.id, "kind": msg.kind.value, "ts": msg.ts}
            if msg.meter is not None:
                obj["meter"] = msg.meter
            if msg.args is not None:
                obj["args"] = {"ts": msg.args.ts}
        case CommandResult():
            obj = {"id": msg.id, "ok": msg.ok, "detail": msg.detail, "ts": msg.ts}
        case _:  # BackendState, the last member of Message
            obj = {"online": msg.online, "ts": msg.ts}
    obj["v"] = VERSION
    return obj


def encode(msg: Message) -> bytes:
    """Canonical JSON bytes of a message (sorted keys, compact, UTF-8).

    Never larger than :data:`MAX_PAYLOAD_BYTES`: the construction bounds guarantee it
    (the test suite encodes the widest possible batch to check).
    """
    return _ENCODER.encode(_to_json(msg)).encode("utf-8")


# ------------------------------------------------------------------ decoding


def _reject_constant(name: str) -> object:
    raise MalformedError(f"payload contains {name}, which is not JSON")


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # The stdlib keeps the last of duplicate keys silently; two parsers could then read
    # two different messages from the same bytes (RFC 8259 §4 leaves it undefined).
    obj = dict(pairs)
    if len(obj) != len(pairs):
        counts = Counter(key for key, _ in pairs)
        duplicates = sorted(key for key, n in counts.items() if n > 1)
        raise MalformedError(f"duplicate key(s) {', '.join(duplicates)}")
    return obj


_DECODER: Final = json.JSONDecoder(
    object_pairs_hook=_object_without_duplicates, parse_constant=_reject_constant
)


def _load(data: bytes, what: str) -> dict[str, Any]:
    """Size, UTF-8, JSON, object, ``v``: the checks every payload passes first."""
    if len(data) > MAX_PAYLOAD_BYTES:
        raise PayloadTooLargeError(
            f"{what} payload is {len(data)} bytes, at most {MAX_PAYLOAD_BYTES}"
        )
    if not data:
        # An empty payload on a retained topic is the broker-level "delete retained" (MQTT
        # 5 §3.3.1.3): callers that want to honour it test for it before decoding.
        raise MalformedError(f"{what} payload is empty")
    try:
        # Decode explicitly: json.loads(bytes) would also accept UTF-16 and UTF-32.
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedError(f"{what} payload is not UTF-8: {exc}") from exc
    try:
        obj = _DECODER.decode(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, int digit limit, nesting
        raise MalformedError(f"{what} payload is not JSON: {exc}") from exc
    if type(obj) is not dict:
        raise MalformedError(f"{what} payload must be a JSON object, got {_type_name(obj)}")
    # Version first, so a newer message with new fields says "version", not "unknown field".
    if "v" not in obj:
        raise MalformedError(f"{what} payload has no 'v' field")
    version = obj["v"]
    if type(version) is not int:
        raise MalformedError(f"{what} field 'v' must be an integer, got {_type_name(version)}")
    if version != VERSION:
        raise UnknownVersionError(f"{what} payload version {version}, this build speaks {VERSION}")
    return obj


def _keys(
    obj: dict[str, Any], required: frozenset[str], optional: frozenset[str], what: str
) -> None:
    keys = obj.keys()
    if required <= keys <= required | optional:
        return
    missing = sorted(required - keys)
    if missing:
        raise MalformedError(f"{what} is missing field(s) {', '.join(missing)}")
    unknown = sorted(keys - required - optional)
    raise MalformedError(f"{what} has unknown field(s) {', '.join(unknown)}")


def _optional(obj: dict[str, Any], key: str) -> Any:
    """An optional field's value, None if absent; an explicit null is refused (omit it)."""
    value = obj.get(key)
    if value is None and key in obj:
        raise MalformedError(f"field {key!r} must be omitted rather than null")
    return value


def _array(value: object, name: str) -> list[Any]:
    if type(value) is not list:
        raise MalformedError(f"{name} must be an array, got {_type_name(value)}")
    return value


def _object(value: object, name: str) -> dict[str, Any]:
    if type(value) is not dict:
        raise MalformedError(f"{name} must be an object, got {_type_name(value)}")
    return value


def _name(value: object, table: dict[str, Any], name: str) -> Any:
    if type(value) is not str or value not in table:
        raise MalformedError(f"{name} must be one of {', '.join(table)}, got {value!r}")
    return table[value]


_M = TypeVar("_M")


def _decode(data: bytes, what: str, build: Callable[[dict[str, Any]], _M]) -> _M:
    obj = _load(data, what)
    try:
        return build(obj)
    except UnitError as exc:  # a field out of range: the peer's fault once it came off the wire
        raise MalformedError(f"{what}: {exc}") from exc


_V: Final = frozenset({"v"})
_NONE: Final[frozenset[str]] = frozenset()
_STATE_REQUIRED: Final = frozenset({"online", "boot_seq", "ts"}) | _V
_STATE_OPTIONAL: Final = frozenset({"fw", "meters"})
_PRESENCE_KEYS: Final = frozenset({"meter", "reachable"})


def _gateway_state(obj: dict[str, Any]) -> GatewayState:
    _keys(obj, _STATE_REQUIRED, _STATE_OPTIONAL, "gateway state")
    meters = _optional(obj, "meters")
    presences = None
    if meters is not None:
        presences = tuple(_presence(m) for m in _array(meters, "meters"))
    return GatewayState(
        online=obj["online"],
        boot_seq=obj["boot_seq"],
        ts=obj["ts"],
        fw=_optional(obj, "fw"),
        meters=presences,
    )


def _presence(value: object) -> MeterPresence:
    item = _object(value, "meters[]")
    _keys(item, _PRESENCE_KEYS, _NONE, "meters[]")
    return MeterPresence(meter=item["meter"], reachable=item["reachable"])


def decode_gateway_state(data: bytes) -> GatewayState:
    """Parse a ``gw/{gw}/state`` payload (birth, Will or clean-stop state)."""
    return _decode(data, "gateway state", _gateway_state)


_BATCH_KEYS: Final = frozenset({"gw", "seq", "historical", "readings"}) | _V
_READING_KEYS: Final = frozenset({"band_wh", "relay"} | {name for name, _, _ in _READING_INTS})


def _reading(d: object) -> Reading:
    if type(d) is not dict:
        raise MalformedError(f"must be an object, got {_type_name(d)}")
    if d.keys() != _READING_KEYS:
        _keys(d, _READING_KEYS, _NONE, "reading")
    return Reading(
        meter=d["meter"],
        ts=d["ts"],
        import_wh=d["import_wh"],
        band_wh=tuple(_array(d["band_wh"], "band_wh")),
        credit_milli=d["credit_milli"],
        relay=_name(d["relay"], _RELAY_BY_NAME, "relay"),
        power_w=d["power_w"],
        voltage_dv=d["voltage_dv"],
        current_ma=d["current_ma"],
        tariff_id=d["tariff_id"],
        last_token_id=d["last_token_id"],
        status_flags=d["status_flags"],
        block_period=d["block_period"],
        block_period_wh=d["block_period_wh"],
    )


def _reading_batch(obj: dict[str, Any]) -> ReadingBatch:
    _keys(obj, _BATCH_KEYS, _NONE, "reading batch")
    items = _array(obj["readings"], "readings")
    # Before building anything, so an oversized batch costs no Reading objects.
    if len(items) > MAX_READINGS_PER_BATCH:
        raise MalformedError(f"a batch holds at most {MAX_READINGS_PER_BATCH} readings")
    readings = []
    for i, item in enumerate(items):
        try:
            readings.append(_reading(item))
        except (MalformedError, UnitError) as exc:
            raise MalformedError(f"readings[{i}]: {exc}") from exc
    return ReadingBatch(
        gw=obj["gw"], seq=obj["seq"], historical=obj["historical"], readings=tuple(readings)
    )


def decode_reading_batch(data: bytes) -> ReadingBatch:
    """Parse a ``gw/{gw}/readings`` payload (the hot path: keep it lean)."""
    return _decode(data, "reading batch", _reading_batch)


_DELIVERY_KEYS: Final = frozenset({"msg", "token_id", "meter"}) | _V


def _token_delivery(obj: dict[str, Any]) -> TokenDelivery:
    _keys(obj, _DELIVERY_KEYS, _NONE, "token delivery")
    text = obj["msg"]
    if type(text) is not str:
        raise MalformedError(f"msg must be a base64 string, got {_type_name(text)}")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:  # ValueError: non-ASCII characters
        raise MalformedError(f"msg is not base64: {exc}") from exc
    # One spelling per byte string (RFC 4648 §3.5: padded, zero pad bits), so that
    # encode(decode(b)) == b and two deliveries of the same message compare equal as text.
    if base64.b64encode(raw).decode("ascii") != text:
        raise MalformedError("msg is not canonical base64 (RFC 4648 §4, padded, zero pad bits)")
    return TokenDelivery(msg=raw, token_id=obj["token_id"], meter=obj["meter"])


def decode_token_delivery(data: bytes) -> TokenDelivery:
    """Parse a ``gw/{gw}/meter/{meter}/token`` payload; the bytes in ``msg`` stay unverified."""
    return _decode(data, "token delivery", _token_delivery)


_RESULT_KEYS: Final = frozenset({"token_id", "meter", "status", "credit_after_milli", "ts"}) | _V


def _token_result(obj: dict[str, Any]) -> TokenResult:
    _keys(obj, _RESULT_KEYS, _NONE, "token result")
    return TokenResult(
        token_id=obj["token_id"],
        meter=obj["meter"],
        status=_name(obj["status"], _STATUS_BY_NAME, "status"),
        credit_after_milli=obj["credit_after_milli"],
        ts=obj["ts"],
    )


def decode_token_result(data: bytes) -> TokenResult:
    """Parse a ``gw/{gw}/meter/{meter}/token/result`` payload."""
    return _decode(data, "token result", _token_result)


_COMMAND_REQUIRED: Final = frozenset({"id", "kind", "ts"}) | _V
_COMMAND_OPTIONAL: Final = frozenset({"meter", "args"})
_ARGS_KEYS: Final = frozenset({"ts"})


def _command(obj: dict[str, Any]) -> Command:
    _keys(obj, _COMMAND_REQUIRED, _COMMAND_OPTIONAL, "command")
    args = _optional(obj, "args")
    time_sync = None
    if args is not None:
        _keys(_object(args, "args"), _ARGS_KEYS, _NONE, "args")
        time_sync = TimeSyncArgs(ts=args["ts"])
    return Command(
        id=obj["id"],
        kind=_name(obj["kind"], _KIND_BY_NAME, "kind"),
        ts=obj["ts"],
        meter=_optional(obj, "meter"),
        args=time_sync,
    )


def decode_command(data: bytes) -> Command:
    """Parse a ``gw/{gw}/cmd`` payload."""
    return _decode(data, "command", _command)


_COMMAND_RESULT_KEYS: Final = frozenset({"id", "ok", "detail", "ts"}) | _V


def _command_result(obj: dict[str, Any]) -> CommandResult:
    _keys(obj, _COMMAND_RESULT_KEYS, _NONE, "command result")
    return CommandResult(id=obj["id"], ok=obj["ok"], detail=obj["detail"], ts=obj["ts"])


def decode_command_result(data: bytes) -> CommandResult:
    """Parse a ``gw/{gw}/cmd/result`` payload."""
    return _decode(data, "command result", _command_result)


_BACKEND_KEYS: Final = frozenset({"online", "ts"}) | _V


def _backend_state(obj: dict[str, Any]) -> BackendState:
    _keys(obj, _BACKEND_KEYS, _NONE, "backend state")
    return BackendState(online=obj["online"], ts=obj["ts"])


def decode_backend_state(data: bytes) -> BackendState:
    """Parse the ``backend/state`` payload."""
    return _decode(data, "backend state", _backend_state)


def decode_payload(topic: Topic, data: bytes) -> Message:
    """Decode ``data`` as the payload type of ``topic`` and check the ids agree.

    A batch naming another gateway, or a token (result) naming another meter than its
    topic, is refused: ids in the payload are what get logged and stored, ids in the topic
    are what the broker's ACLs vouched for, and they must be the same.
    """
    match topic:
        case ReadingsTopic():
            batch = decode_reading_batch(data)
            _same("gw", batch.gw, topic.gw)
            return batch
        case GatewayStateTopic():
            return decode_gateway_state(data)
        case TokenTopic():
            delivery = decode_token_delivery(data)
            _same("meter", delivery.meter, topic.meter)
            return delivery
        case TokenResultTopic():
            result = decode_token_result(data)
            _same("meter", result.meter, topic.meter)
            return result
        case CommandTopic():
            return decode_command(data)
        case CommandResultTopic():
            return decode_command_result(data)
        case _:  # BackendStateTopic, the last member of Topic
            return decode_backend_state(data)


def _same(name: str, in_payload: object, in_topic: object) -> None:
    if in_payload != in_topic:
        raise MalformedError(
            f"payload {name} {in_payload!r} differs from topic {name} {in_topic!r}"
        )
