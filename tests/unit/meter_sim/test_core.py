"""The meter core as a pure state machine: tokens, tariffs, keys, energy and credit in time,
emergency credit, friendly hours, remote commands, DST days, power loss, crash-during-token.

Load profiles are tiny classes defined here (anything with ``power_w(t) -> int``). Most
tests use a flat UTC tariff at 30 milli/Wh and 3600 W, i.e. 1 Wh per second, 60 Wh and
1 800 milli per minute, so expected values can be computed by hand.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
from collections import Counter
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_protocol import messages, rating
from firmware_protocol.errors import MalformedError, UnitError
from firmware_protocol.messages import (
    CreditToken,
    Ed25519Signer,
    Header,
    KeyAction,
    KeyChange,
    TariffMessage,
)
from firmware_protocol.modbus_map import (
    EMPTY_EVENT,
    EVENT_LOG_LEN,
    CreditState,
    EventCode,
    EventRecord,
    RelayCause,
    RelayCommand,
    RelayState,
    StatusFlag,
)
from firmware_protocol.replay import WINDOW
from firmware_protocol.status import TokenStatus
from firmware_protocol.tariff import Band, Block, Switch, Tariff, flat_tariff
from firmware_protocol.units import currency
from firmware_protocol.vectors import (
    EXAMPLE_TOU,
    METER,
    TEST_KEY_ID,
    TEST_KEY_ID_2,
    TEST_SEED,
    TEST_SEED_2,
)
from meter_sim import core, persistence
from meter_sim.core import FriendlyHours, MeterConfig, MeterState

MIN = 60
HOUR = 3600
DAY = 86_400
T0 = 1_780_272_000  # 2026-06-01 00:00 UTC, a Monday (02:00 CEST in Berlin)
BERLIN = ZoneInfo("Europe/Berlin")
EUR = currency("EUR")
USD = currency("USD")

PRICE = 30_000  # milli per kWh = 30 milli per Wh
STANDING = 40_000
FLAT = flat_tariff(
    tariff_id=1,
    currency=EUR,
    timezone="UTC",
    price_milli_per_kwh=PRICE,
    standing_charge_milli_per_day=STANDING,
)
HIGH = flat_tariff(
    tariff_id=2,
    currency=EUR,
    timezone="UTC",
    price_milli_per_kwh=60_000,
    standing_charge_milli_per_day=50_000,
)
FLAT_BERLIN = flat_tariff(
    tariff_id=3,
    currency=EUR,
    timezone="Europe/Berlin",
    price_milli_per_kwh=PRICE,
    standing_charge_milli_per_day=STANDING,
)
_DAY_NIGHT = (Switch(0, 0), Switch(7 * 60, 1), Switch(21 * 60, 0))
#: Night/day every day of the week (EXAMPLE_TOU is night all weekend, and DST days are Sundays).
BERLIN_DAY_NIGHT = Tariff(
    tariff_id=5,
    currency=EUR,
    timezone="Europe/Berlin",
    bands=(Band("night", 20_000), Band("day", 30_000)),
    weekday=_DAY_NIGHT,
    weekend=_DAY_NIGHT,
    holiday=_DAY_NIGHT,
    standing_charge_milli_per_day=STANDING,
)

CONFIG = MeterConfig(meter_id=METER, currency=EUR)  # low 500 000, EC 1 000 000, auto
LOW = CONFIG.low_credit_milli
EC = CONFIG.emergency_limit_milli
MANUAL = dataclasses.replace(CONFIG, auto_reconnect=False)
NIGHT = FriendlyHours(timezone="Europe/Berlin", night_start_minute=18 * 60, night_end_minute=8 * 60)

KEY1 = Ed25519Signer(TEST_KEY_ID, messages.load_private_key(TEST_SEED))
KEY2 = Ed25519Signer(TEST_KEY_ID_2, messages.load_private_key(TEST_SEED_2))
PUB1 = KEY1.public_key_bytes()
PUB2 = KEY2.public_key_bytes()
ISSUED = 1_700_000_000
EXPIRES = 2_000_000_000


class Constant:
    """A fixed draw."""

    def __init__(self, watts: int) -> None:
        self.watts = watts

    def power_w(self, t: int) -> int:
        del t
        return self.watts


class Wobbly:
    """A draw that changes every second (0..4999 W)."""

    def power_w(self, t: int) -> int:
        return t * 7_919 % 5_000


class Minutely:
    """A draw that changes every minute: 0, 100, ..., 600 W."""

    def power_w(self, t: int) -> int:
        return 100 * (t // MIN % 7)


KW = Constant(3_600)  # 1 Wh per second
PER_MIN_MILLI = 60 * PRICE // 1_000  # 1 800: what KW costs per minute on FLAT


# --------------------------------------------------------------------------- helpers


def signer(key_id: int) -> Ed25519Signer:
    return Ed25519Signer(key_id, messages.load_private_key(bytes([key_id]) * 32))


def local(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> int:
    """Unix seconds of a Berlin wall-clock time."""
    return int(dt.datetime(year, month, day, hour, minute, tzinfo=BERLIN).timestamp())


def new(
    credit_milli: int = 10_000_000,
    *,
    config: MeterConfig = CONFIG,
    tariff: Tariff = FLAT,
    now: int = T0,
    keys: dict[int, bytes] | None = None,
) -> MeterState:
    return core.new_meter(
        config,
        tariff=tariff,
        trusted_keys={TEST_KEY_ID: PUB1} if keys is None else keys,
        now=now,
        credit_milli=credit_milli,
    )


def run(
    state: MeterState,
    t: int,
    profile: core.LoadProfile = KW,
    config: MeterConfig = CONFIG,
) -> MeterState:
    return core.advance(state, config, t, profile)


def header(
    msg_id: int,
    *,
    key_id: int = TEST_KEY_ID,
    meter_id: int = METER,
    issued: int = ISSUED,
    expires: int = EXPIRES,
) -> Header:
    return Header(
        key_id=key_id, meter_id=meter_id, msg_id=msg_id, issued_at=issued, expires_at=expires
    )


def credit_token(
    msg_id: int,
    amount_minor: int = 500,
    *,
    key: Ed25519Signer = KEY1,
    cur: str = "EUR",
    meter_id: int = METER,
    issued: int = ISSUED,
    expires: int = EXPIRES,
) -> bytes:
    h = header(msg_id, key_id=key.key_id, meter_id=meter_id, issued=issued, expires=expires)
    return messages.encode(CreditToken(h, currency(cur), amount_minor), key)


def tariff_token(msg_id: int, tariff: Tariff, activation_at: int) -> bytes:
    return messages.encode(TariffMessage(header(msg_id), tariff, activation_at), KEY1)


def key_token(
    msg_id: int,
    action: KeyAction,
    target: int,
    public: bytes = bytes(32),
    *,
    key: Ed25519Signer = KEY1,
) -> bytes:
    change = KeyChange(header(msg_id, key_id=key.key_id), action, target, public)
    return messages.encode(change, key)


def write(state: MeterState, data: bytes, config: MeterConfig = CONFIG) -> MeterState:
    return core.write_message(state, config, data)


def of(state: MeterState, code: EventCode) -> list[EventRecord]:
    """The state's events with ``code``, newest first."""
    return [e for e in state.events if e.code is code]


def expected_credit(start: MeterState, end: MeterState, tariff: Tariff) -> int:
    """Credit after a span on one tariff: start minus energy charge minus standing charges."""
    return (
        start.credit_milli
        - (rating.cumulative_charge_milli(tariff, end.regs) - start.charged_milli)
        - rating.standing_charges_milli(tariff, start.now, end.now)
    )


# --------------------------------------------------------------------------- construction


def test_new_meter_is_settled_and_supplying() -> None:
    s = new()
    assert (s.credit_state, s.relay, s.flags) == (CreditState.IN_CREDIT, RelayState.CLOSED, 0)
    assert s.regs == rating.start_registers(FLAT, T0)
    assert (s.tariff_activated_at, s.next_midnight, s.events) == (T0, T0 + DAY, ())
    assert s.token_status is TokenStatus.NONE
    assert s.trusted_keys == ((TEST_KEY_ID, PUB1),)


def test_new_meter_without_credit_is_off_with_emergency_credit_offered() -> None:
    s = new(0)
    assert (s.credit_state, s.relay) == (CreditState.EMERGENCY_AVAILABLE, RelayState.OPEN)
    assert s.events == (EventRecord(T0, EventCode.RELAY_OPENED, RelayCause.CREDIT),)
    assert s.ec_available(CONFIG)
    assert s.flags == StatusFlag.LOW_CREDIT


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"tariff": flat_tariff(tariff_id=1, currency=USD, timezone="UTC",
                                price_milli_per_kwh=1)}, UnitError, "currency"),
        ({"keys": {}}, UnitError, "1..4 keys"),
        ({"keys": dict.fromkeys(range(5), PUB1)}, UnitError, "1..4 keys"),
        ({"keys": {1: bytes(31)}}, MalformedError, "32 bytes"),
    ],
)  # fmt: skip
def test_new_meter_refuses(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        new(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"meter_id": 0}, "meter_id"),
        ({"meter_id": True}, "meter_id"),
        ({"meter_id": 2**64}, "meter_id"),
        ({"low_credit_milli": -1}, "low_credit_milli"),
        ({"emergency_limit_milli": 2**32}, "emergency_limit_milli"),
        ({"emergency_limit_milli": 1.5}, "emergency_limit_milli"),
    ],
)
def test_config_refuses(kwargs: dict[str, object], match: str) -> None:
    fields: dict[str, object] = {"meter_id": METER, "currency": EUR} | kwargs
    with pytest.raises(UnitError, match=match):
        MeterConfig(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"night_start_minute": 1440}, "night_start_minute"),
        ({"night_end_minute": -1}, "night_end_minute"),
        ({"night_end_minute": True}, "night_end_minute"),
        ({"timezone": "Mars/Olympus_Mons"}, "time zone"),
        ({"timezone": "../etc"}, "time zone"),
    ],
)
def test_friendly_hours_refuse(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(UnitError, match=match):
        FriendlyHours(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("friendly", "when", "active"),
    [
        (NIGHT, local(2026, 6, 1, 17, 59), False),
        (NIGHT, local(2026, 6, 1, 18, 0), True),
        (NIGHT, local(2026, 6, 2, 0, 0), True),
        (NIGHT, local(2026, 6, 2, 7, 59), True),
        (NIGHT, local(2026, 6, 2, 8, 0), False),
        # local time, not UTC: 18:00 CEST is 16:00 UTC
        (NIGHT, T0 + 16 * HOUR, True),
        (FriendlyHours(night_start_minute=720, night_end_minute=840), T0 + 12 * HOUR - 1, False),
        (FriendlyHours(night_start_minute=720, night_end_minute=840), T0 + 12 * HOUR, True),
        (FriendlyHours(night_start_minute=720, night_end_minute=840), T0 + 14 * HOUR, False),
        (FriendlyHours(night_start_minute=600, night_end_minute=600), T0 + 10 * HOUR, False),
        (FriendlyHours(weekends=True), T0 + 5 * DAY - 1, False),  # Friday 23:59:59 UTC
        (FriendlyHours(weekends=True), T0 + 5 * DAY, True),  # Saturday
        (FriendlyHours(weekends=True), T0 + 7 * DAY - 1, True),  # Sunday 23:59:59
        (FriendlyHours(weekends=True), T0 + 7 * DAY, False),  # Monday
        (FriendlyHours(holidays=(dt.date(2026, 6, 3),)), T0 + 2 * DAY, True),
        (FriendlyHours(holidays=(dt.date(2026, 6, 3),)), T0 + 3 * DAY, False),
    ],
)
def test_friendly_hours_active(friendly: FriendlyHours, when: int, active: bool) -> None:
    assert friendly.active(when) is active


# --------------------------------------------------------------------------- tokens


def test_credit_token_is_applied_exactly_once() -> None:
    s0 = new(1_000_000)
    data = credit_token(1, 500)
    s1 = write(s0, data)
    assert s1.token_status is TokenStatus.ACCEPTED
    assert s1.credit_milli == 1_000_000 + 500 * 1_000
    assert (s1.token_seq, s1.last_message_id, s1.last_credit_token_id) == (1, 1, 1)
    assert s1.events == (EventRecord(T0, EventCode.TOKEN_ACCEPTED, 1),)
    assert s1.window.highest == 1

    s2 = write(s1, data)
    assert s2.token_status is TokenStatus.ALREADY_APPLIED
    assert s2.token_status.applied
    assert s2.credit_milli == s1.credit_milli
    assert (s2.token_seq, s2.last_message_id, s2.window) == (2, 1, s1.window)
    assert s2.events[0] == EventRecord(T0, EventCode.TOKEN_REJECTED, TokenStatus.ALREADY_APPLIED)
    assert s2.event_count == 2


def test_out_of_order_ids_inside_the_window_are_each_applied_once() -> None:
    s = new(0)
    for msg_id in (5, 3, 4, 1):
        s = write(s, credit_token(msg_id, 100 * msg_id))
        assert s.token_status is TokenStatus.ACCEPTED, msg_id
    assert s.credit_milli == (5 + 3 + 4 + 1) * 100 * 1_000
    assert (s.window.highest, s.last_message_id, s.last_credit_token_id) == (5, 1, 1)
    for msg_id in (1, 3, 4, 5):
        again = write(s, credit_token(msg_id, 100 * msg_id))
        assert again.token_status is TokenStatus.ALREADY_APPLIED
        assert again.credit_milli == s.credit_milli
    s = write(s, credit_token(2, 200))
    assert s.token_status is TokenStatus.ACCEPTED
    assert s.credit_milli == 15 * 100 * 1_000


def test_an_id_below_the_window_is_too_old() -> None:
    s = write(new(), credit_token(WINDOW + 1))
    too_old = write(s, credit_token(1))
    assert too_old.token_status is TokenStatus.TOO_OLD
    assert too_old.credit_milli == s.credit_milli
    assert too_old.events[0] == EventRecord(T0, EventCode.TOKEN_REJECTED, TokenStatus.TOO_OLD)
    assert write(s, credit_token(2)).token_status is TokenStatus.ACCEPTED  # last in window


def _signed_but_malformed() -> bytes:
    unsigned = credit_token(9)[: -messages.SIGNATURE_LEN] + b"\x00"  # one trailing byte
    return unsigned + KEY1.sign(unsigned)


_GOOD = credit_token(9)
REJECTIONS = [
    pytest.param(_GOOD[:-1] + bytes([_GOOD[-1] ^ 1]), TokenStatus.BAD_SIGNATURE, id="bad-sig"),
    pytest.param(_GOOD[:28] + b"\xff" + _GOOD[29:], TokenStatus.BAD_SIGNATURE, id="tampered"),
    pytest.param(credit_token(9, meter_id=METER + 1), TokenStatus.WRONG_METER, id="wrong-meter"),
    pytest.param(credit_token(9, key=KEY2), TokenStatus.UNKNOWN_KEY, id="unknown-key"),
    pytest.param(_GOOD[:89], TokenStatus.MALFORMED, id="truncated"),
    pytest.param(_signed_but_malformed(), TokenStatus.MALFORMED, id="signed-trailing-byte"),
    pytest.param(b"\x01" * 600, TokenStatus.MALFORMED, id="too-large"),
    pytest.param(b"\x02" + _GOOD[1:], TokenStatus.UNKNOWN_VERSION, id="version-2"),
    pytest.param(
        credit_token(9, issued=T0 + 301, expires=T0 + DAY),
        TokenStatus.NOT_YET_VALID,
        id="not-yet-valid",
    ),
    pytest.param(credit_token(9, issued=T0 - 100, expires=T0), TokenStatus.EXPIRED, id="expired"),
    pytest.param(credit_token(9, cur="USD"), TokenStatus.REFUSED, id="wrong-currency"),
]


@pytest.mark.parametrize(("data", "status"), REJECTIONS)
def test_rejected_messages_change_nothing_but_the_result(data: bytes, status: TokenStatus) -> None:
    s0 = new(1_000_000)
    s = write(s0, data)
    assert s.token_status is status
    assert not s.token_status.applied
    assert s.events == (EventRecord(T0, EventCode.TOKEN_REJECTED, status),)
    assert s.token_seq == 1
    unchanged = dataclasses.replace(
        s, token_status=s0.token_status, token_seq=0, events=(), event_count=0
    )
    assert unchanged == s0
    # A refused message is not burnt: once the cause is gone it can still apply.
    assert write(s, credit_token(9)).token_status is TokenStatus.ACCEPTED


def test_expiry_follows_the_meter_clock() -> None:
    data = credit_token(1, issued=T0 - MIN, expires=T0 + HOUR)
    s = new()
    assert write(run(s, T0 + HOUR - 1), data).token_status is TokenStatus.ACCEPTED
    assert write(run(s, T0 + HOUR), data).token_status is TokenStatus.EXPIRED


def test_issue_time_tolerates_the_configured_skew() -> None:
    data = credit_token(1, issued=T0 + 300, expires=T0 + DAY)
    assert write(new(), data).token_status is TokenStatus.ACCEPTED
    strict = dataclasses.replace(CONFIG, max_skew_s=0)
    assert write(new(), data, strict).token_status is TokenStatus.NOT_YET_VALID


def test_credit_that_would_overflow_the_meter_is_refused() -> None:
    s = new(core.MAX_CREDIT_MILLI - 1_000)
    refused = write(s, credit_token(1, 2))
    assert (refused.token_status, refused.credit_milli) == (TokenStatus.REFUSED, s.credit_milli)
    accepted = write(s, credit_token(1, 1))
    assert accepted.credit_milli == core.MAX_CREDIT_MILLI


def test_token_seq_moves_on_every_write_and_wraps_at_16_bits() -> None:
    s = new()
    seqs = []
    for data in (credit_token(1), credit_token(1), b"junk"):
        s = write(s, data)
        seqs.append((s.token_seq, s.token_status))
    assert seqs == [
        (1, TokenStatus.ACCEPTED),
        (2, TokenStatus.ALREADY_APPLIED),
        (3, TokenStatus.MALFORMED),
    ]
    assert write(dataclasses.replace(s, token_seq=0xFFFF), b"junk").token_seq == 0


# --------------------------------------------------------------------------- tariffs


def test_future_tariff_waits_passive_then_activates_exactly_on_time() -> None:
    s = write(new(), tariff_token(1, HIGH, T0 + HOUR))
    assert s.token_status is TokenStatus.ACCEPTED
    assert (s.tariff, s.passive) == (FLAT, (HIGH, T0 + HOUR))
    assert s.flags & StatusFlag.TARIFF_PENDING

    before = run(s, T0 + HOUR - 1)
    assert (before.tariff, before.passive) == (FLAT, (HIGH, T0 + HOUR))
    at = run(before, T0 + HOUR)
    assert (at.tariff, at.passive, at.tariff_activated_at) == (HIGH, None, T0 + HOUR)
    assert at.regs == rating.start_registers(HIGH, T0 + HOUR)
    assert at.charged_milli == 0
    assert at.events[0] == EventRecord(T0 + HOUR, EventCode.TARIFF_ACTIVATED, HIGH.tariff_id)
    assert not at.flags & StatusFlag.TARIFF_PENDING

    after = run(at, T0 + 2 * HOUR)
    assert (after.import_wh, after.regs.band_wh) == (7_200, (3_600,))
    # One hour at 30 milli/Wh, then one hour at 60 milli/Wh.
    assert after.credit_milli == 10_000_000 - 3_600 * 30 - 3_600 * 60
    assert run(s, T0 + 2 * HOUR) == after  # the same in one call


def test_tariff_with_past_activation_applies_at_once() -> None:
    s = run(new(), T0 + 10 * MIN)
    assert s.charged_milli == 600 * 30
    after = write(s, tariff_token(1, EXAMPLE_TOU, T0 - DAY))
    assert after.token_status is TokenStatus.ACCEPTED
    assert (after.tariff, after.passive, after.tariff_activated_at) == (
        EXAMPLE_TOU,
        None,
        T0 + 10 * MIN,
    )
    assert after.regs.band_wh == (0, 0)  # registers restart, one per band of the new tariff
    assert (after.charged_milli, after.credit_milli, after.import_wh) == (0, s.credit_milli, 600)
    assert [e.code for e in after.events[:2]] == [
        EventCode.TOKEN_ACCEPTED,
        EventCode.TARIFF_ACTIVATED,
    ]
    assert after.next_midnight == local(2026, 6, 2)


def test_tariff_in_another_currency_is_refused() -> None:
    usd = flat_tariff(tariff_id=4, currency=USD, timezone="UTC", price_milli_per_kwh=1)
    s = write(new(), tariff_token(1, usd, T0 + HOUR))
    assert (s.token_status, s.passive, s.tariff) == (TokenStatus.REFUSED, None, FLAT)


def test_a_second_tariff_message_replaces_the_passive_one() -> None:
    s = write(new(), tariff_token(1, HIGH, T0 + HOUR))
    s = write(s, tariff_token(2, FLAT_BERLIN, T0 + 2 * HOUR))
    assert s.passive == (FLAT_BERLIN, T0 + 2 * HOUR)
    s = run(s, T0 + 3 * HOUR)
    assert [e.arg for e in of(s, EventCode.TARIFF_ACTIVATED)] == [FLAT_BERLIN.tariff_id]


def test_credit_is_charged_correctly_across_a_tariff_change() -> None:
    switch = T0 + 6 * HOUR  # Monday 08:00 CEST
    s0 = write(new(), tariff_token(1, EXAMPLE_TOU, switch))
    s = run(s0, switch + DAY)
    # Flat part: 6 h at 1 Wh/s, 30 milli/Wh; no UTC midnight in (T0, switch].
    flat_milli = 6 * 3_600 * 30
    # ToU part, Mon 08:00 to Tue 08:00 local: peak 07-21 on weekdays.
    assert s.regs.band_wh == (10 * 3_600, 14 * 3_600)
    tou_milli = rating.cumulative_charge_milli(EXAMPLE_TOU, s.regs)
    assert tou_milli == 10 * 3_600 * 24 + 14 * 3_600 * 365 // 10
    standing = rating.standing_charges_milli(EXAMPLE_TOU, switch, switch + DAY)
    assert standing == EXAMPLE_TOU.standing_charge_milli_per_day
    assert s.credit_milli == s0.credit_milli - flat_milli - tou_milli - standing
    assert [(e.time_unix, e.arg) for e in of(s, EventCode.STANDING_CHARGE)] == [
        (local(2026, 6, 2), 39_000)
    ]


def test_activation_at_local_midnight_takes_that_days_standing_charge_once() -> None:
    # The day begun at the activation instant is the old tariff's, as
    # standing_charges_milli counts (start, end] of each tariff's span.
    s0 = write(new(), tariff_token(1, HIGH, T0 + DAY))
    s = run(s0, T0 + DAY + HOUR, Constant(0))
    assert s.tariff == HIGH
    assert [(e.time_unix, e.code, e.arg) for e in s.events[:2]] == [
        (T0 + DAY, EventCode.TARIFF_ACTIVATED, HIGH.tariff_id),
        (T0 + DAY, EventCode.STANDING_CHARGE, STANDING),
    ]
    assert s.credit_milli == s0.credit_milli - STANDING
    assert s.next_midnight == T0 + 2 * DAY
    s = run(s, T0 + 2 * DAY, Constant(0))
    assert s0.credit_milli - s.credit_milli == (
        rating.standing_charges_milli(FLAT, T0, T0 + DAY)
        + rating.standing_charges_milli(HIGH, T0 + DAY, T0 + 2 * DAY)
    )


# --------------------------------------------------------------------------- keys


def test_added_key_signs_accepted_tokens() -> None:
    s = new()
    assert write(s, credit_token(1, key=KEY2)).token_status is TokenStatus.UNKNOWN_KEY
    s = write(s, key_token(1, KeyAction.ADD, TEST_KEY_ID_2, PUB2))
    assert s.token_status is TokenStatus.ACCEPTED
    assert s.trusted_keys == ((TEST_KEY_ID, PUB1), (TEST_KEY_ID_2, PUB2))
    assert s.events[:2] == (
        EventRecord(T0, EventCode.TOKEN_ACCEPTED, 1),
        EventRecord(T0, EventCode.KEY_CHANGED, TEST_KEY_ID_2),
    )
    topped = write(s, credit_token(2, 100, key=KEY2))
    assert topped.token_status is TokenStatus.ACCEPTED
    assert topped.credit_milli == s.credit_milli + 100_000


def test_revoked_key_is_no_longer_trusted() -> None:
    s = write(new(keys={7: PUB1, 8: PUB2}), key_token(1, KeyAction.REVOKE, TEST_KEY_ID_2))
    assert s.token_status is TokenStatus.ACCEPTED
    assert s.trusted_keys == ((TEST_KEY_ID, PUB1),)
    assert write(s, credit_token(2, key=KEY2)).token_status is TokenStatus.UNKNOWN_KEY


@pytest.mark.parametrize(
    ("keys", "target"),
    [
        pytest.param({7: PUB1, 8: PUB2}, TEST_KEY_ID, id="the-signer"),
        pytest.param({7: PUB1}, TEST_KEY_ID, id="the-last-key"),
        pytest.param({7: PUB1, 8: PUB2}, 99, id="unknown-target"),
    ],
)
def test_revocations_that_would_lock_out_or_make_no_sense_are_refused(
    keys: dict[int, bytes], target: int
) -> None:
    s0 = new(keys=keys)
    s = write(s0, key_token(1, KeyAction.REVOKE, target))
    assert s.token_status is TokenStatus.REFUSED
    assert s.trusted_keys == s0.trusted_keys
    assert s.window == s0.window


def test_a_meter_trusts_at_most_four_keys() -> None:
    s = new()
    for i, kid in enumerate((8, 9, 10), start=1):
        s = write(s, key_token(i, KeyAction.ADD, kid, signer(kid).public_key_bytes()))
        assert s.token_status is TokenStatus.ACCEPTED
    assert len(s.trusted_keys) == core.MAX_TRUSTED_KEYS
    full = write(s, key_token(4, KeyAction.ADD, 11, signer(11).public_key_bytes()))
    assert (full.token_status, full.trusted_keys) == (TokenStatus.REFUSED, s.trusted_keys)
    # Replacing a trusted key's public key does not grow the set.
    replaced = write(s, key_token(5, KeyAction.ADD, 9, PUB2))
    assert replaced.token_status is TokenStatus.ACCEPTED
    assert dict(replaced.trusted_keys) == {7: PUB1, 8: signer(8).public_key_bytes(), 9: PUB2,
                                           10: signer(10).public_key_bytes()}  # fmt: skip


# --------------------------------------------------------------------------- energy and credit


@pytest.mark.parametrize("tariff", [FLAT, EXAMPLE_TOU, BERLIN_DAY_NIGHT], ids=lambda t: t.tariff_id)
@pytest.mark.parametrize("watts", [1_234, 0])
def test_credit_falls_by_the_rated_energy_plus_standing_charges(tariff: Tariff, watts: int) -> None:
    s0 = new(50_000_000, tariff=tariff, now=T0 + 12_345)  # off the minute grid
    t = s0.now + 2 * DAY + 777
    s = run(s0, t, Constant(watts))
    total_ws = watts * (t - s0.now)
    assert (s.import_wh, s.carry_ws) == divmod(total_ws, 3_600)
    assert sum(s.regs.band_wh) == s.import_wh
    assert s.charged_milli == rating.cumulative_charge_milli(tariff, s.regs)
    assert s.credit_milli == expected_credit(s0, s, tariff)
    assert len(of(s, EventCode.STANDING_CHARGE)) == len(rating.local_midnights(tariff, s0.now, t))
    assert s.power_w == watts


def _reference_bands(tariff: Tariff, start: int, end: int) -> list[int]:
    """Seconds per band in [start, end), from rating.band_at (switches are on minutes)."""
    seconds = [0] * len(tariff.bands)
    t = start
    while t < end:
        step = min(end, t - t % MIN + MIN) - t
        seconds[rating.band_at(tariff, t)] += step
        t += step
    return seconds


def test_energy_lands_in_the_band_in_force_around_a_switch() -> None:
    switch = local(2026, 6, 1, 7, 0)  # weekday: offpeak -> peak
    s = new(tariff=EXAMPLE_TOU, now=switch - 90)
    assert run(s, switch - 1).regs.band_wh == (89, 0)
    s = run(s, switch + 30)
    assert s.regs.band_wh == (90, 30)
    assert rating.band_at(EXAMPLE_TOU, switch - 1) == 0
    assert rating.band_at(EXAMPLE_TOU, switch) == 1


def test_energy_per_band_over_a_week_matches_band_at() -> None:
    s0 = new(100_000_000, tariff=EXAMPLE_TOU, now=T0 + 17)
    end = s0.now + 7 * DAY
    s = run(s0, end)
    assert list(s.regs.band_wh) == _reference_bands(EXAMPLE_TOU, s0.now, end)
    assert s.credit_milli == expected_credit(s0, s, EXAMPLE_TOU)


def test_wh_below_one_is_carried_never_lost() -> None:
    s = run(new(), T0 + 3_599, Constant(1))
    assert (s.import_wh, s.carry_ws, s.credit_milli) == (0, 3_599, 10_000_000)
    s = run(s, T0 + 3_600, Constant(1))
    assert (s.import_wh, s.carry_ws, s.regs.band_wh) == (1, 0, (1,))
    assert s.credit_milli == 10_000_000 - 30


def test_import_is_the_integral_of_a_changing_load() -> None:
    start, end = T0 + 7, T0 + 5 * HOUR + 13
    s = run(new(now=start), end, Minutely())
    total_ws = sum(Minutely().power_w(t) for t in range(start, end))
    assert (s.import_wh, s.carry_ws) == divmod(total_ws, 3_600)


def test_load_is_sampled_once_per_meter_minute() -> None:
    t = T0 + 10 * MIN + 42
    s = run(new(), t, Wobbly())
    assert s.power_w == Wobbly().power_w(T0 + 10 * MIN)
    total_ws = sum(Wobbly().power_w(m) * min(MIN, t - m) for m in range(T0, t, MIN))
    assert (s.import_wh, s.carry_ws) == divmod(total_ws, 3_600)


def test_advancing_to_the_past_changes_nothing() -> None:
    s = run(new(), T0 + 100)
    assert run(s, T0 + 50) == s
    assert run(s, s.now) == s


def test_a_missed_midnight_in_a_loaded_state_is_taken_once() -> None:
    s = dataclasses.replace(new(), next_midnight=T0 - 10)
    s = run(s, T0 + MIN, Constant(0))
    assert [e.time_unix for e in of(s, EventCode.STANDING_CHARGE)] == [T0]
    assert s.next_midnight == T0 + DAY


ADD_START = local(2026, 6, 5, 16, 59) + 17  # Friday, peak band; evening peak, then night
ADD_SPAN = 8 * HOUR  # through 21:00 (band change), local midnight (Saturday)
ADD_CONFIG = dataclasses.replace(
    CONFIG,
    friendly=FriendlyHours(
        timezone="Europe/Berlin", night_start_minute=18 * 60, night_end_minute=19 * 60
    ),
)


def _additivity_start() -> MeterState:
    s = new(300_000, config=ADD_CONFIG, tariff=EXAMPLE_TOU, now=ADD_START)
    # A pending tariff activating off the minute grid.
    return write(s, tariff_token(1, FLAT_BERLIN, local(2026, 6, 5, 22, 13) + 7), ADD_CONFIG)


def _advance_in_pieces(s: MeterState, cuts: list[int], profile: core.LoadProfile) -> MeterState:
    for cut in [*sorted(set(cuts)), ADD_SPAN]:
        s = run(s, ADD_START + cut, profile, ADD_CONFIG)
    return s


def test_additivity_scenario_is_eventful() -> None:
    s = run(_additivity_start(), ADD_START + ADD_SPAN, Wobbly(), ADD_CONFIG)
    happened = Counter(e.code for e in s.events)
    assert happened[EventCode.RELAY_OPENED] == 1
    assert happened[EventCode.TARIFF_ACTIVATED] == 1
    assert happened[EventCode.STANDING_CHARGE] == 1
    assert s.regs.band_wh == (0,)  # the flat tariff saw no load: the meter was off


def test_ticking_every_seven_seconds_equals_one_call() -> None:
    s0 = _additivity_start()
    once = run(s0, ADD_START + ADD_SPAN, Wobbly(), ADD_CONFIG)
    assert _advance_in_pieces(s0, list(range(7, ADD_SPAN, 7)), Wobbly()) == once


@settings(max_examples=25, deadline=None)
@given(cuts=st.lists(st.integers(1, ADD_SPAN - 1), max_size=12))
def test_advance_is_additive(cuts: list[int]) -> None:
    s0 = _additivity_start()
    once = run(s0, ADD_START + ADD_SPAN, Wobbly(), ADD_CONFIG)
    assert _advance_in_pieces(s0, cuts, Wobbly()) == once


# --------------------------------------------------------------------------- state machine in time


def _run_out(config: MeterConfig) -> tuple[MeterState, int]:
    """From 700 000 milli at T0 down through EC to DISCONNECTED; returns the state and when."""
    s = new(700_000, config=config)
    # 1 800 milli per minute: the threshold (500 000) is crossed at minute 112.
    assert run(s, T0 + 111 * MIN, config=config).credit_state is CreditState.IN_CREDIT
    s = run(s, T0 + 112 * MIN, config=config)
    assert (s.credit_state, s.credit_milli) == (CreditState.LOW_CREDIT, 700_000 - 112 * 1_800)
    assert s.flags == StatusFlag.LOW_CREDIT
    # Credit reaches 1 600 at minute 388 and -200 at minute 389.
    assert run(s, T0 + 388 * MIN, config=config).relay is RelayState.CLOSED
    s = run(s, T0 + 389 * MIN, config=config)
    assert (s.credit_state, s.relay, s.credit_milli) == (
        CreditState.EMERGENCY_AVAILABLE,
        RelayState.OPEN,
        -200,
    )
    assert s.events[0] == EventRecord(T0 + 389 * MIN, EventCode.RELAY_OPENED, RelayCause.CREDIT)
    assert s.ec_available(config)
    # While open, no energy flows.
    s = run(s, T0 + 449 * MIN, config=config)
    assert (s.import_wh, s.credit_milli, s.power_w) == (389 * 60, -200, 0)

    s = core.request_emergency_credit(s, config)
    assert (s.credit_state, s.relay, s.ec_active) == (
        CreditState.EMERGENCY_IN_USE,
        RelayState.CLOSED,
        True,
    )
    assert s.events[:2] == (
        EventRecord(T0 + 449 * MIN, EventCode.RELAY_CLOSED, RelayCause.BUTTON),
        EventRecord(T0 + 449 * MIN, EventCode.EMERGENCY_CREDIT_ACTIVATED, EC),
    )
    assert s.flags == StatusFlag.LOW_CREDIT | StatusFlag.EMERGENCY_IN_USE
    assert s.emergency_used_milli == 200
    assert not s.ec_available(config)
    # -200 - 555 * 1 800 = -999 200 (still on); one more minute overdraws the EC.
    on = run(s, T0 + (449 + 555) * MIN, config=config)
    assert (on.credit_state, on.relay) == (CreditState.EMERGENCY_IN_USE, RelayState.CLOSED)
    off_at = T0 + (449 + 556) * MIN
    s = run(on, off_at, config=config)
    assert (s.credit_state, s.relay, s.credit_milli) == (
        CreditState.DISCONNECTED,
        RelayState.OPEN,
        -1_001_000,
    )
    assert s.events[0] == EventRecord(off_at, EventCode.RELAY_OPENED, RelayCause.CREDIT)
    assert core.request_emergency_credit(s, config) is s
    return s, off_at


def test_credit_runs_down_through_emergency_credit_to_disconnection_and_back() -> None:
    s, off_at = _run_out(CONFIG)
    imported = s.import_wh
    assert imported == (389 + 556) * 60
    # Off supply: no energy, but the standing charge is still taken at midnight.
    s = run(s, T0 + DAY + HOUR)
    assert (s.import_wh, s.power_w) == (imported, 0)
    assert s.credit_milli == -1_001_000 - STANDING
    assert of(s, EventCode.STANDING_CHARGE) == [
        EventRecord(T0 + DAY, EventCode.STANDING_CHARGE, STANDING)
    ]
    assert s.credit_milli == 700_000 - imported * 30 - STANDING
    # A top-up smaller than the debt repays part of it; supply stays off.
    small = write(s, credit_token(1, 500))
    assert small.token_status is TokenStatus.ACCEPTED
    assert (small.credit_milli, small.credit_state, small.relay) == (
        -541_000,
        CreditState.DISCONNECTED,
        RelayState.OPEN,
    )
    assert run(small, T0 + DAY + 2 * HOUR).import_wh == imported
    # A larger one repays the debt first, and the relay closes (auto reconnect).
    big = write(small, credit_token(2, 2_000))
    assert (big.credit_milli, big.credit_state, big.relay, big.ec_active) == (
        1_459_000,
        CreditState.IN_CREDIT,
        RelayState.CLOSED,
        False,
    )
    assert big.events[0] == EventRecord(T0 + DAY + HOUR, EventCode.RELAY_CLOSED, RelayCause.CREDIT)
    assert run(big, T0 + DAY + HOUR + MIN).import_wh == imported + 60
    del off_at


def test_without_auto_reconnect_a_top_up_arms_the_relay_for_the_button() -> None:
    s, _ = _run_out(MANUAL)
    assert core.press_button(s, MANUAL) is s  # nothing armed
    s = write(s, credit_token(1, 2_000), MANUAL)
    assert (s.relay, s.armed, s.credit_state) == (RelayState.OPEN, True, CreditState.IN_CREDIT)
    assert s.flags & StatusFlag.RELAY_ARMED
    later = run(s, s.now + 10 * MIN, config=MANUAL)
    assert (later.relay, later.armed, later.import_wh) == (RelayState.OPEN, True, s.import_wh)
    pressed = core.press_button(later, MANUAL)
    assert (pressed.relay, pressed.armed) == (RelayState.CLOSED, False)
    assert pressed.events[0] == EventRecord(later.now, EventCode.RELAY_CLOSED, RelayCause.BUTTON)
    assert core.press_button(pressed, MANUAL) is pressed


def test_an_armed_relay_is_disarmed_when_credit_runs_out_before_the_button() -> None:
    s, _ = _run_out(MANUAL)
    s = write(s, credit_token(1, 1_031), MANUAL)  # leaves 30 000 milli
    assert (s.credit_milli, s.credit_state, s.armed) == (30_000, CreditState.LOW_CREDIT, True)
    s = run(s, T0 + DAY, config=MANUAL)  # the standing charge takes it below zero
    assert (s.credit_milli, s.credit_state, s.armed) == (
        -10_000,
        CreditState.EMERGENCY_AVAILABLE,
        False,
    )
    assert not s.flags & StatusFlag.RELAY_ARMED
    assert core.press_button(s, MANUAL) is s


def test_emergency_credit_closes_the_relay_even_without_auto_reconnect() -> None:
    s = core.request_emergency_credit(new(0, config=MANUAL), MANUAL)
    assert (s.relay, s.credit_state, s.armed) == (
        RelayState.CLOSED,
        CreditState.EMERGENCY_IN_USE,
        False,
    )


def test_top_up_during_emergency_credit() -> None:
    s = core.request_emergency_credit(new(0), CONFIG)
    s = run(s, T0 + 100 * MIN)
    assert s.credit_milli == -180_000
    partial = write(s, credit_token(1, 100))
    assert (partial.credit_state, partial.relay, partial.ec_active) == (
        CreditState.EMERGENCY_IN_USE,
        RelayState.CLOSED,
        True,
    )
    repaid = write(partial, credit_token(2, 1_000))
    assert (repaid.credit_milli, repaid.credit_state, repaid.ec_active) == (
        920_000,
        CreditState.IN_CREDIT,
        False,
    )


def test_emergency_credit_can_be_taken_while_credit_is_low() -> None:
    s = run(new(20_000), T0 + 5 * MIN)
    assert s.credit_state is CreditState.LOW_CREDIT
    s = core.request_emergency_credit(s, CONFIG)
    assert (s.ec_active, s.credit_state, s.relay) == (
        True,
        CreditState.LOW_CREDIT,
        RelayState.CLOSED,
    )
    assert s.events[0].code is EventCode.EMERGENCY_CREDIT_ACTIVATED
    s = run(s, T0 + 20 * MIN)  # credit 20 000 - 20 * 1 800 < 0: no interruption
    assert (s.credit_state, s.relay) == (CreditState.EMERGENCY_IN_USE, RelayState.CLOSED)
    assert of(s, EventCode.RELAY_OPENED) == []


def test_without_emergency_credit_configured_the_meter_disconnects_at_zero() -> None:
    config = dataclasses.replace(CONFIG, emergency_limit_milli=0)
    s = run(new(18_000, config=config), T0 + 10 * MIN, config=config)
    assert (s.credit_milli, s.credit_state, s.relay) == (
        0,
        CreditState.DISCONNECTED,
        RelayState.OPEN,
    )
    assert not s.ec_available(config)
    assert core.request_emergency_credit(s, config) is s


def test_emergency_credit_is_withdrawn_once_debt_reaches_the_limit() -> None:
    pricey = flat_tariff(tariff_id=8, currency=EUR, timezone="UTC", price_milli_per_kwh=PRICE,
                         standing_charge_milli_per_day=400_000)  # fmt: skip
    s = new(0, tariff=pricey)
    s = run(s, T0 + 2 * DAY, Constant(0))
    assert (s.credit_milli, s.credit_state) == (-800_000, CreditState.EMERGENCY_AVAILABLE)
    s = run(s, T0 + 3 * DAY, Constant(0))
    assert (s.credit_milli, s.credit_state) == (-1_200_000, CreditState.DISCONNECTED)
    assert not s.ec_available(CONFIG)


# --------------------------------------------------------------------------- friendly hours


@pytest.mark.parametrize(
    ("watts", "credit", "at_eight"),
    [
        (600, 20_000, CreditState.EMERGENCY_AVAILABLE),  # debt 290 000 < EC limit
        (3_600, 200_000, CreditState.DISCONNECTED),  # debt 1 460 000 beyond the EC limit
    ],
)
def test_friendly_night_keeps_supply_on_until_it_ends(
    watts: int, credit: int, at_eight: CreditState
) -> None:
    config = dataclasses.replace(CONFIG, friendly=NIGHT)
    load = Constant(watts)
    per_min = watts // 60 * PRICE // 1_000
    start = local(2026, 6, 1, 17, 0)
    s = run(new(credit, config=config, tariff=FLAT_BERLIN, now=start), start + HOUR, load, config)
    assert s.friendly_now
    s = run(s, local(2026, 6, 2, 7, 59), load, config)
    assert (s.credit_state, s.relay) == (CreditState.FRIENDLY_HOURS_DEBT, RelayState.CLOSED)
    assert s.credit_milli < 0
    assert s.flags & StatusFlag.FRIENDLY_HOURS
    assert of(s, EventCode.RELAY_OPENED) == []
    eight = local(2026, 6, 2, 8, 0)
    s = run(s, eight, load, config)
    assert (s.credit_state, s.relay, s.friendly_now) == (at_eight, RelayState.OPEN, False)
    assert s.events[0] == EventRecord(eight, EventCode.RELAY_OPENED, RelayCause.CREDIT)
    assert s.credit_milli == credit - 15 * 60 * per_min - STANDING
    assert s.import_wh == 15 * watts


def test_friendly_weekend_keeps_supply_on_until_monday() -> None:
    config = dataclasses.replace(CONFIG, friendly=FriendlyHours(weekends=True))
    saturday = T0 + 5 * DAY + 10 * HOUR
    s = run(new(18_000, config=config, now=saturday), saturday + 11 * MIN, config=config)
    assert (s.credit_state, s.relay) == (CreditState.FRIENDLY_HOURS_DEBT, RelayState.CLOSED)
    monday = T0 + 7 * DAY
    s = run(s, monday - 1, config=config)
    assert s.relay is RelayState.CLOSED
    s = run(s, monday, config=config)
    assert (s.credit_state, s.relay) == (CreditState.DISCONNECTED, RelayState.OPEN)
    assert s.events[0] == EventRecord(monday, EventCode.RELAY_OPENED, RelayCause.CREDIT)


def test_friendly_hours_do_not_reconnect_a_meter_already_off() -> None:
    config = dataclasses.replace(CONFIG, friendly=NIGHT)
    start = local(2026, 6, 1, 16, 0)
    s = run(new(18_000, config=config, tariff=FLAT_BERLIN, now=start), start + HOUR,
            config=config)  # fmt: skip
    assert (s.credit_state, s.relay, s.import_wh) == (
        CreditState.EMERGENCY_AVAILABLE,
        RelayState.OPEN,
        600,
    )
    s = run(s, local(2026, 6, 1, 19, 0), config=config)
    assert s.friendly_now
    assert (s.credit_state, s.relay, s.import_wh) == (
        CreditState.EMERGENCY_AVAILABLE,
        RelayState.OPEN,
        600,
    )


def test_emergency_credit_can_be_taken_during_friendly_debt() -> None:
    config = dataclasses.replace(CONFIG, friendly=NIGHT)
    start = local(2026, 6, 1, 18, 0)
    s = run(new(1_800, config=config, tariff=FLAT_BERLIN, now=start), start + 10 * MIN,
            config=config)  # fmt: skip
    assert s.credit_state is CreditState.FRIENDLY_HOURS_DEBT
    assert s.ec_available(config)
    s = core.request_emergency_credit(s, config)
    assert (s.credit_state, s.relay) == (CreditState.EMERGENCY_IN_USE, RelayState.CLOSED)
    assert of(s, EventCode.RELAY_CLOSED) == []  # it never opened


# --------------------------------------------------------------------------- remote commands


def test_remote_disconnect_holds_the_relay_open_whatever_the_credit() -> None:
    s = core.remote_command(new(), CONFIG, RelayCommand.DISCONNECT)
    assert (s.relay, s.remote_disconnect) == (RelayState.OPEN, True)
    assert s.flags == StatusFlag.REMOTE_DISCONNECT
    assert s.events[0] == EventRecord(T0, EventCode.RELAY_OPENED, RelayCause.REMOTE)
    s = run(s, T0 + HOUR)
    s = write(s, credit_token(1))
    s = core.press_button(s, CONFIG)
    assert (s.relay, s.import_wh, s.credit_state) == (RelayState.OPEN, 0, CreditState.IN_CREDIT)
    again = core.remote_command(s, CONFIG, RelayCommand.DISCONNECT)
    assert again.events == s.events  # already open: nothing new to log

    s = core.remote_command(s, CONFIG, RelayCommand.CONNECT)
    assert (s.relay, s.remote_disconnect) == (RelayState.CLOSED, False)
    assert s.events[0] == EventRecord(T0 + HOUR, EventCode.RELAY_CLOSED, RelayCause.REMOTE)


def test_remote_connect_without_auto_reconnect_arms() -> None:
    s = core.remote_command(new(config=MANUAL), MANUAL, RelayCommand.DISCONNECT)
    s = core.remote_command(s, MANUAL, RelayCommand.CONNECT)
    assert (s.relay, s.armed, s.remote_disconnect) == (RelayState.OPEN, True, False)
    s = core.press_button(s, MANUAL)
    assert s.relay is RelayState.CLOSED


def test_remote_connect_still_obeys_the_credit_rules() -> None:
    s = core.remote_command(new(0), CONFIG, RelayCommand.DISCONNECT)
    s = core.remote_command(s, CONFIG, RelayCommand.CONNECT)
    assert (s.relay, s.credit_state) == (RelayState.OPEN, CreditState.EMERGENCY_AVAILABLE)


def test_remote_disconnect_cancels_an_armed_relay() -> None:
    s, _ = _run_out(MANUAL)
    s = write(s, credit_token(1, 2_000), MANUAL)
    assert s.armed
    s = core.remote_command(s, MANUAL, RelayCommand.DISCONNECT)
    assert not s.armed
    assert core.press_button(s, MANUAL).relay is RelayState.OPEN


@pytest.mark.parametrize("command", [RelayCommand.CONNECT, RelayCommand.NONE])
def test_remote_commands_without_effect(command: RelayCommand) -> None:
    s = new()
    assert core.remote_command(s, CONFIG, command) is s


# --------------------------------------------------------------------------- DST days


@pytest.mark.parametrize(
    ("day", "hours", "night_before_seven"),
    [
        pytest.param(dt.date(2026, 3, 29), 23, 6, id="spring-23h"),
        pytest.param(dt.date(2026, 10, 25), 25, 8, id="autumn-25h"),
        pytest.param(dt.date(2026, 6, 7), 24, 7, id="ordinary-24h"),
    ],
)
def test_dst_days(day: dt.date, hours: int, night_before_seven: int) -> None:
    start = local(day.year, day.month, day.day)
    after = day + dt.timedelta(days=1)
    end = local(after.year, after.month, after.day)
    assert end - start == hours * HOUR
    s0 = new(100_000_000, tariff=BERLIN_DAY_NIGHT, now=start - MIN)
    # Bands follow local time: day from 07:00 local, whatever the UTC offset.
    seven = run(s0, local(day.year, day.month, day.day, 7, 0))
    assert seven.regs.band_wh == (60 + night_before_seven * 3_600, 0)
    s = run(seven, end - MIN)
    # Energy over the local day is power times its real length.
    assert s.import_wh == hours * 3_600
    assert s.regs.band_wh == ((hours - 14) * 3_600, 14 * 3_600)
    assert list(s.regs.band_wh) == _reference_bands(BERLIN_DAY_NIGHT, s0.now, s.now)
    # Exactly one standing charge for the day, taken when it began.
    assert of(s, EventCode.STANDING_CHARGE) == [
        EventRecord(start, EventCode.STANDING_CHARGE, STANDING)
    ]
    assert s.credit_milli == expected_credit(s0, s, BERLIN_DAY_NIGHT)
    s = run(s, end)
    assert [e.time_unix for e in of(s, EventCode.STANDING_CHARGE)] == [end, start]


# --------------------------------------------------------------------------- power and clock


def test_power_up_after_an_outage() -> None:
    s = run(new(), T0 + 10 * HOUR)
    back = T0 + 3 * DAY + 5 * HOUR
    up = core.power_up(s, CONFIG, back)
    assert (up.now, up.import_wh, up.regs, up.power_w) == (back, s.import_wh, s.regs, 0)
    assert up.credit_milli == s.credit_milli - 3 * STANDING
    assert [e.time_unix for e in of(up, EventCode.STANDING_CHARGE)] == [
        T0 + 3 * DAY,
        T0 + 2 * DAY,
        T0 + DAY,
    ]
    assert up.events[0] == EventRecord(back, EventCode.POWER_UP, 0)
    assert up.relay is RelayState.CLOSED
    assert run(up, back + MIN).import_wh == s.import_wh + 60


def test_power_up_activates_a_tariff_that_fell_due_during_the_outage() -> None:
    s = write(run(new(), T0 + HOUR), tariff_token(1, HIGH, T0 + 5 * HOUR + 7))
    up = core.power_up(s, CONFIG, T0 + 10 * HOUR)
    assert up.tariff == HIGH
    assert of(up, EventCode.TARIFF_ACTIVATED) == [
        EventRecord(T0 + 5 * HOUR + 7, EventCode.TARIFF_ACTIVATED, HIGH.tariff_id)
    ]


def test_power_down_is_logged() -> None:
    s = run(new(), T0 + 5)
    assert core.power_down(s).events[0] == EventRecord(T0 + 5, EventCode.POWER_DOWN, 0)


def test_set_clock_forward_books_no_energy_but_takes_the_days() -> None:
    s = run(new(), T0 + 10 * HOUR)
    later = core.set_clock(s, CONFIG, T0 + DAY + HOUR)
    assert (later.now, later.import_wh, later.regs) == (T0 + DAY + HOUR, s.import_wh, s.regs)
    assert later.credit_milli == s.credit_milli - STANDING
    assert later.events[0] == EventRecord(T0 + DAY + HOUR, EventCode.CLOCK_SET, T0 + 10 * HOUR)


def test_set_clock_backward_moves_only_the_clock() -> None:
    s = run(new(), T0 + DAY + 30 * MIN)
    assert len(of(s, EventCode.STANDING_CHARGE)) == 1
    back = core.set_clock(s, CONFIG, T0 + DAY - 30 * MIN)
    assert back.now == T0 + DAY - 30 * MIN
    assert back.events[0] == EventRecord(back.now, EventCode.CLOCK_SET, T0 + DAY + 30 * MIN)
    assert dataclasses.replace(back, now=s.now, events=s.events, event_count=s.event_count) == s
    # The hour is lived again (energy is real) but the midnight is not charged twice.
    again = run(back, T0 + DAY + 30 * MIN)
    assert again.import_wh == s.import_wh + 3_600
    assert len(of(again, EventCode.STANDING_CHARGE)) == 1
    assert again.credit_milli == s.credit_milli - 3_600 * 30
    assert again.next_midnight == T0 + 2 * DAY


def test_set_clock_back_across_a_month_start_keeps_the_block_period() -> None:
    blocks = Tariff(
        tariff_id=6,
        currency=EUR,
        timezone="UTC",
        bands=(Band("all-day", 10_000),),
        weekday=(Switch(0, 0),),
        weekend=(Switch(0, 0),),
        holiday=(Switch(0, 0),),
        blocks=(Block(0, 1_000), Block(1_000, 5_000)),
    )
    july = int(dt.datetime(2026, 7, 1, tzinfo=dt.UTC).timestamp())
    s0 = new(tariff=blocks, now=july - HOUR)
    s = run(s0, july + 30 * MIN)
    assert (s.regs.block_period, s.regs.block_period_wh, s.regs.prev_block_period_wh) == (
        2026 * 12 + 6,
        1_800,
        3_600,
    )
    back = core.set_clock(s, CONFIG, july - 15 * MIN)
    s = run(back, july - 5 * MIN)  # June again on the clock: used to raise RegisterError
    assert (s.regs.block_period, s.regs.block_period_wh, s.regs.prev_block_period_wh) == (
        2026 * 12 + 6,
        2_400,
        3_600,
    )
    assert s.regs.band_wh == (6_000,)
    assert s.charged_milli == rating.cumulative_charge_milli(blocks, s.regs)
    assert s.credit_milli == s0.credit_milli - s.charged_milli


def test_clock_not_set_flag_is_cleared_by_a_time_sync() -> None:
    s = dataclasses.replace(new(), clock_set=False)
    assert s.flags == StatusFlag.CLOCK_NOT_SET
    assert core.set_clock(s, CONFIG, T0).flags == 0


# --------------------------------------------------------------------------- crash during token


def _crash_and_retry(path: Path, crash_point: str) -> MeterState:
    """Deliver a token, lose power at ``crash_point``, reload, and let the gateway retry."""
    s0 = run(new(1_000_000), T0 + 5 * MIN)
    persistence.save(path, s0)
    data = credit_token(1, 500)
    if crash_point == "before-write":
        pass
    elif crash_point == "after-write-before-save":
        write(s0, data)  # applied in RAM only: lost with the power
    else:
        persistence.save(path, write(s0, data))
    reloaded = persistence.load(path)
    assert reloaded is not None
    retried = write(reloaded, data)
    persistence.save(path, retried)
    return retried


@pytest.mark.parametrize("crash_point", ["before-write", "after-write-before-save", "after-save"])
def test_crash_at_any_point_applies_the_token_exactly_once(
    tmp_path: Path, crash_point: str
) -> None:
    path = tmp_path / "meter.json"
    retried = _crash_and_retry(path, crash_point)
    assert retried.credit_milli == 1_000_000 - 5 * PER_MIN_MILLI + 500_000
    expected = TokenStatus.ALREADY_APPLIED if crash_point == "after-save" else TokenStatus.ACCEPTED
    assert retried.token_status is expected
    assert retried.token_status.applied
    # And any further retry is a harmless duplicate.
    final = persistence.load(path)
    assert final is not None
    again = write(final, credit_token(1, 500))
    assert (again.token_status, again.credit_milli) == (
        TokenStatus.ALREADY_APPLIED,
        retried.credit_milli,
    )


@pytest.mark.parametrize("fail", ["replace", "fsync", "write"])
def test_crash_during_save_leaves_the_old_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail: str
) -> None:
    path = tmp_path / "meter.json"
    s0 = new(1_000_000)
    persistence.save(path, s0)
    s1 = write(s0, credit_token(1, 500))

    def power_cut(*args: object) -> None:
        raise OSError("power cut")

    with monkeypatch.context() as m:
        m.setattr(os, fail, power_cut)
        with pytest.raises(OSError, match="power cut"):
            persistence.save(path, s1)
    assert persistence.load(path) == s0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meter.json"]
    # The gateway retries on the old state: applied once.
    reloaded = persistence.load(path)
    assert reloaded is not None
    retried = write(reloaded, credit_token(1, 500))
    assert (retried.token_status, retried.credit_milli) == (TokenStatus.ACCEPTED, 1_500_000)


# --------------------------------------------------------------------------- registers and log


def test_flags_reflect_the_state() -> None:
    s = dataclasses.replace(
        new(),
        credit_state=CreditState.EMERGENCY_IN_USE,
        friendly_now=True,
        armed=True,
        clock_set=False,
        passive=(HIGH, T0 + 1),
        remote_disconnect=True,
    )
    assert s.flags == (
        StatusFlag.LOW_CREDIT
        | StatusFlag.EMERGENCY_IN_USE
        | StatusFlag.FRIENDLY_HOURS
        | StatusFlag.RELAY_ARMED
        | StatusFlag.CLOCK_NOT_SET
        | StatusFlag.TARIFF_PENDING
        | StatusFlag.REMOTE_DISCONNECT
    )


@pytest.mark.parametrize(
    ("ec_active", "credit", "used"),
    [(False, -123, 0), (True, -123, 123), (True, 50, 0), (True, 0, 0)],
)
def test_emergency_used(ec_active: bool, credit: int, used: int) -> None:
    s = dataclasses.replace(new(), ec_active=ec_active, credit_milli=credit)
    assert s.emergency_used_milli == used


def test_event_log_keeps_the_newest_records() -> None:
    assert core.event_log(new()) == (EMPTY_EVENT,) * EVENT_LOG_LEN
    s = write(new(), credit_token(1))
    for _ in range(EVENT_LOG_LEN + 3):
        s = write(s, credit_token(1))
    assert s.event_count == EVENT_LOG_LEN + 4
    log = core.event_log(s)
    assert len(log) == EVENT_LOG_LEN
    assert all(e.code is EventCode.TOKEN_REJECTED for e in log)
    s = write(dataclasses.replace(s, event_count=2**32 - 1), b"junk")
    assert s.event_count == 0
