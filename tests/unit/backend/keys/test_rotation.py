"""Key rotation plans, checked against the simulated meter (meter_sim.core) end to end."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from backend.keys.errors import RotationError
from backend.keys.rotation import (
    DEFAULT_VALIDITY,
    MeterSlot,
    RotationPlan,
    RotationStep,
    plan_add,
    plan_revoke,
    plan_rotation,
    validity_window,
)
from backend.keys.store import FileKeyStore, KeyState, KeyStore
from firmware_protocol import messages
from firmware_protocol.messages import CreditToken, Header, KeyAction, KeyChange
from firmware_protocol.status import TokenStatus
from firmware_protocol.tariff import flat_tariff
from firmware_protocol.units import currency
from meter_sim import core
from meter_sim.core import MeterConfig, MeterState

EUR = currency("EUR")
NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)
NOW_S = 1_780_315_200  # NOW in Unix seconds
TARIFF = flat_tariff(tariff_id=1, currency=EUR, timezone="UTC", price_milli_per_kwh=300_000)


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> dt.datetime:
        self.now += dt.timedelta(seconds=1)
        return self.now


@pytest.fixture
def store(tmp_path: Path) -> FileKeyStore:
    """Key 1 ACTIVE, nothing else yet."""
    s = FileKeyStore(tmp_path / "keys", create=True, clock=Clock())
    s.generate()
    return s


def commission(store: KeyStore, meter_id: int) -> tuple[MeterConfig, MeterState]:
    """A meter fresh from the factory, trusting what the store distributes."""
    config = MeterConfig(meter_id=meter_id, currency=EUR)
    state = core.new_meter(
        config, tariff=TARIFF, trusted_keys=store.public_keys(), now=NOW_S, credit_milli=0
    )
    return config, state


def deliver(config: MeterConfig, state: MeterState, data: bytes) -> MeterState:
    return core.write_message(state, config, data)


def credit(store: FileKeyStore, key_id: int, meter_id: int, msg_id: int) -> bytes:
    token = CreditToken(
        Header(
            key_id=key_id,
            meter_id=meter_id,
            msg_id=msg_id,
            issued_at=NOW_S,
            expires_at=NOW_S + 3600,
        ),
        EUR,
        500,
    )
    return messages.encode(token, store.signer(key_id))


def retired_private_key(store: FileKeyStore, key_id: int) -> Ed25519PrivateKey:
    """A retired key's seed, read from its file: the store itself signs nothing with it."""
    seed = (store.directory / f"key-{key_id}.seed").read_text().strip()
    return messages.load_private_key(bytes.fromhex(seed))


def message_for(plan: RotationPlan, meter_id: int) -> bytes:
    (data,) = [m.data for m in plan.messages if m.meter_id == meter_id]
    return data


# --------------------------------------------------------------------------- end to end


def test_rotation_moves_a_meter_from_the_old_key_to_the_new(store: FileKeyStore) -> None:
    meter = 1_000_001
    config, state = commission(store, meter)
    old_pub = store.info(1).public_key
    assert state.trusted_keys == ((1, old_pub),)
    new = store.generate()

    # Step 1: ADD key 2, signed by key 1.
    add = plan_rotation(store, [MeterSlot(meter, 1)], now=NOW)
    assert (add.step, add.signing_key_id, add.target_key_id) == (RotationStep.ADD, 1, 2)
    state = deliver(config, state, message_for(add, meter))
    assert state.token_status is TokenStatus.ACCEPTED
    assert state.trusted_keys == ((1, old_pub), (2, new.public_key))
    # Until the switch, tokens signed by the old key still work.
    state = deliver(config, state, credit(store, 1, meter, 2))
    assert state.token_status is TokenStatus.ACCEPTED

    # Step 2: switch. Step 3: REVOKE key 1, signed by key 2.
    store.activate(2)
    revoke = plan_rotation(store, [MeterSlot(meter, 3)], now=NOW)
    assert (revoke.step, revoke.signing_key_id, revoke.target_key_id) == (
        RotationStep.REVOKE,
        2,
        1,
    )
    state = deliver(config, state, message_for(revoke, meter))
    assert state.token_status is TokenStatus.ACCEPTED
    assert state.trusted_keys == ((2, new.public_key),)

    # Tokens signed by the new key are accepted, by the old key rejected as unknown.
    before = state.credit_milli
    state = deliver(config, state, credit(store, 2, meter, 4))
    assert state.token_status is TokenStatus.ACCEPTED
    assert state.credit_milli == before + 500_000
    old_signer = messages.Ed25519Signer(1, retired_private_key(store, 1))
    old_signed = messages.encode(
        CreditToken(
            Header(key_id=1, meter_id=meter, msg_id=5, issued_at=NOW_S, expires_at=NOW_S + 60),
            EUR,
            500,
        ),
        old_signer,
    )
    state = deliver(config, state, old_signed)
    assert state.token_status is TokenStatus.UNKNOWN_KEY
    assert state.credit_milli == before + 500_000


def test_a_fleet_gets_one_message_each_with_its_own_id(store: FileKeyStore) -> None:
    fleet = {meter: commission(store, meter) for meter in (11, 12, 13)}
    store.generate()
    slots = [MeterSlot(11, 7), MeterSlot(12, 1), MeterSlot(13, 4_000_000_000)]
    plan = plan_add(store, slots, now=NOW)
    assert [(m.meter_id, m.message.header.msg_id) for m in plan.messages] == [
        (11, 7),
        (12, 1),
        (13, 4_000_000_000),
    ]
    for m in plan.messages:
        config, state = fleet[m.meter_id]
        assert deliver(config, state, m.data).token_status is TokenStatus.ACCEPTED
        # A message for one meter is useless at another.
        other = fleet[11 if m.meter_id != 11 else 12]
        assert deliver(*other, m.data).token_status is TokenStatus.WRONG_METER


def test_revoke_cannot_lock_out_a_meter_that_missed_the_add(store: FileKeyStore) -> None:
    config, state = commission(store, 5)
    store.generate()
    store.activate(2)
    revoke = plan_revoke(store, [MeterSlot(5, 1)], now=NOW)
    state = deliver(config, state, message_for(revoke, 5))
    # Signed by a key the meter does not know: refused, and it keeps its only key.
    assert state.token_status is TokenStatus.UNKNOWN_KEY
    assert [k for k, _ in state.trusted_keys] == [1]


def test_meter_refuses_a_revoke_signed_by_the_revoked_key(store: FileKeyStore) -> None:
    # What the planner never builds (it revokes only RETIRED keys and signs with ACTIVE):
    # the meter itself refuses it, which is why the order of the steps matters.
    config, state = commission(store, 5)
    store.generate()
    state = deliver(config, state, message_for(plan_add(store, [MeterSlot(5, 1)], now=NOW), 5))
    suicide = KeyChange(
        Header(key_id=1, meter_id=5, msg_id=2, issued_at=NOW_S, expires_at=NOW_S + 60),
        KeyAction.REVOKE,
        1,
        bytes(32),
    )
    state = deliver(config, state, messages.encode(suicide, store.active_signer()))
    assert state.token_status is TokenStatus.REFUSED
    with pytest.raises(RotationError, match="key 1 is ACTIVE: only a RETIRED key"):
        plan_revoke(store, [MeterSlot(5, 2)], now=NOW, key_id=1)


# --------------------------------------------------------------------------- message fields


def test_messages_carry_exact_fields(store: FileKeyStore) -> None:
    new = store.generate()
    now = NOW + dt.timedelta(microseconds=999_999)  # floored, never rounded up
    plan = plan_add(store, [MeterSlot(42, 9)], now=now, validity=dt.timedelta(hours=2))
    (m,) = plan.messages
    assert m.message == KeyChange(
        Header(key_id=1, meter_id=42, msg_id=9, issued_at=NOW_S, expires_at=NOW_S + 7200),
        KeyAction.ADD,
        2,
        new.public_key,
    )
    assert len(m.data) == 127  # SPEC.md §2.4
    trusted = {1: messages.load_public_key(store.info(1).public_key)}
    assert messages.verify(m.data, trusted, meter_id=42, now=NOW_S) == m.message

    store.activate(2)
    (r,) = plan_revoke(store, [MeterSlot(42, 10)], now=NOW).messages
    assert r.message.action is KeyAction.REVOKE
    assert r.message.public_key == bytes(32)
    assert r.message.header.key_id == 2
    assert r.message.header.expires_at == NOW_S + int(DEFAULT_VALIDITY.total_seconds())


def test_add_defaults_to_the_newest_next_key(store: FileKeyStore) -> None:
    store.generate()
    store.generate()
    assert plan_add(store, [], now=NOW).target_key_id == 3
    assert plan_add(store, [], now=NOW, key_id=2).target_key_id == 2
    assert plan_add(store, [], now=NOW).messages == ()


def test_revoke_defaults_to_the_last_retired_key(store: FileKeyStore) -> None:
    store.generate()
    store.generate()
    store.activate(3)  # retires 1
    store.activate(2)  # retires 3
    store.generate()
    store.activate(4)  # retires 2: the most recent, though 3 has the higher id
    assert plan_revoke(store, [], now=NOW).target_key_id == 2
    assert plan_rotation(store, [], now=NOW).target_key_id == 2
    assert plan_revoke(store, [], now=NOW, key_id=3).target_key_id == 3


def test_auto_plan_prefers_a_pending_add(store: FileKeyStore) -> None:
    store.generate()
    store.activate(2)
    store.generate()  # key 3 NEXT while key 1 is still to be revoked
    assert plan_rotation(store, [], now=NOW).step is RotationStep.ADD


# --------------------------------------------------------------------------- refusals


def test_nothing_to_rotate(store: FileKeyStore) -> None:
    with pytest.raises(RotationError, match="nothing to rotate"):
        plan_rotation(store, [], now=NOW)
    with pytest.raises(RotationError, match="no NEXT key to add"):
        plan_add(store, [], now=NOW)
    with pytest.raises(RotationError, match="no RETIRED key to revoke"):
        plan_revoke(store, [], now=NOW)


def test_wrong_key_for_the_step(store: FileKeyStore) -> None:
    store.generate()
    with pytest.raises(RotationError, match="key 1 is ACTIVE: only a NEXT key"):
        plan_add(store, [], now=NOW, key_id=1)
    with pytest.raises(RotationError, match="key 2 is NEXT: only a RETIRED key"):
        plan_revoke(store, [], now=NOW, key_id=2)
    with pytest.raises(RotationError, match="no key 9"):
        plan_add(store, [], now=NOW, key_id=9)
    store.activate(2)
    with pytest.raises(RotationError, match="key 1 is RETIRED: only a NEXT key"):
        plan_add(store, [], now=NOW, key_id=1)


def test_duplicate_meters_are_refused(store: FileKeyStore) -> None:
    store.generate()
    with pytest.raises(RotationError, match="meter 3 appears twice"):
        plan_add(store, [MeterSlot(3, 1), MeterSlot(3, 2)], now=NOW)


@pytest.mark.parametrize(
    ("meter_id", "msg_id", "message"),
    [
        (0, 1, "meter_id must be"),
        (2**64, 1, "meter_id must be"),
        (True, 1, "meter_id must be"),
        (1, 0, "meter 1: msg_id must be"),
        (1, 2**32, "meter 1: msg_id must be"),
        (1, "7", "meter 1: msg_id must be"),
    ],
)
def test_meter_slot_ranges(meter_id: object, msg_id: object, message: str) -> None:
    with pytest.raises(RotationError, match=message):
        MeterSlot(meter_id, msg_id)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("now", "validity", "message"),
    [
        (dt.datetime(2026, 6, 1), DEFAULT_VALIDITY, "timezone-aware"),  # noqa: DTZ001
        (NOW, dt.timedelta(0), "at least one second"),
        (NOW, dt.timedelta(milliseconds=999), "at least one second"),
        (dt.datetime(2106, 2, 1, tzinfo=dt.UTC), DEFAULT_VALIDITY, "does not fit u32"),
        (dt.datetime(1969, 12, 31, tzinfo=dt.UTC), DEFAULT_VALIDITY, "does not fit u32"),
    ],
)
def test_validity_window_refusals(now: dt.datetime, validity: dt.timedelta, message: str) -> None:
    with pytest.raises(RotationError, match=message):
        validity_window(now, validity)


def test_validity_window_in_another_offset() -> None:
    berlin_summer = dt.timezone(dt.timedelta(hours=2))
    assert validity_window(NOW.astimezone(berlin_summer), dt.timedelta(seconds=1)) == (
        NOW_S,
        NOW_S + 1,
    )


def test_store_states_seen_by_the_planner(store: FileKeyStore) -> None:
    store.generate()
    assert [i.state for i in store.list()] == [KeyState.ACTIVE, KeyState.NEXT]
