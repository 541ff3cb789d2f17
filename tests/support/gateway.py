"""Gateway test plumbing: a broker that can go down, the backend's side, configs, meters, runners.

* :func:`open_broker` — a private Mosquitto when the binary exists (with CI=true a missing
  one fails, see ``tests.support.broker``), else the embedded amqtt broker; either can be
  stopped and started again on the same port (outage tests).
* :class:`Backend` — what the backend would see: a plain paho client with a persistent
  session that records readings, token results, command results and gateway states,
  and publishes the retained backend state the gateway waits for.
* :func:`gateway_toml` — a complete config file for a test gateway.
* :func:`wall_meter` — a simulated meter on the wall clock (the gateway verifies token
  expiry with the wall clock, so meter and gateway must agree on the time).
* :func:`running_gateway` (in-process) and :class:`GatewayProcess` (``voltcredit
  gateway run`` as a real subprocess, for SIGKILL and crash-hook tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as pm

from firmware_protocol import mqtt
from firmware_protocol.mqtt_topics import (
    BACKEND_STATE_TOPIC,
    COMMAND_RESULT_FILTER,
    GATEWAY_STATE_FILTER,
    READINGS_FILTER,
    TOKEN_RESULT_FILTER,
    command_topic,
    token_topic,
)
from gateway.config import CRASH_ENV, GatewayConfig, RuntimeEnv, load_config
from gateway.service import Gateway
from meter_sim import core
from meter_sim.core import MeterConfig
from meter_sim.device import MeterDevice
from meter_sim.profiles import ConstantProfile
from tests.support.broker import Mosquitto, free_port, mosquitto_binary
from tests.support.meters import EUR, SIGNER, TARIFF, voltcredit_command

GW = "gw-test"


class WallClock:
    """Meter time = the host's wall clock (what the gateway checks token expiry against)."""

    def now(self) -> int:
        return int(time.time())


def wall_meter(
    meter_id: int, *, unit_id: int = 1, credit_milli: int = 10_000_000, watts: int = 0
) -> MeterDevice:
    """A simulated meter trusting the test key, on the wall clock; no load unless asked,
    so its credit changes only by tokens."""
    clock = WallClock()
    config = MeterConfig(meter_id=meter_id, currency=EUR)
    state = core.new_meter(
        config,
        tariff=TARIFF,
        trusted_keys={SIGNER.key_id: SIGNER.public_key_bytes()},
        now=clock.now(),
        credit_milli=credit_milli,
    )
    return MeterDevice(
        unit_id=unit_id,
        config=config,
        state=state,
        profile=ConstantProfile(watts),
        clock=clock,
        state_path=None,
    )


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[int]:
    """A TCP port that accepts connections and never answers (a hung meter); yields the port."""
    writers: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        while await reader.read(1024):
            pass

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for writer in writers:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        await server.wait_closed()


# ----------------------------------------------------------------------------- brokers


class TestBroker:
    """A broker on a fixed loopback port that a test can stop and start."""

    port: int
    kind: str

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError


class _MosquittoBroker(TestBroker):
    kind = "mosquitto"

    def __init__(self, workdir: Path, binary: str) -> None:
        self._m = Mosquitto(binary=binary, workdir=workdir)
        self.port = self._m.port

    async def start(self) -> None:
        await asyncio.to_thread(self._m.start)

    async def stop(self) -> None:
        await asyncio.to_thread(self._m.stop)


class _AmqttBroker(TestBroker):
    kind = "amqtt"

    def __init__(self) -> None:
        self.port = free_port()
        self._broker: Any = None

    async def start(self) -> None:
        from amqtt.broker import Broker

        self._broker = Broker(
            {
                "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
                "plugins": {
                    "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
                },
            }
        )
        await self._broker.start()  # listening when it returns (a bare TCP probe would leak
        # a socket inside amqtt, which waits for a CONNECT that never comes)

    async def stop(self) -> None:
        if self._broker is not None:
            await self._broker.shutdown()
            self._broker = None


@contextlib.asynccontextmanager
async def open_broker(workdir: Path) -> AsyncIterator[TestBroker]:
    """Mosquitto if installed (required with CI=true), else the embedded amqtt broker."""
    binary = mosquitto_binary()
    broker: TestBroker
    if binary is not None:
        workdir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - test set-up, instant
        broker = _MosquittoBroker(workdir, binary)
    else:
        broker = _AmqttBroker()
    await broker.start()
    try:
        yield broker
    finally:
        await broker.stop()


# ----------------------------------------------------------------------------- backend


@dataclass
class Backend:
    """The backend's side of the MQTT contract, recording everything gateways publish."""

    port: int
    client_id: str = "test-backend"
    username: str | None = None
    password: str | None = None
    online: bool = True
    batches: list[mqtt.ReadingBatch] = field(default_factory=list)
    results: list[mqtt.TokenResult] = field(default_factory=list)
    command_results: list[mqtt.CommandResult] = field(default_factory=list)
    states: list[mqtt.GatewayState] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _client: Any = None
    _connected: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        client = pm.Client(
            pm.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=False,
            protocol=pm.MQTTv311,
        )
        client.reconnect_delay_set(min_delay=0.1, max_delay=0.5)  # type: ignore[arg-type]
        client.on_connect = self._on_connect
        client.on_disconnect = lambda *_: self._connected.clear()
        client.on_message = self._on_message
        if self.username is not None:
            client.username_pw_set(self.username, self.password)
        self._client = client
        client.connect("127.0.0.1", self.port)
        client.loop_start()
        assert self._connected.wait(10), "the test backend could not connect"

    def stop(self) -> None:
        if self._client is not None:
            self._client.disconnect()  # first: loop_stop would wait out paho's 1 s select
            self._client.loop_stop()

    def _on_connect(self, client: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            return
        client.subscribe(
            [
                (f, 1)
                for f in (
                    READINGS_FILTER,
                    TOKEN_RESULT_FILTER,
                    COMMAND_RESULT_FILTER,
                    GATEWAY_STATE_FILTER,
                )
            ]
        )
        # After the subscriptions (same connection, so in order): the gateway may flush now.
        self._publish_state()
        self._connected.set()

    def _publish_state(self) -> None:
        state = mqtt.BackendState(online=self.online, ts=int(time.time()))
        self._client.publish(BACKEND_STATE_TOPIC, mqtt.encode(state), qos=1, retain=True)

    def set_online(self, online: bool) -> None:
        self.online = online
        self._publish_state()

    def _on_message(self, _c: Any, _u: Any, message: Any) -> None:
        decoded = mqtt.decode_payload(mqtt_topic(message.topic), bytes(message.payload))
        with self._lock:
            match decoded:
                case mqtt.ReadingBatch():
                    self.batches.append(decoded)
                case mqtt.TokenResult():
                    self.results.append(decoded)
                case mqtt.CommandResult():
                    self.command_results.append(decoded)
                case mqtt.GatewayState():
                    self.states.append(decoded)
                case _:  # pragma: no cover - not subscribed
                    pass

    # -- publishing as the backend does

    def deliver(self, meter: int, msg: bytes, token_id: int, *, gw: str = GW) -> None:
        delivery = mqtt.TokenDelivery(msg=msg, token_id=token_id, meter=meter)
        self._client.publish(token_topic(gw, meter), mqtt.encode(delivery), qos=1)

    def raw(self, topic: str, payload: bytes) -> None:
        self._client.publish(topic, payload, qos=1)

    def command(self, command: mqtt.Command, *, gw: str = GW) -> None:
        self._client.publish(command_topic(gw), mqtt.encode(command), qos=1)

    # -- what arrived

    def snapshot(
        self,
    ) -> tuple[list[mqtt.ReadingBatch], list[mqtt.TokenResult], list[mqtt.GatewayState]]:
        with self._lock:
            return list(self.batches), list(self.results), list(self.states)

    def results_for(self, meter: int, token_id: int) -> list[mqtt.TokenResult]:
        with self._lock:
            return [r for r in self.results if r.meter == meter and r.token_id == token_id]

    def distinct_seqs(self) -> list[int]:
        """Batch seqs in order of first arrival, duplicates (QoS 1 redeliveries) dropped."""
        seen: dict[int, None] = {}
        with self._lock:
            for b in self.batches:
                seen.setdefault(b.seq, None)
        return list(seen)


def mqtt_topic(name: str) -> Any:
    from firmware_protocol.mqtt_topics import parse_topic

    return parse_topic(name)


async def wait_until(
    predicate: Callable[[], object],
    timeout: float = 10.0,  # noqa: ASYNC109 - a test helper's deadline, reported by name
    what: str = "",
) -> Any:
    """Poll ``predicate`` until it returns something truthy; that value, or AssertionError."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running_backend(
    port: int, client_id: str = "test-backend", **credentials: str
) -> AsyncIterator[Backend]:
    backend = Backend(port, client_id=client_id, **credentials)  # type: ignore[arg-type]
    await asyncio.to_thread(backend.start)
    try:
        yield backend
    finally:
        await asyncio.to_thread(backend.stop)


# ----------------------------------------------------------------------------- configs


def gateway_toml(
    *,
    broker_port: int,
    store: Path,
    meters: Sequence[dict[str, Any]],
    poll_interval_s: float = 0.5,
    timeout_s: float = 0.5,
    retries: int = 1,
    backoff_min_s: float = 0.5,
    backoff_max_s: float = 2.0,
    extra: str = "",
) -> str:
    """A complete gateway config for tests (fast polls, short timeouts, quick reconnects)."""
    lines = [
        f'gateway_id = "{GW}"',
        f"poll_interval_s = {poll_interval_s}",
        "token_result_timeout_s = 3",
        extra,
        "[mqtt]",
        f'url = "mqtt://127.0.0.1:{broker_port}"',
        "reconnect_min_s = 0.1",
        "reconnect_max_s = 0.5",
        "keepalive_s = 5",
        "[store]",
        f'path = "{store}"',
        "[[trusted_keys]]",
        f"id = {SIGNER.key_id}",
        f'public_key = "{SIGNER.public_key_bytes().hex()}"',
        "[modbus]",
        f"timeout_s = {timeout_s}",
        f"retries = {retries}",
        f"backoff_min_s = {backoff_min_s}",
        f"backoff_max_s = {backoff_max_s}",
    ]
    for m in meters:
        lines.append("[[meters]]")
        for key, value in m.items():
            lines.append(f"{key} = {value!r}".replace("'", '"'))
    return "\n".join(lines) + "\n"


def tcp_meter(meter_id: int, port: int, unit: int = 1) -> dict[str, Any]:
    return {"id": meter_id, "driver": "modbus_tcp", "host": "127.0.0.1", "port": port, "unit": unit}


def write_config(path: Path, text: str) -> GatewayConfig:
    path.write_text(text)
    return load_config(path)


# ----------------------------------------------------------------------------- runners


@contextlib.asynccontextmanager
async def running_gateway(
    config: GatewayConfig, runtime: RuntimeEnv | None = None, **kwargs: Any
) -> AsyncIterator[Gateway]:
    """The gateway service in this event loop, stopped cleanly on exit."""
    gw = Gateway(config, runtime, **kwargs)
    stop = asyncio.Event()
    task = asyncio.create_task(gw.run(stop), name="gateway-under-test")
    ready = asyncio.ensure_future(gw.ready.wait())
    await asyncio.wait([task, ready], timeout=10, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        ready.cancel()
        task.result()  # raises what made it fail
    assert ready.done(), "the gateway did not become ready"
    try:
        yield gw
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


class GatewayProcess:
    """``voltcredit -v gateway run --config FILE`` as a subprocess (logs in ``log_path``)."""

    def __init__(
        self,
        config_path: Path,
        log_path: Path,
        *,
        crash_at: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.crash_at = crash_at
        self.extra_env = env or {}
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
        if self.crash_at is not None:
            env[CRASH_ENV] = self.crash_at
        env.update(self.extra_env)
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *voltcredit_command(),
                "-v",
                "gateway",
                "run",
                "--config",
                str(self.config_path),
                env=env,
                stdout=log,
                stderr=log,
            )

    async def wait(self, timeout: float = 15.0) -> int:  # noqa: ASYNC109 - a deadline, not cancellation
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def terminate(self, timeout: float = 15.0) -> int:  # noqa: ASYNC109 - as wait()
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        return await self.wait(timeout)

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")
