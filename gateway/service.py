"""The gateway's composition root: store, drivers, MQTT link and the named tasks that use them.

:meth:`Gateway.run` opens the store (``boot_seq`` + 1), builds the meter drivers,
starts the MQTT link and runs, in one :class:`asyncio.TaskGroup`:

==================  ==================================================================
``mqtt-dispatch``   routes received messages: tokens to the token desk (PUBACK after
                    storing), commands to the command desk, the backend's state to the gate
``poller``          polls every meter each interval into the outbox
``outbox-flusher``  publishes the outbox oldest first while connected and the backend is online
``token-worker``    drives stored tokens to the meter and their results to the broker
``command-handler`` executes commands and publishes their results
``watchdog``        feeds systemd's watchdog while the poller makes progress; status line
==================  ==================================================================

A failing task fails the gateway (systemd restarts it; the store makes that safe). On
stop it publishes its offline state (the Will covers a crash), disconnects and closes.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import time
from collections.abc import Callable, Mapping
from typing import Final

from firmware_protocol import mqtt
from firmware_protocol.errors import ProtocolError
from firmware_protocol.mqtt_topics import (
    BackendStateTopic,
    CommandTopic,
    TokenTopic,
    gateway_state_topic,
    gateway_subscriptions,
    parse_topic,
)
from gateway.commands import CommandDesk
from gateway.config import GatewayConfig, RuntimeEnv
from gateway.drivers.base import MeterDriver
from gateway.drivers.modbus import ModbusNetwork
from gateway.mqtt_link import Incoming, MqttLink
from gateway.polling import Flusher, Poller
from gateway.readings import birth_state, offline_state
from gateway.sdnotify import Notifier
from gateway.store import AsyncStore, Store
from gateway.tokens import TokenDesk

log = logging.getLogger(__name__)

#: How often stored tokens wait for an unreachable meter before the next attempt (at most).
TOKEN_RETRY_S: Final = 5.0
#: How long a clean stop waits for the PUBACKs of batches in flight.
DRAIN_S: Final = 3.0


def software_version() -> str:
    """The ``fw`` of the birth message: ``voltcredit-gateway <package version>``."""
    try:
        version = importlib.metadata.version("voltcredit")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - run from a bare checkout
        version = "0+unknown"
    return f"voltcredit-gateway {version}"[:64]


class Gateway:
    """One gateway process: build with a config, then ``await run(stop)``."""

    def __init__(
        self,
        config: GatewayConfig,
        runtime: RuntimeEnv | None = None,
        *,
        drivers: Mapping[int, MeterDriver] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.runtime = runtime or RuntimeEnv()
        self._given_drivers = drivers
        self._clock = clock
        self.notifier = Notifier(self.runtime.notify_socket)
        self.boot_seq = 0
        self.backend_online = False
        self.reachable: dict[int, bool] = {m.id: False for m in config.meters}
        self.ready = asyncio.Event()
        self._fw = software_version()
        self._state_topic = gateway_state_topic(config.gateway_id)
        # Built in run():
        self.link: MqttLink
        self.poller: Poller
        self.flusher: Flusher
        self.tokens: TokenDesk
        self.commands: CommandDesk

    def now(self) -> int:
        """The gateway's clock, Unix seconds (token expiry, result and state timestamps)."""
        return int(self._clock())

    # ------------------------------------------------------------------ life cycle

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set; raises if a task fails."""
        cfg = self.config
        store = await asyncio.to_thread(Store.open, cfg.store.path, now=self.now())
        astore = AsyncStore(store)
        network: ModbusNetwork | None = None
        try:
            self.boot_seq = await astore.run(store.begin_boot)
            known = await astore.run(store.meter_rows)
            for meter in self.reachable:
                if meter in known:
                    self.reachable[meter] = known[meter].reachable
            drivers = self._given_drivers
            if drivers is None:
                network = ModbusNetwork(
                    cfg.meters, token_result_timeout_s=cfg.token_result_timeout_s
                )
                drivers = network.drivers
            log.info(
                "gateway %s starting: boot %d, %d meter(s), store %s",
                cfg.gateway_id,
                self.boot_seq,
                len(drivers),
                cfg.store.path,
            )
            await self._run_with(astore, drivers, stop)
        finally:
            if network is not None:
                network.close()
            await astore.aclose()

    async def _run_with(
        self, astore: AsyncStore, drivers: Mapping[int, MeterDriver], stop: asyncio.Event
    ) -> None:
        cfg = self.config
        self.link = MqttLink(
            cfg.mqtt,
            client_id=cfg.gateway_id,
            subscriptions=gateway_subscriptions(cfg.gateway_id),
            will=self._will,
            farewell=self._offline,
            on_connect=self._on_connect,
            on_disconnect=self._on_disconnect,
        )
        self.tokens = TokenDesk(
            gw=cfg.gateway_id,
            store=astore,
            drivers=drivers,
            publisher=self.link,
            trusted=cfg.public_keys(),
            now=self.now,
            retry_s=min(TOKEN_RETRY_S, cfg.poll_interval_s),
            crash_at=self.runtime.crash_at,
        )
        self.poller = Poller(
            gw=cfg.gateway_id,
            store=astore,
            drivers=drivers,
            interval_s=cfg.poll_interval_s,
            cap_bytes=cfg.store.outbox_max_bytes,
            retention_s=cfg.store.token_retention_days * 86_400,
            now=self.now,
            on_cycle=self._after_poll,
        )
        self.flusher = Flusher(
            gw=cfg.gateway_id,
            store=astore,
            publisher=self.link,
            window=cfg.mqtt.max_inflight,
            interval_s=cfg.poll_interval_s,
            gate=lambda: self.link.connected and self.backend_online,
            now=self._clock,
        )
        self.commands = CommandDesk(
            gw=cfg.gateway_id,
            drivers=drivers,
            publisher=self.link,
            now=self.now,
            max_age_s=cfg.command_max_age_s,
            poll=self.poller.cycle,
            rebirth=self._publish_birth,
        )
        # The link is left last: it publishes the offline state, then disconnects.
        async with self.link, asyncio.TaskGroup() as tg:
            tasks = [
                tg.create_task(self._dispatch(), name="mqtt-dispatch"),
                tg.create_task(self.poller.run(), name="poller"),
                tg.create_task(self.flusher.run(), name="outbox-flusher"),
                tg.create_task(self.tokens.run(), name="token-worker"),
                tg.create_task(self.commands.run(), name="command-handler"),
                tg.create_task(self._watchdog(), name="watchdog"),
            ]
            self.notifier.ready(f"gateway {cfg.gateway_id} running, boot {self.boot_seq}")
            self.ready.set()
            await stop.wait()
            log.info("gateway %s stopping", cfg.gateway_id)
            self.notifier.stopping()
            flusher = tasks[2]
            for task in tasks:
                if task is not flusher:
                    task.cancel()
            # Let batches already handed to the link be acknowledged and deleted.
            self.flusher.drain()
            await asyncio.wait([flusher], timeout=DRAIN_S)
            flusher.cancel()

    # ------------------------------------------------------------------ state messages

    def _offline(self) -> tuple[str, bytes]:
        state = offline_state(boot_seq=self.boot_seq, now=self.now())
        return self._state_topic, mqtt.encode(state)

    def _will(self) -> tuple[str, bytes]:
        # Called on the MQTT network thread before each connection attempt; it only reads
        # immutable values and the clock.
        return self._offline()

    def _publish_birth(self) -> None:
        if not self.link.connected:
            return  # the next connection publishes a fresh one
        state = birth_state(
            boot_seq=self.boot_seq, now=self.now(), fw=self._fw, reachable=self.reachable
        )
        fut = self.link.publish(self._state_topic, mqtt.encode(state), retain=True)
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())

    def _on_connect(self, _session_present: bool) -> None:
        self._publish_birth()
        self.flusher.wake()

    def _on_disconnect(self, _reason: str) -> None:
        # After a reconnect the retained backend state arrives again; until then, hold.
        self.backend_online = False

    async def _after_poll(self, seqs: list[int], answered: dict[int, bool]) -> None:
        changed = {m: ok for m, ok in answered.items() if self.reachable.get(m) != ok}
        self.reachable.update(answered)
        if seqs:
            self.flusher.wake()
        if changed:
            for meter, ok in sorted(changed.items()):
                log.info("meter %d is now %s", meter, "reachable" if ok else "unreachable")
            self._publish_birth()
            if any(changed.values()):
                self.tokens.wake()

    # ------------------------------------------------------------------ tasks

    async def _dispatch(self) -> None:
        """Route every received message; a poison message is logged and acknowledged."""
        while True:
            incoming = await self.link.messages.get()
            try:
                await self._route(incoming)
            except ProtocolError as exc:
                log.warning("dropping a bad message on %s: %s", incoming.topic, exc)
                self.link.ack(incoming)

    async def _route(self, incoming: Incoming) -> None:
        topic = parse_topic(incoming.topic)
        match topic:
            case TokenTopic() if topic.gw == self.config.gateway_id:
                delivery = mqtt.decode_payload(topic, incoming.payload)
                if isinstance(delivery, mqtt.TokenDelivery):  # always, for a token topic
                    await self.tokens.receive(delivery)
                self.link.ack(incoming)
            case CommandTopic() if topic.gw == self.config.gateway_id:
                command = mqtt.decode_command(incoming.payload)
                await self.commands.queue.put((command, lambda: self.link.ack(incoming)))
            case BackendStateTopic():
                # An empty retained payload deletes the retained state (MQTT.md §3.1 rule 1).
                online = (
                    bool(incoming.payload) and mqtt.decode_backend_state(incoming.payload).online
                )
                if online != self.backend_online:
                    log.info("backend is %s", "online" if online else "offline")
                self.backend_online = online
                self.flusher.wake()
                self.link.ack(incoming)
            case _:
                log.warning("ignoring a message on %s", incoming.topic)
                self.link.ack(incoming)

    def healthy(self) -> bool:
        """The poller completed a cycle recently (its schedule plus generous slack)."""
        loop = asyncio.get_running_loop()
        return loop.time() - self.poller.last_progress <= 3 * self.config.poll_interval_s + 60

    def status_line(self) -> str:
        """One line for ``systemctl status``."""
        up = sum(self.reachable.values())
        return (
            f"meters {up}/{len(self.reachable)} reachable; mqtt "
            f"{'connected' if self.link.connected else 'disconnected'}; backend "
            f"{'online' if self.backend_online else 'offline'}; "
            f"{self.flusher.delivered} batches sent; last poll {self.poller.last_cycle_s:.1f} s"
        )

    async def _watchdog(self) -> None:
        """Feed systemd's watchdog at half its interval while healthy; update the status line."""
        usec = self.runtime.watchdog_usec
        period = 10.0 if usec is None else usec / 2_000_000
        while True:
            if self.healthy():
                if usec is not None:
                    self.notifier.watchdog()
            else:
                log.error("the poller has made no progress: not feeding the watchdog")
            self.notifier.status(self.status_line())
            await asyncio.sleep(period)
