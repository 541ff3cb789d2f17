"""The gateway's MQTT link: paho-mqtt in its own network thread, driven from asyncio.

paho is a thread-safe, blocking-socket client; the asyncio side never blocks on it:

* A network thread owned by the link connects (TLS and username/password as
  configured), runs ``client.loop()`` while connected, and reconnects after a capped,
  jittered back-off (:mod:`gateway.backoff`) — paho's own reconnect has no jitter, and
  a broker restart must not bring every gateway back in the same instant.
* Every paho callback is marshalled onto the event loop with
  ``loop.call_soon_threadsafe``: received messages land in :attr:`MqttLink.messages`,
  PUBACKs resolve the future :meth:`MqttLink.publish` returned, connection changes call
  ``on_connect`` / ``on_disconnect``.
* MQTT 3.1.1 (so the embedded amqtt broker works too), ``clean_session=False`` under the
  gateway id as client id: tokens and commands wait at the broker while the gateway is
  away (MQTT.md §1). Every subscription is re-made at each connect (harmless if the
  session survived, needed if the broker lost it).
* **Manual acknowledgement** (``manual_ack_set(True)``): a received QoS 1 message is
  PUBACKed only when the service calls :meth:`MqttLink.ack` — for a token, after it is
  stored. An ack for a message of an earlier connection is dropped: the broker
  redelivers that message, and the service recognises it.
* A Will (retained, QoS 1) is registered before each connection attempt with the
  current time; :meth:`MqttLink.close` publishes the ``farewell`` (the same offline
  state) first, because a clean DISCONNECT discards the Will (MQTT 3.1.1 §3.14.4).
* paho keeps QoS 1 publishes across reconnects and re-sends them in order, so a future
  from :meth:`MqttLink.publish` survives an outage; ``max_inflight`` bounds what is on
  the wire (NOTES.md: do not hand paho the whole outbox).

paho return codes and socket errors become :class:`~gateway.errors.LinkError` here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Self

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from firmware_protocol.mqtt_topics import QOS
from gateway.backoff import backoff_delay
from gateway.config import MqttConfig
from gateway.errors import LinkError

log = logging.getLogger(__name__)

#: How long one ``client.loop()`` call waits for socket activity (bounds stop latency).
_LOOP_S: Final = 0.2


@dataclass(frozen=True, slots=True)
class Incoming:
    """A message the broker delivered; ``generation`` numbers the connection it came on."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int
    generation: int


class _ClosingSSLSocket(ssl.SSLSocket):
    """An SSL socket that closes itself when its handshake fails.

    paho 2.2 wraps its TCP socket and calls ``do_handshake()``; when that raises (an
    untrusted certificate, say) it drops the socket without closing it, leaking a file
    descriptor per reconnect attempt.
    """

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except BaseException:
            self.close()
            raise


def _tls_context(config: MqttConfig) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(
            cafile=None if config.ca_file is None else str(config.ca_file)
        )
        ctx.sslsocket_class = _ClosingSSLSocket
        if config.cert_file is not None and config.key_file is not None:
            ctx.load_cert_chain(str(config.cert_file), str(config.key_file))
    except (OSError, ssl.SSLError) as exc:
        raise LinkError(f"cannot load TLS files: {exc}") from exc
    return ctx


class MqttLink:
    """One persistent MQTT session of the gateway; use as ``async with MqttLink(...) as link``."""

    def __init__(
        self,
        config: MqttConfig,
        *,
        client_id: str,
        subscriptions: Sequence[str],
        will: Callable[[], tuple[str, bytes]],
        farewell: Callable[[], tuple[str, bytes]] | None = None,
        on_connect: Callable[[bool], None],
        on_disconnect: Callable[[str], None],
        uniform: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self._config = config
        self._subscriptions = tuple(subscriptions)
        self._will = will
        self._farewell = farewell
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect
        self._uniform = uniform
        self.messages: asyncio.Queue[Incoming] = asyncio.Queue()
        self.connected = False
        self.generation = 0
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connacked = False
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=False,
            protocol=paho.MQTTv311,
        )
        client.manual_ack_set(on=True)
        client.max_inflight_messages_set(config.max_inflight)
        if config.username is not None:
            client.username_pw_set(config.username, config.password)
        if config.tls:
            client.tls_set_context(_tls_context(config))
        client.on_connect = self._paho_connect
        client.on_disconnect = self._paho_disconnect
        client.on_message = self._paho_message
        client.on_publish = self._paho_publish
        client.enable_logger(logging.getLogger("gateway.mqtt.paho"))
        # connect_async only records where to connect; the network thread connects.
        client.connect_async(config.host, config.port, keepalive=config.keepalive_s)
        self._client = client

    # ------------------------------------------------------------------ life cycle

    async def __aenter__(self) -> Self:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._network, name="gateway-mqtt", daemon=True)
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
        """Publish the farewell (retained) if connected, disconnect cleanly, stop the thread."""
        if self._thread is None:
            return
        if self._farewell is not None and self.connected:
            topic, payload = self._farewell()
            with contextlib.suppress(TimeoutError, LinkError):
                await asyncio.wait_for(self.publish(topic, payload, retain=True), timeout_s)
        self._stop.set()
        self._client.disconnect()
        thread, self._thread = self._thread, None
        await asyncio.to_thread(thread.join, timeout_s + 2.0)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(
                    LinkError("the MQTT link was closed before the broker acknowledged")
                )
        self._pending.clear()
        self.connected = False

    def _network(self) -> None:
        """The network thread: connect, run paho's loop while connected, back off, repeat."""
        attempt = 0
        client = self._client
        while not self._stop.is_set():
            topic, payload = self._will()
            client.will_set(topic, payload, qos=QOS, retain=True)
            self._connacked = False
            try:
                client.reconnect()
            except OSError as exc:  # refused, unreachable, DNS, TLS handshake (ssl.SSLError)
                log.warning(
                    "MQTT: cannot connect to %s:%d: %s", self._config.host, self._config.port, exc
                )
            else:
                rc = paho.MQTT_ERR_SUCCESS
                # socket() is None once paho closed it (paho logs an error if looped then).
                while rc == paho.MQTT_ERR_SUCCESS and client.socket() is not None:
                    rc = client.loop(timeout=_LOOP_S)
            if self._connacked:
                attempt = 0
            if self._stop.is_set():
                break
            delay = backoff_delay(
                attempt,
                base=self._config.reconnect_min_s,
                cap=self._config.reconnect_max_s,
                uniform=self._uniform,
            )
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
            retain=bool(message.retain),
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
        log.info(
            "MQTT: connected to %s:%d (session present: %s)",
            self._config.host,
            self._config.port,
            session_present,
        )
        self._on_connect(session_present)

    def _disconnected(self, reason: str) -> None:
        was = self.connected
        self.connected = False
        if was:
            log.warning("MQTT: disconnected: %s", reason)
        self._on_disconnect(reason)

    def _published(self, mid: int) -> None:
        fut = self._pending.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> asyncio.Future[None]:
        """Hand a QoS 1 message to paho; the future resolves on the broker's PUBACK.

        While disconnected paho keeps the message and sends it after reconnecting.
        """
        if self._thread is None:
            raise LinkError("the MQTT link is not running")
        info = self._client.publish(topic, payload, qos=QOS, retain=retain)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            raise LinkError(f"publish to {topic} refused: {paho.error_string(info.rc)}")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending[info.mid] = fut
        return fut

    def ack(self, message: Incoming) -> None:
        """PUBACK ``message`` now (only if it came on the current connection; see module doc)."""
        if message.qos == 0 or message.generation != self.generation or not self.connected:
            return
        self._client.ack(message.mid, message.qos)

    @property
    def in_flight(self) -> int:
        """Publishes handed to paho and not yet acknowledged."""
        return len(self._pending)
