"""The HTTP API under test: the real app on a fresh database, an aiohttp test client, a world.

:func:`api_client` starts :func:`backend.api.app.create_app` on a fresh SQLite file or
PostgreSQL schema (``tests/support/db.py``), migrated, with a fixed clock, a cheap argon2
profile (the production one costs 64 MiB and tens of milliseconds per hash, on purpose)
and an in-memory signing key. The platform admin's key comes from the bootstrap
setting, so that path is exercised too.

:func:`build_world` provisions two tenants through the API itself — every provisioning
endpoint's happy path — and returns the ids and credentials the tests act with:

* tenant A: resellers r1 and r2 (a RESELLER key each), UTILITY_ADMIN and SUPPORT keys,
  a partner, tariff ``domestic``, gateway ``gw-a``, customers c1 (of r1), c2 (of r2) and
  c0 (direct), one supply account and one meter each (serials 1000..), a customer token
  each, and a spare supply account of c0 without a meter;
* tenant B: the same shape, smaller (reseller r1, customer c1, gateway ``gw-b``).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp.test_utils import TestClient, TestServer
from argon2 import PasswordHasher
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select

from backend.adapters.db.engine import Database
from backend.adapters.db.ledger_tables import AccountRow
from backend.adapters.db.migrate import upgrade
from backend.adapters.db.tables import (
    ApiKeyRow,
    AuditRow,
    CustomerRow,
    GatewayRow,
    MeterRow,
    PartnerRow,
    ResellerRow,
    SupplyAccountRow,
    TariffRow,
    TenantRow,
    TokenRow,
)
from backend.api.app import create_app
from backend.api.context import DATABASE
from backend.api.routes.topups import TOPUP_SETTINGS
from backend.config import BackendConfig
from backend.domain.auth import format_api_key
from backend.service.topup_runtime import SandboxMode, TopupSettings
from firmware_protocol.messages import Ed25519Signer
from tests.support.db import Target

T0 = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)
ADMIN_KEY = format_api_key("0badcafe", "A" * 43)
SIGNING_KEY_ID = 7
FLAT = {
    "currency": "KES",
    "timezone": "Africa/Nairobi",
    "bands": [{"name": "flat", "price_milli_per_kwh": 25_000}],
    "weekday": [[0, 0]],
}


class Clock:
    """A settable clock for the app (requests see ``now``)."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class KeyRing:
    """An in-memory signing-key source; ``signer=None`` is a store without an active key."""

    def __init__(self) -> None:
        self.signer: Ed25519Signer | None = Ed25519Signer(
            SIGNING_KEY_ID, Ed25519PrivateKey.generate()
        )

    def active_signer(self) -> Ed25519Signer:
        from backend.keys.errors import KeyStateError

        if self.signer is None:
            raise KeyStateError("no active signing key: run `voltcredit keys generate`")
        return self.signer


@dataclass
class Reply:
    """One response: status, headers and the decoded JSON body."""

    status: int
    headers: Any
    body: Any

    @property
    def content_type(self) -> str:
        return str(self.headers.get("Content-Type", "")).split(";")[0]


@dataclass
class Api:
    """The test client and what the app runs on."""

    client: TestClient[Any, Any]
    clock: Clock
    keys: KeyRing
    _rid: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    async def call(
        self,
        method: str,
        path: str,
        auth: str | None = None,
        json: Any = None,
        *,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        sent = {"X-Request-Id": f"test-{next(self._rid)}"}
        if auth is not None:
            sent["Authorization"] = f"Bearer {auth}"
        sent.update(headers or {})
        if json is not None:
            resp = await self.client.request(method, path, json=json, headers=sent)
        else:
            resp = await self.client.request(method, path, data=data, headers=sent)
        async with resp:
            raw = await resp.read()
            body: Any = None
            if raw and resp.content_type.endswith("json"):
                body = await resp.json(content_type=None)
            elif raw:
                body = raw.decode()
            return Reply(resp.status, resp.headers, body)

    async def ok(self, method: str, path: str, auth: str | None, json: Any = None) -> Any:
        """The body of a call that must succeed (2xx)."""
        reply = await self.call(method, path, auth, json)
        assert 200 <= reply.status < 300, (method, path, reply.status, reply.body)
        return reply.body

    @property
    def database(self) -> Database:
        app = self.client.app
        assert app is not None
        database: Database = app[DATABASE]
        return database


def cheap_hasher() -> PasswordHasher:
    """argon2id at its minimum cost: same code path, milliseconds instead of tens."""
    return PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


@contextlib.asynccontextmanager
async def api_client(target: Target, **config: Any) -> AsyncIterator[Api]:
    """The app on ``target`` (migrated here), served to a test client."""
    await upgrade(target.url, **target.engine_kwargs)
    clock, keys = Clock(), KeyRing()
    settings = BackendConfig(
        database_url=target.url,
        token_secret=b"t" * 32,
        bootstrap_admin_key=ADMIN_KEY,
        **config,
    )
    app = create_app(
        settings,
        engine_kwargs=target.engine_kwargs,
        key_store=keys,
        clock=clock,
        hasher=cheap_hasher(),
    )
    # API tests run no MQTT link or dispatcher and settle sandbox payments at once.
    app[TOPUP_SETTINGS] = TopupSettings(dispatch=False, sandbox_mode=SandboxMode.INSTANT)
    async with TestClient(TestServer(app)) as client:
        yield Api(client, clock, keys)


# ------------------------------------------------------------------------------ world


@dataclass
class Tenant:
    """What one tenant of the world holds (ids and credentials)."""

    id: int = 0
    admin: str = ""
    support: str = ""
    admin_key_id: int = 0
    resellers: dict[str, int] = field(default_factory=dict)
    reseller_keys: dict[str, str] = field(default_factory=dict)
    partner: int = 0
    tariff: int = 0
    gateway: str = ""
    customers: dict[str, int] = field(default_factory=dict)
    accounts: dict[str, int] = field(default_factory=dict)
    meters: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)
    #: tenant A only: a supply account of c0 without a meter
    spare_account: int = 0


@dataclass
class World:
    a: Tenant
    b: Tenant


async def _tenant(
    api: Api, name: str, resellers: list[str], customers: dict[str, str | None], serial_base: int
) -> Tenant:
    t = Tenant()
    body = {
        "name": name,
        "currency": "KES",
        "timezone": "Africa/Nairobi",
        "min_topup_minor": 100,
        "max_topup_minor": 1_000_000,
    }
    t.id = (await api.ok("POST", "/v1/tenants", ADMIN_KEY, body))["id"]
    admin = await api.ok(
        "POST",
        "/v1/api-keys",
        ADMIN_KEY,
        {"name": "ops", "role": "UTILITY_ADMIN", "tenant_id": t.id},
    )
    t.admin, t.admin_key_id = admin["key"], admin["id"]
    t.support = (
        await api.ok("POST", "/v1/api-keys", t.admin, {"name": "desk", "role": "SUPPORT"})
    )["key"]
    for r in resellers:
        rid = (await api.ok("POST", "/v1/resellers", t.admin, {"name": f"{name} {r}"}))["id"]
        t.resellers[r] = rid
        t.reseller_keys[r] = (
            await api.ok(
                "POST",
                "/v1/api-keys",
                t.admin,
                {"name": f"key {r}", "role": "RESELLER", "reseller_id": rid},
            )
        )["key"]
    t.partner = (
        await api.ok("POST", "/v1/partners", t.admin, {"name": "grid", "kind": "GRID_OPERATOR"})
    )["id"]
    tariff = {"code": "domestic", "activation_at": "2026-12-01T00:00:00Z", "tariff": FLAT}
    t.tariff = (await api.ok("POST", "/v1/tariffs", t.admin, tariff))["id"]
    t.gateway = f"gw-{name.rsplit(maxsplit=1)[-1].lower()}"
    await api.ok("POST", "/v1/gateways", t.admin, {"id": t.gateway})
    for n, (c, reseller) in enumerate(customers.items()):
        seller = t.reseller_keys[reseller] if reseller else t.admin
        cid = (
            await api.ok(
                "POST",
                "/v1/customers",
                seller,
                {"name": c, "email": f"{c}@{t.id}.example", "password": f"secret-{c}-pw"},
            )
        )["id"]
        t.customers[c] = cid
        t.accounts[c] = (
            await api.ok(
                "POST",
                "/v1/supply-accounts",
                seller,
                {
                    "customer_id": cid,
                    "tariff_code": "domestic",
                    "label": f"home of {c}",
                    "debt_limit_minor": 500,
                },
            )
        )["id"]
        serial = serial_base + n
        await api.ok(
            "POST",
            "/v1/meters",
            t.admin,
            {
                "serial": serial,
                "gateway_id": t.gateway,
                "supply_account_id": t.accounts[c],
                "modbus_unit": n + 1,
            },
        )
        t.meters[c] = serial
        login = {"tenant_id": t.id, "email": f"{c}@{t.id}.example", "password": f"secret-{c}-pw"}
        t.tokens[c] = (await api.ok("POST", "/v1/auth/login", None, login))["token"]
    return t


async def build_world(api: Api) -> World:
    """Two tenants provisioned through the API (see the module docstring)."""
    a = await _tenant(api, "Tenant A", ["r1", "r2"], {"c1": "r1", "c2": "r2", "c0": None}, 1000)
    b = await _tenant(api, "Tenant B", ["r1"], {"c1": "r1"}, 2000)
    spare = {"customer_id": a.customers["c0"], "tariff_code": "domestic", "label": "spare"}
    a.spare_account = (await api.ok("POST", "/v1/supply-accounts", a.admin, spare))["id"]
    return World(a, b)


SNAPSHOT_TABLES = (
    TenantRow,
    ApiKeyRow,
    ResellerRow,
    PartnerRow,
    TariffRow,
    CustomerRow,
    SupplyAccountRow,
    GatewayRow,
    MeterRow,
    TokenRow,
    AuditRow,
    AccountRow,
)


async def snapshot(api: Api) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every provisioning table (all columns), to prove nothing changed."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    async with api.database.read() as session:
        for model in SNAPSHOT_TABLES:
            columns = list(model.__table__.columns)
            rows = (
                await session.execute(select(*columns).order_by(*model.__table__.primary_key))
            ).all()
            out[model.__tablename__] = [tuple(r) for r in rows]
    return out


def valid_bodies(world: World) -> dict[str, dict[str, Any]]:
    """A body each POST endpoint accepts as caller tenant A's admin (platform for tenants)."""
    a = world.a
    return {
        "/v1/tenants": {
            "name": "Tenant C",
            "currency": "KES",
            "timezone": "Africa/Nairobi",
            "min_topup_minor": 100,
            "max_topup_minor": 10_000,
        },
        "/v1/api-keys": {"name": "new key", "role": "SUPPORT"},
        "/v1/resellers": {"name": "r3"},
        "/v1/partners": {"name": "tax", "kind": "TAX_AUTHORITY"},
        "/v1/tariffs": {
            "code": "domestic",
            "activation_at": "2027-01-01T00:00:00Z",
            "tariff": dict(FLAT),
        },
        "/v1/customers": {"name": "c9", "email": "c9@example.org", "password": "long enough pw"},
        "/v1/supply-accounts": {
            "customer_id": a.customers["c0"],
            "tariff_code": "domestic",
            "label": "second home",
        },
        "/v1/gateways": {"id": "gw-new"},
        "/v1/webhook-endpoints": {"url": "https://ops.example.org/hook", "kinds": ["LOW_CREDIT"]},
        "/v1/meters": {
            "serial": 3000,
            "gateway_id": a.gateway,
            "supply_account_id": a.spare_account,
        },
        "/v1/auth/login": {
            "tenant_id": a.id,
            "email": f"c0@{a.id}.example",
            "password": "secret-c0-pw",
        },
    }
