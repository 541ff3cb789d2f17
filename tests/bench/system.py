"""The whole system as separate processes: top-up latency end to end, memory per process, ingest.

Set-up, as production runs it (each its own OS process, started with the ``voltcredit``
entry point, see :mod:`tests.support.procs`): a private Mosquitto on a free loopback port
(anonymous on 127.0.0.1: passwords and ACLs are the integration tests' business and cost
nothing per message here), ``voltcredit backend run`` on SQLite in a temporary directory
(its sandbox payment provider in its default *webhook* mode), ``voltcredit meter-sim run``
with ``--meters`` meters in real time and ``voltcredit gateway run`` polling them. The
backend's signing key, configuration files and the utility provisioned over the HTTP API
(tenant, partners, tariff, gateway, a customer with a supply account and a meter per
simulated meter) come from ``backend.demo``, the code ``voltcredit demo`` runs.

1. **Top-up latency end to end** at steady request rates (``--rates``, ``--seconds``
   each): a customer's ``POST /v1/accounts/{id}/topups`` (fresh Idempotency-Key) → the
   sandbox confirms the payment by its signed webhook → settlement issues the signed
   credit token → the dispatcher publishes it → the gateway verifies, stores and writes
   it to the meter, reads back and publishes the result → the backend marks the token
   APPLIED → ``GET /v1/accounts/{id}/tokens`` shows it. Each top-up goes to an account
   with none in flight. Milestones on one clock (this host's): the HTTP answer, the
   token row's ``created_at`` and ``completed_at`` (read-only SQLite), and when the token
   and its result passed the broker (a plain MQTT subscriber on ``vc/v1/#``).
2. **Memory and CPU** of every process during each phase: VmRSS (largest sample) and
   VmHWM from ``/proc/<pid>/status``, CPU from ``/proc/<pid>/stat``.
3. **Sustained readings/s into the ledger** (:func:`measure_ingest`, the hook for the
   ingest service of issue 6): a second fleet (``--ingest-meters``, 247 per TCP port of
   one meter-sim process) and gateway polling every ``--ingest-poll-s``; readings/s that
   leave the gateway through the broker (the subscriber) and readings/s that land in
   ``reading_batches`` (row count and ``sum(readings)``) and ``consumption_intervals``.
   Zero there means ingest is not running yet, and is reported as such.

Baselines in the same run: one bare MQTT hop (paho publisher → the same Mosquitto → paho
subscriber, QoS 1) and ``GET /healthz`` on the same backend.

``python -m tests.bench system [--quick] [--rates 2,10] [--seconds 30] ...`` (``--help``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import queue
import sqlite3
import statistics
import tempfile
import threading
import time
import uuid
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import aiohttp
import paho.mqtt.client as pm
from paho.mqtt.enums import CallbackAPIVersion

from backend.demo import (
    GATEWAY_ID,
    TARIFF_CODE,
    _backend_config,
    _backend_key,
    _gateway_config,
    _Provisioner,
    _voltcredit,
)
from backend.service.topup_runtime import SandboxMode, TopupSettings
from firmware_protocol import mqtt
from firmware_protocol.errors import ProtocolError
from firmware_protocol.mqtt_topics import parse_topic
from firmware_protocol.status import TokenStatus
from tests.bench.common import Report
from tests.support.broker import Mosquitto, free_port, mosquitto_binary
from tests.support.procs import ProcessDiedError, Processes, proc_stat

LATENCY_GATEWAY: Final = GATEWAY_ID  # the gateway id backend.demo._gateway_config writes
INGEST_GATEWAY: Final = "bench-ingest"
INGEST_FIRST_METER: Final = 2_000_001
UNITS_PER_PORT: Final = 247
TOPUP_MINOR: Final = 500
#: How long one top-up may take before it counts as an error.
TOPUP_TIMEOUT_S: Final = 30.0
#: Samples of the bare MQTT hop and of GET /healthz.
FLOOR_SAMPLES: Final = 200
PROVISION_CONCURRENCY: Final = 8


@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    """What one run measures (``--help``)."""

    meters: int
    rates: tuple[float, ...]
    seconds: float
    ingest_meters: int
    ingest_poll_s: float
    ingest_seconds: float


FULL: Final = Options(
    meters=50, rates=(2.0, 10.0), seconds=30.0, ingest_meters=2000, ingest_poll_s=5.0,
    ingest_seconds=60.0,
)  # fmt: skip
QUICK: Final = Options(
    meters=20, rates=(2.0, 10.0), seconds=10.0, ingest_meters=247, ingest_poll_s=2.0,
    ingest_seconds=15.0,
)  # fmt: skip


def parse_options(argv: Sequence[str]) -> Options:
    """``--quick`` picks the short defaults; every other flag overrides one value."""
    p = argparse.ArgumentParser(
        prog="python -m tests.bench system",
        description="The whole system as separate processes (see tests/bench/system.py).",
    )
    p.add_argument("--quick", action="store_true", help="short run (under 2 minutes)")
    p.add_argument("--meters", type=int, help=f"latency fleet, 1..247 (default {FULL.meters})")
    p.add_argument("--rates", help="top-ups per second, comma-separated (default 2,10)")
    p.add_argument("--seconds", type=float, help=f"per rate (default {FULL.seconds:g})")
    p.add_argument(
        "--ingest-meters", type=int, help=f"ingest fleet, 0 skips (default {FULL.ingest_meters})"
    )
    p.add_argument(
        "--ingest-poll-s",
        type=float,
        help=f"ingest gateway's poll (default {FULL.ingest_poll_s:g})",
    )
    p.add_argument(
        "--ingest-seconds", type=float, help=f"ingest window (default {FULL.ingest_seconds:g})"
    )
    args = p.parse_args(list(argv))
    base = QUICK if args.quick else FULL
    rates = base.rates
    if args.rates is not None:
        try:
            rates = tuple(float(r) for r in args.rates.split(","))
        except ValueError:
            p.error(f"--rates: not a list of numbers: {args.rates!r}")
    opts = Options(
        meters=base.meters if args.meters is None else args.meters,
        rates=rates,
        seconds=base.seconds if args.seconds is None else args.seconds,
        ingest_meters=base.ingest_meters if args.ingest_meters is None else args.ingest_meters,
        ingest_poll_s=base.ingest_poll_s if args.ingest_poll_s is None else args.ingest_poll_s,
        ingest_seconds=base.ingest_seconds if args.ingest_seconds is None else args.ingest_seconds,
    )
    if not 1 <= opts.meters <= UNITS_PER_PORT:
        p.error(f"--meters must be 1..{UNITS_PER_PORT} (one Modbus TCP port)")
    if not all(0 < r <= 100 for r in opts.rates) or opts.seconds <= 0:
        p.error("--rates must be in (0, 100] and --seconds > 0")
    if not 0 <= opts.ingest_meters <= mqtt.MAX_METERS_PER_GATEWAY:
        p.error(f"--ingest-meters must be 0..{mqtt.MAX_METERS_PER_GATEWAY} (one gateway)")
    if not 0.1 <= opts.ingest_poll_s <= 86_400 or opts.ingest_seconds <= 0:
        p.error("--ingest-poll-s must be 0.1..86400 (gateway/config.py) and --ingest-seconds > 0")
    return opts


# ----------------------------------------------------------------------- small helpers


def _pct(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def _utc_ts(text: str | None) -> float | None:
    """A SQLite UTCDateTime column (naive UTC text, backend/adapters/db/base.py) as Unix s."""
    if text is None:
        return None
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


class DbProbe:
    """Read-only queries on the backend's SQLite file while the backend writes it."""

    def __init__(self, path: Path) -> None:
        self.uri = f"file:{path}?mode=ro"

    def rows(self, sql: str, args: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        with contextlib.closing(sqlite3.connect(self.uri, uri=True, timeout=10)) as conn:
            return conn.execute(sql, tuple(args)).fetchall()

    async def arows(self, sql: str, args: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        return await asyncio.to_thread(self.rows, sql, args)

    async def tokens_in_flight(self) -> int:
        rows = await self.arows("SELECT count(*) FROM tokens WHERE status IN ('PENDING', 'SENT')")
        return int(rows[0][0])


# ----------------------------------------------------------------------- the MQTT observer


def _mqtt_client(name: str) -> Any:
    return pm.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"bench-{name}-{uuid.uuid4().hex[:8]}",
        protocol=pm.MQTTv311,
    )


def _connect_and_subscribe(client: Any, port: int, topic: str) -> None:
    """Connect, start paho's thread, subscribe at QoS 1 and wait for the SUBACK."""
    subscribed = threading.Event()
    client.on_subscribe = lambda *_: subscribed.set()
    client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
    client.connect("127.0.0.1", port)
    client.loop_start()
    if not subscribed.wait(10):
        raise RuntimeError(f"no SUBACK for {topic} from the broker on port {port}")


class Observer:
    """A plain subscriber on ``vc/v1/#``: when tokens and results pass the broker, readings.

    Times are ``time.time()`` in paho's thread as the message arrives; one broker hop
    after the publisher sent it (the baseline measures that hop).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._client = _mqtt_client("observer")
        self._client.on_message = self._on_message
        #: (meter, token id) → when the signed message first passed the broker.
        self.token_sent: dict[tuple[int, int], float] = {}
        #: (meter, token id) → when its first final result passed the broker, and its status.
        self.token_final: dict[tuple[int, int], tuple[float, TokenStatus]] = {}
        self.online: dict[str, bool] = {}
        self.batches: dict[str, int] = defaultdict(int)
        self.readings: dict[str, int] = defaultdict(int)
        #: (gateway, seq) → when the readings batch passed the broker, and its readings.
        self.batch_seen: dict[tuple[str, int], tuple[float, int]] = {}
        self.malformed = 0
        self._waiters: dict[int, asyncio.Event] = {}

    def start(self, port: int) -> None:
        _connect_and_subscribe(self._client, port, "vc/v1/#")

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def expect_result(self, meter: int) -> asyncio.Event:
        """An event set when the next final token result of ``meter`` passes the broker."""
        event = asyncio.Event()
        self._waiters[meter] = event
        return event

    def _wake(self, meter: int) -> None:
        event = self._waiters.pop(meter, None)
        if event is not None:
            event.set()

    def _on_message(self, _client: Any, _userdata: Any, message: Any) -> None:
        now = time.time()
        try:
            decoded = mqtt.decode_payload(parse_topic(message.topic), message.payload)
        except ProtocolError:
            self.malformed += 1
            return
        match decoded:
            case mqtt.TokenDelivery(meter=meter, token_id=token_id):
                self.token_sent.setdefault((meter, token_id), now)
            case mqtt.TokenResult(meter=meter, token_id=token_id, status=status) if status.final:
                self.token_final.setdefault((meter, token_id), (now, status))
                self._loop.call_soon_threadsafe(self._wake, meter)
            case mqtt.ReadingBatch(gw=gw, seq=seq, readings=readings):
                self.batch_seen.setdefault((gw, seq), (now, len(readings)))
                self.batches[gw] += 1
                self.readings[gw] += len(readings)
            case mqtt.GatewayState(online=online):
                self.online[message.topic.split("/")[3]] = online
            case _:
                pass


def mqtt_hop_floor(port: int, samples: int = FLOOR_SAMPLES) -> list[float]:
    """Seconds from paho publish (QoS 1) to the message reaching a paho subscriber."""
    arrived: queue.SimpleQueue[float] = queue.SimpleQueue()
    sub = _mqtt_client("floor-sub")
    sub.on_message = lambda *_: arrived.put(time.perf_counter())
    _connect_and_subscribe(sub, port, "bench/floor")
    pub = _mqtt_client("floor-pub")
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    hops = []
    try:
        for _ in range(samples):
            start = time.perf_counter()
            pub.publish("bench/floor", b"x" * 96, qos=1)  # a credit token is 96 bytes
            hops.append(arrived.get(timeout=10) - start)
            time.sleep(0.005)
    finally:
        for client in (pub, sub):
            client.disconnect()
            client.loop_stop()
    return hops


# ----------------------------------------------------------------------- process usage


@dataclass
class Usage:
    """Per process over one phase: largest VmRSS sampled, VmHWM at the end, CPU share."""

    rss_kib: dict[str, int] = field(default_factory=dict)
    hwm_kib: dict[str, int] = field(default_factory=dict)
    cpu_pct: dict[str, float] = field(default_factory=dict)


@contextlib.asynccontextmanager
async def sampling(pids: dict[str, int], every_s: float = 0.5) -> AsyncIterator[Usage]:
    """Sample the processes' memory while the block runs; fill the Usage at its end."""
    usage = Usage()
    first = {name: proc_stat(pid) for name, pid in pids.items()}
    started = time.monotonic()
    usage.rss_kib = {name: s.rss_kib for name, s in first.items()}
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every_s)
            for name, pid in pids.items():
                with contextlib.suppress(OSError):  # it is gone: the caller's check says so
                    usage.rss_kib[name] = max(usage.rss_kib[name], proc_stat(pid).rss_kib)

    task = asyncio.create_task(sample(), name="memory-sampler")
    try:
        yield usage
    finally:
        stop.set()
        await task
        wall = time.monotonic() - started
        for name, pid in pids.items():
            with contextlib.suppress(OSError):
                last = proc_stat(pid)
                usage.hwm_kib[name] = last.hwm_kib
                usage.cpu_pct[name] = 100 * (last.cpu_s - first[name].cpu_s) / wall


def report_usage(report: Report, phase: str, usage: Usage) -> None:
    for name in usage.hwm_kib:
        report.add(
            f"memory {name} ({phase})",
            usage.rss_kib[name] / 1024,
            "MiB RSS",
            peak_hwm_mib=round(usage.hwm_kib[name] / 1024, 1),
            cpu_pct_of_core=round(usage.cpu_pct[name], 1),
        )


# ----------------------------------------------------------------------- the system


@dataclass
class System:
    """The running system: where it is and how to talk to it."""

    tmp: Path
    procs: Processes
    mqtt_port: int
    observer: Observer
    http: aiohttp.ClientSession
    key: tuple[int, str]
    public_keys: Path
    #: Where the simulated meters keep their state (see :func:`_simulator_state`).
    meter_state: Path
    api: str = ""
    admin: str = ""
    db: DbProbe | None = None
    world: dict[str, Any] = field(default_factory=dict)

    @property
    def directory(self) -> Path:
        return self.tmp / "system"

    async def wait(self, what: str, done: Callable[[], bool], timeout_s: float) -> float:
        """Wait for ``done()`` (checking that no process died); the seconds it took."""
        start = time.monotonic()
        while not done():
            self.procs.check()
            if time.monotonic() - start > timeout_s:
                raise TimeoutError(f"{what}: not within {timeout_s:g} s")
            await asyncio.sleep(0.05)
        return time.monotonic() - start

    async def post(self, path: str, body: dict[str, Any], *, key: str) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {key}"}
        async with self.http.post(self.api + path, json=body, headers=headers) as response:
            data: dict[str, Any] = await response.json(content_type=None)
            if response.status not in (200, 201):
                raise RuntimeError(f"POST {path}: {response.status} {data}")
            return data

    async def drain_tokens(self, timeout_s: float) -> float:
        """Wait until no token is in flight; the seconds it took."""
        assert self.db is not None
        start = time.monotonic()
        while await self.db.tokens_in_flight():
            self.procs.check()
            if time.monotonic() - start > timeout_s:
                raise TimeoutError(f"tokens still in flight after {timeout_s:g} s")
            await asyncio.sleep(0.2)
        return time.monotonic() - start

    async def start_fleet(self, name: str, meters: int, first: int, *extra: str) -> list[int]:
        """``voltcredit meter-sim run`` trusting the backend's key; its TCP ports."""
        self.procs.start(
            name,
            [
                *_voltcredit(),
                "meter-sim",
                "run",
                "--meters",
                str(meters),
                "--meter-id",
                str(first),
                "--trusted-key",
                str(self.public_keys),
                "--credit",
                "20.00",
                "--state-dir",
                str(self.meter_state / name),
                "--status-every",
                "0",
                "--json",
                *extra,
            ],
        )
        line = await asyncio.to_thread(self.procs.wait_for_line, name, '{"event": "ready"', 120)
        ports: list[int] = json.loads(line)["ports"]
        return ports

    async def start_gateway(self, name: str, gateway_id: str, config: Path) -> None:
        self.procs.start(name, [*_voltcredit(), "gateway", "run", "--config", str(config)])
        await self.wait(
            f"{gateway_id} online", lambda: self.observer.online.get(gateway_id, False), 60
        )


async def _start_backend(system: System) -> None:
    directory = system.directory
    http_port = free_port()
    config, system.admin = _backend_config(directory, http_port, system.mqtt_port)
    system.api = f"http://127.0.0.1:{http_port}"
    system.db = DbProbe(directory / "voltcredit.db")
    system.procs.start("backend", [*_voltcredit(), "backend", "run", "--config", str(config)])

    async def ready() -> bool:
        with contextlib.suppress(aiohttp.ClientError):
            async with system.http.get(system.api + "/readyz") as response:
                return response.status == 200
        return False

    start = time.monotonic()
    while not await ready():
        system.procs.check()
        if time.monotonic() - start > 60:
            raise TimeoutError("the backend did not answer /readyz in 60 s")
        await asyncio.sleep(0.2)


# ----------------------------------------------------------------------- top-up latency


@dataclass(frozen=True, slots=True)
class Customer:
    """A logged-in customer's supply account and its meter."""

    account_id: int
    meter: int
    auth: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Sample:
    """One top-up: its ids and the times (Unix s) this process saw."""

    meter: int
    payment_id: str
    msg_id: int
    sent: float  #: request sent
    answered: float  #: 201 received
    visible: float  #: GET tokens showed APPLIED


async def _login_all(system: System) -> list[Customer]:
    tenant = system.world["tenant_id"]
    customers = []
    for c in system.world["customers"]:
        login = await system.post(
            "/v1/auth/login",
            {"tenant_id": tenant, "email": c["email"], "password": c["password"]},
            key="",
        )
        customers.append(Customer(c["account_id"], c["meter"], f"Bearer {login['token']}"))
    return customers


async def _topup(system: System, customer: Customer) -> Sample:
    """One top-up, from the request to APPLIED in the API (module docstring, part 1)."""
    result = system.observer.expect_result(customer.meter)
    headers = {"Authorization": customer.auth, "Idempotency-Key": uuid.uuid4().hex}
    sent = time.time()
    deadline = sent + TOPUP_TIMEOUT_S
    async with system.http.post(
        f"{system.api}/v1/accounts/{customer.account_id}/topups",
        json={"amount_minor": TOPUP_MINOR, "currency": "EUR"},
        headers=headers,
    ) as response:
        body = await response.json(content_type=None)
        if response.status != 201:
            raise RuntimeError(f"top-up: {response.status} {body}")
    answered = time.time()
    payment_id = body["payment_id"]
    # Poll the API only once a result for this meter passed the broker: polling from the
    # start would load the backend with ~20 reads per top-up and distort what we measure.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(result.wait(), deadline - time.time())
    url = f"{system.api}/v1/accounts/{customer.account_id}/tokens?limit=5"
    while True:
        async with system.http.get(url, headers={"Authorization": customer.auth}) as response:
            items = (await response.json())["items"]
        mine = [t for t in items if t["payment_id"] == payment_id]
        if mine and mine[0]["status"] == "APPLIED":
            return Sample(
                meter=customer.meter,
                payment_id=payment_id,
                msg_id=mine[0]["msg_id"],
                sent=sent,
                answered=answered,
                visible=time.time(),
            )
        if mine and mine[0]["status"] == "REJECTED":
            raise RuntimeError(f"token rejected: {mine[0]}")
        if time.time() > deadline:
            raise TimeoutError(f"top-up {payment_id} not APPLIED in {TOPUP_TIMEOUT_S:g} s")
        await asyncio.sleep(0.01)


@dataclass
class Steady:
    """The outcome of one steady-rate phase."""

    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    #: Arrivals dropped because every account had a top-up in flight.
    skipped: int = 0


async def steady_topups(
    system: System, customers: list[Customer], rate: float, seconds: float
) -> Steady:
    """Start a top-up every 1/rate s (open loop) for ``seconds``; wait for all of them."""
    out = Steady()
    idle = deque(customers)
    loop = asyncio.get_running_loop()

    async def one(customer: Customer) -> None:
        try:
            out.samples.append(await _topup(system, customer))
        except (RuntimeError, TimeoutError, aiohttp.ClientError) as exc:
            out.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            idle.append(customer)

    tasks = []
    start = loop.time()
    for i in range(round(rate * seconds)):
        await asyncio.sleep(max(0.0, start + i / rate - loop.time()))
        system.procs.check()
        if not idle:
            out.skipped += 1
            continue
        tasks.append(asyncio.create_task(one(idle.popleft()), name=f"topup-{i}"))
    await asyncio.gather(*tasks)
    return out


#: Milestones of a top-up, each as seconds after the request was sent.
MILESTONES: Final = (
    ("answered", "API answered 201 (payment PENDING)"),
    ("issued", "payment settled, token issued (sandbox webhook)"),
    ("published", "token passed the broker (dispatcher published)"),
    ("applied", "APPLIED result passed the broker (meter has it)"),
    ("recorded", "backend recorded APPLIED (tokens.completed_at)"),
    ("visible", "APPLIED visible in GET /v1/accounts/{id}/tokens"),
)


async def milestones(system: System, samples: list[Sample]) -> dict[str, list[float]]:
    """Each milestone's offsets from the request (s), over the samples that have them all."""
    assert system.db is not None
    rows = await system.db.arows(
        "SELECT payment_id, created_at, completed_at FROM tokens WHERE kind = 'CREDIT'"
    )
    db = {uuid.UUID(str(p)).hex: (_utc_ts(c), _utc_ts(d)) for p, c, d in rows}
    out: dict[str, list[float]] = {name: [] for name, _ in MILESTONES}
    for s in samples:
        issued, recorded = db.get(uuid.UUID(s.payment_id).hex, (None, None))
        published = system.observer.token_sent.get((s.meter, s.msg_id))
        final = system.observer.token_final.get((s.meter, s.msg_id))
        if issued is None or recorded is None or published is None or final is None:
            continue
        times = {
            "answered": s.answered,
            "issued": issued,
            "published": published,
            "applied": final[0],
            "recorded": recorded,
            "visible": s.visible,
        }
        for name, at in times.items():
            out[name].append(at - s.sent)
    return out


async def latency_phase(
    system: System, customers: list[Customer], rate: float, seconds: float
) -> tuple[Steady, Usage, dict[str, list[float]]]:
    async with sampling(system.procs.pids) as usage:
        run = await steady_topups(system, customers, rate, seconds)
    if not run.samples:
        raise RuntimeError(f"no top-up completed at {rate:g}/s: {run.errors[:3]}")
    return run, usage, await milestones(system, run.samples)


def report_latency(
    report: Report, rate: float, run: Steady, marks: dict[str, list[float]], hop_p50: float
) -> None:
    e2e = [s.visible - s.sent for s in run.samples]
    report.add(
        f"top-up end to end at {rate:g}/s: request -> APPLIED in the API",
        statistics.median(e2e) * 1000,
        "ms p50",
        p99_ms=_ms(_pct(e2e, 0.99)),
        max_ms=_ms(max(e2e)),
        n=len(e2e),
        errors=len(run.errors),
        skipped=run.skipped,
    )
    for name, label in MILESTONES:
        values = marks[name]
        if not values:
            continue
        extra: dict[str, Any] = {"p99_ms": _ms(_pct(values, 0.99))}
        if name == "applied":
            leg = [a - p for a, p in zip(marks["applied"], marks["published"], strict=True)]
            extra["gateway_leg_p50_ms"] = _ms(statistics.median(leg))
            extra["vs_mqtt_hop"] = round(statistics.median(leg) / hop_p50, 1)
        report.add(
            f"  {rate:g}/s, from request: {label}",
            statistics.median(values) * 1000,
            "ms p50",
            **extra,
        )
    if run.errors:
        report.notes.append(f"{rate:g}/s: {len(run.errors)} top-up(s) failed, e.g. {run.errors[0]}")


# ----------------------------------------------------------------------- ingest (hook)


@dataclass(frozen=True, slots=True)
class IngestCounts:
    """What ingest has stored for one fleet so far (reading_batches, consumption_intervals)."""

    batches: int
    readings: int
    intervals: int


async def ingest_counts(db: DbProbe, gateway_id: str, first_meter: int) -> IngestCounts:
    [(batches, readings)] = await db.arows(
        "SELECT count(*), coalesce(sum(readings), 0) FROM reading_batches WHERE gateway_id = ?",
        (gateway_id,),
    )
    [(intervals,)] = await db.arows(
        "SELECT count(*) FROM consumption_intervals WHERE meter_id >= ?", (first_meter,)
    )
    return IngestCounts(int(batches), int(readings), int(intervals))


async def quarantines(db: DbProbe, first_meter: int, since: float) -> dict[str, int]:
    """READING_QUARANTINED alerts of the fleet raised since ``since`` (Unix s), by reason."""
    # UTCDateTime on SQLite is naive UTC text, which sorts as it compares.
    after = datetime.fromtimestamp(since, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    rows = await db.arows(
        "SELECT json_extract(detail, '$.reason'), count(*) FROM alerts"
        " WHERE kind = 'READING_QUARANTINED' AND meter_id >= ? AND created_at >= ?"
        " GROUP BY 1",
        (first_meter, after),
    )
    return {str(reason): int(n) for reason, n in rows}


async def measure_ingest(
    system: System,
    report: Report,
    *,
    gateway_id: str,
    first_meter: int,
    meters: int,
    poll_s: float,
    seconds: float,
) -> None:
    """HOOK (issue 6): sustained readings/s from the fleet through the gateway and the broker
    into the ledger, over ``seconds`` of steady state.

    Upstream: readings/s the subscriber saw leave the gateway through the broker. Into the
    ledger: growth of ``reading_batches`` (rows, ``sum(readings)``) and of
    ``consumption_intervals`` for this fleet, read with a read-only SQLite connection while
    the backend writes. Nothing is inferred: with no rows, ingest is not running and the
    figure is 0.
    """
    assert system.db is not None
    obs = system.observer
    # A whole number of poll cycles, from the middle of one to the middle of another:
    # counting whole batches (up to 1,000 readings each) would otherwise swing the rate.
    window = max(1, round(seconds / poll_s)) * poll_s
    batches_before = obs.batches[gateway_id]
    await system.wait(
        f"a readings batch from {gateway_id}",
        lambda: obs.batches[gateway_id] > batches_before,
        2 * poll_s + 30,
    )
    await asyncio.sleep(poll_s / 2)
    started = time.time()
    before = await ingest_counts(system.db, gateway_id, first_meter)
    t0 = time.monotonic()
    async with sampling(system.procs.pids) as usage:
        while time.monotonic() - t0 < window:
            system.procs.check()
            await asyncio.sleep(0.2)
    wall, ended = time.monotonic() - t0, time.time()
    # The window's batches, as they passed the broker: (seq → (when, readings)).
    published = {
        seq: seen
        for (gw, seq), seen in list(obs.batch_seen.items())
        if gw == gateway_id and started <= seen[0] < ended
    }
    # Ingest lags the broker a little: give it time to take this window's last batch.
    await asyncio.sleep(min(poll_s, 5.0))
    after = await ingest_counts(system.db, gateway_id, first_meter)
    rows = await system.db.arows(
        "SELECT seq, readings, received_at FROM reading_batches WHERE gateway_id = ?",
        (gateway_id,),
    )
    ingested = {int(seq): (int(n), _utc_ts(text)) for seq, n, text in rows if seq in published}
    in_window = await quarantines(system.db, first_meter, started)
    seen = sum(n for _, n in published.values())
    stored = sum(n for n, _ in ingested.values())
    lags = [
        received - published[seq][0]
        for seq, (_, received) in ingested.items()
        if received is not None
    ]
    report.add(
        f"readings/s leaving the gateway through Mosquitto ({meters} meters)",
        seen / wall,
        "readings/s",
        batches_per_s=round(len(published) / wall, 2),
        offered_per_s=round(meters / poll_s, 1),
    )
    running = after.batches > 0
    report.add(
        "readings/s ingested into the ledger (reading_batches)",
        stored / wall,
        "readings/s",
        batches_per_s=round(len(ingested) / wall, 2),
        intervals_per_s=round((after.intervals - before.intervals) / wall, 1),
        vs_published=round(stored / seen, 2) if seen else 0.0,
        quarantine_alerts=sum(in_window.values()),
        backend_cpu_us_per_reading=(
            round(usage.cpu_pct["backend"] / 100 * wall / stored * 1e6) if stored else None
        ),
        note="" if running else "ingest not running (reading_batches empty)",
    )
    if lags:
        report.add(
            "  batch on the broker -> ingest took it (reading_batches.received_at)",
            statistics.median(lags) * 1000,
            "ms p50",
            max_ms=_ms(max(lags)),
            batches=len(lags),
        )
    if in_window:
        report.notes.append(f"ingest quarantined readings in the window: {in_window}")
    if not running:
        report.notes.append(
            f"ingest not running: reading_batches has no row of {gateway_id} after "
            f"{wall:.0f} s of readings ({seen} published); the ingest figure is 0"
        )
    report_usage(report, f"ingest, {meters} meters", usage)


def _ingest_gateway_toml(
    system: System, path: Path, ports: list[int], meters: int, poll_s: float
) -> Path:
    lines = [
        f'gateway_id = "{INGEST_GATEWAY}"',
        f"poll_interval_s = {poll_s}",
        "[mqtt]",
        f'url = "mqtt://127.0.0.1:{system.mqtt_port}"',
        "[store]",
        f'path = "{path.parent / "ingest-gateway.sqlite"}"',
        "[[trusted_keys]]",
        f"id = {system.key[0]}",
        f'public_key = "{system.key[1]}"',
    ]
    for i in range(meters):
        lines += [
            "[[meters]]",
            f"id = {INGEST_FIRST_METER + i}",
            'driver = "modbus_tcp"',
            'host = "127.0.0.1"',
            f"port = {ports[i // UNITS_PER_PORT]}",
            f"unit = {i % UNITS_PER_PORT + 1}",
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


async def ingest_phase(system: System, report: Report, opts: Options) -> None:
    """A second fleet and gateway; provisioned over the API; then :func:`measure_ingest`."""
    n = opts.ingest_meters
    ports = await system.start_fleet(
        "meter-sim-ingest",
        n,
        INGEST_FIRST_METER,
        "--port", "0",
        "--per-port", str(UNITS_PER_PORT),
        # Real time: the backend quarantines readings stamped ahead of its clock
        # (ingest.max_clock_ahead_s), as it must for a real meter.
        "--speed", "1",
        "--profile", "household",
        "--profile", "constant:800",
    )  # fmt: skip
    config = _ingest_gateway_toml(
        system, system.directory / "ingest-gateway.toml", ports, n, opts.ingest_poll_s
    )
    # Gateway before provisioning: the tariff message each new meter gets then finds the
    # gateway's session at the broker (published before it, it would wait for a re-send).
    await system.start_gateway("gateway-ingest", INGEST_GATEWAY, config)
    tenant_key = system.world["tenant_key"]
    start = time.monotonic()
    await system.post("/v1/gateways", {"id": INGEST_GATEWAY}, key=tenant_key)
    customer = await system.post(
        "/v1/customers",
        {"name": "Ingest Bench", "email": "ingest@bench.example", "password": uuid.uuid4().hex},
        key=tenant_key,
    )
    gate = asyncio.Semaphore(PROVISION_CONCURRENCY)

    async def provision(i: int) -> None:
        async with gate:
            account = await system.post(
                "/v1/supply-accounts",
                {
                    "customer_id": customer["id"],
                    "tariff_code": TARIFF_CODE,
                    "label": f"Bench feeder, meter {i + 1}",
                    "debt_limit_minor": 500,
                },
                key=tenant_key,
            )
            await system.post(
                "/v1/meters",
                {
                    "serial": INGEST_FIRST_METER + i,
                    "gateway_id": INGEST_GATEWAY,
                    "supply_account_id": account["id"],
                    "modbus_unit": i % UNITS_PER_PORT + 1,
                },
                key=tenant_key,
            )

    await asyncio.gather(*(provision(i) for i in range(n)))
    provisioned_s = time.monotonic() - start
    report.add(
        "provisioning over the API: supply account + meter (tariff queued)",
        n / provisioned_s,
        "meters/s",
        meters=n,
        concurrency=PROVISION_CONCURRENCY,
    )
    drained_s = await system.drain_tokens(timeout_s=max(120.0, n / 5))
    report.add(
        "tariff messages to a new fleet, provisioned -> all APPLIED",
        n / max(provisioned_s + drained_s, 1e-9),
        "messages/s",
        meters=n,
        tail_after_provisioning_s=round(drained_s, 1),
    )
    # One poll cycle so every meter has reported at least once before the window opens.
    await asyncio.sleep(opts.ingest_poll_s)
    assert system.db is not None
    setup = await quarantines(system.db, INGEST_FIRST_METER, since=0)
    if setup:
        # The simulated meters start on meter_sim's default tariff and switch when the
        # backend's signed tariff message arrives: ingest flags that transition.
        report.notes.append(f"ingest quarantine alerts while the fleet came up: {setup}")
    await measure_ingest(
        system,
        report,
        gateway_id=INGEST_GATEWAY,
        first_meter=INGEST_FIRST_METER,
        meters=n,
        poll_s=opts.ingest_poll_s,
        seconds=opts.ingest_seconds,
    )


# ----------------------------------------------------------------------- the run


async def _run_system(system: System, report: Report, opts: Options) -> None:
    await _start_backend(system)
    modbus_port = free_port()
    await system.start_fleet(
        "meter-sim", opts.meters, 1_000_001, "--port", str(modbus_port), "--profile", "constant:500"
    )
    config = _gateway_config(
        system.directory, system.key, opts.meters, modbus_port, system.mqtt_port
    )
    await system.start_gateway("gateway", LATENCY_GATEWAY, config)
    start = time.monotonic()
    system.world = await _Provisioner(system.http, system.api, system.admin, system.directory).run(
        opts.meters
    )
    drained_s = await system.drain_tokens(timeout_s=120)
    report.notes.append(
        f"set-up: {opts.meters} customers, supply accounts and meters provisioned over the API "
        f"and their tariff messages applied in {time.monotonic() - start:.1f} s "
        f"({drained_s:.1f} s of it waiting for the last tariff results)"
    )
    customers = await _login_all(system)

    hops = await asyncio.to_thread(mqtt_hop_floor, system.mqtt_port)
    hop_p50 = statistics.median(hops)
    report.add(
        "baseline: bare MQTT hop, paho -> Mosquitto -> paho, QoS 1",
        hop_p50 * 1000,
        "ms p50",
        p99_ms=round(_pct(hops, 0.99) * 1000, 2),
        n=len(hops),
    )
    health = []
    for _ in range(FLOOR_SAMPLES):
        t = time.perf_counter()
        async with system.http.get(system.api + "/healthz") as response:
            await response.read()
        health.append(time.perf_counter() - t)
    report.add(
        "baseline: GET /healthz round trip, same backend",
        statistics.median(health) * 1000,
        "ms p50",
        p99_ms=round(_pct(health, 0.99) * 1000, 2),
    )

    for rate in opts.rates:
        print(f"  ... {rate:g} top-ups/s for {opts.seconds:g} s", flush=True)
        run, usage, marks = await latency_phase(system, customers, rate, opts.seconds)
        report_latency(report, rate, run, marks, hop_p50)
        report_usage(report, f"top-ups {rate:g}/s", usage)

    if opts.ingest_meters:
        print(
            f"  ... ingest: {opts.ingest_meters} meters polled every {opts.ingest_poll_s:g} s, "
            f"{opts.ingest_seconds:g} s window",
            flush=True,
        )
        try:
            await ingest_phase(system, report, opts)
        except (ProcessDiedError, TimeoutError, RuntimeError, aiohttp.ClientError) as exc:
            # The latency and memory figures above stand; say why this one is missing.
            first_line = str(exc).splitlines()[0]
            print(f"  ingest phase FAILED: {first_line}", flush=True)
            report.notes.append(f"ingest phase failed, no ingest figures: {exc}")


async def _bench(tmp: Path, meter_state: Path, report: Report, opts: Options) -> None:
    binary = mosquitto_binary()
    if binary is None:
        raise RuntimeError(
            "the system benchmark needs the mosquitto binary (apt install mosquitto)"
        )
    (tmp / "mosquitto").mkdir()
    (tmp / "system").mkdir()
    broker = Mosquitto(binary=binary, workdir=tmp / "mosquitto")
    await asyncio.to_thread(broker.start)
    try:
        assert broker.proc is not None
        with Processes(tmp / "logs") as procs:
            procs.track("mosquitto", broker.proc.pid)
            observer = Observer(asyncio.get_running_loop())
            observer.start(broker.port)
            try:
                key_id, key_hex, public_keys = _backend_key(tmp / "system")
                async with aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=30),
                    connector=aiohttp.TCPConnector(limit=64),
                ) as http:
                    system = System(
                        tmp=tmp,
                        procs=procs,
                        mqtt_port=broker.port,
                        observer=observer,
                        http=http,
                        key=(key_id, key_hex),
                        public_keys=public_keys,
                        meter_state=meter_state,
                    )
                    try:
                        await _run_system(system, report, opts)
                    except BaseException:
                        for name in procs.pids:
                            print(f"--- last lines of {name}:\n{procs.tail(name, 15)}", flush=True)
                        raise
            finally:
                # Gateways first (they publish their offline state), the backend, then the
                # broker: SIGTERM each, SIGKILL after 20 s.
                codes = await asyncio.to_thread(procs.stop_all)
                observer.stop()
        bad = {name: code for name, code in codes.items() if code != 0}
        report.notes.append(
            "every process stopped cleanly (exit 0)" if not bad else f"exit codes: {bad}"
        )
        if observer.malformed:
            report.notes.append(f"{observer.malformed} MQTT message(s) did not decode")
    finally:
        await asyncio.to_thread(broker.stop)


def _simulator_state() -> tempfile.TemporaryDirectory[str]:
    """A directory for meter_sim's state files, in RAM (/dev/shm) where there is one.

    The simulator stands in for the meters, whose own flash writes are not this server's
    cost, and its fsync per changed meter per poll would compete for the disk with the
    backend's and the gateway's SQLite. On tmpfs it also makes a race in meter_sim much
    rarer: the ticker's periodic ``save_all`` and a poll's ``persist`` of the same meter
    can write the same ``<meter>.json.tmp`` at once, and the loser's rename kills the
    whole fleet with FileNotFoundError (meter_sim/fleet.py ``save_all`` does not take the
    device's lock; seen with 2,000 meters polled every 5 s on disk).
    """
    shm = Path("/dev/shm")
    return tempfile.TemporaryDirectory(prefix="vc-bench-meters-", dir=shm if shm.is_dir() else None)


def run(argv: Sequence[str] = ()) -> Report:
    opts = parse_options(argv)
    report = Report("system")
    print(
        f"system: Mosquitto, backend (SQLite), meter-sim ({opts.meters} meters), gateway; "
        f"top-ups at {', '.join(f'{r:g}/s' for r in opts.rates)} for {opts.seconds:g} s each",
        flush=True,
    )
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="vc-bench-system-") as d,
        _simulator_state() as meters,
    ):
        asyncio.run(_bench(Path(d), Path(meters), report, opts))
    # The default of the backend's settings (instant mode only to construct them here).
    delay = TopupSettings(sandbox_mode=SandboxMode.INSTANT).sandbox_completion_delay_s
    report.notes.append(
        f"`python -m tests.bench system {' '.join(argv)}`: {opts}; "
        f"whole run {time.monotonic() - started:.0f} s"
    )
    report.notes.append(
        "every component is its own process on the same 2-core machine as this load "
        "generator and observer; Mosquitto anonymous on 127.0.0.1, persistence on, "
        "max_queued_messages 100000; SQLite in WAL"
    )
    report.notes.append(
        f"the sandbox payment provider confirms each payment {delay * 1000:.0f} ms after the "
        "request by its signed webhook (a real provider's confirmation takes its place): "
        "that delay is inside 'payment settled, token issued' and the end-to-end figure"
    )
    report.notes.append(
        "milestones are on this host's wall clock: HTTP answers here, tokens.created_at/"
        "completed_at from the backend, broker passages from a subscriber one MQTT hop "
        "behind the publisher (the bare-hop baseline)"
    )
    report.notes.append(
        f"1-minute load average {load_before:.1f} before and {os.getloadavg()[0]:.1f} after "
        "(the machine is shared: figures are indicative)"
    )
    return report
