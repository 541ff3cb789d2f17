"""The token dispatcher: outbox claims, retries and results — with a scripted publisher, through
a real broker with a fake gateway (plain paho), and end to end with the real gateway and a
simulated meter.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as pm
import pytest
from sqlalchemy import select

from backend.adapters.db.alert_tables import AlertRow
from backend.adapters.db.engine import Database
from backend.adapters.db.tables import MeterRow, TokenRow
from backend.adapters.instant_sandbox import InstantSandbox
from backend.adapters.mqtt import BackendLink, MqttLinkError, MqttSettings, backend_state
from backend.domain.topups import UNCONFIRMED, TokenState
from backend.payments.sandbox import SandboxProvider
from backend.service.accounts import AccountService
from backend.service.context import utc_now
from backend.service.dispatcher import (
    Dispatcher,
    DispatcherSettings,
    ResultOutcome,
    result_subscription,
)
from backend.service.topups import TopupService
from firmware_protocol import messages, mqtt
from firmware_protocol.errors import MalformedError
from firmware_protocol.mqtt_topics import BACKEND_STATE_TOPIC, token_result_topic
from firmware_protocol.status import TokenStatus
from meter_sim.fleet import TcpLayout, serve
from tests.support.broker import free_port
from tests.support.gateway import (
    GW,
    gateway_toml,
    open_broker,
    running_gateway,
    tcp_meter,
    wall_meter,
    write_config,
)
from tests.support.meters import SIGNER
from tests.support.topups import (
    GATEWAY,
    T0,
    Clock,
    StaticSigners,
    Target,
    World,
    counts,
    fresh_target,
    provision,
)

pytestmark = pytest.mark.integration

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
FAST = DispatcherSettings(poll_s=0.05, retry_base_s=0.4, retry_cap_s=1.0, puback_timeout_s=5.0)


# --- plumbing ----------------------------------------------------------------------------


class ScriptedPublisher:
    """Records publishes; PUBACKs at once unless told to hold them."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, mqtt.TokenDelivery]] = []
        self.hold = False
        self.held: list[asyncio.Future[None]] = []

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> asyncio.Future[None]:
        assert not retain
        self.sent.append((topic, mqtt.decode_token_delivery(payload)))
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.hold:
            self.held.append(fut)
        else:
            fut.set_result(None)
        return fut


async def make_topups(
    db: Database,
    world: World,
    n: int,
    *,
    clock: Callable[[], datetime] | None = None,
    signer: Any = None,
) -> TopupService:
    """``n`` settled top-ups (tokens in the outbox); at T0 unless given a clock."""
    clock = clock or Clock()
    sandbox = SandboxProvider(secret=b"s" * 32, clock=clock)
    service = TopupService(
        db,
        providers={"sandbox": InstantSandbox(sandbox)},
        default_provider="sandbox",
        signers=StaticSigners(signer=signer),
        clock=clock,
    )
    for i in range(n):
        c = world.customers[i % len(world.customers)]
        await service.request_topup(
            c.call(world.tenant_id, clock()),
            c.account_id,
            amount_minor=1_000 + 10 * i,
            currency="EUR",
            idempotency_key=f"k{i}",
        )
    return service


async def tokens(db: Database) -> list[TokenRow]:
    async with db.read() as s:
        return list((await s.scalars(select(TokenRow).order_by(TokenRow.id))).all())


async def alerts(db: Database) -> list[AlertRow]:
    async with db.read() as s:
        return list((await s.scalars(select(AlertRow).order_by(AlertRow.id))).all())


def result_payload(
    meter: int, token_id: int, status: TokenStatus, credit: int | None = 5_000_000, ts: int = 0
) -> bytes:
    return mqtt.encode(
        mqtt.TokenResult(
            token_id=token_id,
            meter=meter,
            status=status,
            credit_after_milli=credit,
            ts=ts or int(T0.timestamp()),
        )
    )


@pytest.fixture(params=BACKENDS)
async def target(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Target]:
    dsn = request.getfixturevalue("postgres_dsn") if request.param == "postgresql" else None
    async with fresh_target(request.param, tmp_path, dsn) as t:
        yield t


@pytest.fixture
async def sqlite_db(tmp_path: Path) -> AsyncIterator[Database]:
    async with fresh_target("sqlite", tmp_path) as t, t.database() as db:
        yield db


# --- claims, retries, expiry (scripted publisher) ----------------------------------------


async def test_claims_publish_each_due_token_once_and_retry_with_backoff(
    sqlite_db: Database,
) -> None:
    db = sqlite_db
    world = await provision(db, customers=2)
    await make_topups(db, world, 3)
    clock = Clock()
    pub = ScriptedPublisher()
    dispatcher = Dispatcher(
        db,
        pub,
        settings=DispatcherSettings(retry_base_s=10, retry_cap_s=40),
        clock=clock,
        uniform=lambda _lo, hi: hi,  # no jitter: exact times
    )
    assert await dispatcher.dispatch_once() == 3
    meters = [c.meter_id for c in world.customers]
    assert [(t, d.meter, d.token_id) for t, d in pub.sent] == [
        (f"vc/v1/gw/{GATEWAY}/meter/{meters[0]}/token", meters[0], 1),
        (f"vc/v1/gw/{GATEWAY}/meter/{meters[1]}/token", meters[1], 1),
        (f"vc/v1/gw/{GATEWAY}/meter/{meters[0]}/token", meters[0], 2),
    ]
    rows = await tokens(db)
    assert [(r.status, r.attempts, r.next_attempt_at) for r in rows] == [
        (TokenState.SENT, 1, T0 + timedelta(seconds=10))
    ] * 3
    # The bytes published are the stored, signed bytes.
    assert [d.msg for _, d in pub.sent] == [r.message for r in rows]
    # Nothing is due again before the lease runs out.
    clock.now = T0 + timedelta(seconds=9)
    assert await dispatcher.dispatch_once() == 0
    clock.now = T0 + timedelta(seconds=10)
    assert await dispatcher.dispatch_once() == 3
    rows = await tokens(db)
    assert {(r.attempts, r.next_attempt_at) for r in rows} == {
        (2, clock.now + timedelta(seconds=20))
    }
    # Back-off doubles up to the cap.
    for attempts, delay in ((3, 40), (4, 40)):
        clock.now = rows[0].next_attempt_at
        assert await dispatcher.dispatch_once() == 3
        rows = await tokens(db)
        assert {(r.attempts, r.next_attempt_at - clock.now) for r in rows} == {
            (attempts, timedelta(seconds=delay))
        }
    assert len(pub.sent) == 12  # always the same three tokens, never new ids
    assert (await counts(db)).tokens == 3


async def test_concurrent_dispatchers_never_claim_a_token_twice(target: Target) -> None:
    async with target.database() as db, target.database() as db2:
        world = await provision(db, customers=4)
        await make_topups(db, world, 40)
        pubs = [ScriptedPublisher() for _ in range(4)]
        dispatchers = [
            Dispatcher(d, p, settings=DispatcherSettings(batch=7, retry_base_s=60), clock=Clock())
            for d, p in zip((db, db2, db, db2), pubs, strict=True)
        ]
        for _ in range(10):
            await asyncio.gather(*(d.dispatch_once() for d in dispatchers))
        sent = [(d.meter, d.token_id) for p in pubs for _, d in p.sent]
        assert len(sent) == 40
        assert len(set(sent)) == 40
        assert {r.attempts for r in await tokens(db)} == {1}


async def test_unacknowledged_publishes_stay_leased(sqlite_db: Database) -> None:
    world = await provision(sqlite_db, customers=1)
    await make_topups(sqlite_db, world, 1)
    pub = ScriptedPublisher()
    pub.hold = True
    d = Dispatcher(
        sqlite_db, pub, settings=DispatcherSettings(puback_timeout_s=0.05), clock=Clock()
    )
    assert await d.dispatch_once() == 1
    (row,) = await tokens(sqlite_db)
    assert (row.status, row.attempts) == (TokenState.SENT, 1)
    pub.held[0].set_exception(MqttLinkError("closed"))  # retrieved, not reported as lost
    await asyncio.sleep(0)


async def test_an_expired_token_is_given_up_with_an_alert(sqlite_db: Database) -> None:
    world = await provision(sqlite_db, customers=1)
    await make_topups(sqlite_db, world, 1)
    clock = Clock(T0 + timedelta(days=30))
    pub = ScriptedPublisher()
    assert await Dispatcher(sqlite_db, pub, clock=clock).dispatch_once() == 0
    (row,) = await tokens(sqlite_db)
    assert (row.status, row.result_status, row.completed_at) == (
        TokenState.REJECTED,
        UNCONFIRMED,
        clock.now,
    )
    assert [(a.kind, a.token_id) for a in await alerts(sqlite_db)] == [
        ("TOKEN_UNCONFIRMED", row.id)
    ]
    assert pub.sent == []


# --- results (no broker) -----------------------------------------------------------------


async def test_results_apply_once_and_refusals_raise_one_alert(sqlite_db: Database) -> None:
    db = sqlite_db
    world = await provision(db, customers=2)
    await make_topups(db, world, 2)
    clock = Clock(T0 + timedelta(seconds=5))
    d = Dispatcher(db, ScriptedPublisher(), clock=clock)
    a, b = (c.meter_id for c in world.customers)
    assert a is not None
    assert b is not None
    topic_a, topic_b = token_result_topic(GATEWAY, a), token_result_topic(GATEWAY, b)

    # Transient status: nothing changes.
    assert await d.handle_result(topic_a, result_payload(a, 1, TokenStatus.PENDING)) is (
        ResultOutcome.UNCHANGED
    )
    ts = int(T0.timestamp()) + 3
    accepted = result_payload(a, 1, TokenStatus.ACCEPTED, 1_000_000, ts)
    assert await d.handle_result(topic_a, accepted) is ResultOutcome.APPLIED
    assert await d.handle_result(topic_a, accepted) is ResultOutcome.UNCHANGED  # duplicate
    # A refusal for a re-delivery never demotes an applied token.
    too_old = result_payload(a, 1, TokenStatus.TOO_OLD)
    assert await d.handle_result(topic_a, too_old) is ResultOutcome.UNCHANGED
    rows = {r.meter_id: r for r in await tokens(db)}
    assert (rows[a].status, rows[a].result_status, rows[a].credit_after_milli) == (
        TokenState.APPLIED,
        "ACCEPTED",
        1_000_000,
    )
    assert rows[a].completed_at == clock.now
    async with db.read() as s:
        meter = await s.get(MeterRow, a)
    assert meter is not None
    assert (meter.last_credit_milli, meter.last_reading_at) == (
        1_000_000,
        datetime.fromtimestamp(ts, UTC),
    )

    rejected = result_payload(b, 1, TokenStatus.BAD_SIGNATURE, None)
    assert await d.handle_result(topic_b, rejected) is ResultOutcome.REJECTED
    assert await d.handle_result(topic_b, rejected) is ResultOutcome.UNCHANGED
    (alert,) = await alerts(db)
    assert (alert.kind, alert.meter_id, alert.detail["status"]) == (
        "TOKEN_REJECTED",
        b,
        "BAD_SIGNATURE",
    )
    # No re-issue: still one token per top-up, and the rejected one is never published.
    assert (await counts(db)).tokens == 2
    pub = ScriptedPublisher()
    await Dispatcher(db, pub, clock=Clock(T0 + timedelta(hours=1))).dispatch_once()
    assert pub.sent == []
    # The meter says it has the credit after all (a lost acceptance): APPLIED wins.
    late = result_payload(b, 1, TokenStatus.ALREADY_APPLIED, 2_000_000, ts - 100)
    assert await d.handle_result(topic_b, late) is ResultOutcome.APPLIED
    async with db.read() as s:
        meter_b = await s.get(MeterRow, b)
    assert meter_b is not None
    assert meter_b.last_credit_milli == 2_000_000
    # An older report does not overwrite a newer credit reading.
    async with db.write() as s:
        m = await s.get(MeterRow, b)
        assert m is not None
        m.last_reading_at = datetime.fromtimestamp(ts, UTC)
        m.last_credit_milli = 3_000_000
    await make_topups(db, world, 4)  # tokens 2 for each meter (k0, k1 replay; k2, k3 new)
    older = result_payload(b, 2, TokenStatus.ACCEPTED, 9_999, ts - 50)
    assert await d.handle_result(topic_b, older) is ResultOutcome.APPLIED
    async with db.read() as s:
        meter_b = await s.get(MeterRow, b)
    assert meter_b is not None
    assert meter_b.last_credit_milli == 3_000_000


async def test_results_that_change_nothing(sqlite_db: Database) -> None:
    world = await provision(sqlite_db, customers=1)
    await make_topups(sqlite_db, world, 1)
    d = Dispatcher(sqlite_db, ScriptedPublisher())
    a = world.customers[0].meter_id
    assert a is not None
    # Unknown token id, unknown meter.
    assert await d.handle_result(
        token_result_topic(GATEWAY, a), result_payload(a, 9, TokenStatus.ACCEPTED)
    ) is (ResultOutcome.UNKNOWN)
    assert await d.handle_result(
        token_result_topic(GATEWAY, 42), result_payload(42, 1, TokenStatus.ACCEPTED)
    ) is (ResultOutcome.UNKNOWN)
    # A gateway reporting on a meter that is not its own.
    assert await d.handle_result(
        token_result_topic("gw-other", a), result_payload(a, 1, TokenStatus.ACCEPTED)
    ) is (ResultOutcome.FOREIGN)
    (row,) = await tokens(sqlite_db)
    assert row.status == TokenState.PENDING
    # Malformed input is the peer's fault and raises.
    with pytest.raises(MalformedError):
        await d.handle_result(token_result_topic(GATEWAY, a), b"{}")
    with pytest.raises(MalformedError):
        await d.handle_result(
            token_result_topic(GATEWAY, a), result_payload(a + 1, 1, TokenStatus.ACCEPTED)
        )
    with pytest.raises(MalformedError):
        await d.handle_result(f"vc/v1/gw/{GATEWAY}/readings", b"{}")


def test_result_subscription() -> None:
    assert result_subscription(shared=False) == "vc/v1/gw/+/meter/+/token/result"
    assert result_subscription(shared=True) == "$share/tokens/vc/v1/gw/+/meter/+/token/result"


# --- through a broker, with a fake gateway -----------------------------------------------


@dataclass
class FakeGateway:
    """A plain paho client in the gateway's place: records deliveries, publishes results."""

    port: int
    gw: str = GATEWAY
    deliveries: queue.Queue[tuple[str, mqtt.TokenDelivery]] = field(default_factory=queue.Queue)
    states: queue.Queue[bytes] = field(default_factory=queue.Queue)
    client: Any = None

    def start(self) -> None:
        connected: queue.Queue[Any] = queue.Queue()
        subscribed: queue.Queue[Any] = queue.Queue()
        client = pm.Client(
            pm.CallbackAPIVersion.VERSION2, client_id=f"fake-{self.gw}", protocol=pm.MQTTv311
        )
        client.on_connect = lambda _c, _u, _f, rc, _p: connected.put(rc)
        client.on_subscribe = lambda _c, _u, _m, codes, _p: subscribed.put(codes)
        client.on_message = self._on_message
        client.connect("127.0.0.1", self.port)
        client.loop_start()
        assert not connected.get(timeout=10).is_failure
        client.subscribe([(f"vc/v1/gw/{self.gw}/meter/+/token", 1), (BACKEND_STATE_TOPIC, 1)])
        subscribed.get(timeout=10)
        self.client = client

    def _on_message(self, _c: Any, _u: Any, message: Any) -> None:
        if message.topic == BACKEND_STATE_TOPIC:
            self.states.put(bytes(message.payload))
        else:
            self.deliveries.put((message.topic, mqtt.decode_token_delivery(bytes(message.payload))))

    async def delivery(self, timeout: float = 10.0) -> tuple[str, mqtt.TokenDelivery]:  # noqa: ASYNC109
        return await asyncio.to_thread(self.deliveries.get, timeout=timeout)

    async def state(self, timeout: float = 10.0) -> mqtt.BackendState:  # noqa: ASYNC109
        return mqtt.decode_backend_state(await asyncio.to_thread(self.states.get, timeout=timeout))

    def result(self, meter: int, token_id: int, status: TokenStatus, credit: int | None) -> None:
        payload = result_payload(meter, token_id, status, credit, int(time.time()))
        info = self.client.publish(token_result_topic(self.gw, meter), payload, qos=1)
        info.wait_for_publish(5)

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@contextlib.contextmanager
def fake_gateway(port: int) -> Iterator[FakeGateway]:
    gw = FakeGateway(port)
    gw.start()
    try:
        yield gw
    finally:
        gw.stop()


@contextlib.asynccontextmanager
async def running_dispatcher(
    db: Database, port: int, *, shared: bool = False, client_id: str = "backend-test"
) -> AsyncIterator[tuple[Dispatcher, BackendLink]]:
    settings = MqttSettings(port=port, client_id=client_id, reconnect_min_s=0.1)
    async with BackendLink(settings, subscriptions=[result_subscription(shared=shared)]) as link:
        dispatcher = Dispatcher(db, link, settings=FAST)
        task = asyncio.create_task(dispatcher.run(link), name="dispatcher-under-test")
        try:
            await asyncio.wait_for(link.online.wait(), 10)
            yield dispatcher, link
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def wait_status(db: Database, status: TokenState, n: int = 1) -> list[TokenRow]:
    async def check() -> list[TokenRow]:
        rows = [r for r in await tokens(db) if r.status == status]
        return rows if len(rows) >= n else []

    deadline = time.monotonic() + 10
    while not (rows := await check()):
        assert time.monotonic() < deadline, f"no token reached {status}"
        await asyncio.sleep(0.05)
    return rows


async def test_through_the_broker_publish_retry_apply(sqlite_db: Database, tmp_path: Path) -> None:
    db = sqlite_db
    world = await provision(db, customers=1)
    meter = world.customers[0].meter_id
    assert meter is not None
    async with open_broker(tmp_path / "broker") as broker:
        with fake_gateway(broker.port) as gw:
            async with running_dispatcher(db, broker.port) as (dispatcher, _link):
                assert (await gw.state()).online is True
                await make_topups(db, world, 1, clock=utc_now)
                dispatcher.wake()
                topic, first = await gw.delivery()
                assert topic == f"vc/v1/gw/{GATEWAY}/meter/{meter}/token"
                assert (first.meter, first.token_id) == (meter, 1)
                public = {1: StaticSigners().signer.private_key.public_key()}
                token = messages.verify(first.msg, public, meter_id=meter, now=int(time.time()))
                assert isinstance(token, messages.CreditToken)
                assert token.amount_minor == 1_000
                # No result: the same token again after the back-off (0.2..0.4 s).
                _, second = await gw.delivery(timeout=5)
                assert second == first
                # A malformed result is the peer's fault: dropped, and the loop goes on.
                gw.client.publish(token_result_topic(GATEWAY, meter), b"garbage", qos=1)
                gw.result(meter, 1, TokenStatus.ACCEPTED, 7_000_000)
                (row,) = await wait_status(db, TokenState.APPLIED)
                assert row.attempts >= 2
                assert row.credit_after_milli == 7_000_000
                balance = await AccountService(db).balance(
                    world.customers[0].call(world.tenant_id), world.customers[0].account_id
                )
                assert (balance.tokens_in_flight, balance.meter_credit_milli) == (0, 7_000_000)
                # Applied tokens are never published again.
                await asyncio.sleep(0.6)
                while not gw.deliveries.empty():
                    assert gw.deliveries.get_nowait()[1] == first  # in flight before APPLIED
                await asyncio.sleep(0.6)
                assert gw.deliveries.empty()
            # A clean stop says offline (retained).
            assert (await gw.state()).online is False


async def test_through_the_broker_a_rejection_alerts_and_is_not_reissued(
    sqlite_db: Database, tmp_path: Path
) -> None:
    db = sqlite_db
    world = await provision(db, customers=1)
    meter = world.customers[0].meter_id
    assert meter is not None
    async with open_broker(tmp_path / "broker") as broker:
        with fake_gateway(broker.port) as gw:
            async with running_dispatcher(db, broker.port) as (dispatcher, _):
                await make_topups(db, world, 1, clock=utc_now)
                dispatcher.wake()
                await gw.delivery()
                gw.result(meter, 1, TokenStatus.EXPIRED, None)
                await wait_status(db, TokenState.REJECTED)
                await asyncio.sleep(1.0)  # past several back-off periods
                while not gw.deliveries.empty():
                    _, d = gw.deliveries.get_nowait()
                    assert d.token_id == 1  # only re-sends from before the result
                await asyncio.sleep(1.0)
                assert gw.deliveries.empty()
    assert [a.kind for a in await alerts(db)] == ["TOKEN_REJECTED"]
    assert (await counts(db)).tokens == 1


async def test_results_published_while_the_backend_was_away_are_not_lost(
    sqlite_db: Database, tmp_path: Path
) -> None:
    db = sqlite_db
    world = await provision(db, customers=1)
    meter = world.customers[0].meter_id
    assert meter is not None
    async with open_broker(tmp_path / "broker") as broker:
        with fake_gateway(broker.port) as gw:
            async with running_dispatcher(db, broker.port) as (dispatcher, _):
                await make_topups(db, world, 1, clock=utc_now)
                dispatcher.wake()
                await gw.delivery()
            # The backend is down (persistent session): the result waits at the broker.
            gw.result(meter, 1, TokenStatus.ACCEPTED, 1_234_000)
            await asyncio.sleep(0.2)
            assert (await tokens(db))[0].status == TokenState.SENT
            async with running_dispatcher(db, broker.port):
                (row,) = await wait_status(db, TokenState.APPLIED)
                assert row.credit_after_milli == 1_234_000


async def test_shared_subscription_splits_results_between_instances(
    sqlite_db: Database, tmp_path: Path, mosquitto_factory: Any
) -> None:
    db = sqlite_db
    world = await provision(db, customers=4)
    broker = mosquitto_factory()
    handled: list[str] = []
    with fake_gateway(broker.port) as gw:
        async with (
            running_dispatcher(db, broker.port, shared=True, client_id="backend-a") as (d1, _),
            running_dispatcher(db, broker.port, shared=True, client_id="backend-b") as (d2, _),
        ):
            for name, d in (("a", d1), ("b", d2)):
                original = d.handle_result

                async def counting(
                    topic: str, payload: bytes, *, _o: Any = original, _n: str = name
                ) -> ResultOutcome:
                    handled.append(_n)
                    return await _o(topic, payload)

                d.handle_result = counting  # type: ignore[method-assign]
            await make_topups(db, world, 8, clock=utc_now)
            d1.wake()
            got: dict[tuple[int, int], mqtt.TokenDelivery] = {}
            while len(got) < 8:
                _, delivery = await gw.delivery()
                got[delivery.meter, delivery.token_id] = delivery
            for meter, token_id in got:
                gw.result(meter, token_id, TokenStatus.ACCEPTED, 1_000)
            await wait_status(db, TokenState.APPLIED, 8)
    # Every result went to exactly one instance of the group.
    assert len(handled) == 8


async def test_amqtt_broker_plain_subscription(sqlite_db: Database) -> None:
    from amqtt.broker import Broker

    db = sqlite_db
    world = await provision(db, customers=1)
    meter = world.customers[0].meter_id
    assert meter is not None
    port = free_port()
    broker = Broker(
        {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
    )
    await broker.start()
    try:
        gw = FakeGateway(port)
        await asyncio.to_thread(gw.start)
        try:
            async with running_dispatcher(db, port) as (dispatcher, _):
                await make_topups(db, world, 1, clock=utc_now)
                dispatcher.wake()
                _, delivery = await gw.delivery()
                await asyncio.to_thread(
                    gw.result, meter, delivery.token_id, TokenStatus.ACCEPTED, 5
                )
                await wait_status(db, TokenState.APPLIED)
        finally:
            await asyncio.to_thread(gw.stop)
    finally:
        await broker.shutdown()


async def test_link_refuses_publishing_when_not_running() -> None:
    link = BackendLink(MqttSettings(port=free_port()), subscriptions=[])
    with pytest.raises(MqttLinkError):
        link.publish("vc/v1/x", b"")
    assert backend_state(online=True, ts=1) == b'{"online":true,"ts":1,"v":1}'


# --- end to end: real gateway, simulated meter -------------------------------------------


async def test_end_to_end_topup_reaches_the_meter(sqlite_db: Database, tmp_path: Path) -> None:
    db = sqlite_db
    meter_id = 4_200_000_001
    world = await provision(db, customers=1, first_meter=meter_id, gateway=GW)
    device = wall_meter(meter_id, unit_id=1, credit_milli=0)
    async with (
        open_broker(tmp_path / "broker") as broker,
        serve([device], TcpLayout(port=0)) as fleet,
    ):
        text = gateway_toml(
            broker_port=broker.port,
            store=tmp_path / "gw.sqlite",
            meters=[tcp_meter(meter_id, fleet.ports[0], 1)],
            poll_interval_s=5,
        )
        async with (
            running_gateway(write_config(tmp_path / "gw.toml", text)),
            running_dispatcher(db, broker.port) as (dispatcher, _),
        ):
            # Real time: the meter checks the token's validity against the wall clock.
            sandbox = SandboxProvider(secret=b"s" * 32)
            service = TopupService(
                db,
                providers={"sandbox": InstantSandbox(sandbox)},
                default_provider="sandbox",
                signers=StaticSigners(signer=SIGNER),
                on_token_issued=dispatcher.wake,
            )
            c = world.customers[0]
            started = time.monotonic()
            result = await service.request_topup(
                c.call(world.tenant_id, utc_now()),
                c.account_id,
                amount_minor=2_500,
                currency="EUR",
                idempotency_key=str(uuid.uuid4()),
            )
            (row,) = await wait_status(db, TokenState.APPLIED)
            elapsed = time.monotonic() - started
            assert row.payment_id == result.payment_id
            assert row.result_status == "ACCEPTED"
            assert row.credit_after_milli == 2_500_000
            assert device.state.credit_milli == 2_500_000
            assert elapsed < 5.0, elapsed
