"""Token path through a real broker and meter_sim: happy path, refusals, replays, poison messages.

The gateway runs in this event loop; the meters are a meter_sim fleet on Modbus TCP; the
backend is a plain paho client. "Nothing written to the meter" is checked on the meter
itself: every commit of the token block moves its ``token_seq``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from firmware_protocol import messages
from firmware_protocol.messages import Ed25519Signer, Header, KeyAction, KeyChange, TariffMessage
from firmware_protocol.mqtt_topics import token_topic
from firmware_protocol.status import TokenStatus
from firmware_protocol.vectors import TEST_KEY_ID_2, TEST_SEED_2
from gateway.service import Gateway
from gateway.store import Store
from meter_sim.device import MeterDevice
from meter_sim.fleet import TcpLayout, serve
from tests.support.gateway import (
    GW,
    Backend,
    gateway_toml,
    open_broker,
    running_backend,
    running_gateway,
    tcp_meter,
    wait_until,
    wall_meter,
    write_config,
)
from tests.support.meters import FORGER, SIGNER, TARIFF, credit_token

pytestmark = pytest.mark.integration

A, B = 4_100_000_001, 4_100_000_002


@dataclass
class Rig:
    gateway: Gateway
    backend: Backend
    meters: dict[int, MeterDevice]


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    devices = [wall_meter(A, unit_id=1), wall_meter(B, unit_id=2)]
    async with (
        open_broker(tmp_path / "broker") as broker,
        serve(devices, TcpLayout(port=0)) as fleet,
        running_backend(broker.port) as backend,
    ):
        text = gateway_toml(
            broker_port=broker.port,
            store=tmp_path / "gw.sqlite",
            meters=[tcp_meter(A, fleet.ports[0], 1), tcp_meter(B, fleet.ports[0], 2)],
            poll_interval_s=5,
        )
        async with running_gateway(write_config(tmp_path / "gw.toml", text)) as gw:
            await wait_until(lambda: gw.link.connected, what="gateway connected")
            yield Rig(gw, backend, {d.config.meter_id: d for d in devices})


def now() -> int:
    return int(time.time())


async def result_of(rig: Rig, meter: int, token_id: int, *, count: int = 1) -> list[object]:
    return await wait_until(
        lambda: len(r := rig.backend.results_for(meter, token_id)) >= count and r,
        what=f"result of token {token_id} for meter {meter}",
    )


async def test_token_happy_path_credits_the_meter_once_and_reports_it(rig: Rig) -> None:
    meter = rig.meters[A]
    credit_before = meter.state.credit_milli
    rig.backend.deliver(A, credit_token(A, 1, 500, now=now()), 1)
    (result,) = await result_of(rig, A, 1)
    assert result.status is TokenStatus.ACCEPTED
    assert result.credit_after_milli == credit_before + 500 * 1000
    assert meter.state.credit_milli == credit_before + 500 * 1000
    assert meter.state.last_credit_token_id == 1
    # The stored row goes all the way to DONE once the broker acknowledged the result.
    store = Store.open_readonly(rig.gateway.config.store.path)
    try:
        await wait_until(lambda: store.open_tokens() == [], what="token done")
    finally:
        store.close()


async def test_refused_tokens_get_their_status_and_never_reach_the_meter(rig: Rig) -> None:
    meter = rig.meters[A]
    seq_before, credit_before = meter.state.token_seq, meter.state.credit_milli
    t = now()
    stranger = Ed25519Signer(99, messages.load_private_key(TEST_SEED_2))
    cases = {
        # forged: our key id, somebody else's private key
        11: (credit_token(A, 11, 500, now=t, signer=FORGER), TokenStatus.BAD_SIGNATURE),
        # foreign: validly signed, but for meter B, delivered for meter A
        12: (credit_token(B, 12, 500, now=t), TokenStatus.WRONG_METER),
        # expired an hour ago
        13: (
            credit_token(A, 13, 500, now=t, valid_from=t - 7200, valid_s=3600),
            TokenStatus.EXPIRED,
        ),
        # signed by a key the gateway does not trust
        14: (credit_token(A, 14, 500, now=t, signer=stranger), TokenStatus.UNKNOWN_KEY),
        # issued an hour in the future
        15: (credit_token(A, 15, 500, now=t, valid_from=t + 3600), TokenStatus.NOT_YET_VALID),
        # not a message at all
        16: (b"\x01\x01\x00\x00\x00\x07" + bytes(90), TokenStatus.BAD_SIGNATURE),
    }
    for token_id, (msg, _) in cases.items():
        rig.backend.deliver(A, msg, token_id)
    for token_id, (_, status) in cases.items():
        (result,) = await result_of(rig, A, token_id)
        assert result.status is status, token_id
        assert result.credit_after_milli is None
    assert meter.state.token_seq == seq_before
    assert meter.state.credit_milli == credit_before


async def test_a_token_for_a_meter_the_gateway_does_not_serve_is_wrong_meter(rig: Rig) -> None:
    rig.backend.deliver(777, credit_token(777, 1, 500, now=now()), 1)
    (result,) = await result_of(rig, 777, 1)
    assert result.status is TokenStatus.WRONG_METER


async def test_replays_are_answered_without_writing_twice(rig: Rig) -> None:
    meter = rig.meters[A]
    t = now()
    first = credit_token(A, 5, 300, now=t)
    rig.backend.deliver(A, first, 5)
    (accepted,) = await result_of(rig, A, 5)
    assert accepted.status is TokenStatus.ACCEPTED
    seq_after, credit_after = meter.state.token_seq, meter.state.credit_milli

    # The same bytes again (a backend retry): the stored result is published again.
    rig.backend.deliver(A, first, 5)
    again = await result_of(rig, A, 5, count=2)
    assert again[1].status is TokenStatus.ACCEPTED
    assert again[1].credit_after_milli == accepted.credit_after_milli

    # The same id, re-signed with another expiry: the gateway's window knows it.
    reissued = credit_token(A, 5, 300, now=t, valid_s=7200)
    assert reissued != first
    rig.backend.deliver(A, reissued, 5)
    third = await result_of(rig, A, 5, count=3)
    assert third[2].status is TokenStatus.ALREADY_APPLIED
    assert (meter.state.token_seq, meter.state.credit_milli) == (seq_after, credit_after)


async def test_meter_reports_already_applied_for_a_token_it_has_but_the_gateway_does_not(
    rig: Rig,
) -> None:
    # Applied to meter B by hand (a technician's keypad, another gateway): the gateway's
    # window does not know it, so it writes it, and the meter answers already_applied.
    from firmware_protocol import modbus_map as mm
    from tests.support.meters import send_token, tcp_client

    meter = rig.meters[B]
    msg = credit_token(B, 9, 100, now=now())
    port = rig.gateway.config.meters[1].address.port  # type: ignore[union-attr]
    async with tcp_client(port) as client:
        result = await send_token(client, 2, msg)
    assert result.token_status is mm.TokenStatus.ACCEPTED
    credit = meter.state.credit_milli
    rig.backend.deliver(B, msg, 9)
    (answer,) = await result_of(rig, B, 9)
    assert answer.status is TokenStatus.ALREADY_APPLIED
    assert answer.credit_after_milli == credit == meter.state.credit_milli


async def test_tariff_and_key_change_messages_pass_through_like_tokens(rig: Rig) -> None:
    meter = rig.meters[A]
    t = now()
    tariff = dataclasses.replace(TARIFF, tariff_id=77)
    header = Header(
        key_id=SIGNER.key_id, meter_id=A, msg_id=19, issued_at=t - 60, expires_at=t + 3600
    )
    rig.backend.deliver(A, messages.encode(TariffMessage(header, tariff, t + 86_400), SIGNER), 19)
    (result,) = await result_of(rig, A, 19)
    assert result.status is TokenStatus.ACCEPTED
    assert meter.state.passive is not None
    assert meter.state.passive[0].tariff_id == 77

    new_key = Ed25519Signer(TEST_KEY_ID_2, messages.load_private_key(TEST_SEED_2))
    header = Header(
        key_id=SIGNER.key_id, meter_id=A, msg_id=20, issued_at=t - 60, expires_at=t + 3600
    )
    add = KeyChange(header, KeyAction.ADD, TEST_KEY_ID_2, new_key.public_key_bytes())
    rig.backend.deliver(A, messages.encode(add, SIGNER), 20)
    (result,) = await result_of(rig, A, 20)
    assert result.status is TokenStatus.ACCEPTED
    assert TEST_KEY_ID_2 in dict(meter.state.trusted_keys)


async def test_a_poison_message_is_dropped_and_does_not_block_the_session(rig: Rig) -> None:
    rig.backend.raw(token_topic(GW, A), b"{not json")
    rig.backend.raw(
        token_topic(GW, A), b'{"v":1,"meter":1,"msg":"AQ==","token_id":1}'
    )  # meter mismatch
    rig.backend.deliver(A, credit_token(A, 30, 100, now=now()), 30)
    (result,) = await result_of(rig, A, 30)
    assert result.status is TokenStatus.ACCEPTED
