"""The split-rule API on SQLite and PostgreSQL: round trip, refusals change nothing, isolation.

``PUT/GET /v1/tariffs/{code}/split-rules/{applies_to}``: a rule set is replaced whole in
one transaction with an audit row; a refused set (bad kind for the context, two
REMAINDERs, a foreign or missing partner, an unknown tariff, basis points over 10 000, a
role that may not) leaves every table as it was; tenants never see each other's sets.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from backend.adapters.db.tables import AuditRow, SplitRuleRow
from tests.support.api import ADMIN_KEY, FLAT, Api, World, api_client, build_world, snapshot
from tests.support.db import BACKENDS, target_factory

pytestmark = pytest.mark.integration

RULES = "/v1/tariffs/domestic/split-rules"


@pytest.fixture(params=BACKENDS)
async def api(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Api]:
    factory = target_factory(request.param, tmp_path, request, prefix="split")
    async with factory() as target, api_client(target) as client:
        yield client


@pytest.fixture
async def world(api: Api) -> World:
    return await build_world(api)


async def _partners(api: Api, key: str, reseller_id: int | None = None) -> dict[str, Any]:
    """A utility, a tax authority and (with ``reseller_id``) a reseller partner."""
    out = {
        "utility": await api.ok("POST", "/v1/partners", key, {"name": "util", "kind": "UTILITY"}),
        "tax": await api.ok("POST", "/v1/partners", key, {"name": "vat", "kind": "TAX_AUTHORITY"}),
    }
    if reseller_id is not None:
        out["reseller"] = await api.ok(
            "POST",
            "/v1/partners",
            key,
            {"name": "kiosk", "kind": "RESELLER", "reseller_id": reseller_id},
        )
    return out


def _consumption(grid: int, tax: int, utility: int) -> dict[str, Any]:
    return {
        "rules": [
            {"kind": "PER_KWH", "partner_id": grid, "value": 9_000},
            {"kind": "BASIS_POINTS", "partner_id": tax, "value": 1597},
            {"kind": "REMAINDER", "partner_id": utility},
        ]
    }


async def _state(api: Api) -> dict[str, list[tuple[Any, ...]]]:
    """Every provisioning table plus split_rules, all columns."""
    out = await snapshot(api)
    async with api.database.read() as session:
        columns = list(SplitRuleRow.__table__.columns)
        rows = (await session.execute(select(*columns).order_by(SplitRuleRow.id))).all()
    out["split_rules"] = [tuple(r) for r in rows]
    return out


async def test_put_then_get_round_trips_and_audits(api: Api, world: World) -> None:
    a = world.a
    p = await _partners(api, a.admin)
    body = _consumption(a.partner, p["tax"]["id"], p["utility"]["id"])
    put = await api.ok("PUT", f"{RULES}/CONSUMPTION", a.admin, body)
    assert put["tariff_code"] == "domestic"
    assert put["applies_to"] == "CONSUMPTION"
    got = [(r["position"], r["kind"], r["partner_id"], r["value"]) for r in put["rules"]]
    assert got == [
        (0, "PER_KWH", a.partner, 9_000),
        (1, "BASIS_POINTS", p["tax"]["id"], 1597),
        (2, "REMAINDER", p["utility"]["id"], 0),
    ]
    assert put["rules"][1]["ledger_account_id"] == p["tax"]["ledger_account_id"]
    assert put["rules"][2]["partner_name"] == "util"
    assert put["rules"][0]["created_at"] == "2026-11-26T09:00:00Z"
    # GET answers exactly what PUT answered, for the admin and for SUPPORT (read-only).
    assert await api.ok("GET", f"{RULES}/CONSUMPTION", a.admin) == put
    assert await api.ok("GET", f"{RULES}/CONSUMPTION", a.support) == put
    # The other context of the same code is untouched (empty: nothing is split).
    topup = await api.ok("GET", f"{RULES}/TOPUP", a.admin)
    assert topup == {"tariff_code": "domestic", "applies_to": "TOPUP", "rules": []}
    async with api.database.read() as session:
        audit = (
            await session.scalars(select(AuditRow).where(AuditRow.action == "split_rules.replace"))
        ).all()
    assert len(audit) == 1
    assert audit[0].target == "split_rules:domestic:CONSUMPTION"
    assert audit[0].tenant_id == a.id
    assert audit[0].detail["rules"][0] == {
        "kind": "PER_KWH",
        "partner_id": a.partner,
        "value": 9000,
    }
    assert audit[0].detail["replaced"] == []

    # Replacing: new ids, old rows gone, the audit row names what was replaced.
    api.clock.advance(60)
    smaller = {"rules": [{"kind": "REMAINDER", "partner_id": p["utility"]["id"], "value": 0}]}
    again = await api.ok("PUT", f"{RULES}/CONSUMPTION", a.admin, smaller)
    assert len(again["rules"]) == 1
    assert again["rules"][0]["id"] not in {r["id"] for r in put["rules"]}
    async with api.database.read() as session:
        count = await session.scalar(select(func.count()).select_from(SplitRuleRow))
        last = (
            await session.scalars(
                select(AuditRow)
                .where(AuditRow.action == "split_rules.replace")
                .order_by(AuditRow.id.desc())
            )
        ).first()
    assert count == 1
    assert last is not None
    assert [r["kind"] for r in last.detail["replaced"]] == ["PER_KWH", "BASIS_POINTS", "REMAINDER"]

    # A TOPUP set: reseller commission to a reseller's partner, the rest to the utility.
    r1 = await _partners_reseller(api, a.admin, a.resellers["r1"])
    topup_body = {
        "rules": [
            {"kind": "BASIS_POINTS", "partner_id": r1, "value": 300},
            {"kind": "FIXED_PER_TOPUP", "partner_id": p["tax"]["id"], "value": 5_000},
            {"kind": "REMAINDER", "partner_id": p["utility"]["id"]},
        ]
    }
    topup = await api.ok("PUT", f"{RULES}/TOPUP", a.admin, topup_body)
    assert [r["kind"] for r in topup["rules"]] == ["BASIS_POINTS", "FIXED_PER_TOPUP", "REMAINDER"]
    assert (await api.ok("GET", f"{RULES}/CONSUMPTION", a.admin))["rules"] == again["rules"]


async def _partners_reseller(api: Api, key: str, reseller_id: int) -> int:
    body = {
        "name": f"reseller partner {reseller_id}",
        "kind": "RESELLER",
        "reseller_id": reseller_id,
    }
    partner = await api.ok("POST", "/v1/partners", key, body)
    return int(partner["id"])


async def test_every_refusal_changes_nothing(api: Api, world: World) -> None:
    a, b = world.a, world.b
    p = await _partners(api, a.admin, a.resellers["r1"])
    grid, tax, util, kiosk = a.partner, p["tax"]["id"], p["utility"]["id"], p["reseller"]["id"]
    await api.ok("PUT", f"{RULES}/CONSUMPTION", a.admin, _consumption(grid, tax, util))
    before = await _state(api)

    def rules(*items: tuple[str, int, int]) -> dict[str, Any]:
        return {"rules": [{"kind": k, "partner_id": pid, "value": v} for k, pid, v in items]}

    rem = ("REMAINDER", util, 0)
    cases: list[tuple[str, str, str | None, Any, int, str | None]] = [
        # (name, path, key, body, status, field named in errors[])
        ("fixed per top-up in consumption", "CONSUMPTION", a.admin,
         rules(("FIXED_PER_TOPUP", grid, 10), rem), 422, "rules"),
        ("per kWh in top-up", "TOPUP", a.admin, rules(("PER_KWH", grid, 10), rem), 422, "rules"),
        ("fixed per day in top-up", "TOPUP", a.admin,
         rules(("FIXED_PER_DAY", grid, 10), rem), 422, "rules"),
        ("two remainders", "CONSUMPTION", a.admin, rules(rem, ("REMAINDER", grid, 0)), 422,
         "rules"),
        ("no remainder", "CONSUMPTION", a.admin, rules(("PER_KWH", grid, 10)), 422, "rules"),
        ("foreign partner", "CONSUMPTION", a.admin, rules(("PER_KWH", b.partner, 10), rem), 422,
         "rules[0].partner_id"),
        ("missing partner", "CONSUMPTION", a.admin, rules(("PER_KWH", 987_654, 10), rem), 422,
         "rules[0].partner_id"),
        ("basis points over 10000", "CONSUMPTION", a.admin,
         rules(("BASIS_POINTS", tax, 10_001), rem), 422, "rules[0].value"),
        ("basis points total over 10000", "TOPUP", a.admin,
         rules(("BASIS_POINTS", tax, 6000), ("BASIS_POINTS", grid, 4001), rem), 422, "rules"),
        ("remainder with a value", "CONSUMPTION", a.admin, rules(("REMAINDER", util, 5)), 422,
         "rules[0].value"),
        ("remainder to a reseller's partner", "TOPUP", a.admin,
         rules(("REMAINDER", kiosk, 0)), 422, "rules[0].partner_id"),
        ("unknown kind", "CONSUMPTION", a.admin, rules(("PERCENT", grid, 10), rem), 422,
         "rules[0].kind"),
        ("no rules", "CONSUMPTION", a.admin, {"rules": []}, 422, "rules"),
        ("negative value", "CONSUMPTION", a.admin, rules(("PER_KWH", grid, -1), rem), 422,
         "rules[0].value"),
        ("unknown field", "CONSUMPTION", a.admin, {"rules": [{"kind": "REMAINDER",
         "partner_id": util, "share": 1}]}, 422, "rules[0].share"),
        ("unknown tariff", "CONSUMPTION", a.admin, rules(rem), 404, None),
        ("unknown context", "STANDING", a.admin, rules(rem), 404, None),
        ("support may only read", "CONSUMPTION", a.support, rules(rem), 403, None),
        ("reseller may not", "CONSUMPTION", a.reseller_keys["r1"], rules(rem), 403, None),
        ("customer may not", "CONSUMPTION", a.tokens["c0"], rules(rem), 403, None),
        ("platform admin has no tenant", "CONSUMPTION", ADMIN_KEY, rules(rem), 403, None),
        ("no credentials", "CONSUMPTION", None, rules(rem), 401, None),
    ]  # fmt: skip
    for name, context, key, payload, status, field in cases:
        path = f"{RULES}/{context}"
        if name == "unknown tariff":
            path = f"/v1/tariffs/no-such-code/split-rules/{context}"
        reply = await api.call("PUT", path, key, payload)
        assert reply.status == status, (name, reply.status, reply.body)
        assert reply.content_type == "application/problem+json", name
        if field is not None:
            fields = {e["field"] for e in reply.body.get("errors", [])}
            assert field in fields, (name, reply.body)
    # Malformed JSON shapes (the generic cases of test_api_input.py, which skips this path).
    good_rule = {"kind": "REMAINDER", "partner_id": util, "value": 0}
    for label, payload, field in (
        ("unknown field", {"rules": [good_rule], "surprise": 1}, "surprise"),
        ("missing rules", {}, "rules"),
        ("null rules", {"rules": None}, "rules"),
        ("rules not an array", {"rules": good_rule}, "rules"),
        ("rule not an object", {"rules": [5]}, "rules[0]"),
        ("bool as int", {"rules": [{**good_rule, "partner_id": True}]}, "rules[0].partner_id"),
        ("string as int", {"rules": [{**good_rule, "value": "0"}]}, "rules[0].value"),
        ("float as int", {"rules": [{**good_rule, "value": 0.0}]}, "rules[0].value"),
        ("huge int", {"rules": [{**good_rule, "partner_id": 2**64}]}, "rules[0].partner_id"),
        ("kind not a string", {"rules": [{**good_rule, "kind": 1}]}, "rules[0].kind"),
        ("too many rules", {"rules": [good_rule] * 33}, "rules"),
    ):
        reply = await api.call("PUT", f"{RULES}/CONSUMPTION", a.admin, payload)
        assert reply.status == 422, (label, reply.body)
        assert field in {e["field"] for e in reply.body["errors"]}, (label, reply.body)
    array = await api.call("PUT", f"{RULES}/CONSUMPTION", a.admin, [{"rules": [good_rule]}])
    assert array.status == 422
    for label, raw in (
        ("not JSON", b'{"rules": '),
        ("not UTF-8", b'{"rules": "\xff\xfe"}'),
        ("duplicate key", b'{"rules": [], "rules": []}'),
        ("NaN", b'{"rules": NaN}'),
        ("empty", b""),
        ("trailing garbage", b'{"rules": []} x'),
    ):
        reply = await api.call(
            "PUT",
            f"{RULES}/CONSUMPTION",
            a.admin,
            data=raw,
            headers={"Content-Type": "application/json"},
        )
        assert reply.status == 400, label
        assert reply.body["type"] == "urn:voltcredit:problem:malformed-request", label
    plain = await api.call(
        "PUT", f"{RULES}/CONSUMPTION", a.admin, data=b"x", headers={"Content-Type": "text/plain"}
    )
    assert plain.status == 415
    big = b'{"rules": "' + b"x" * (64 * 1024) + b'"}'
    oversize = await api.call(
        "PUT",
        f"{RULES}/CONSUMPTION",
        a.admin,
        data=big,
        headers={"Content-Type": "application/json"},
    )
    assert oversize.status == 413
    # Reads refused to roles that may not see partners.
    for key in (a.reseller_keys["r1"], a.tokens["c1"], ADMIN_KEY):
        assert (await api.call("GET", f"{RULES}/CONSUMPTION", key)).status == 403
    assert (await api.call("GET", "/v1/tariffs/nope/split-rules/TOPUP", a.admin)).status == 404
    assert (await api.call("GET", f"{RULES}/consumption", a.admin)).status == 404
    assert await _state(api) == before


async def test_tenants_never_see_each_others_rule_sets(api: Api, world: World) -> None:
    a, b = world.a, world.b
    pa = await _partners(api, a.admin)
    pb = await _partners(api, b.admin)
    set_a = await api.ok(
        "PUT",
        f"{RULES}/CONSUMPTION",
        a.admin,
        _consumption(a.partner, pa["tax"]["id"], pa["utility"]["id"]),
    )
    # Both tenants have a tariff "domestic": B sees its own (empty) set, not A's.
    assert (await api.ok("GET", f"{RULES}/CONSUMPTION", b.admin))["rules"] == []
    assert (await api.ok("GET", f"{RULES}/CONSUMPTION", b.support))["rules"] == []
    set_b = await api.ok(
        "PUT",
        f"{RULES}/CONSUMPTION",
        b.admin,
        {"rules": [{"kind": "REMAINDER", "partner_id": pb["utility"]["id"]}]},
    )
    assert await api.ok("GET", f"{RULES}/CONSUMPTION", a.admin) == set_a
    assert await api.ok("GET", f"{RULES}/CONSUMPTION", b.admin) == set_b
    # A tariff code only A has is 404 for B, reading and writing alike.
    tariff = {"code": "a-only", "activation_at": "2026-12-01T00:00:00Z", "tariff": FLAT}
    await api.ok("POST", "/v1/tariffs", a.admin, tariff)
    only_a = {"rules": [{"kind": "REMAINDER", "partner_id": pa["utility"]["id"]}]}
    await api.ok("PUT", "/v1/tariffs/a-only/split-rules/TOPUP", a.admin, only_a)
    assert (await api.call("GET", "/v1/tariffs/a-only/split-rules/TOPUP", b.admin)).status == 404
    mine = {"rules": [{"kind": "REMAINDER", "partner_id": pb["utility"]["id"]}]}
    refused = await api.call("PUT", "/v1/tariffs/a-only/split-rules/TOPUP", b.admin, mine)
    assert refused.status == 404
    # B naming A's partner is refused like a partner that does not exist.
    theirs = {"rules": [{"kind": "REMAINDER", "partner_id": pa["utility"]["id"]}]}
    refused = await api.call("PUT", f"{RULES}/TOPUP", b.admin, theirs)
    assert refused.status == 422
    assert "no partner" in refused.body["errors"][0]["problem"]
    async with api.database.read() as session:
        per_tenant = dict(
            (
                await session.execute(
                    select(SplitRuleRow.tenant_id, func.count()).group_by(SplitRuleRow.tenant_id)
                )
            ).all()
        )
    assert per_tenant == {a.id: 4, b.id: 1}


async def test_concurrent_replacements_leave_one_whole_set(api: Api, world: World) -> None:
    a = world.a
    p = await _partners(api, a.admin)
    three = _consumption(a.partner, p["tax"]["id"], p["utility"]["id"])
    one = {"rules": [{"kind": "REMAINDER", "partner_id": a.partner}]}
    for _ in range(3):
        replies = await asyncio.gather(
            *(api.call("PUT", f"{RULES}/CONSUMPTION", a.admin, body) for body in (three, one) * 3)
        )
        assert all(r.status == 200 for r in replies), [r.body for r in replies]
        final = await api.ok("GET", f"{RULES}/CONSUMPTION", a.admin)
        kinds = [r["kind"] for r in final["rules"]]
        assert kinds in (["PER_KWH", "BASIS_POINTS", "REMAINDER"], ["REMAINDER"])
        assert [r["position"] for r in final["rules"]] == list(range(len(kinds)))
