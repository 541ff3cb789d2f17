"""The whole system for end-to-end tests, each component its own process, as in production.

:func:`running_system` starts a private broker (Mosquitto when the binary exists, else
amqtt: :func:`tests.support.gateway.open_broker`), ``voltcredit backend run`` on a fresh
database, provisions one utility over the HTTP API (tenant, partners and their
CONSUMPTION split rules, the meter's own time-of-use tariff, a customer with a supply
account, a gateway and a meter), then starts ``voltcredit meter-sim run`` (one meter,
no credit, accelerated time from a fixed local time of day) and ``voltcredit gateway
run`` polling it every second. The test sees the system as its users do: the HTTP API,
the meter over Modbus (pymodbus), the readings on the broker (a plain MQTT subscriber,
besides the backend's), and the backend's database, read only.

The meter starts at 10:00 local time on the next weekday (inside the tariff's peak band,
far from local midnight and from the friendly night), so a test's minutes of meter time
are charged at one price and no standing charge falls due: the numbers a test checks do
not depend on when it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import os
import signal
import threading
import uuid
import zoneinfo
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

import aiohttp
import paho.mqtt.client as pm
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import select

from backend.adapters.db.engine import Database
from backend.adapters.db.ingest_tables import ConsumptionIntervalRow, MeterIngestRow
from backend.demo import TARIFF as DEMO_TARIFF
from backend.keys.store import FileKeyStore, KeyState
from firmware_protocol import modbus_map as mm
from firmware_protocol import mqtt
from firmware_protocol.mqtt_topics import READINGS_FILTER, parse_topic
from tests.support.broker import free_port
from tests.support.gateway import open_broker
from tests.support.meters import read_poll, tcp_client, voltcredit_command

T = TypeVar("T")

GATEWAY: Final = "e2e-gw"
METER: Final = 4_200_001
TIMEZONE: Final = "Europe/Berlin"
#: The demo's tariff (meter_sim's factory tariff without its id): off-peak 24.0 ct/kWh,
#: peak 36.5 ct/kWh on weekdays 07:00-21:00, 39 ct standing charge a day.
TARIFF: Final = DEMO_TARIFF
PEAK_MILLI_PER_KWH: Final = 36_500
ADMIN_KEY: Final = "vck_e2e00001_" + "A" * 43
TOKEN_SECRET: Final = "e2e-token-secret-0123456789abcdef0123456789"  # noqa: S105 - test only
#: How long a wait for the system may take before the test fails.
WAIT_S: Final = 30.0


def next_weekday_10am(now: dt.datetime | None = None) -> dt.datetime:
    """10:00 local time on the first weekday (Mon-Fri) after ``now``: the meter's start."""
    zone = zoneinfo.ZoneInfo(TIMEZONE)
    local = (now or dt.datetime.now(dt.UTC)).astimezone(zone)
    day = local.date() + dt.timedelta(days=1)
    while day.weekday() >= 5:
        day += dt.timedelta(days=1)
    return dt.datetime.combine(day, dt.time(10, 0), tzinfo=zone)


@dataclass(frozen=True)
class MeterOptions:
    """How the simulated meter runs (``voltcredit meter-sim run`` options)."""

    load_w: int
    speed: int
    emergency_limit: str = "1.00"
    low_credit: str = "1.00"
    friendly_night: str | None = None


@dataclass(frozen=True)
class AccountOptions:
    """The supply account's limits (minor units)."""

    debt_limit_minor: int = 500
    low_credit_minor: int = 100


@dataclass
class ReadingLog:
    """Every reading batch on the broker, as a plain subscriber sees them."""

    port: int
    readings: dict[int, mqtt.Reading] = field(default_factory=dict)  # ts → reading
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _client: Any = None
    _subscribed: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        client = pm.Client(
            CallbackAPIVersion.VERSION2, client_id=f"e2e-observer-{uuid.uuid4().hex[:8]}"
        )
        client.on_connect = lambda c, *_: c.subscribe(READINGS_FILTER, qos=1)
        client.on_subscribe = lambda *_: self._subscribed.set()
        client.on_message = self._on_message
        self._client = client
        client.connect("127.0.0.1", self.port)
        client.loop_start()
        assert self._subscribed.wait(10), "the observer could not subscribe"

    def stop(self) -> None:
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()

    def _on_message(self, _c: Any, _u: Any, message: Any) -> None:
        batch = mqtt.decode_payload(parse_topic(message.topic), bytes(message.payload))
        assert isinstance(batch, mqtt.ReadingBatch)
        with self._lock:
            for reading in batch.readings:
                if reading.meter == METER:
                    self.readings[reading.ts] = reading

    def at(self, ts: int) -> mqtt.Reading:
        with self._lock:
            return self.readings[ts]


@dataclass
class System:
    """A running system and the ways a test looks at it."""

    tmp: Path
    api: str
    modbus_port: int
    db: Database
    http: aiohttp.ClientSession
    log: ReadingLog
    procs: dict[str, asyncio.subprocess.Process]
    tenant_key: str = ""
    account_id: int = 0
    customer: dict[str, str] = field(default_factory=dict)

    # ------------------------------------------------------------------ HTTP

    async def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        key: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        auth = {"Authorization": f"Bearer {key or self.tenant_key}", **(headers or {})}
        async with self.http.request(
            method, f"{self.api}{path}", json=body, headers=auth
        ) as response:
            data = await response.json(content_type=None)
            assert response.status in (200, 201), (method, path, response.status, data)
            return data

    async def balance(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.request(
            "GET", f"/v1/accounts/{self.account_id}/balance", headers=self.customer
        )
        return result

    async def tokens(self) -> list[dict[str, Any]]:
        page = await self.request("GET", f"/v1/accounts/{self.account_id}/tokens")
        items: list[dict[str, Any]] = page["items"]
        return items

    async def topup(self, amount_minor: int) -> dict[str, Any]:
        """A customer's top-up over HTTP; the credit token once the meter applied it."""
        payment = await self.request(
            "POST",
            f"/v1/accounts/{self.account_id}/topups",
            {"amount_minor": amount_minor, "currency": "EUR"},
            headers={**self.customer, "Idempotency-Key": uuid.uuid4().hex},
        )

        async def applied() -> dict[str, Any] | None:
            for token in await self.tokens():
                if token["payment_id"] == payment["payment_id"] and token["status"] == "APPLIED":
                    return token
            return None

        return await self.until(f"the token of {amount_minor} applied", applied)

    # ------------------------------------------------------------------ meter and database

    async def meter(self) -> mm.MeterSnapshot:
        """The meter's poll block, read over Modbus like a gateway does."""
        async with tcp_client(self.modbus_port) as client:
            return await read_poll(client, 1)

    async def request_emergency_credit(self) -> None:
        """The customer's emergency-credit request (a holding-register write)."""
        async with tcp_client(self.modbus_port) as client:
            address = mm.register("emergency_credit_request").address
            rr = await client.write_register(address, 1, device_id=1)
            assert not rr.isError(), rr

    async def ingest_row(self) -> MeterIngestRow | None:
        async with self.db.read() as s:
            row: MeterIngestRow | None = await s.get(MeterIngestRow, METER)
            return row

    async def intervals(self) -> list[ConsumptionIntervalRow]:
        async with self.db.read() as s:
            rows = await s.scalars(
                select(ConsumptionIntervalRow)
                .where(ConsumptionIntervalRow.meter_id == METER)
                .order_by(ConsumptionIntervalRow.to_ts)
            )
            return list(rows)

    # ------------------------------------------------------------------ waiting

    async def until(
        self, what: str, check: Callable[[], Awaitable[T | None]], within_s: float = WAIT_S
    ) -> T:
        """Poll ``check`` until it answers something; fail with the logs after ``within_s``."""
        deadline = asyncio.get_running_loop().time() + within_s
        while True:
            for name, proc in self.procs.items():
                assert proc.returncode is None, f"{name} exited:\n{self.logs()}"
            value = await check()
            if value is not None and value is not False:
                return value
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{what}: not within {within_s:.0f} s\n{self.logs()}")
            await asyncio.sleep(0.2)

    async def baseline(self) -> MeterIngestRow:
        """The backend's first reading of the meter, after its tariff message was applied."""

        async def ready() -> MeterIngestRow | None:
            tokens = await self.tokens()
            if not tokens or any(t["status"] != "APPLIED" for t in tokens):
                return None
            row = await self.ingest_row()
            return row if row is not None and row.state["baseline"] is not None else None

        return await self.until("the meter's tariff applied and its first reading", ready)

    async def quiesce(self) -> None:
        """Stop the gateway (cleanly: it waits for its last batch's PUBACK) and wait until
        the backend has ingested everything: the meter's ingest row stops changing."""
        gateway = self.procs["gateway"]
        gateway.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(gateway.wait(), 15) == 0, self.logs()
        del self.procs["gateway"]
        seen = None
        while True:
            row = await self.ingest_row()
            now = None if row is None else (row.updated_at, row.last_ts)
            if now == seen:
                return
            seen = now
            await asyncio.sleep(1.0)

    def logs(self) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}"
            for path in sorted(self.tmp.glob("*.log"))
        )


@contextlib.asynccontextmanager
async def database_url(kind: str, tmp_path: Path, pg_dsn: str | None) -> AsyncIterator[str]:
    """A fresh SQLite file, or a fresh PostgreSQL database (dropped afterwards)."""
    if kind == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'backend.db'}"
        return
    import asyncpg  # type: ignore[import-untyped]  # no stubs; tests only
    from sqlalchemy.engine import make_url

    assert pg_dsn is not None
    name = f"vc_e2e_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(pg_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        url = make_url(pg_dsn).set(drivername="postgresql+asyncpg", database=name)
        yield url.render_as_string(hide_password=False)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def _start(
    name: str, tmp: Path, args: list[str], env: dict[str, str]
) -> asyncio.subprocess.Process:
    with (tmp / f"{name}.log").open("ab") as out:
        return await asyncio.create_subprocess_exec(
            *voltcredit_command(), *args, env=env, stdout=out, stderr=out
        )


async def _stop(procs: dict[str, asyncio.subprocess.Process]) -> dict[str, int | None]:
    """SIGINT to each (the last started first), SIGKILL after 15 s; the exit codes."""
    codes: dict[str, int | None] = {}
    for name, proc in reversed(procs.items()):
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        codes[name] = proc.returncode
    return codes


def _backend_toml(tmp: Path, url: str, http_port: int, mqtt_port: int) -> Path:
    path = tmp / "backend.toml"
    path.write_text(
        "\n".join(
            [
                "[database]",
                f'url = "{url}"',
                "[http]",
                'host = "127.0.0.1"',
                f"port = {http_port}",
                "[keys]",
                f'dir = "{tmp / "keys"}"',
                "[mqtt]",
                f'url = "mqtt://127.0.0.1:{mqtt_port}"',
                'client_id = "e2e-backend"',
                "[auth]",
                f'token_secret = "{TOKEN_SECRET}"',
                f'bootstrap_admin_key = "{ADMIN_KEY}"',
                "[ingest]",
                "# the meter's clock starts up to three days ahead and runs accelerated",
                f"max_clock_ahead_s = {365 * 86_400}",
            ]
        )
        + "\n"
    )
    return path


def _gateway_toml(tmp: Path, key: tuple[int, str], mqtt_port: int, modbus_port: int) -> Path:
    path = tmp / "gateway.toml"
    path.write_text(
        "\n".join(
            [
                f'gateway_id = "{GATEWAY}"',
                "poll_interval_s = 1",
                "[mqtt]",
                f'url = "mqtt://127.0.0.1:{mqtt_port}"',
                "reconnect_min_s = 0.1",
                "reconnect_max_s = 0.5",
                "[store]",
                f'path = "{tmp / "gateway.sqlite"}"',
                "[[trusted_keys]]",
                f"id = {key[0]}",
                f'public_key = "{key[1]}"',
                "[[meters]]",
                f"id = {METER}",
                'driver = "modbus_tcp"',
                'host = "127.0.0.1"',
                f"port = {modbus_port}",
                "unit = 1",
            ]
        )
        + "\n"
    )
    return path


async def _provision(system: System, account: AccountOptions) -> None:
    """One utility over the API, as its staff would set it up; the customer logged in."""
    tenant = await system.request(
        "POST",
        "/v1/tenants",
        {
            "name": "E2E Power",
            "currency": "EUR",
            "timezone": TIMEZONE,
            "min_topup_minor": 100,
            "max_topup_minor": 50_000,
        },
        key=ADMIN_KEY,
    )
    created = await system.request(
        "POST",
        "/v1/api-keys",
        {"name": "e2e utility admin", "role": "UTILITY_ADMIN", "tenant_id": tenant["id"]},
        key=ADMIN_KEY,
    )
    system.tenant_key = created["key"]
    partners = {
        kind: (await system.request("POST", "/v1/partners", {"name": kind, "kind": kind}))["id"]
        for kind in ("UTILITY", "GRID_OPERATOR", "TAX_AUTHORITY")
    }
    activation = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
    await system.request(
        "POST", "/v1/tariffs", {"code": "e2e-tou", "activation_at": activation, "tariff": TARIFF}
    )
    # Consumption is shared out: a grid fee per kWh, VAT as basis points, the rest to the
    # utility (so the ledger postings are linked prepaid → utility → fee partners).
    await system.request(
        "PUT",
        "/v1/tariffs/e2e-tou/split-rules/CONSUMPTION",
        {
            "rules": [
                {"kind": "PER_KWH", "partner_id": partners["GRID_OPERATOR"], "value": 9_000},
                {"kind": "BASIS_POINTS", "partner_id": partners["TAX_AUTHORITY"], "value": 1597},
                {"kind": "REMAINDER", "partner_id": partners["UTILITY"]},
            ]
        },
    )
    await system.request("POST", "/v1/gateways", {"id": GATEWAY})
    password = uuid.uuid4().hex
    customer = await system.request(
        "POST",
        "/v1/customers",
        {"name": "Eve", "email": "eve@e2e.example", "password": password},
    )
    supply = await system.request(
        "POST",
        "/v1/supply-accounts",
        {
            "customer_id": customer["id"],
            "tariff_code": "e2e-tou",
            "label": "E2E Straße 1",
            "debt_limit_minor": account.debt_limit_minor,
            "low_credit_minor": account.low_credit_minor,
        },
    )
    system.account_id = supply["id"]
    await system.request(
        "POST",
        "/v1/meters",
        {
            "serial": METER,
            "gateway_id": GATEWAY,
            "supply_account_id": supply["id"],
            "modbus_unit": 1,
        },
    )
    login = await system.request(
        "POST",
        "/v1/auth/login",
        {"tenant_id": tenant["id"], "email": "eve@e2e.example", "password": password},
    )
    system.customer = {"Authorization": f"Bearer {login['token']}"}


@contextlib.asynccontextmanager
async def running_system(
    tmp: Path,
    *,
    url: str,
    meter: MeterOptions,
    account: AccountOptions | None = None,
) -> AsyncIterator[System]:
    """Broker, backend, provisioning, meter_sim and gateway; everything stopped on exit."""
    store = FileKeyStore(tmp / "keys", create=True)
    store.generate()
    active = next(i for i in store.list() if i.state is KeyState.ACTIVE)
    (tmp / "keys.pub").write_text(f"{active.key_id} {active.public_key.hex()}\n")
    http_port, modbus_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOLTCREDIT_")}
    procs: dict[str, asyncio.subprocess.Process] = {}
    async with open_broker(tmp / "broker") as broker:
        log = ReadingLog(broker.port)
        log.start()
        try:
            backend_toml = _backend_toml(tmp, url, http_port, broker.port)
            procs["backend"] = await _start(
                "backend", tmp, ["backend", "run", "--config", str(backend_toml)], env
            )
            async with (
                Database(url) as db,
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http,
            ):
                system = System(
                    tmp, f"http://127.0.0.1:{http_port}", modbus_port, db, http, log, procs
                )

                async def ready() -> bool:
                    with contextlib.suppress(aiohttp.ClientError):
                        async with http.get(f"{system.api}/readyz") as response:
                            return response.status == 200
                    return False

                await system.until("the backend ready", ready, within_s=60)
                await _provision(system, account or AccountOptions())
                start = next_weekday_10am()
                meter_args = [
                    "meter-sim",
                    "run",
                    "--meter-id",
                    str(METER),
                    "--port",
                    str(modbus_port),
                    "--speed",
                    str(meter.speed),
                    "--start",
                    start.isoformat(),
                    "--trusted-key",
                    str(tmp / "keys.pub"),
                    "--credit",
                    "0.00",
                    "--emergency-limit",
                    meter.emergency_limit,
                    "--low-credit",
                    meter.low_credit,
                    "--profile",
                    f"constant:{meter.load_w}",
                    "--state-dir",
                    str(tmp / "meters"),
                    "--status-every",
                    "0",
                ]
                if meter.friendly_night is not None:
                    meter_args += ["--friendly-night", meter.friendly_night]
                procs["meter-sim"] = await _start("meter-sim", tmp, meter_args, env)
                gateway_toml = _gateway_toml(
                    tmp, (active.key_id, active.public_key.hex()), broker.port, modbus_port
                )
                procs["gateway"] = await _start(
                    "gateway", tmp, ["gateway", "run", "--config", str(gateway_toml)], env
                )
                try:
                    yield system
                except BaseException:
                    await _stop(procs)
                    raise
                # A clean stop is part of the test: every process exits 0 on SIGINT.
                codes = await _stop(procs)
                assert all(c == 0 for c in codes.values()), (codes, system.logs())
        finally:
            await _stop(procs)
            log.stop()


def meter_charged(
    readings: ReadingLog, intervals: list[ConsumptionIntervalRow], tokens: list[dict[str, Any]]
) -> int:
    """What the meter took from its credit between the first and the last billed reading,
    in rating units: its credit drop plus the credit tokens it applied in between (those
    with message ids after the first reading's ``last_token_id``, up to the last's)."""
    first, last = readings.at(intervals[0].from_ts), readings.at(intervals[-1].to_ts)
    topped_up: int = sum(
        int(t["amount_minor"]) * 1000
        for t in tokens
        if t["kind"] == "CREDIT" and first.last_token_id < t["msg_id"] <= last.last_token_id
    )
    return first.credit_milli - last.credit_milli + topped_up


def interval_chain_ok(intervals: list[ConsumptionIntervalRow]) -> bool:
    """Each billed interval starts where the one before ended (no reading skipped)."""
    return all(a.to_ts == b.from_ts for a, b in itertools.pairwise(intervals))
