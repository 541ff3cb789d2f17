"""The test infrastructure itself: private Mosquitto with ACLs and TLS, embedded amqtt, PostgreSQL.

Later suites build on these; if one of them breaks, this file says which.
"""

from __future__ import annotations

import asyncio
import queue
import ssl
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from tests.support.broker import Users, free_port
from tests.support.pki import Pki

pytestmark = pytest.mark.integration


def connect(
    port: int, *, user: str | None = None, password: str | None = None, ca: str | None = None
) -> tuple[mqtt.Client, queue.Queue[tuple[str, bytes]]]:
    got: queue.Queue[tuple[str, bytes]] = queue.Queue()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    if user is not None:
        client.username_pw_set(user, password)
    if ca is not None:
        client.tls_set(ca_certs=ca, cert_reqs=ssl.CERT_REQUIRED)
    client.on_message = lambda _c, _u, m: got.put((m.topic, m.payload))
    connected: queue.Queue[Any] = queue.Queue()
    client.on_connect = lambda _c, _u, _f, rc, _p: connected.put(rc)
    client.connect("127.0.0.1" if ca is None else "localhost", port)
    client.loop_start()
    rc = connected.get(timeout=10)
    assert not rc.is_failure, rc
    return client, got


def subscribe(client: mqtt.Client, topic: str) -> None:
    done: queue.Queue[Any] = queue.Queue()
    client.on_subscribe = lambda _c, _u, _mid, codes, _p: done.put(codes)
    client.subscribe(topic, qos=1)
    done.get(timeout=10)


def test_mosquitto_acl_confines_a_gateway_to_its_own_topics(mosquitto_factory: Any) -> None:
    users = Users(
        passwords={"backend": "b-pass", "gw1": "g-pass"},
        acl={
            "backend": ["topic readwrite vc/v1/#"],
            "gw1": ["topic write vc/v1/gw/gw1/#", "topic read vc/v1/gw/gw1/#"],
        },
    )
    broker = mosquitto_factory(users=users)
    backend, got = connect(broker.port, user="backend", password="b-pass")  # noqa: S106 - throw-away broker
    subscribe(backend, "vc/v1/#")
    gw, _ = connect(broker.port, user="gw1", password="g-pass")  # noqa: S106 - throw-away broker
    gw.publish("vc/v1/gw/gw2/readings", b"spoofed", qos=1).wait_for_publish(5)
    gw.publish("vc/v1/gw/gw1/readings", b"own", qos=1).wait_for_publish(5)
    topic, payload = got.get(timeout=10)
    # The spoofed message was sent first; ACLs drop it, so the first to arrive is our own.
    assert (topic, payload) == ("vc/v1/gw/gw1/readings", b"own")
    with pytest.raises(queue.Empty):
        got.get(timeout=0.3)
    bad = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    bad.username_pw_set("gw1", "wrong")
    result: queue.Queue[Any] = queue.Queue()
    bad.on_connect = lambda _c, _u, _f, rc, _p: result.put(rc)
    bad.connect("127.0.0.1", broker.port)
    bad.loop_start()
    assert result.get(timeout=10).is_failure
    for c in (backend, gw, bad):
        c.loop_stop()
        c.disconnect()


def test_mosquitto_tls_listener(mosquitto_factory: Any, pki: Pki) -> None:
    broker = mosquitto_factory(pki=pki)
    client, got = connect(broker.tls_port, ca=str(pki.ca_cert))
    subscribe(client, "vc/v1/backend/state")
    client.publish("vc/v1/backend/state", b"{}", qos=1)
    assert got.get(timeout=10) == ("vc/v1/backend/state", b"{}")
    client.loop_stop()
    client.disconnect()


async def test_embedded_amqtt_fallback_carries_qos1() -> None:
    from amqtt.broker import Broker

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
        client, got = await asyncio.to_thread(connect, port)
        await asyncio.to_thread(subscribe, client, "vc/v1/gw/+/readings")
        client.publish("vc/v1/gw/x/readings", b"1", qos=1)
        assert await asyncio.to_thread(got.get, timeout=10) == ("vc/v1/gw/x/readings", b"1")
        client.loop_stop()
        client.disconnect()
    finally:
        await broker.shutdown()


async def test_postgres_answers(postgres_dsn: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(postgres_dsn)
    try:
        assert await conn.fetchval("select 1 + 1") == 2
    finally:
        await conn.close()
