"""Tenant isolation, role by role and endpoint by endpoint, on SQLite and PostgreSQL.

Every caller of tenant A — its utility admin, its support desk, reseller r1, customer c1
— and the platform admin try every authenticated endpoint against what is not theirs:
tenant B's resources, and for the reseller reseller r2's customers, for the customer the
other customers'. Reading a foreign id answers 404 exactly like an id that does not
exist (existence does not leak); a write naming a foreign id answers 404; a role that may
not take the action at all answers 403. Lists hold only the caller's own rows. After the
whole matrix the database is byte-for-byte what it was. The matrix must name every
authenticated operation of the provisioning route modules, so a new endpoint without
an isolation row fails here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from backend.api.registry import Operation
from backend.api.routes import auth, network, tenancy
from backend.domain.auth import PERMISSIONS, Role
from tests.support.api import ADMIN_KEY, FLAT, Api, World, api_client, build_world, snapshot
from tests.support.db import BACKENDS, target_factory

pytestmark = pytest.mark.integration

OPERATIONS: dict[str, Operation] = {
    op.operation_id: op
    for table in (auth.routes, tenancy.routes, network.routes)
    for op in table.operations
    if not op.public
}


@dataclass(frozen=True)
class Actor:
    name: str
    role: Role
    credential: str


@pytest.fixture(params=BACKENDS)
async def api(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Api]:
    factory = target_factory(request.param, tmp_path, request, prefix="iso")
    async with factory() as target, api_client(target) as client:
        yield client


def actors(world: World) -> list[Actor]:
    a = world.a
    return [
        Actor("utility admin", Role.UTILITY_ADMIN, a.admin),
        Actor("support", Role.SUPPORT, a.support),
        Actor("reseller r1", Role.RESELLER, a.reseller_keys["r1"]),
        Actor("customer c1", Role.CUSTOMER, a.tokens["c1"]),
        Actor("platform admin", Role.PLATFORM_ADMIN, ADMIN_KEY),
    ]


def foreign_reads(actor: Actor, world: World) -> dict[str, list[str]]:
    """Per GET/DELETE-one operation, paths naming what ``actor`` must not reach."""
    a, b = world.a, world.b
    out: dict[str, list[str]] = {
        "get_tenant": [f"/v1/tenants/{b.id}"],
        "get_api_key": [f"/v1/api-keys/{b.admin_key_id}"],
        "revoke_api_key": [f"/v1/api-keys/{b.admin_key_id}"],
        "get_reseller": [f"/v1/resellers/{b.resellers['r1']}"],
        "get_partner": [f"/v1/partners/{b.partner}"],
        "get_tariff": [f"/v1/tariffs/{b.tariff}"],
        "get_customer": [f"/v1/customers/{b.customers['c1']}"],
        "get_supply_account": [f"/v1/supply-accounts/{b.accounts['c1']}"],
        "get_gateway": [f"/v1/gateways/{b.gateway}"],
        "get_meter": [f"/v1/meters/{b.meters['c1']}"],
    }
    if actor.role is Role.PLATFORM_ADMIN:
        # The platform sees every tenant and key by design; it is isolated from the rest.
        for name in ("get_tenant", "get_api_key", "revoke_api_key"):
            out.pop(name)
    others: list[str] = []
    if actor.role is Role.RESELLER:
        out["get_reseller"].append(f"/v1/resellers/{a.resellers['r2']}")
        others = ["c2", "c0"]
    if actor.role is Role.CUSTOMER:
        others = ["c2", "c0"]
        out["get_supply_account"].append(f"/v1/supply-accounts/{a.spare_account}")
    for c in others:
        out["get_customer"].append(f"/v1/customers/{a.customers[c]}")
        out["get_supply_account"].append(f"/v1/supply-accounts/{a.accounts[c]}")
        out["get_meter"].append(f"/v1/meters/{a.meters[c]}")
    return out


def own_reads(actor: Actor, world: World) -> dict[str, str]:
    """A path per GET-one operation that ``actor`` may read (the positive control)."""
    a = world.a
    return {
        "get_tenant": f"/v1/tenants/{a.id}",
        "get_api_key": f"/v1/api-keys/{a.admin_key_id}",
        "get_reseller": f"/v1/resellers/{a.resellers['r1']}",
        "get_partner": f"/v1/partners/{a.partner}",
        "get_tariff": f"/v1/tariffs/{a.tariff}",
        "get_customer": f"/v1/customers/{a.customers['c1']}",
        "get_supply_account": f"/v1/supply-accounts/{a.accounts['c1']}",
        "get_gateway": f"/v1/gateways/{a.gateway}",
        "get_meter": f"/v1/meters/{a.meters['c1']}",
    }


def foreign_writes(actor: Actor, world: World) -> dict[str, list[dict[str, Any]]]:
    """Per POST operation, bodies that name something ``actor`` must not reach."""
    a, b = world.a, world.b
    customer = {"name": "x", "email": "x@example.org", "password": "long enough pw"}
    out: dict[str, list[dict[str, Any]]] = {
        "create_api_key": [
            {"name": "x", "role": "SUPPORT", "tenant_id": b.id},
            {"name": "x", "role": "RESELLER", "reseller_id": b.resellers["r1"]},
        ],
        "create_partner": [{"name": "x", "kind": "RESELLER", "reseller_id": b.resellers["r1"]}],
        "create_customer": [{**customer, "reseller_id": b.resellers["r1"]}],
        "create_supply_account": [
            {"customer_id": b.customers["c1"], "tariff_code": "domestic", "label": "x"}
        ],
        "attach_meter": [
            {"serial": 9001, "gateway_id": b.gateway, "supply_account_id": a.spare_account},
            {"serial": 9002, "gateway_id": a.gateway, "supply_account_id": b.accounts["c1"]},
        ],
        # No foreign id to name: these can only write into the caller's own tenant, so
        # the matrix checks that roles without the permission are refused.
        "create_tenant": [
            {
                "name": "x",
                "currency": "KES",
                "timezone": "UTC",
                "min_topup_minor": 1,
                "max_topup_minor": 2,
            }
        ],
        "create_reseller": [{"name": "x"}],
        "publish_tariff": [
            {"code": "domestic", "activation_at": "2027-01-01T00:00:00Z", "tariff": FLAT}
        ],
        "create_gateway": [{"id": "gw-x"}],
    }
    if actor.role is Role.RESELLER:
        out["create_customer"].append({**customer, "reseller_id": a.resellers["r2"]})
        for c in ("c2", "c0"):
            out["create_supply_account"].append(
                {"customer_id": a.customers[c], "tariff_code": "domestic", "label": "x"}
            )
    if actor.role is Role.PLATFORM_ADMIN:
        out.pop("create_tenant")  # its job
        out["create_api_key"] = [
            {"name": "x", "role": "RESELLER", "tenant_id": a.id, "reseller_id": b.resellers["r1"]}
        ]
    return out


def own_lists(actor: Actor, world: World) -> dict[str, set[Any]]:
    """Per list operation, exactly the ids ``actor`` must see (when its role may list)."""
    a = world.a
    staff = actor.role in (Role.UTILITY_ADMIN, Role.SUPPORT)
    own = ["c1", "c2", "c0"] if staff else ["c1"]
    accounts = {a.accounts[c] for c in own} | ({a.spare_account} if staff else set())
    return {
        "list_tenants": {a.id} if actor.role is not Role.PLATFORM_ADMIN else {a.id, world.b.id},
        "list_resellers": set(a.resellers.values()) if staff else {a.resellers["r1"]},
        "list_partners": {a.partner},
        "list_tariffs": {a.tariff},
        "list_customers": {a.customers[c] for c in own},
        "list_supply_accounts": accounts,
        "list_gateways": {a.gateway},
        "list_meters": {a.meters[c] for c in own},
    }


LIST_PATHS = {
    "list_tenants": "/v1/tenants",
    "list_api_keys": "/v1/api-keys",
    "list_resellers": "/v1/resellers",
    "list_partners": "/v1/partners",
    "list_tariffs": "/v1/tariffs",
    "list_customers": "/v1/customers",
    "list_supply_accounts": "/v1/supply-accounts",
    "list_gateways": "/v1/gateways",
    "list_meters": "/v1/meters",
    "list_audit": "/v1/audit",
}


def expected(actor: Actor, op_id: str) -> int:
    action = OPERATIONS[op_id].action
    assert action is not None
    return 404 if action in PERMISSIONS[actor.role] else 403


def _key(item: dict[str, Any]) -> Any:
    return item.get("id", item.get("serial"))


async def test_no_role_reaches_another_tenants_or_resellers_or_customers_data(api: Api) -> None:
    world = await build_world(api)
    covered: set[str] = set()
    before = await snapshot(api)
    # Lists first: the allowed writes further down add rows of the caller's own.
    for actor in actors(world):
        for op_id, path in LIST_PATHS.items():
            covered.add(op_id)
            reply = await api.call("GET", f"{path}?limit=500", actor.credential)
            case = (actor.name, path)
            if expected(actor, op_id) == 403:
                assert reply.status == 403, (case, reply.body)
                continue
            assert reply.status == 200, (case, reply.body)
            items = reply.body["items"]
            if op_id in ("list_api_keys", "list_audit"):
                if actor.role is not Role.PLATFORM_ADMIN:
                    assert items, case
                    assert {i["tenant_id"] for i in items} == {world.a.id}, case
                continue
            assert {_key(i) for i in items} == own_lists(actor, world)[op_id], case
    for actor in actors(world):
        for op_id, paths in foreign_reads(actor, world).items():
            covered.add(op_id)
            method = OPERATIONS[op_id].method
            for path in paths:
                reply = await api.call(method, path, actor.credential)
                where = (actor.name, method, path)
                assert reply.status == expected(actor, op_id), (where, reply.body)
                assert reply.content_type == "application/problem+json", where
        for op_id, bodies in foreign_writes(actor, world).items():
            covered.add(op_id)
            op = OPERATIONS[op_id]
            if actor.role is Role.UTILITY_ADMIN and op_id in OWN_TENANT_ONLY:
                continue  # allowed: see the end of this test
            for body in bodies:
                reply = await api.call(op.method, op.path, actor.credential, body)
                sent = (actor.name, op.path, body)
                assert reply.status == expected(actor, op_id), (sent, reply.body)
    assert covered == set(OPERATIONS), set(OPERATIONS) ^ covered
    assert await snapshot(api) == before
    # What has no foreign id to name lands in the caller's own tenant.
    admin = actors(world)[0]
    writes = foreign_writes(admin, world)
    for op_id in OWN_TENANT_ONLY:
        op = OPERATIONS[op_id]
        created = await api.ok(op.method, op.path, admin.credential, writes[op_id][0])
        assert created["tenant_id"] == world.a.id, op_id


#: Operations that name no other resource: they write into the caller's tenant, always.
OWN_TENANT_ONLY = ("create_reseller", "publish_tariff", "create_gateway")


async def test_own_resources_are_readable_by_whoever_may_read_them(api: Api) -> None:
    world = await build_world(api)
    for actor in actors(world):
        for op_id, path in own_reads(actor, world).items():
            reply = await api.call("GET", path, actor.credential)
            want = 200 if expected(actor, op_id) == 404 else 403
            assert reply.status == want, (actor.name, path, reply.body)
