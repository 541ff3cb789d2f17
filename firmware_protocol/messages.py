"""Binary layout, signing and verification of the three signed messages (SPEC.md §2).

Every message is ``header ‖ body ‖ signature``: a 26-byte big-endian header, a
type-specific body, and a 64-byte Ed25519 signature (RFC 8032) over all bytes before
it. Decoding reads only the version, type and key id before the signature has been
verified; every other field is parsed after :func:`verify` has checked it.
"""

from __future__ import annotations

import datetime as dt
import enum
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from firmware_protocol.errors import (
    ExpiredError,
    MalformedError,
    NotYetValidError,
    PayloadTooLargeError,
    ProtocolError,
    SignatureError,
    UnitError,
    UnknownKeyError,
    UnknownVersionError,
    WrongMeterError,
)
from firmware_protocol.tariff import Band, Block, Switch, Tariff
from firmware_protocol.units import Currency, check_int, currency_by_numeric

VERSION: Final = 1
HEADER_LEN: Final = 26
SIGNATURE_LEN: Final = 64
PUBLIC_KEY_LEN: Final = 32
#: No message is longer than this; the meter's token block holds exactly this many bytes.
MAX_MESSAGE_LEN: Final = 512
#: Default tolerance for a meter clock that runs behind the backend's.
DEFAULT_MAX_SKEW_S: Final = 300
U32_MAX: Final = 2**32 - 1
U64_MAX: Final = 2**64 - 1

_HEADER = struct.Struct(">BBIQIII")  # version, type, key_id, meter_id, msg_id, issued, expires
_CREDIT_BODY = struct.Struct(">HI")  # currency numeric, amount in minor units
_KEY_HEAD = struct.Struct(">BI")  # action, target key id; then the 32-byte public key
_TARIFF_FIXED = struct.Struct(">IIHI")  # tariff id, activation, currency, standing charge
_EPOCH_DATE: Final = dt.date(1970, 1, 1)


class MessageType(enum.IntEnum):
    """Wire value of byte 1."""

    CREDIT = 1
    TARIFF = 2
    KEY_CHANGE = 3


class KeyAction(enum.IntEnum):
    """What a key-change message does to the meter's trusted key set."""

    ADD = 1
    REVOKE = 2


@dataclass(frozen=True, slots=True)
class Header:
    """Fields every message carries (SPEC.md §2.1)."""

    key_id: int
    meter_id: int
    msg_id: int
    issued_at: int
    expires_at: int

    def __post_init__(self) -> None:
        _u(self.key_id, "key_id", U32_MAX)
        _u(self.meter_id, "meter_id", U64_MAX, minimum=1)
        _u(self.msg_id, "msg_id", U32_MAX, minimum=1)
        _u(self.issued_at, "issued_at", U32_MAX)
        _u(self.expires_at, "expires_at", U32_MAX)
        if self.expires_at <= self.issued_at:
            raise UnitError("expires_at must be after issued_at")


@dataclass(frozen=True, slots=True)
class CreditToken:
    """Adds ``amount_minor`` of ``currency`` to the meter's credit, once."""

    header: Header
    currency: Currency
    amount_minor: int

    def __post_init__(self) -> None:
        _u(self.amount_minor, "amount_minor", U32_MAX, minimum=1)


@dataclass(frozen=True, slots=True)
class TariffMessage:
    """Installs ``tariff`` as the meter's passive tariff, active from ``activation_at``."""

    header: Header
    tariff: Tariff
    activation_at: int

    def __post_init__(self) -> None:
        _u(self.activation_at, "activation_at", U32_MAX)


@dataclass(frozen=True, slots=True)
class KeyChange:
    """Adds or revokes one trusted verification key at the meter."""

    header: Header
    action: KeyAction
    target_key_id: int
    public_key: bytes  # 32 raw Ed25519 bytes for ADD, 32 zero bytes for REVOKE

    def __post_init__(self) -> None:
        _u(self.target_key_id, "target_key_id", U32_MAX)
        if len(self.public_key) != PUBLIC_KEY_LEN:
            raise UnitError("public_key must be 32 bytes")
        if self.action is KeyAction.REVOKE and any(self.public_key):
            raise UnitError("a REVOKE carries 32 zero bytes as public key")


Message = CreditToken | TariffMessage | KeyChange


class Signer(Protocol):
    """Anything that signs with a named Ed25519 key (a key file today, an HSM later)."""

    @property
    def key_id(self) -> int: ...

    def sign(self, data: bytes) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Ed25519Signer:
    """A :class:`Signer` holding the private key in memory."""

    key_id: int
    private_key: Ed25519PrivateKey

    def sign(self, data: bytes) -> bytes:
        """Ed25519 signature (64 bytes) of ``data``."""
        return self.private_key.sign(data)

    def public_key_bytes(self) -> bytes:
        """The 32 raw bytes of the matching public key."""
        return public_key_bytes(self.private_key.public_key())


def public_key_bytes(key: Ed25519PublicKey) -> bytes:
    """Raw 32-byte encoding (RFC 8032 §5.1.5) of an Ed25519 public key."""
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def load_public_key(raw: bytes) -> Ed25519PublicKey:
    """Public key from 32 raw bytes; anything else raises :class:`MalformedError`."""
    if len(raw) != PUBLIC_KEY_LEN:
        raise MalformedError(f"an Ed25519 public key is 32 bytes, got {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def load_private_key(raw: bytes) -> Ed25519PrivateKey:
    """Private key from its 32-byte seed; anything else raises :class:`MalformedError`."""
    if len(raw) != PUBLIC_KEY_LEN:
        raise MalformedError(f"an Ed25519 private key seed is 32 bytes, got {len(raw)}")
    return Ed25519PrivateKey.from_private_bytes(raw)


# ---------------------------------------------------------------- encoding


def encode(message: Message, signer: Signer) -> bytes:
    """Serialise and sign; the header's key id must be the signer's."""
    if message.header.key_id != signer.key_id:
        raise UnitError(
            f"header names key {message.header.key_id}, signer holds key {signer.key_id}"
        )
    unsigned = _header_bytes(message) + _body_bytes(message)
    if (
        len(unsigned) + SIGNATURE_LEN > MAX_MESSAGE_LEN
    ):  # pragma: no cover - bounded by Tariff limits
        raise UnitError("message exceeds MAX_MESSAGE_LEN")
    return unsigned + signer.sign(unsigned)


def _header_bytes(message: Message) -> bytes:
    h = message.header
    mtype = {
        CreditToken: MessageType.CREDIT,
        TariffMessage: MessageType.TARIFF,
        KeyChange: MessageType.KEY_CHANGE,
    }[type(message)]
    return _HEADER.pack(VERSION, mtype, h.key_id, h.meter_id, h.msg_id, h.issued_at, h.expires_at)


def _body_bytes(message: Message) -> bytes:
    if isinstance(message, CreditToken):
        return _CREDIT_BODY.pack(message.currency.numeric, message.amount_minor)
    if isinstance(message, KeyChange):
        return _KEY_HEAD.pack(message.action, message.target_key_id) + message.public_key
    return _tariff_body(message)


def _short_str(text: str) -> bytes:
    raw = text.encode("ascii")
    return bytes([len(raw)]) + raw


def _schedule(schedule: tuple[Switch, ...]) -> bytes:
    return bytes([len(schedule)]) + b"".join(struct.pack(">HB", s.minute, s.band) for s in schedule)


def _tariff_body(message: TariffMessage) -> bytes:
    t = message.tariff
    parts = [
        _TARIFF_FIXED.pack(
            t.tariff_id,
            message.activation_at,
            t.currency.numeric,
            t.standing_charge_milli_per_day,
        ),
        _short_str(t.timezone),
        bytes([len(t.bands)]),
    ]
    parts += [struct.pack(">I", b.price_milli_per_kwh) + _short_str(b.name) for b in t.bands]
    parts += [_schedule(t.weekday), _schedule(t.weekend), _schedule(t.holiday)]
    parts.append(bytes([len(t.holidays)]))
    parts += [struct.pack(">H", (d - _EPOCH_DATE).days) for d in t.holidays]
    parts.append(bytes([len(t.blocks)]))
    parts += [struct.pack(">II", b.from_wh, b.adder_milli_per_kwh) for b in t.blocks]
    return b"".join(parts)


# ---------------------------------------------------------------- decoding


@dataclass(frozen=True, slots=True)
class Envelope:
    """What may be read before verification: version, type and the signing key id."""

    message_type: MessageType
    key_id: int


def peek(data: bytes) -> Envelope:
    """Read the unauthenticated envelope; checks length, version and type only."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedError("a signed message is bytes")
    if len(data) > MAX_MESSAGE_LEN:
        raise PayloadTooLargeError(f"message is {len(data)} bytes, at most {MAX_MESSAGE_LEN}")
    if len(data) < HEADER_LEN + SIGNATURE_LEN:
        raise MalformedError(f"message is {len(data)} bytes, too short for header and signature")
    if data[0] != VERSION:
        raise UnknownVersionError(f"message version {data[0]}, this build speaks {VERSION}")
    try:
        mtype = MessageType(data[1])
    except ValueError:
        raise UnknownVersionError(f"unknown message type {data[1]}") from None
    (key_id,) = struct.unpack_from(">I", data, 2)
    return Envelope(mtype, key_id)


def verify(
    data: bytes,
    trusted: Mapping[int, Ed25519PublicKey],
    *,
    meter_id: int | None,
    now: int,
    max_skew_s: int = DEFAULT_MAX_SKEW_S,
) -> Message:
    """Check the signature, then parse, then check meter binding and validity time.

    ``meter_id=None`` skips the binding check (the backend's own audit of a message it
    made). Order of checks, each with its own error: size/version/type → key id known →
    signature → body well-formed → meter → expiry → not-yet-valid.
    """
    data = bytes(data)
    env = peek(data)
    key = trusted.get(env.key_id)
    if key is None:
        raise UnknownKeyError(f"message signed with unknown key id {env.key_id}")
    body_end = len(data) - SIGNATURE_LEN
    try:
        key.verify(data[body_end:], data[:body_end])
    except InvalidSignature:
        raise SignatureError(f"signature does not verify with key {env.key_id}") from None
    message = decode_unverified(data)
    h = message.header
    if meter_id is not None and h.meter_id != meter_id:
        raise WrongMeterError(f"message is for meter {h.meter_id}, this is meter {meter_id}")
    if now >= h.expires_at:
        raise ExpiredError(f"message expired at {h.expires_at}, now {now}")
    if h.issued_at > now + max_skew_s:
        raise NotYetValidError(f"message issued at {h.issued_at}, now {now}")
    return message


def decode_unverified(data: bytes) -> Message:
    """Parse without checking the signature. Only for tools and tests: use :func:`verify`."""
    env = peek(data)
    body = memoryview(data)[HEADER_LEN : len(data) - SIGNATURE_LEN]
    _, _, key_id, meter_id, msg_id, issued, expires = _HEADER.unpack_from(data, 0)
    try:
        header = Header(
            key_id=key_id,
            meter_id=meter_id,
            msg_id=msg_id,
            issued_at=issued,
            expires_at=expires,
        )
        reader = _Reader(body)
        message: Message
        if env.message_type is MessageType.CREDIT:
            numeric, amount = reader.unpack(_CREDIT_BODY)
            message = CreditToken(header, currency_by_numeric(numeric), amount)
        elif env.message_type is MessageType.KEY_CHANGE:
            action, target = reader.unpack(_KEY_HEAD)
            message = KeyChange(header, KeyAction(action), target, reader.take(PUBLIC_KEY_LEN))
        else:
            message = _read_tariff(header, reader)
        reader.end()
    except ProtocolError as exc:
        if isinstance(exc, MalformedError):
            raise
        raise MalformedError(f"{env.message_type.name.lower()} message: {exc}") from exc
    except ValueError as exc:  # enum values, ASCII, dates
        raise MalformedError(f"{env.message_type.name.lower()} message: {exc}") from exc
    return message


class _Reader:
    """Bounds-checked cursor over a body; running past the end is a MalformedError."""

    def __init__(self, view: memoryview) -> None:
        self._view = view
        self._pos = 0

    def take(self, n: int) -> bytes:
        if self._pos + n > len(self._view):
            raise MalformedError("message body is truncated")
        chunk = bytes(self._view[self._pos : self._pos + n])
        self._pos += n
        return chunk

    def unpack(self, fmt: struct.Struct) -> tuple[int, ...]:
        values: tuple[int, ...] = fmt.unpack(self.take(fmt.size))
        return values

    def u8(self) -> int:
        return self.take(1)[0]

    def short_str(self) -> str:
        return self.take(self.u8()).decode("ascii")

    def end(self) -> None:
        if self._pos != len(self._view):
            raise MalformedError(f"{len(self._view) - self._pos} unexpected trailing bytes")


def _read_schedule(reader: _Reader) -> tuple[Switch, ...]:
    return tuple(Switch(*reader.unpack(_SWITCH)) for _ in range(reader.u8()))


_SWITCH = struct.Struct(">HB")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_BLOCK = struct.Struct(">II")


def _read_tariff(header: Header, reader: _Reader) -> TariffMessage:
    tariff_id, activation, numeric, standing = reader.unpack(_TARIFF_FIXED)
    timezone = reader.short_str()
    bands = []
    for _ in range(reader.u8()):
        (price,) = reader.unpack(_U32)
        bands.append(Band(reader.short_str(), price))
    weekday = _read_schedule(reader)
    weekend = _read_schedule(reader)
    holiday = _read_schedule(reader)
    holidays = tuple(
        _EPOCH_DATE + dt.timedelta(days=reader.unpack(_U16)[0]) for _ in range(reader.u8())
    )
    blocks = tuple(Block(*reader.unpack(_BLOCK)) for _ in range(reader.u8()))
    tariff = Tariff(
        tariff_id=tariff_id,
        currency=currency_by_numeric(numeric),
        timezone=timezone,
        bands=tuple(bands),
        weekday=weekday,
        weekend=weekend,
        holiday=holiday,
        standing_charge_milli_per_day=standing,
        holidays=holidays,
        blocks=blocks,
    )
    return TariffMessage(header, tariff, activation)


def _u(value: object, name: str, maximum: int, *, minimum: int = 0) -> None:
    check_int(value, name, minimum=minimum, maximum=maximum)
