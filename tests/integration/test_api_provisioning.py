"""The provisioning API on SQLite and PostgreSQL: every endpoint's happy path and its refusals.

Tenants, API keys, resellers, partners, tariffs (with signed tariff messages queued for
the affected meters), customers and login, supply accounts, gateways (MQTT credentials
shown once), meters; the audit row of every change; readiness.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher
from sqlalchemy import select

from backend.adapters.db.ledger_tables import AccountRow
from backend.adapters.db.tables import AuditRow, GatewayRow, MeterRow, TokenRow
from firmware_protocol import messages
from firmware_protocol.messages import TariffMessage
from tests.support.api import (
    ADMIN_KEY,
    FLAT,
    SIGNING_KEY_ID,
    Api,
    World,
    api_client,
    build_world,
    snapshot,
    valid_bodies,
)
from tests.support.db import BACKENDS, target_factory

pytestmark = pytest.mark.integration


@pytest.fixture(params=BACKENDS)
async def api(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Api]:
    factory = target_factory(request.param, tmp_path, request, prefix="api")
    async with factory() as target, api_client(target) as client:
        yield client


#: For behaviour that does not depend on the database (checked in code, not by SQL), one
#: database is enough; the rest runs on both.
SQLITE_ONLY = pytest.mark.parametrize("api", ["sqlite"], indirect=True)


@pytest.fixture
async def world(api: Api) -> World:
    return await build_world(api)


async def test_world_is_provisioned_and_readable(api: Api, world: World) -> None:
    a = world.a
    tenant = await api.ok("GET", f"/v1/tenants/{a.id}", a.admin)
    assert tenant["name"] == "Tenant A"
    assert tenant["currency"] == "KES"
    assert tenant["created_at"] == "2026-11-26T09:00:00Z"
    customers = (await api.ok("GET", "/v1/customers", a.admin))["items"]
    assert {c["id"] for c in customers} == set(a.customers.values())
    assert all("password" not in str(c) for c in customers)
    c1 = await api.ok("GET", f"/v1/customers/{a.customers['c1']}", a.admin)
    assert c1["reseller_id"] == a.resellers["r1"]
    assert c1["email"] == f"c1@{a.id}.example"
    account = await api.ok("GET", f"/v1/supply-accounts/{a.accounts['c1']}", a.admin)
    assert account["customer_id"] == a.customers["c1"]
    assert account["reseller_id"] == a.resellers["r1"]  # inherited from the customer
    assert account["debt_limit_minor"] == 500
    meter = await api.ok("GET", f"/v1/meters/{a.meters['c1']}", a.admin)
    assert meter["gateway_id"] == a.gateway
    assert meter["supply_account_id"] == a.accounts["c1"]
    assert meter["next_msg_id"] == 2  # msg 1 carried the account's tariff to the meter
    partner = await api.ok("GET", f"/v1/partners/{a.partner}", a.admin)
    assert partner["kind"] == "GRID_OPERATOR"
    reseller = await api.ok("GET", f"/v1/resellers/{a.resellers['r2']}", a.admin)
    assert reseller["name"] == "Tenant A r2"
    gateway = await api.ok("GET", f"/v1/gateways/{a.gateway}", a.admin)
    assert gateway["mqtt_username"] == a.gateway
    assert "mqtt_password" not in gateway
    tariff = await api.ok("GET", f"/v1/tariffs/{a.tariff}", a.admin)
    assert (tariff["code"], tariff["version"], tariff["tariff_id"]) == ("domestic", 1, 1)
    assert tariff["tariff"]["bands"] == FLAT["bands"]
    assert tariff["activation_at"] == "2026-12-01T00:00:00Z"
    # The ledger accounts behind tenants, partners and supply accounts.
    async with api.database.read() as session:
        accounts = {row.id: row for row in (await session.scalars(select(AccountRow))).all()}
    assert accounts[tenant["clearing_account_id"]].code == "CLEARING"
    assert accounts[tenant["clearing_account_id"]].min_balance is None
    assert accounts[partner["ledger_account_id"]].code == "PARTNER"
    assert accounts[partner["ledger_account_id"]].min_balance == 0
    assert accounts[account["ledger_account_id"]].code == "PREPAID"
    assert accounts[account["ledger_account_id"]].min_balance == -500
    assert accounts[account["ledger_account_id"]].currency == "KES"


@SQLITE_ONLY
async def test_lists_page_through_with_after(api: Api, world: World) -> None:
    a = world.a
    seen: list[int] = []
    after: int | None = None
    while True:
        query = f"?limit=1&after={after}" if after is not None else "?limit=1"
        page = await api.ok("GET", f"/v1/customers{query}", a.admin)
        seen += [c["id"] for c in page["items"]]
        after = page["next_after"]
        if after is None:
            break
    assert seen == sorted(a.customers.values())
    gateways = await api.ok("GET", "/v1/gateways?limit=1", a.admin)
    assert [g["id"] for g in gateways["items"]] == [a.gateway]
    assert gateways["next_after"] is None
    tenants = await api.ok("GET", "/v1/tenants", ADMIN_KEY)
    assert [t["id"] for t in tenants["items"]] == [world.a.id, world.b.id]


async def test_publishing_a_tariff_signs_a_message_for_each_affected_meter(
    api: Api, world: World
) -> None:
    a = world.a
    body = {
        "code": "domestic",
        "activation_at": "2027-01-01T00:00:00+03:00",
        "tariff": {**FLAT, "bands": [{"name": "flat", "price_milli_per_kwh": 27_500}]},
    }
    published = await api.ok("POST", "/v1/tariffs", a.admin, body)
    assert (published["version"], published["tariff_id"]) == (2, 2)
    assert published["messages_queued"] == 3
    assert published["activation_at"] == "2026-12-31T21:00:00Z"
    async with api.database.read() as session:
        tokens = (
            await session.scalars(
                select(TokenRow).where(TokenRow.tenant_id == a.id).order_by(TokenRow.id)
            )
        ).all()
        meters = {m.id: m for m in (await session.scalars(select(MeterRow))).all()}
    assert signer_public(api) is not None
    new = [t for t in tokens if t.msg_id == 2]
    assert sorted(t.meter_id for t in new) == sorted(a.meters.values())
    keys = {SIGNING_KEY_ID: signer_public(api)}
    for token in new:
        assert (token.kind, token.status, token.attempts) == ("TARIFF", "PENDING", 0)
        message = messages.verify(token.message, keys, meter_id=token.meter_id, now=api_now(api))
        assert isinstance(message, TariffMessage)
        assert message.header.msg_id == 2
        assert message.tariff.tariff_id == 2
        assert message.tariff.bands[0].price_milli_per_kwh == 27_500
        assert message.activation_at == 1_798_750_800  # 2026-12-31T21:00:00Z
        assert meters[token.meter_id].next_msg_id == 3
    # Another tenant's meters are untouched.
    b_tokens = [t for t in tokens if t.meter_id in world.b.meters.values()]
    assert b_tokens == []
    # A new code affects no meter yet.
    other = await api.ok("POST", "/v1/tariffs", a.admin, {**body, "code": "business"})
    assert (other["version"], other["tariff_id"], other["messages_queued"]) == (1, 3, 0)


async def test_concurrent_publications_take_distinct_numbers(api: Api, world: World) -> None:
    a = world.a
    body = {"code": "domestic", "activation_at": "2027-01-01T00:00:00Z", "tariff": FLAT}
    replies = await asyncio.gather(
        *(api.call("POST", "/v1/tariffs", a.admin, body) for _ in range(4))
    )
    assert [r.status for r in replies] == [201] * 4
    assert sorted(r.body["version"] for r in replies) == [2, 3, 4, 5]
    assert sorted(r.body["tariff_id"] for r in replies) == [2, 3, 4, 5]
    async with api.database.read() as session:
        tokens = (await session.scalars(select(TokenRow).where(TokenRow.tenant_id == a.id))).all()
        meters = (await session.scalars(select(MeterRow).where(MeterRow.tenant_id == a.id))).all()
    for meter in meters:
        ids = sorted(t.msg_id for t in tokens if t.meter_id == meter.id)
        assert ids == [1, 2, 3, 4, 5]  # attach + four publications, no gap, no repeat
        assert meter.next_msg_id == 6


def signer_public(api: Api) -> Any:
    signer = api.keys.signer
    assert signer is not None
    return signer.private_key.public_key()


def api_now(api: Api) -> int:
    return int(api.clock.now.timestamp())


@SQLITE_ONLY
async def test_publishing_without_a_signing_key_changes_nothing(api: Api, world: World) -> None:
    before = await snapshot(api)
    api.keys.signer = None
    body = {"code": "domestic", "activation_at": "2027-01-01T00:00:00Z", "tariff": FLAT}
    reply = await api.call("POST", "/v1/tariffs", world.a.admin, body)
    assert reply.status == 409
    assert reply.body["type"] == "urn:voltcredit:problem:key-state"
    assert await snapshot(api) == before


@SQLITE_ONLY
async def test_gateway_credentials_are_shown_once_and_stored_hashed(api: Api, world: World) -> None:
    created = await api.ok("POST", "/v1/gateways", world.a.admin, {"id": "site-7"})
    assert created["mqtt_username"] == "site-7"
    password = created["mqtt_password"]
    assert len(password) >= 32
    async with api.database.read() as session:
        row = await session.get(GatewayRow, "site-7")
    assert row is not None
    assert password not in row.mqtt_password_hash
    assert row.mqtt_password_hash.startswith("$argon2id$")
    assert PasswordHasher().verify(row.mqtt_password_hash, password)
    listed = await api.ok("GET", "/v1/gateways", world.a.admin)
    assert all("mqtt_password" not in g for g in listed["items"])


@SQLITE_ONLY
async def test_api_keys_are_shown_once_and_revocable(api: Api, world: World) -> None:
    a = world.a
    created = await api.ok("POST", "/v1/api-keys", a.admin, {"name": "bi", "role": "SUPPORT"})
    key = created["key"]
    assert key.startswith(f"vck_{created['prefix']}_")
    assert created["tenant_id"] == a.id
    listed = await api.ok("GET", "/v1/api-keys", a.admin)
    assert all("key" not in k for k in listed["items"])
    assert created["id"] in {k["id"] for k in listed["items"]}
    assert (await api.call("GET", "/v1/customers", key)).status == 200
    revoked = await api.ok("DELETE", f"/v1/api-keys/{created['id']}", a.admin)
    assert revoked["revoked_at"] == "2026-11-26T09:00:00Z"
    reply = await api.call("GET", "/v1/customers", key)
    assert reply.status == 401
    assert "revoked" in reply.body["detail"]
    again = await api.ok("DELETE", f"/v1/api-keys/{created['id']}", a.admin)
    assert again["revoked_at"] == revoked["revoked_at"]
    shown = await api.ok("GET", f"/v1/api-keys/{created['id']}", a.admin)
    assert shown["revoked_at"] == revoked["revoked_at"]
    # A key with the right prefix and a wrong secret is unknown.
    forged = key[:-1] + ("A" if key[-1] != "A" else "B")
    assert (await api.call("GET", "/v1/customers", forged)).status == 401


@SQLITE_ONLY
async def test_customer_login_and_token_expiry(api: Api, world: World) -> None:
    a = world.a
    login = {"tenant_id": a.id, "email": f"C1@{a.id}.EXAMPLE", "password": "secret-c1-pw"}
    result = await api.ok("POST", "/v1/auth/login", None, login)
    assert result["token_type"] == "Bearer"  # noqa: S105 - the RFC 6750 scheme name
    assert result["customer_id"] == a.customers["c1"]
    assert result["expires_at"] == "2026-11-26T09:15:00Z"
    token = result["token"]
    mine = await api.ok("GET", "/v1/supply-accounts", token)
    assert [x["id"] for x in mine["items"]] == [a.accounts["c1"]]
    for wrong in (
        {**login, "password": "secret-c2-pw"},
        {**login, "email": "nobody@example.org"},
        {**login, "tenant_id": world.b.id},
    ):
        reply = await api.call("POST", "/v1/auth/login", None, wrong)
        assert reply.status == 401
        assert reply.body["detail"] == "wrong tenant, e-mail or password"
    tampered = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    assert (await api.call("GET", "/v1/supply-accounts", tampered)).status == 401
    api.clock.advance(15 * 60)
    reply = await api.call("GET", "/v1/supply-accounts", token)
    assert reply.status == 401
    assert "expired" in reply.body["detail"]


async def test_every_change_is_audited_in_its_transaction(api: Api, world: World) -> None:
    a = world.a
    reply = await api.call("POST", "/v1/resellers", a.admin, {"name": "audited"})
    assert reply.status == 201
    rid = reply.headers["X-Request-Id"]
    entries = (await api.ok("GET", "/v1/audit?limit=500", a.admin))["items"]
    mine = [e for e in entries if e["request_id"] == rid]
    assert len(mine) == 1
    entry = mine[0]
    assert entry["action"] == "reseller.create"
    assert entry["target"] == f"reseller:{reply.body['id']}"
    assert entry["actor"] == f"api_key:{a.admin_key_id}"
    assert entry["tenant_id"] == a.id
    assert entry["at"] == "2026-11-26T09:00:00Z"
    actions = {e["action"] for e in entries}
    assert {
        "tenant.create",
        "api_key.create",
        "reseller.create",
        "partner.create",
        "tariff.publish",
        "gateway.create",
        "customer.create",
        "supply_account.create",
        "meter.create",
    } <= actions
    assert all(e["tenant_id"] == a.id for e in entries)
    # Every audited change of tenant A has a distinct request id.
    async with api.database.read() as session:
        rows = (await session.scalars(select(AuditRow))).all()
    assert len({r.request_id for r in rows}) == len(rows)
    assert any(r.actor == "system" and r.request_id == "startup" for r in rows)  # bootstrap
    platform = (await api.ok("GET", "/v1/audit?limit=500", ADMIN_KEY))["items"]
    assert len(platform) == len(rows)


#: (caller, endpoint, body overrides, status, problem slug): refusals of valid-looking bodies.
REFUSALS: list[tuple[str, str, dict[str, Any], int, str]] = [
    ("admin", "/v1/tenants", {"name": "Tenant A"}, 409, "conflict"),
    ("a", "/v1/resellers", {"name": "Tenant A r1"}, 409, "conflict"),
    ("a", "/v1/partners", {"name": "grid", "kind": "OTHER"}, 409, "conflict"),
    ("a", "/v1/customers", {"email": "C1@{a}.example"}, 409, "conflict"),
    ("a", "/v1/gateways", {"id": "gw-b"}, 409, "conflict"),
    ("a", "/v1/gateways", {"id": "backend"}, 422, "invalid-input"),
    ("a", "/v1/meters", {"serial": 2000}, 409, "conflict"),
    ("a", "/v1/meters", {"supply_account_id": "{c1_account}"}, 409, "conflict"),
    ("a", "/v1/tariffs", {"currency": "EUR"}, 422, "invalid-input"),
    ("a", "/v1/tariffs", {"tariff_id": 9}, 422, "invalid-input"),
    ("a", "/v1/tariffs", {"bands": []}, 422, "invalid-input"),
    ("a", "/v1/tariffs", {"timezone": "Mars/Olympus"}, 422, "invalid-input"),
    ("a", "/v1/supply-accounts", {"tariff_code": "nope"}, 422, "invalid-input"),
    ("a", "/v1/api-keys", {"role": "PLATFORM_ADMIN"}, 403, "forbidden"),
    ("a", "/v1/api-keys", {"role": "CUSTOMER"}, 422, "invalid-input"),
    ("a", "/v1/api-keys", {"role": "RESELLER"}, 422, "invalid-input"),
    ("a", "/v1/api-keys", {"role": "SUPPORT", "reseller_id": "{r1}"}, 422, "invalid-input"),
    ("admin", "/v1/api-keys", {"role": "SUPPORT"}, 422, "invalid-input"),
    ("admin", "/v1/api-keys", {"role": "PLATFORM_ADMIN", "tenant_id": "{a}"}, 422, "invalid-input"),
    ("admin", "/v1/api-keys", {"role": "SUPPORT", "tenant_id": 999}, 404, "not-found"),
    ("admin", "/v1/tenants", {"currency": "XXX"}, 422, "invalid-input"),
    ("admin", "/v1/tenants", {"timezone": "Nowhere/City"}, 422, "invalid-input"),
    ("admin", "/v1/tenants", {"max_topup_minor": 1}, 422, "invalid-input"),
]


async def test_refusals_change_nothing(api: Api, world: World) -> None:
    a = world.a
    bodies = valid_bodies(world)
    names = {"a": a.id, "r1": a.resellers["r1"], "c1_account": a.accounts["c1"]}
    for who, path, overrides, status, kind in REFUSALS:
        filled = {
            k: (
                int(v[1:-1] and names[v[1:-1]])
                if isinstance(v, str) and v.startswith("{")
                else v.format(**names)
                if isinstance(v, str)
                else v
            )
            for k, v in overrides.items()
        }
        body = {**bodies[path], **filled}
        if path == "/v1/tariffs":
            body = {**bodies[path], "tariff": {**bodies[path]["tariff"], **filled}}
        before = await snapshot(api)
        reply = await api.call("POST", path, ADMIN_KEY if who == "admin" else a.admin, body)
        case = (who, path, overrides)
        assert reply.status == status, (case, reply.body)
        assert reply.content_type == "application/problem+json", case
        assert reply.body["type"] == f"urn:voltcredit:problem:{kind}", case
        assert reply.body["status"] == status, case
        assert reply.body["detail"], case
        assert await snapshot(api) == before, case
    # and each valid body is indeed accepted (so the refusals above were for their reason)
    for path, body in bodies.items():
        caller = ADMIN_KEY if path == "/v1/tenants" else None if "login" in path else a.admin
        await api.ok("POST", path, caller, body)


@SQLITE_ONLY
async def test_health_and_readiness(api: Api) -> None:
    assert (await api.ok("GET", "/healthz", None)) == {"status": "alive"}
    ready = await api.ok("GET", "/readyz", None)
    assert ready["status"] == "ready"
    reply = await api.call("GET", "/healthz", None, headers={"X-Request-Id": "abc-123"})
    assert reply.headers["X-Request-Id"] == "abc-123"
    reply = await api.call("GET", "/healthz", None, headers={"X-Request-Id": "bad id!"})
    assert reply.headers["X-Request-Id"] != "bad id!"
    assert len(reply.headers["X-Request-Id"]) == 32
