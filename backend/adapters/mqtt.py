"""The backend's MQTT link: paho-mqtt 2.x in its own network thread, driven from asyncio.

paho is a thread-safe, blocking-socket client; the event loop never blocks on it:

* A network thread connects, runs ``client.loop()`` while connected and reconnects after
  a capped, jittered back-off (paho's own reconnect has no jitter).
* Every paho callback is marshalled onto the event loop with ``call_soon_threadsafe``:
  received messages land in :attr:`BackendLink.messages`, PUBACKs resolve the future that
  :meth:`BackendLink.publish` returned.
* MQTT 3.1.1 (``CallbackAPIVersion.VERSION2`` callbacks), so the embedded amqtt broker
  works as well as Mosquitto. ``clean_session=False`` under a stable client id: token
  results published while this instance was down wait at the broker. Subscriptions are
  re-made at every connect.
* **Manual acknowledgement**: a token result is PUBACKed by :meth:`BackendLink.ack` only
  after its effect is committed; a crash in between makes the broker redeliver it.
* **Presence** (DESIGN §5): at every connect the link publishes ``vc/v1/backend/state``
  ``{online: true}`` retained, and registers the same topic with ``online: false`` as its
  Will; a clean :meth:`BackendLink.close` publishes ``online: false`` itself first,
  because a clean DISCONNECT discards the Will (MQTT 3.1.1 §3.14.4). Gateways flush their
  result outboxes only while the backend is online. With several backend instances the
  flag is the last writer's: one instance stopping says "offline" while the others run
  — gateways then hold results until the next instance reconnects (a known limit).

paho return codes become :class:`MqttLinkError` here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from backend.errors import BackendError
from firmware_protocol import mqtt
from firmware_protocol.mqtt_topics import BACKEND_STATE_TOPIC, QOS

log = logging.getLogger(__name__)

#: How long one ``client.loop()`` call waits for socket activity (bounds stop latency).
_LOOP_S: Final = 0.2


class MqttLinkError(BackendError):
    """The MQTT link refused an operation or is not running (our side's state)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class MqttSettings:
    """Where and how the backend connects to the broker."""

    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = "voltcredit-backend"
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    keepalive_s: int = 30
    #: QoS 1 publishes paho keeps on the wire before queueing (NOTES.md: bound it).
    max_inflight: int = 100
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    #: Consume token results through ``$share/{group}/…`` (Mosquitto, EMQX; not amqtt).
    shared_subscriptions: bool = False


@dataclass(frozen=True, slots=True)
class Incoming:
    """A message the broker delivered; ``generation`` numbers the connection it came on."""

    topic: str
    payload: bytes
    qos: int
    mid: int
    generation: int


def _now_s() -> int:
    return int(time.time())


def backend_state(*, online: bool, ts: int) -> bytes:
    """The retained presence payload."""
    return mqtt.encode(mqtt.BackendState(online=online, ts=ts))


def _tls_context(settings: MqttSettings) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(
            cafile=None if settings.ca_file is None else str(settings.ca_file)
        )
        if settings.cert_file is not None and settings.key_file is not None:
            ctx.load_cert_chain(str(settings.cert_file), str(settings.key_file))
    except (OSError, ssl.SSLError) as exc:
        raise MqttLinkError(f"cannot load TLS files: {exc}") from exc
    return ctx


class BackendLink:
    """One persistent MQTT session of a backend instance; ``async with BackendLink(...)``."""

    def __init__(
        self,
        settings: MqttSettings,
        *,
        subscriptions: Sequence[str],
        clock_s: Callable[[], int] = _now_s,
        uniform: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self._settings = settings
        self._subscriptions = tuple(subscriptions)
        self._clock_s = clock_s
        self._uniform = uniform
        self.messages: asyncio.Queue[Incoming] = asyncio.Queue()
        self.connected = False
        #: Set while connected; the dispatcher waits on it instead of polling.
        self.online = asyncio.Event()
        self.generation = 0
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connacked = False
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=settings.client_id,
            clean_session=False,
            protocol=paho.MQTTv311,
        )
        client.manual_ack_set(on=True)
        client.max_inflight_messages_set(settings.max_inflight)
        if settings.username is not None:
            client.username_pw_set(settings.username, settings.password)
        if settings.tls:
            client.tls_set_context(_tls_context(settings))
        client.on_connect = self._paho_connect
        client.on_disconnect = self._paho_disconnect
        client.on_message = self._paho_message
        client.on_publish = self._paho_publish
        client.enable_logger(logging.getLogger("backend.mqtt.paho"))
        client.connect_async(settings.host, settings.port, keepalive=settings.keepalive_s)
        self._client = client

    # ------------------------------------------------------------------ life cycle

    async def __aenter__(self) -> Self:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._network, name="backend-mqtt", daemon=True)
        self._thread.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self, *, timeout_s: float = 3.0) -> None:
        """Say offline (retained) if connected, disconnect cleanly, stop the thread."""
        if self._thread is None:
            return
        if self.connected:
            payload = backend_state(online=False, ts=self._clock_s())
            with contextlib.suppress(TimeoutError, MqttLinkError):
                await asyncio.wait_for(
                    self.publish(BACKEND_STATE_TOPIC, payload, retain=True), timeout_s
                )
        self._stop.set()
        self._client.disconnect()
        thread, self._thread = self._thread, None
        await asyncio.to_thread(thread.join, timeout_s + 2.0)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(MqttLinkError("the link closed before the broker acknowledged"))
        self._pending.clear()
        self.connected = False
        self.online.clear()

    def _network(self) -> None:
        """The network thread: connect, loop while connected, back off, repeat."""
        attempt = 0
        client = self._client
        settings = self._settings
        while not self._stop.is_set():
            will = backend_state(online=False, ts=self._clock_s())
            client.will_set(BACKEND_STATE_TOPIC, will, qos=QOS, retain=True)
            self._connacked = False
            try:
                client.reconnect()
            except OSError as exc:  # refused, unreachable, DNS, TLS handshake
                log.warning("MQTT: cannot connect to %s:%d: %s", settings.host, settings.port, exc)
            else:
                rc = paho.MQTT_ERR_SUCCESS
                while rc == paho.MQTT_ERR_SUCCESS and client.socket() is not None:
                    rc = client.loop(timeout=_LOOP_S)
            if self._connacked:
                attempt = 0
            if self._stop.is_set():
                break
            nominal = min(
                settings.reconnect_max_s, settings.reconnect_min_s * 2 ** min(attempt, 30)
            )
            delay = self._uniform(nominal / 2, nominal)
            attempt += 1
            log.info("MQTT: reconnecting in %.2f s", delay)
            self._stop.wait(delay)

    # ------------------------------------------------------- paho callbacks (network thread)

    def _post(self, fn: Callable[..., object], *args: object) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop is shutting down
            loop.call_soon_threadsafe(fn, *args)

    def _paho_connect(
        self, client: paho.Client, _userdata: Any, flags: Any, reason: Any, _props: Any
    ) -> None:
        if reason.is_failure:
            log.error("MQTT: broker refused the connection: %s", reason)
            return
        self._connacked = True
        self.generation += 1
        client.subscribe([(f, QOS) for f in self._subscriptions])
        # Presence first thing on every connection; paho sends it in order after SUBSCRIBE.
        client.publish(
            BACKEND_STATE_TOPIC,
            backend_state(online=True, ts=self._clock_s()),
            qos=QOS,
            retain=True,
        )
        self._post(self._connected, bool(flags.session_present))

    def _paho_disconnect(
        self, _client: paho.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        self._post(self._disconnected, str(reason))

    def _paho_message(
        self, _client: paho.Client, _userdata: Any, message: paho.MQTTMessage
    ) -> None:
        incoming = Incoming(
            topic=message.topic,
            payload=bytes(message.payload),
            qos=message.qos,
            mid=message.mid,
            generation=self.generation,
        )
        self._post(self.messages.put_nowait, incoming)

    def _paho_publish(
        self, _client: paho.Client, _userdata: Any, mid: int, _reason: Any, _props: Any
    ) -> None:
        self._post(self._published, mid)

    # ------------------------------------------------------------------ event-loop side

    def _connected(self, session_present: bool) -> None:
        self.connected = True
        self.online.set()
        log.info(
            "MQTT: connected to %s:%d (session present: %s)",
            self._settings.host,
            self._settings.port,
            session_present,
        )

    def _disconnected(self, reason: str) -> None:
        if self.connected:
            log.warning("MQTT: disconnected: %s", reason)
        self.connected = False
        self.online.clear()

    def _published(self, mid: int) -> None:
        fut = self._pending.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> asyncio.Future[None]:
        """Hand a QoS 1 message to paho; the future resolves on the broker's PUBACK.

        While disconnected paho keeps the message and sends it after reconnecting.
        """
        if self._thread is None:
            raise MqttLinkError("the MQTT link is not running")
        info = self._client.publish(topic, payload, qos=QOS, retain=retain)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            raise MqttLinkError(f"publish to {topic} refused: {paho.error_string(info.rc)}")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending[info.mid] = fut
        return fut

    def ack(self, message: Incoming) -> None:
        """PUBACK ``message`` now, if it came on the current connection.

        An ack for a message of an earlier connection is dropped: the broker redelivers
        that message on the new one, and handling it again is a no-op.
        """
        if message.qos == 0 or message.generation != self.generation or not self.connected:
            return
        self._client.ack(message.mid, message.qos)

    @property
    def in_flight(self) -> int:
        """Publishes handed to paho and not yet acknowledged."""
        return len(self._pending)
