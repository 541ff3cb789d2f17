"""Malformed input never changes anything: every body endpoint by every kind of bad input.

For each operation with a request body, starting from a body it accepts, each mutation —
not JSON, not UTF-8, duplicate keys, NaN, too deep, empty, not an object, unknown field,
missing field, null, wrong type, bool as integer, float as integer, out of range, control
characters, too long, wrong content type, too large — answers a 4xx
``application/problem+json`` naming the problem, and the database is unchanged. So do bad
path ids, bad query strings, unknown routes, wrong methods and malformed credentials.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from backend.api.app import ROUTE_MODULES, load_routes
from backend.api.registry import Operation
from tests.support.api import ADMIN_KEY, Api, World, api_client, build_world, snapshot, valid_bodies
from tests.support.db import BACKENDS, target_factory

pytestmark = pytest.mark.integration

# Top-ups need an Idempotency-Key and a metered account, split-rule sets a tariff code in
# their path; their malformed-input cases are in tests/integration/test_topups_http.py and
# tests/integration/test_split_rules_api.py.
BODY_OPS: list[Operation] = [
    op
    for table, _ in load_routes(ROUTE_MODULES)
    for op in table.operations
    if op.body is not None and not op.path.endswith("/topups") and "/split-rules/" not in op.path
]
Body = dict[str, Any]


@pytest.fixture(params=BACKENDS)
async def api(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Api]:
    factory = target_factory(request.param, tmp_path, request, prefix="input")
    async with factory() as target, api_client(target) as client:
        yield client


def _fields_of(op: Operation, kind: type) -> list[str]:
    assert op.body is not None
    hints = typing.get_type_hints(op.body)
    return [f.name for f in dataclasses.fields(op.body) if hints[f.name] is kind]


def _required(op: Operation) -> list[str]:
    assert op.body is not None
    return [
        f.name
        for f in dataclasses.fields(op.body)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]


Mutation = Callable[[Body], Any]


def setting(name: str, value: object) -> Mutation:
    """A mutation putting ``value`` under ``name``."""
    return lambda body: {**body, name: value}


def json_mutations(op: Operation) -> list[tuple[str, Mutation, str]]:
    """(label, mutate valid body → bad body, field the problem must name)."""
    ints, strs = _fields_of(op, int), _fields_of(op, str)
    first = _required(op)[0]
    out: list[tuple[str, Mutation, str]] = [
        ("unknown field", setting("surprise", 1), "surprise"),
        ("missing field", lambda b: {k: v for k, v in b.items() if k != first}, first),
        ("null", setting(first, None), first),
    ]
    for name in ints[:1]:
        out += [
            ("bool as int", setting(name, value=True), name),
            ("string as int", setting(name, "1"), name),
            ("float as int", setting(name, 1.0), name),
            ("out of range", setting(name, -1), name),
            ("huge int", setting(name, 2**64), name),
        ]
    for name in strs[:1]:
        out += [
            ("int as string", setting(name, 5), name),
            ("control char", setting(name, "a\u0000b"), name),
            ("too long", setting(name, "x" * 2000), name),
            ("empty string", setting(name, ""), name),
            ("object as string", setting(name, {"a": 1}), name),
        ]
    return out


#: Raw bodies that are not acceptable JSON at all (400).
RAW_BAD: list[tuple[str, bytes]] = [
    ("not JSON", b'{"name": '),
    ("not UTF-8", b'{"name": "\xff\xfe"}'),
    ("duplicate key", b'{"name": "a", "name": "b"}'),
    ("NaN", b'{"name": NaN}'),
    ("Infinity", b'{"x": -Infinity}'),
    ("too deep", b"[" * 30_000 + b"]" * 30_000),
    ("empty", b""),
    ("trailing garbage", b'{"name": "a"} x'),
]


def check_problem(reply: Any, status: int, case: object) -> None:
    assert reply.status == status, (case, reply.body)
    assert reply.content_type == "application/problem+json", case
    body = reply.body
    assert body["status"] == status, case
    assert body["type"].startswith("urn:voltcredit:problem:"), case
    assert body["title"], case
    assert body["detail"], case
    assert body["instance"] == f"urn:voltcredit:request:{reply.headers['X-Request-Id']}", case


def caller(op: Operation, world: World) -> str | None:
    if op.public:
        return None
    return ADMIN_KEY if op.path == "/v1/tenants" else world.a.admin


async def test_malformed_bodies_are_refused_and_change_nothing(api: Api) -> None:
    world = await build_world(api)
    bodies = valid_bodies(world)
    before = await snapshot(api)
    assert {op.path for op in BODY_OPS} <= set(bodies)
    for op in BODY_OPS:
        auth = caller(op, world)
        for label, mutate, field in json_mutations(op):
            reply = await api.call(op.method, op.path, auth, mutate(bodies[op.path]))
            case = (op.path, label)
            check_problem(reply, 422, case)
            assert reply.body["type"] == "urn:voltcredit:problem:invalid-input", case
            assert field in {e["field"] for e in reply.body["errors"]}, (case, reply.body)
        reply = await api.call(op.method, op.path, auth, [bodies[op.path]])
        check_problem(reply, 422, (op.path, "array body"))
        for label, raw in RAW_BAD:
            reply = await api.call(
                op.method, op.path, auth, data=raw, headers={"Content-Type": "application/json"}
            )
            check_problem(reply, 400, (op.path, label))
            assert reply.body["type"] == "urn:voltcredit:problem:malformed-request"
        reply = await api.call(
            op.method,
            op.path,
            auth,
            data=b'{"name": "x"}',
            headers={"Content-Type": "text/plain"},
        )
        check_problem(reply, 415, (op.path, "text/plain"))
        big = b'{"name": "' + b"x" * (64 * 1024) + b'"}'
        reply = await api.call(
            op.method, op.path, auth, data=big, headers={"Content-Type": "application/json"}
        )
        check_problem(reply, 413, (op.path, "oversize"))
    assert await snapshot(api) == before


async def test_oversize_chunked_body_is_cut_at_the_limit(api: Api) -> None:
    before = await snapshot(api)

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"name": "'
        for _ in range(100):
            yield b"x" * 1024
        yield b'"}'

    resp = await api.client.post(
        "/v1/tenants",
        data=chunks(),
        headers={"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"},
    )
    async with resp:
        assert resp.status == 413
        assert resp.content_type == "application/problem+json"
    assert await snapshot(api) == before


async def test_bad_ids_queries_routes_methods_and_credentials(api: Api) -> None:
    world = await build_world(api)
    admin = world.a.admin
    before = await snapshot(api)
    for path in ("tenants", "customers", "supply-accounts", "meters", "tariffs", "api-keys"):
        for bad in ("abc", "0", "-1", "1.5", "99999999999999999999", "0001", "1e3", "%20"):
            reply = await api.call("GET", f"/v1/{path}/{bad}", admin)
            check_problem(reply, 404, (path, bad))
    for bad in ("bad%20id", "x" * 65, "semi;colon"):
        check_problem(await api.call("GET", f"/v1/gateways/{bad}", admin), 404, bad)
    check_problem(await api.call("DELETE", "/v1/api-keys/abc", admin), 404, "delete abc")
    for query in (
        "limit=0",
        "limit=abc",
        "limit=501",
        "limit=-1",
        "after=x",
        "after=-5",
        "foo=1",
        "limit=1&limit=2",
    ):
        reply = await api.call("GET", f"/v1/customers?{query}", admin)
        check_problem(reply, 400, query)
        assert reply.body["type"] == "urn:voltcredit:problem:malformed-request"
    check_problem(await api.call("GET", "/v1/gateways?after=bad%20id", admin), 400, "gw after")
    check_problem(await api.call("GET", "/v1/nothing-here", admin), 404, "no route")
    reply = await api.call("PUT", "/v1/tenants", ADMIN_KEY, {"name": "x"})
    check_problem(reply, 405, "PUT")
    assert "POST" in reply.headers["Allow"]
    for header in (
        "Basic dXNlcjpwdw==",
        "Bearer",
        "Bearer ",
        "Bearer vck_short",
        "Bearer vck_0badcafe_" + "B" * 43,
        "Bearer vcc_garbage",
        "Bearer vcc_.",
        "Bearer vcc_eyJ9.AAAA",
        "bearer " + world.a.admin[:-1],
    ):
        reply = await api.call("GET", "/v1/customers", None, headers={"Authorization": header})
        check_problem(reply, 401, header)
        assert reply.headers["WWW-Authenticate"].startswith("Bearer")
    # The scheme is case-insensitive (RFC 7235 §2.1).
    reply = await api.call(
        "GET", "/v1/customers", None, headers={"Authorization": f"bearer {admin}"}
    )
    assert reply.status == 200
    assert await snapshot(api) == before
