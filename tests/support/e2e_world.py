"""The whole system as OS processes for end-to-end tests: broker, backend, meters, gateway, world.

:class:`System` runs each component as production does — ``voltcredit backend run``,
``voltcredit meter-sim run``, ``voltcredit gateway run`` — with logs in ``<tmp>/logs``
(one file per incarnation, ``backend-2.log`` after the first restart), plus a private
broker: a Mosquitto that saves its persistence file after every change (so a SIGKILL loses
as little as Mosquitto can), or, where Mosquitto is not installed (never in CI), amqtt in a
subprocess of its own (no persistence); ``VOLTCREDIT_E2E_BROKER=amqtt`` forces the latter.
Every component can be stopped (SIGTERM), killed (SIGKILL) and started again on the same
ports and state.

The world is provisioned over the HTTP API, like the demo: a utility with partners, a
two-band time-of-use tariff with CONSUMPTION and TOPUP split rules, a gateway, and one
customer, supply account and meter per simulated meter (even-numbered customers belong to a
reseller, whose partner earns a top-up commission). The simulated meters run in accelerated
time from ``T0`` (the next local midnight + 30 min, so no standing charge falls due before
ingest has its first reading), start with **zero credit** — so their relays are open and
nothing is consumed or charged until the first top-up — and run the backend's tariff from
the start. Ingest's first reading of a meter is therefore its baseline with the meter's
credit equal to the prepaid account's balance (both 0), which is what lets a test demand
``reconcile_diff_milli == 0`` at the end.

:class:`Observer` is a plain MQTT subscriber on ``vc/v1/#`` (persistent session) that records
every readings batch and gateway state passing the broker. What the backend stored is read
and checked by :mod:`tests.support.e2e_checks`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Protocol
from zoneinfo import ZoneInfo

import aiohttp
import paho.mqtt.client as pm
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy.engine import make_url

from backend.adapters.db.engine import Database
from backend.demo import TARIFF as DEMO_TARIFF
from backend.domain.auth import format_api_key
from backend.keys.store import FileKeyStore
from firmware_protocol import mqtt
from firmware_protocol.errors import ProtocolError
from firmware_protocol.mqtt_topics import parse_topic
from tests.support.broker import Mosquitto, free_port, mosquitto_binary, wait_port
from tests.support.e2e_checks import Snapshot, snapshot
from tests.support.meters import voltcredit_command
from tests.support.procs import Processes

GATEWAY_ID: Final = "e2e-gw"
FIRST_METER: Final = 3_000_001
TARIFF_CODE: Final = "e2e-tou"
TIMEZONE: Final = "Europe/Berlin"
#: The demo's tariff (meter_sim's factory tariff without its id): off-peak 24.0 ct/kWh,
#: peak 36.5 ct/kWh on weekdays 07:00-21:00, 39 ct standing charge a day.
TARIFF: Final = DEMO_TARIFF
MAX_PRICE_MILLI_PER_KWH: Final = 36_500
BANDS: Final = 2
STANDING_MILLI: Final = 39_000
#: Readings are stamped with the meters' accelerated clocks, days ahead of the backend's:
#: ingest must not quarantine them as "from the future" ([ingest] max_clock_ahead_s).
MAX_CLOCK_AHEAD_S: Final = 60 * 86_400
DEBT_LIMIT_MINOR: Final = 1_000  # the meters' emergency credit (meter-sim's default 10.00)
TOKEN_SECRET: Final = "e2e-token-secret-0123456789abcdef0123"  # noqa: S105 - a test secret


def start_instant(now: datetime, timezone: str = TIMEZONE) -> int:
    """The meters' ``T0``: the next local midnight after ``now``, plus 30 minutes (Unix s)."""
    local = now.astimezone(ZoneInfo(timezone))
    midnight = datetime.combine(local.date() + timedelta(days=1), datetime.min.time(), local.tzinfo)
    return int((midnight + timedelta(minutes=30)).timestamp())


# ----------------------------------------------------------------------------- brokers


class Broker(Protocol):
    """What a test does with its broker."""

    port: int

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def kill(self) -> None: ...
    def log(self) -> str: ...


@dataclass
class DurableMosquitto(Mosquitto):
    """A private Mosquitto that writes its persistence file after every change.

    Mosquitto keeps sessions, queued QoS 1 messages and retained messages in memory and
    saves them on a clean stop and every ``autosave_interval`` changes
    (``autosave_on_changes``): with 1, a SIGKILL loses at most what changed since the last
    write — still possibly a message it had acknowledged, which is Mosquitto's limit, not
    ours.
    """

    def write_config(self) -> Path:
        conf = super().write_config()
        with conf.open("a") as f:
            f.write("autosave_on_changes true\nautosave_interval 1\n")
        return conf

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def log(self) -> str:
        path = self.workdir / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""


_AMQTT_MAIN: Final = """
import asyncio, sys
from amqtt.broker import Broker

async def main(port):
    broker = Broker({
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    })
    await broker.start()
    await asyncio.Event().wait()

asyncio.run(main(int(sys.argv[1])))
"""


@dataclass
class AmqttProcess:
    """The embedded broker in a process of its own (memory only: no persistence)."""

    workdir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with (self.workdir / "amqtt.log").open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _AMQTT_MAIN, str(self.port)],
                stdout=subprocess.DEVNULL,
                stderr=out,
            )
        wait_port(self.port, timeout=20)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def log(self) -> str:
        path = self.workdir / "amqtt.log"
        return path.read_text(errors="replace") if path.exists() else ""


def make_broker(workdir: Path) -> tuple[Broker, bool]:
    """A started broker and whether it is a durable Mosquitto (module docstring)."""
    workdir.mkdir(parents=True, exist_ok=True)
    binary = None if os.environ.get("VOLTCREDIT_E2E_BROKER") == "amqtt" else mosquitto_binary()
    broker: Broker
    if binary is None:
        broker = AmqttProcess(workdir)
    else:
        broker = DurableMosquitto(binary=binary, workdir=workdir)
    broker.start()
    return broker, binary is not None


# ----------------------------------------------------------------------------- observer


class Observer:
    """A plain subscriber on ``vc/v1/#``: every readings batch and gateway state it sees.

    Persistent session (``clean_session=False``, QoS 1) under a fixed client id, so what a
    gateway publishes while this client reconnects still reaches it — unless the broker
    itself lost it.
    """

    def __init__(self, port: int) -> None:
        self._lock = threading.Lock()
        self.batches: list[mqtt.ReadingBatch] = []
        self.states: list[mqtt.GatewayState] = []
        self.malformed = 0
        self._client = pm.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"e2e-observer-{uuid.uuid4().hex[:8]}",
            clean_session=False,
            protocol=pm.MQTTv311,
        )
        self._client.reconnect_delay_set(min_delay=1, max_delay=1)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._subscribed = threading.Event()
        self._client.on_subscribe = lambda *_: self._subscribed.set()
        self._client.connect("127.0.0.1", port, keepalive=5)
        self._client.loop_start()
        if not self._subscribed.wait(15):
            raise RuntimeError("the observer got no SUBACK")

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, client: Any, *_: Any) -> None:
        client.subscribe("vc/v1/#", qos=1)

    def _on_message(self, _client: Any, _userdata: Any, message: Any) -> None:
        try:
            decoded = mqtt.decode_payload(parse_topic(message.topic), message.payload)
        except ProtocolError:
            with self._lock:
                self.malformed += 1
            return
        with self._lock:
            if isinstance(decoded, mqtt.ReadingBatch):
                self.batches.append(decoded)
            elif isinstance(decoded, mqtt.GatewayState):
                self.states.append(decoded)

    def readings(self, meter: int) -> dict[int, mqtt.Reading]:
        """Every reading of ``meter`` seen, by timestamp."""
        with self._lock:
            return {r.ts: r for b in self.batches for r in b.readings if r.meter == meter}

    def online_boots(self) -> list[int]:
        """``boot_seq`` of every online state seen, in arrival order."""
        with self._lock:
            return [s.boot_seq for s in self.states if s.online]


# ----------------------------------------------------------------------------- the system


@dataclass(frozen=True, slots=True)
class Customer:
    """A provisioned customer with a supply account and a meter, logged in."""

    customer_id: int
    account_id: int
    prepaid_ledger_id: int
    meter: int
    unit: int
    bearer: str


@dataclass
class World:
    """What provisioning made."""

    tenant_id: int
    tenant_key: str
    tariff_wire_id: int
    customers: list[Customer] = field(default_factory=list)


class System:
    """The component processes of one test run and the ways to start, stop and kill them."""

    def __init__(
        self,
        tmp: Path,
        *,
        db_url: str,
        meters: int,
        speed: int,
        poll_s: float,
        profiles: Sequence[str],
        start_at: int,
    ) -> None:
        self.tmp = tmp
        self.db_url = db_url
        self.meters = meters
        self.speed = speed
        self.poll_s = poll_s
        self.profiles = list(profiles)
        self.start_at = start_at
        (tmp / "logs").mkdir(parents=True, exist_ok=True)
        self.procs = Processes(tmp / "logs", grace_s=15.0)
        self.broker, self.durable_broker = make_broker(tmp / "broker")
        self.http_port = free_port()
        self.modbus_port = free_port()
        self.api = f"http://127.0.0.1:{self.http_port}"
        self.admin_key = format_api_key(secrets.token_hex(4), secrets.token_urlsafe(32))
        store = FileKeyStore(tmp / "keys", create=True)
        key = store.generate()
        self.key = (key.key_id, key.public_key.hex())
        self.public_keys = tmp / "backend-keys.pub"
        self.public_keys.write_text(f"{key.key_id} {key.public_key.hex()}\n")
        self.starts: Counter[str] = Counter()
        #: When each component was last started (wall clock).
        self.started_at: dict[str, datetime] = {}
        self._popen: dict[str, subprocess.Popen[bytes]] = {}
        self._running: dict[str, str] = {}  # component → its Processes name
        self.tariff_file = tmp / "tariff.json"
        self.observer = Observer(self.broker.port)

    # ---------------------------------------------------------------- configuration

    def backend_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("VOLTCREDIT_")}
        env.update({
            "VOLTCREDIT_DATABASE_URL": self.db_url,
            "VOLTCREDIT_HTTP_HOST": "127.0.0.1",
            "VOLTCREDIT_HTTP_PORT": str(self.http_port),
            "VOLTCREDIT_KEY_DIR": str(self.tmp / "keys"),
            "VOLTCREDIT_MQTT_URL": f"mqtt://127.0.0.1:{self.broker.port}",
            "VOLTCREDIT_MQTT_CLIENT_ID": "e2e-backend",
            # One backend instance: plain subscriptions (the default). Mosquitto 2.0.11 does
            # not restore $share subscriptions from its persistence file, so after a broker
            # restart whatever is published before the backend re-subscribes is dropped
            # (reported with issue 7); plain ones are restored and queue it.
            "VOLTCREDIT_MQTT_SHARED_SUBSCRIPTIONS": "false",
            "VOLTCREDIT_INGEST_MAX_CLOCK_AHEAD_S": str(MAX_CLOCK_AHEAD_S),
            "VOLTCREDIT_TOKEN_SECRET": TOKEN_SECRET,
            "VOLTCREDIT_BOOTSTRAP_ADMIN_KEY": self.admin_key,
            "VOLTCREDIT_CUSTOMER_TOKEN_TTL_S": "7200",
        })  # fmt: skip
        return env

    def gateway_config(self) -> Path:
        lines = [
            f'gateway_id = "{GATEWAY_ID}"',
            f"poll_interval_s = {self.poll_s}",
            "token_result_timeout_s = 3",
            "[mqtt]",
            f'url = "mqtt://127.0.0.1:{self.broker.port}"',
            "reconnect_min_s = 0.1",
            "reconnect_max_s = 1.0",
            "keepalive_s = 5",
            "[store]",
            f'path = "{self.tmp / "gateway.sqlite"}"',
            "[modbus]",
            "timeout_s = 0.5",
            "retries = 1",
            "backoff_min_s = 0.1",
            "backoff_max_s = 1.0",
            "[[trusted_keys]]",
            f"id = {self.key[0]}",
            f'public_key = "{self.key[1]}"',
        ]
        for i in range(self.meters):
            lines += [
                "[[meters]]",
                f"id = {FIRST_METER + i}",
                'driver = "modbus_tcp"',
                'host = "127.0.0.1"',
                f"port = {self.modbus_port}",
                f"unit = {i + 1}",
            ]
        path = self.tmp / "gateway.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def _argv(self, component: str) -> list[str]:
        vc = voltcredit_command()
        if component == "backend":
            return [*vc, "-v", "backend", "run"]
        if component == "gateway":
            return [*vc, "-v", "gateway", "run", "--config", str(self.tmp / "gateway.toml")]
        assert component == "meter-sim", component
        argv = [
            *vc,
            "meter-sim",
            "run",
            "--meters", str(self.meters),
            "--meter-id", str(FIRST_METER),
            "--port", str(self.modbus_port),
            "--speed", str(self.speed),
            "--trusted-key", str(self.public_keys),
            "--tariff", str(self.tariff_file),
            "--timezone", TIMEZONE,
            "--credit", "0.00",
            "--state-dir", str(self.tmp / "meters"),
            "--status-every", "0",
            "--json",
            *(x for p in self.profiles for x in ("--profile", p)),
        ]  # fmt: skip
        if self.starts[component] == 0:
            # Only the first time: later starts resume the clock where the saved state
            # left off (an explicit --start would rewind it).
            argv += ["--start", datetime.fromtimestamp(self.start_at, UTC).isoformat()]
        return argv

    # ---------------------------------------------------------------- life cycle

    async def start(self, component: str) -> None:
        """Start a component (the broker too) and wait until it serves."""
        self.started_at[component] = datetime.now(UTC)
        if component == "broker":
            await asyncio.to_thread(self.broker.start)
            self.starts[component] += 1
            return
        assert component not in self._running, f"{component} is running"
        argv = self._argv(component)
        self.starts[component] += 1
        name = f"{component}-{self.starts[component]}"
        env = self.backend_env() if component == "backend" else None
        self._popen[component] = self.procs.start(name, argv, env=env)
        self._running[component] = name
        if component == "backend":
            await self._wait_ready()
        elif component == "meter-sim":
            await asyncio.to_thread(self.procs.wait_for_line, name, '{"event": "ready"', 60)
        elif component == "gateway":
            # Its birth: from now on its session holds what is published to it (a token
            # published before that would wait for the dispatcher's re-send, seconds later).
            await self._wait_birth()

    async def _wait_birth(self) -> None:
        before = max(self.observer.online_boots(), default=0)
        deadline = time.monotonic() + 30
        while max(self.observer.online_boots(), default=0) <= before:
            self.procs.check()
            if time.monotonic() > deadline:
                raise TimeoutError("the gateway did not come online in 30 s")
            await asyncio.sleep(0.05)

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            while True:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with http.get(f"{self.api}/readyz") as response:
                        if response.status == 200:
                            return
                self.procs.check()
                if time.monotonic() > deadline:
                    raise TimeoutError("the backend did not answer /readyz in 60 s")
                await asyncio.sleep(0.1)

    def kill(self, component: str) -> None:
        """SIGKILL a component (a power cut)."""
        if component == "broker":
            self.broker.kill()
            return
        name = self._running.pop(component)
        proc = self._popen.pop(component)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert self.procs.stop(name) == -signal.SIGKILL

    async def stop(self, component: str) -> int:
        """SIGTERM a component and wait for it (a clean stop); its exit code."""
        if component == "broker":
            await asyncio.to_thread(self.broker.stop)
            return 0
        name = self._running.pop(component)
        self._popen.pop(component)
        return await asyncio.to_thread(self.procs.stop, name)

    def check(self) -> None:
        """Fail if a running component died by itself."""
        self.procs.check()

    def logs(self, component: str, lines: int = 40) -> str:
        """The last lines of each incarnation's log of ``component``."""
        if component == "broker":
            return "\n".join(self.broker.log().splitlines()[-lines:])
        return "\n".join(
            f"--- {component}-{n}\n{self.procs.tail(f'{component}-{n}', lines)}"
            for n in range(1, self.starts[component] + 1)
        )

    def close(self) -> None:
        self.observer.close()
        self.procs.stop_all()
        self.broker.stop()


# ----------------------------------------------------------------------------- API


class ApiError(RuntimeError):
    """The API answered with an error."""


async def call(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    bearer: str,
    body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One API request; its JSON answer, or :class:`ApiError`."""
    async with http.request(
        method, url, json=body, headers={"Authorization": f"Bearer {bearer}", **(headers or {})}
    ) as response:
        data: dict[str, Any] = await response.json(content_type=None)
        if response.status not in (200, 201):
            raise ApiError(f"{method} {url}: {response.status} {data}")
        return data


async def provision(system: System, http: aiohttp.ClientSession, meters: int) -> World:
    """The utility, its partners, tariff, rules, gateway and customers (no meters yet)."""
    api = system.api

    async def post(path: str, body: dict[str, Any], key: str, method: str = "POST") -> Any:
        return await call(http, method, f"{api}{path}", bearer=key, body=body)

    admin = system.admin_key
    limits = {"min_topup_minor": 100, "max_topup_minor": 50_000}
    tenant = await post(
        "/v1/tenants", {"name": "E2E", "currency": "EUR", "timezone": TIMEZONE, **limits}, admin
    )
    tk = (
        await post(
            "/v1/api-keys",
            {"name": "e2e admin", "role": "UTILITY_ADMIN", "tenant_id": tenant["id"]},
            admin,
        )
    )["key"]
    reseller = await post("/v1/resellers", {"name": "Kiosk"}, tk)
    partners = {
        name: (await post("/v1/partners", {"name": name, "kind": kind, **extra}, tk))["id"]
        for name, kind, extra in (
            ("utility", "UTILITY", {}),
            ("grid", "GRID_OPERATOR", {}),
            ("tax", "TAX_AUTHORITY", {}),
            ("reseller", "RESELLER", {"reseller_id": reseller["id"]}),
        )
    }
    now = datetime.now(UTC).replace(microsecond=0).isoformat()
    tariff = await post(
        "/v1/tariffs", {"code": TARIFF_CODE, "activation_at": now, "tariff": TARIFF}, tk
    )
    # The meters run this very tariff from the factory (meter-sim --tariff).
    system.tariff_file.write_text(json.dumps({**TARIFF, "tariff_id": tariff["tariff_id"]}))
    rules = {
        "CONSUMPTION": [
            {"kind": "PER_KWH", "partner_id": partners["grid"], "value": 9_000},
            {"kind": "BASIS_POINTS", "partner_id": partners["tax"], "value": 1_597},
            {"kind": "REMAINDER", "partner_id": partners["utility"]},
        ],
        "TOPUP": [
            {"kind": "BASIS_POINTS", "partner_id": partners["reseller"], "value": 300},
            {"kind": "REMAINDER", "partner_id": partners["utility"]},
        ],
    }
    for applies_to, rule_set in rules.items():
        path = f"/v1/tariffs/{TARIFF_CODE}/split-rules/{applies_to}"
        await post(path, {"rules": rule_set}, tk, "PUT")
    await post("/v1/gateways", {"id": GATEWAY_ID}, tk)
    world = World(tenant_id=tenant["id"], tenant_key=tk, tariff_wire_id=tariff["tariff_id"])
    for i in range(meters):
        email, password = f"c{i + 1}@e2e.example", secrets.token_urlsafe(12)
        sold_by = {"reseller_id": reseller["id"]} if i % 2 == 0 else {}
        customer = await post(
            "/v1/customers",
            {"name": f"Customer {i + 1}", "email": email, "password": password, **sold_by},
            tk,
        )
        account = await post(
            "/v1/supply-accounts",
            {
                "customer_id": customer["id"],
                "tariff_code": TARIFF_CODE,
                "label": f"E2E-Straße {i + 1}",
                "debt_limit_minor": DEBT_LIMIT_MINOR,
            },
            tk,
        )
        login = {"tenant_id": tenant["id"], "email": email, "password": password}
        world.customers.append(
            Customer(
                customer_id=customer["id"],
                account_id=account["id"],
                prepaid_ledger_id=account["ledger_account_id"],
                meter=FIRST_METER + i,
                unit=i + 1,
                bearer=(await post("/v1/auth/login", login, ""))["token"],
            )
        )
    return world


async def provision_meters(system: System, http: aiohttp.ClientSession, world: World) -> None:
    """Attach the meters (each gets the tariff message, queued for the gateway)."""
    for c in world.customers:
        body = {
            "serial": c.meter,
            "gateway_id": GATEWAY_ID,
            "supply_account_id": c.account_id,
            "modbus_unit": c.unit,
        }
        await call(http, "POST", f"{system.api}/v1/meters", bearer=world.tenant_key, body=body)


async def topup(
    http: aiohttp.ClientSession,
    api: str,
    customer: Customer,
    amount_minor: int,
    *,
    key: str | None = None,
    attempts: int = 200,
    on_failure: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """A top-up, retried with the same Idempotency-Key until the API answers it."""
    key = key or uuid.uuid4().hex
    for _ in range(attempts):
        try:
            async with http.post(
                f"{api}/v1/accounts/{customer.account_id}/topups",
                json={"amount_minor": amount_minor, "currency": "EUR"},
                headers={"Idempotency-Key": key, "Authorization": f"Bearer {customer.bearer}"},
            ) as response:
                body: dict[str, Any] = await response.json(content_type=None)
                if response.status in (200, 201):
                    return body
                failure = f"http {response.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            failure = type(exc).__name__
        if on_failure is not None:
            on_failure(failure)
        await asyncio.sleep(0.25)
    raise ApiError(f"top-up {key} not answered after {attempts} attempts")


async def meter_status(system: System, unit: int) -> dict[str, Any]:
    """A meter's own status read over Modbus (``voltcredit meter-sim status --json``)."""
    proc = await asyncio.create_subprocess_exec(
        *voltcredit_command(),
        "meter-sim",
        "status",
        "--port",
        str(system.modbus_port),
        "--unit",
        str(unit),
        "--json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    status: dict[str, Any] = json.loads(out)
    return status


async def wait_for(
    what: str,
    predicate: Callable[[], Awaitable[bool]],
    *,
    system: System,
    timeout_s: float,
    every_s: float = 0.3,
    detail: Callable[[], str] | None = None,
) -> None:
    """Poll an async ``predicate`` until it is true; fail (with ``detail``) after the timeout."""
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        system.check()
        if time.monotonic() > deadline:
            more = "" if detail is None else "\n" + detail()
            raise AssertionError(f"{what}: not within {timeout_s:g} s{more}")
        await asyncio.sleep(every_s)


async def check_meters_over_modbus(system: System, snap: Snapshot) -> None:
    """Each meter's own credit, read over Modbus now, agrees with the backend's last reading:
    lower by at most what the meter can have charged for the energy and days since."""
    zone = ZoneInfo(TIMEZONE)
    for meter, row in sorted(snap.ingest.items()):
        assert row.last_ts is not None
        assert row.last_credit_milli is not None
        assert row.last_import_wh is not None
        status = await meter_status(system, meter - FIRST_METER + 1)
        assert status["meter"] == meter
        # No message reached the meter after the backend's last reading of it.
        assert status["last_token"]["message_id"] == row.last_token_id, (meter, status)
        used_wh = status["import_wh"] - row.last_import_wh
        clock = datetime.fromisoformat(status["clock"])
        days = (
            clock.astimezone(zone).date() - datetime.fromtimestamp(row.last_ts, zone).date()
        ).days
        assert used_wh >= 0, (meter, status, row.last_import_wh)
        assert days >= 0, (meter, status, row.last_ts)
        # Each band's charge is a floor of its cumulative energy: at most 1 milli more per
        # band than its energy x price, plus the standing charge of each day begun.
        bound = -(-used_wh * MAX_PRICE_MILLI_PER_KWH // 1000) + BANDS + days * STANDING_MILLI
        assert row.last_credit_milli - bound <= status["credit_milli"] <= row.last_credit_milli, (
            meter,
            status,
            row.last_credit_milli,
            bound,
        )


@contextlib.asynccontextmanager
async def e2e_database(kind: str, tmp_path: Path, pg_dsn: str | None) -> AsyncIterator[str]:
    """A fresh database URL for the backend process: a SQLite file, or a new PostgreSQL
    database (dropped afterwards) — a process cannot be given a private schema by URL."""
    if kind == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'voltcredit.db'}"
        return
    import asyncpg  # type: ignore[import-untyped]  # no stubs; tests only

    assert pg_dsn is not None
    name = f"e2e_{uuid.uuid4().hex}"
    admin = await asyncpg.connect(pg_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield (
            make_url(pg_dsn)
            .set(drivername="postgresql+asyncpg", database=name)
            .render_as_string(hide_password=False)
        )
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def bring_up(system: System, http: aiohttp.ClientSession, db: Database) -> World:
    """Start everything, provision the world, and wait until every meter has its tariff
    message applied and ingest has its first reading (the baseline: zero credit, nothing
    consumed — the relays are open until the first top-up)."""
    await system.start("backend")
    world = await provision(system, http, system.meters)
    system.gateway_config()
    await system.start("meter-sim")
    await system.start("gateway")
    await provision_meters(system, http, world)

    async def ready() -> bool:
        snap = await snapshot(db)
        return all(
            (row := snap.ingest.get(c.meter)) is not None and row.state["baseline"] is not None
            for c in world.customers
        ) and all(t.status == "APPLIED" for t in snap.tokens)

    await wait_for(
        "tariff messages applied and first readings ingested",
        ready,
        system=system,
        timeout_s=30,
        detail=lambda: system.logs("gateway") + system.logs("backend"),
    )
    return world
