"""Signed message layout, signing and the order of verification checks."""

from __future__ import annotations

import datetime as dt
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from firmware_protocol import errors, messages
from firmware_protocol.messages import (
    CreditToken,
    Ed25519Signer,
    Header,
    KeyAction,
    KeyChange,
    MessageType,
    TariffMessage,
)
from firmware_protocol.tariff import Band, Block, Switch, Tariff, flat_tariff
from firmware_protocol.units import CURRENCIES, currency

SEED = bytes(range(32))
SIGNER = Ed25519Signer(7, messages.load_private_key(SEED))
TRUSTED = {7: SIGNER.private_key.public_key()}
EUR = currency("EUR")
HEADER = Header(key_id=7, meter_id=123, msg_id=1, issued_at=1000, expires_at=2000)


def credit(**kw: int) -> CreditToken:
    fields = {"key_id": 7, "meter_id": 123, "msg_id": 1, "issued_at": 1000, "expires_at": 2000}
    fields.update(kw)
    return CreditToken(Header(**fields), EUR, 500)


def test_credit_token_exact_bytes() -> None:
    data = messages.encode(credit(), SIGNER)
    assert len(data) == 96
    assert data[:32] == bytes.fromhex(
        "010100000007000000000000007b00000001000003e8000007d003d2000001f4"
    )
    # Ed25519 is deterministic (RFC 8032): the signature is a known answer too.
    SIGNER.private_key.public_key().verify(data[32:], data[:32])


def test_roundtrip_every_type() -> None:
    tou = Tariff(
        tariff_id=9,
        currency=EUR,
        timezone="Europe/Berlin",
        bands=(Band("offpeak", 21000), Band("peak", 38000)),
        weekday=(Switch(0, 0), Switch(420, 1), Switch(1320, 0)),
        weekend=(Switch(0, 0),),
        holiday=(Switch(0, 0),),
        standing_charge_milli_per_day=45000,
        holidays=(dt.date(2026, 12, 25), dt.date(2026, 12, 26)),
        blocks=(Block(0, 0), Block(100_000, 5000)),
    )
    other = SIGNER.public_key_bytes()
    for msg in (
        credit(),
        TariffMessage(HEADER, tou, 1500),
        KeyChange(HEADER, KeyAction.ADD, 8, other),
        KeyChange(HEADER, KeyAction.REVOKE, 3, bytes(32)),
    ):
        data = messages.encode(msg, SIGNER)
        assert messages.verify(data, TRUSTED, meter_id=123, now=1500) == msg
        assert messages.decode_unverified(data) == msg
        assert messages.peek(data).key_id == 7


@given(
    meter=st.integers(1, 2**64 - 1),
    msg_id=st.integers(1, 2**32 - 1),
    issued=st.integers(0, 2**32 - 2),
    amount=st.integers(1, 2**32 - 1),
    cur=st.sampled_from(sorted(CURRENCIES)),
)
def test_credit_roundtrip_property(
    meter: int, msg_id: int, issued: int, amount: int, cur: str
) -> None:
    header = Header(
        key_id=7, meter_id=meter, msg_id=msg_id, issued_at=issued, expires_at=issued + 1
    )
    msg = CreditToken(header, currency(cur), amount)
    data = messages.encode(msg, SIGNER)
    assert messages.verify(data, TRUSTED, meter_id=meter, now=issued) == msg


@given(st.integers(0, 95), st.integers(1, 255))
def test_any_flipped_byte_is_refused(pos: int, flip: int) -> None:
    data = bytearray(messages.encode(credit(), SIGNER))
    data[pos] ^= flip
    with pytest.raises(errors.ProtocolError):
        messages.verify(bytes(data), TRUSTED, meter_id=123, now=1500)


def test_check_order_and_errors() -> None:
    data = messages.encode(credit(), SIGNER)
    with pytest.raises(errors.UnknownKeyError):
        messages.verify(data, {}, meter_id=123, now=1500)
    forged = Ed25519Signer(7, Ed25519PrivateKey.generate())
    with pytest.raises(errors.SignatureError):
        messages.verify(messages.encode(credit(), forged), TRUSTED, meter_id=123, now=1500)
    with pytest.raises(errors.WrongMeterError):
        messages.verify(data, TRUSTED, meter_id=124, now=1500)
    with pytest.raises(errors.ExpiredError):
        messages.verify(data, TRUSTED, meter_id=123, now=2000)
    with pytest.raises(errors.NotYetValidError):
        messages.verify(data, TRUSTED, meter_id=123, now=1000 - 301)
    assert messages.verify(data, TRUSTED, meter_id=None, now=1000 - 300) == credit()


def resign(unsigned: bytes) -> bytes:
    return unsigned + SIGNER.sign(unsigned)


def test_envelope_rejections() -> None:
    data = messages.encode(credit(), SIGNER)
    with pytest.raises(errors.MalformedError, match="bytes"):
        messages.peek("text")  # type: ignore[arg-type]
    with pytest.raises(errors.PayloadTooLargeError):
        messages.peek(bytes(513))
    with pytest.raises(errors.MalformedError, match="too short"):
        messages.peek(data[:89])
    with pytest.raises(errors.UnknownVersionError, match="version 2"):
        messages.verify(resign(b"\x02" + data[1:32]), TRUSTED, meter_id=123, now=1500)
    with pytest.raises(errors.UnknownVersionError, match="type 9"):
        messages.verify(resign(b"\x01\x09" + data[2:32]), TRUSTED, meter_id=123, now=1500)


def test_signed_but_malformed_bodies() -> None:
    """A validly signed message with a bad body is still refused as malformed."""
    data = messages.encode(credit(), SIGNER)[:32]
    cases = {
        "truncated": data[:30],
        "trailing": data + b"\x00",
        "currency": data[:26] + struct.pack(">HI", 999, 5),
        "amount_minor": data[:28] + bytes(4),
        "msg_id": data[:14] + bytes(4) + data[18:],
        "expires_at": data[:22] + struct.pack(">I", 1000) + data[26:],
        "meter_id": data[:6] + bytes(8) + data[14:],
    }
    for name, unsigned in cases.items():
        with pytest.raises(errors.MalformedError) as info:
            messages.verify(resign(unsigned), TRUSTED, meter_id=None, now=1500)
        assert name in str(info.value) or name in ("truncated", "trailing"), name
    key = messages.encode(KeyChange(HEADER, KeyAction.ADD, 8, bytes(32)), SIGNER)[:-64]
    with pytest.raises(errors.MalformedError, match="is not a valid KeyAction"):
        messages.verify(resign(key[:26] + b"\x07" + key[27:]), TRUSTED, meter_id=None, now=1500)
    with pytest.raises(errors.MalformedError, match="zero bytes"):
        messages.verify(
            resign(key[:26] + b"\x02" + key[27:-1] + b"\x01"), TRUSTED, meter_id=None, now=1500
        )
    tariff = flat_tariff(tariff_id=1, currency=EUR, timezone="UTC", price_milli_per_kwh=1)
    tar = messages.encode(TariffMessage(HEADER, tariff, 0), SIGNER)[:-64]
    tz_at = 26 + 14
    bad = resign(tar[: tz_at + 1] + b"\xff\xff\xff" + tar[tz_at + 4 :])
    with pytest.raises(errors.MalformedError, match="ascii"):
        messages.verify(bad, TRUSTED, meter_id=None, now=1500)
    bad = resign(tar[: tz_at + 1] + b"XYZ" + tar[tz_at + 4 :])
    with pytest.raises(errors.MalformedError, match="time zone"):
        messages.verify(bad, TRUSTED, meter_id=None, now=1500)
    with pytest.raises(errors.MalformedError, match="truncated"):
        messages.verify(resign(tar[:-1]), TRUSTED, meter_id=None, now=1500)


def test_construction_errors_are_ours() -> None:
    with pytest.raises(errors.UnitError):
        Header(key_id=7, meter_id=0, msg_id=1, issued_at=0, expires_at=1)
    with pytest.raises(errors.UnitError, match="after"):
        Header(key_id=7, meter_id=1, msg_id=1, issued_at=5, expires_at=5)
    with pytest.raises(errors.UnitError):
        CreditToken(HEADER, EUR, 0)
    with pytest.raises(errors.UnitError):
        TariffMessage(
            HEADER,
            flat_tariff(tariff_id=1, currency=EUR, timezone="UTC", price_milli_per_kwh=1),
            -1,
        )
    with pytest.raises(errors.UnitError, match="32 bytes"):
        KeyChange(HEADER, KeyAction.ADD, 1, b"short")
    with pytest.raises(errors.UnitError, match="signer holds key 7"):
        messages.encode(
            CreditToken(Header(key_id=8, meter_id=1, msg_id=1, issued_at=0, expires_at=1), EUR, 1),
            SIGNER,
        )
    assert not errors.UnitError.peer_fault
    assert errors.SignatureError.peer_fault


def test_key_material_helpers() -> None:
    with pytest.raises(errors.MalformedError):
        messages.load_public_key(b"x" * 31)
    with pytest.raises(errors.MalformedError):
        messages.load_private_key(b"x" * 33)
    raw = SIGNER.public_key_bytes()
    assert messages.public_key_bytes(messages.load_public_key(raw)) == raw
    assert MessageType(1) is MessageType.CREDIT
