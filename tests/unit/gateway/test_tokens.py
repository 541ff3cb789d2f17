"""The token desk with a scripted meter and link: the full path, unreachable meters, restarts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from firmware_protocol import mqtt
from firmware_protocol.mqtt import TokenDelivery
from firmware_protocol.replay import ReplayWindow
from firmware_protocol.status import TokenStatus
from gateway.store import AsyncStore, Store
from gateway.token_flow import IntakeKind, TokenState
from gateway.tokens import TokenDesk
from tests.support.gateway import wait_until
from tests.support.meters import FORGER, SIGNER, credit_token
from tests.unit.gateway.fakes import FakeDriver, FakePublisher

NOW = 1_790_000_000
M1, M2 = 101, 102


@pytest.fixture
async def astore(tmp_path: Path) -> AsyncIterator[AsyncStore]:
    astore = AsyncStore(Store.open(tmp_path / "gw.sqlite", now=NOW))
    yield astore
    await astore.aclose()


def desk(astore: AsyncStore, drivers: dict[int, FakeDriver], pub: FakePublisher) -> TokenDesk:
    return TokenDesk(
        gw="gw-1",
        store=astore,
        drivers=drivers,
        publisher=pub,
        trusted={SIGNER.key_id: SIGNER.private_key.public_key()},
        now=lambda: NOW,
        retry_s=0.05,
    )


def delivery(meter: int, token_id: int, **kw: object) -> TokenDelivery:
    return TokenDelivery(
        msg=credit_token(meter, token_id, 500, now=NOW, **kw), token_id=token_id, meter=meter
    )  # type: ignore[arg-type]


def results(pub: FakePublisher) -> list[tuple[int, int, TokenStatus, int | None]]:
    return [
        (r.meter, r.token_id, r.status, r.credit_after_milli)
        for r in pub.decoded()
        if isinstance(r, mqtt.TokenResult)
    ]


async def test_store_write_read_publish_done(astore: AsyncStore) -> None:
    d1, pub = FakeDriver(M1), FakePublisher()
    tokens = desk(astore, {M1: d1}, pub)
    intake = await tokens.receive(delivery(M1, 1))
    assert intake.kind is IntakeKind.STORE
    # Stored before anything touched the meter (the caller PUBACKs now).
    (row,) = astore.store.open_tokens()
    assert row.state is TokenState.STORED
    assert d1.writes == []
    assert await tokens.process_open() is False
    assert results(pub) == [(M1, 1, TokenStatus.ACCEPTED, 501_000)]
    assert astore.store.open_tokens() == []
    assert astore.store.replay_window(M1) == ReplayWindow().accept(1)
    # The same bytes again: the stored result, nothing written.
    again = await tokens.receive(delivery(M1, 1))
    await asyncio.sleep(0)
    assert again.kind is IntakeKind.REPUBLISH
    assert len(d1.writes) == 1
    assert results(pub)[-1] == (M1, 1, TokenStatus.ACCEPTED, 501_000)


async def test_refusals_are_stored_and_published_without_the_meter(astore: AsyncStore) -> None:
    d1, pub = FakeDriver(M1), FakePublisher()
    tokens = desk(astore, {M1: d1}, pub)
    await tokens.receive(
        TokenDelivery(msg=credit_token(M1, 2, 5, now=NOW, signer=FORGER), token_id=2, meter=M1)
    )
    await tokens.receive(delivery(M1, 3, valid_from=NOW - 100, valid_s=10))
    await tokens.process_open()
    assert results(pub) == [
        (M1, 2, TokenStatus.BAD_SIGNATURE, None),
        (M1, 3, TokenStatus.EXPIRED, None),
    ]
    assert d1.writes == []


async def test_an_unreachable_meter_keeps_its_tokens_stored_and_others_proceed(
    astore: AsyncStore,
) -> None:
    d1, d2, pub = FakeDriver(M1, up=False), FakeDriver(M2), FakePublisher()
    tokens = desk(astore, {M1: d1, M2: d2}, pub)
    await tokens.receive(delivery(M1, 1))
    await tokens.receive(delivery(M1, 2))
    await tokens.receive(delivery(M2, 1))
    assert await tokens.process_open() is True  # M1 still waiting
    assert results(pub) == [(M2, 1, TokenStatus.ACCEPTED, 501_000)]
    assert [r.token_id for r in astore.store.open_tokens()] == [1, 2]
    # A repeat while it waits: "pending", nothing changes.
    assert (await tokens.receive(delivery(M1, 1))).kind is IntakeKind.IN_PROGRESS
    await asyncio.sleep(0)
    assert results(pub)[-1] == (M1, 1, TokenStatus.PENDING, None)
    d1.up = True
    run = asyncio.create_task(tokens.run())
    try:
        await wait_until(lambda: not astore.store.open_tokens())
    finally:
        run.cancel()
    assert [r[1:3] for r in results(pub) if r[0] == M1 and r[2].final] == [
        (1, TokenStatus.ACCEPTED),
        (2, TokenStatus.ACCEPTED),
    ]


async def test_restart_after_write_reports_already_applied_once(tmp_path: Path) -> None:
    """The meter applied it, the gateway died before storing the result: write again."""
    path = tmp_path / "gw.sqlite"
    d1, pub = FakeDriver(M1), FakePublisher()
    astore = AsyncStore(Store.open(path, now=NOW))
    d = delivery(M1, 1)
    await desk(astore, {M1: d1}, pub).receive(d)
    await d1.write_message(d.msg)  # the write that got through before the "crash"
    await astore.aclose()

    astore = AsyncStore(Store.open(path, now=NOW))
    try:
        assert await desk(astore, {M1: d1}, pub).process_open() is False
    finally:
        await astore.aclose()
    assert results(pub) == [(M1, 1, TokenStatus.ALREADY_APPLIED, 501_000)]
    assert len(d1.applied) == 1
    assert d1.credit == 501_000


async def test_restart_after_result_republishes_without_writing(tmp_path: Path) -> None:
    path = tmp_path / "gw.sqlite"
    d1, pub = FakeDriver(M1), FakePublisher()
    astore = AsyncStore(Store.open(path, now=NOW))
    await desk(astore, {M1: d1}, pub).receive(delivery(M1, 1))
    (row,) = astore.store.open_tokens()
    astore.store.set_token_result(
        row.id, status=TokenStatus.ACCEPTED, credit_after_milli=42, window=None, now=NOW
    )
    await astore.aclose()
    astore = AsyncStore(Store.open(path, now=NOW))
    try:
        await desk(astore, {M1: d1}, pub).process_open()
        assert astore.store.open_tokens() == []
    finally:
        await astore.aclose()
    assert results(pub) == [(M1, 1, TokenStatus.ACCEPTED, 42)]
    assert d1.writes == []


async def test_a_meter_refusal_is_reported_and_does_not_move_the_window(astore: AsyncStore) -> None:
    d1, pub = FakeDriver(M1, refuse=TokenStatus.REFUSED), FakePublisher()
    tokens = desk(astore, {M1: d1}, pub)
    await tokens.receive(delivery(M1, 4))
    await tokens.process_open()
    assert results(pub) == [(M1, 4, TokenStatus.REFUSED, 1000)]
    assert astore.store.replay_window(M1) == ReplayWindow()


async def test_a_result_waits_for_the_brokers_puback_before_done(astore: AsyncStore) -> None:
    d1, pub = FakeDriver(M1), FakePublisher()
    pub.hold = True
    tokens = desk(astore, {M1: d1}, pub)
    await tokens.receive(delivery(M1, 1))
    work = asyncio.create_task(tokens.process_open())
    await wait_until(lambda: pub.held)
    (row,) = astore.store.open_tokens()
    assert row.state is TokenState.RESULT_READ  # result stored, publish not acknowledged
    pub.release()
    await work
    assert astore.store.open_tokens() == []
