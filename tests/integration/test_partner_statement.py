"""Partner balance and settlement statements on SQLite and PostgreSQL, from rows written directly.

A utility in Europe/Berlin is provisioned through the API (partners, a tariff, its
CONSUMPTION rule set, a customer's supply account and meter); ledger transfers are then
posted through the ledger repository and billed intervals and ingest state inserted
through the ORM, at chosen times around the local month boundary. The statement's money
reconciles (opening + Σ lines = closing, and the closing of a period covering everything
is the ledger account's balance), its periods are local days (23:30 UTC on 31 January is
1 February in Berlin; a 23-hour DST day is 23 hours), its CSV carries the same figures,
and nothing of another tenant ever shows.
"""

from __future__ import annotations

import csv
import io
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from backend.adapters.db.ingest_tables import ConsumptionIntervalRow, MeterIngestRow
from backend.adapters.db.ledger_repo import LedgerRepository
from backend.domain.ledger import Transfer, TransferCode, derive_id
from tests.support.api import ADMIN_KEY, Api, api_client
from tests.support.db import BACKENDS, target_factory

pytestmark = pytest.mark.integration

BERLIN_TARIFF = {
    "currency": "EUR",
    "timezone": "Europe/Berlin",
    "bands": [{"name": "flat", "price_milli_per_kwh": 30_000}],
    "weekday": [[0, 0]],
}
#: 1 January and 1 February 2027, 00:00 in Berlin (UTC+1 in winter), as Unix seconds.
JAN1 = int(datetime(2026, 12, 31, 23, 0, tzinfo=UTC).timestamp())
FEB1 = int(datetime(2027, 1, 31, 23, 0, tzinfo=UTC).timestamp())
SERIAL = 5000


@pytest.fixture(params=BACKENDS)
async def api(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Api]:
    factory = target_factory(request.param, tmp_path, request, prefix="stmt")
    async with factory() as target, api_client(target) as client:
        yield client


@dataclass
class Berlin:
    """The Berlin utility's ids, keys and ledger accounts."""

    tenant_id: int = 0
    clearing: int = 0
    admin: str = ""
    support: str = ""
    reseller_key: str = ""
    customer_token: str = ""
    prepaid: int = 0
    account_id: int = 0
    wire_id: int = 0
    other_tenant: int = 0
    other_admin: str = ""
    partners: dict[str, dict[str, Any]] = field(default_factory=dict)
    rules: dict[str, int] = field(default_factory=dict)

    def acct(self, name: str) -> int:
        return int(self.partners[name]["ledger_account_id"])

    def pid(self, name: str) -> int:
        return int(self.partners[name]["id"])


async def _provision(api: Api) -> Berlin:
    b = Berlin()
    tenant = await api.ok(
        "POST",
        "/v1/tenants",
        ADMIN_KEY,
        {
            "name": "Stadtwerke Berlin Test",
            "currency": "EUR",
            "timezone": "Europe/Berlin",
            "min_topup_minor": 100,
            "max_topup_minor": 100_000,
        },
    )
    b.tenant_id, b.clearing = tenant["id"], tenant["clearing_account_id"]

    async def key(role: str, **extra: Any) -> str:
        body = {"name": f"{role} key", "role": role, "tenant_id": b.tenant_id, **extra}
        return str((await api.ok("POST", "/v1/api-keys", ADMIN_KEY, body))["key"])

    b.admin = await key("UTILITY_ADMIN")
    b.support = await key("SUPPORT")
    reseller = await api.ok("POST", "/v1/resellers", b.admin, {"name": "Kiosk"})
    b.reseller_key = await key("RESELLER", reseller_id=reseller["id"])
    for name, kind, extra in (
        ("utility", "UTILITY", {}),
        ("grid", "GRID_OPERATOR", {}),
        ("tax", "TAX_AUTHORITY", {}),
        ("kiosk", "RESELLER", {"reseller_id": reseller["id"]}),
    ):
        body = {"name": name, "kind": kind, **extra}
        b.partners[name] = await api.ok("POST", "/v1/partners", b.admin, body)
    tariff = await api.ok(
        "POST",
        "/v1/tariffs",
        b.admin,
        {"code": "berlin", "activation_at": "2026-11-01T00:00:00Z", "tariff": BERLIN_TARIFF},
    )
    b.wire_id = tariff["tariff_id"]
    rules = await api.ok(
        "PUT",
        "/v1/tariffs/berlin/split-rules/CONSUMPTION",
        b.admin,
        {
            "rules": [
                {"kind": "PER_KWH", "partner_id": b.pid("grid"), "value": 9_000},
                {"kind": "BASIS_POINTS", "partner_id": b.pid("tax"), "value": 1597},
                {"kind": "REMAINDER", "partner_id": b.pid("utility")},
            ]
        },
    )
    b.rules = dict(zip(("grid", "tax", "utility"), (r["id"] for r in rules["rules"]), strict=True))
    login = {"name": "Ute", "email": "ute@berlin.example", "password": "long enough pw"}
    customer = await api.ok("POST", "/v1/customers", b.admin, login)
    account = await api.ok(
        "POST",
        "/v1/supply-accounts",
        b.admin,
        {
            "customer_id": customer["id"],
            "tariff_code": "berlin",
            "label": "Alexanderplatz 1",
            "debt_limit_minor": 500,
        },
    )
    b.account_id, b.prepaid = account["id"], account["ledger_account_id"]
    await api.ok("POST", "/v1/gateways", b.admin, {"id": "gw-berlin"})
    await api.ok(
        "POST",
        "/v1/meters",
        b.admin,
        {"serial": SERIAL, "gateway_id": "gw-berlin", "supply_account_id": b.account_id},
    )
    creds = {"tenant_id": b.tenant_id, "email": "ute@berlin.example", "password": "long enough pw"}
    b.customer_token = (await api.ok("POST", "/v1/auth/login", None, creds))["token"]
    other = await api.ok(
        "POST",
        "/v1/tenants",
        ADMIN_KEY,
        {
            "name": "Other Utility",
            "currency": "EUR",
            "timezone": "UTC",
            "min_topup_minor": 100,
            "max_topup_minor": 100_000,
        },
    )
    b.other_tenant = other["id"]
    b.other_admin = str(
        (
            await api.ok(
                "POST",
                "/v1/api-keys",
                ADMIN_KEY,
                {"name": "other", "role": "UTILITY_ADMIN", "tenant_id": other["id"]},
            )
        )["key"]
    )
    return b


_SEQ = itertools.count(1)


async def _post(api: Api, at: datetime, reference: str, *moves: tuple[int, int, int, str]) -> None:
    """Post one linked batch at ``at``: (debit, credit, amount, code) per transfer."""
    group = derive_id("test-group", str(next(_SEQ)))
    transfers = [
        Transfer(
            id=derive_id("test", reference, str(i), str(group)),
            debit_account_id=debit,
            credit_account_id=credit,
            amount=amount,
            currency="EUR",
            code=TransferCode(code),
            reference=reference,
            created_at=at,
            linked_group=group if len(moves) > 1 else None,
        )
        for i, (debit, credit, amount, code) in enumerate(moves)
    ]
    async with api.database.write() as session:
        await LedgerRepository(session).post(transfers)


def _utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


async def _ledger(api: Api, b: Berlin) -> None:
    """The transfers of the scenario (comments: Berlin local time)."""
    util, grid, tax, kiosk = (b.acct(n) for n in ("utility", "grid", "tax", "kiosk"))
    # 1 Dec: a top-up, the reseller's commission paid by the utility.
    await _post(
        api,
        _utc(2026, 12, 1, 10),
        "payment:p1",
        (b.clearing, b.prepaid, 10_000, "TOPUP"),
        (util, kiosk, 300, "SPLIT"),
    )
    # 31 Dec 23:30: consumption, before January.
    await _post(
        api,
        _utc(2026, 12, 31, 22, 30),
        f"consumption:{SERIAL}:1",
        (b.prepaid, util, 500, "CONSUMPTION"),
        (util, grid, 100, "SPLIT"),
        (util, tax, 80, "SPLIT"),
    )
    # 1 Jan 00:30 (23:30 UTC on 31 Dec): consumption, in January.
    await _post(
        api,
        _utc(2026, 12, 31, 23, 30),
        f"consumption:{SERIAL}:2",
        (b.prepaid, util, 700, "CONSUMPTION"),
        (util, grid, 150, "SPLIT"),
        (util, tax, 110, "SPLIT"),
    )
    # 15 Jan: another top-up and commission.
    await _post(
        api,
        _utc(2027, 1, 15, 12),
        "payment:p2",
        (b.clearing, b.prepaid, 5_000, "TOPUP"),
        (util, kiosk, 150, "SPLIT"),
    )
    # 31 Jan 23:30: the grid operator is paid out (in January).
    await _post(
        api, _utc(2027, 1, 31, 22, 30), "payout:grid:2027-01", (grid, b.clearing, 50, "SETTLEMENT")
    )
    # 1 Feb 00:30 (23:30 UTC on 31 Jan): consumption, in February.
    await _post(
        api,
        _utc(2027, 1, 31, 23, 30),
        f"consumption:{SERIAL}:3",
        (b.prepaid, util, 900, "CONSUMPTION"),
        (util, grid, 200, "SPLIT"),
        (util, tax, 140, "SPLIT"),
    )
    # Around the spring-forward day 28 Mar 2027 (23 hours long in Berlin).
    await _post(
        api, _utc(2027, 3, 27, 23, 30), f"consumption:{SERIAL}:4", (util, grid, 10, "SPLIT")
    )
    await _post(
        api, _utc(2027, 3, 28, 22, 30), f"consumption:{SERIAL}:5", (util, grid, 20, "SPLIT")
    )


async def _intervals(api: Api, b: Berlin) -> None:
    """Billed intervals around the January boundaries, one with a replaced rule, one foreign."""
    g, t, u = b.rules["grid"], b.rules["tax"], b.rules["utility"]
    ga, ta, ua = b.acct("grid"), b.acct("tax"), b.acct("utility")
    gone = max(b.rules.values()) + 1000  # a rule id of a set replaced since

    def row(to_ts: int, wh: int, shares: list[list[int]], tenant: int | None = None) -> Any:
        total = sum(s[2] for s in shares)
        return ConsumptionIntervalRow(
            tenant_id=tenant or b.tenant_id,
            supply_account_id=b.account_id,
            meter_id=SERIAL,
            tariff_id=b.wire_id,
            from_ts=to_ts - 900,
            to_ts=to_ts,
            import_wh=wh,
            band_wh=[wh],
            band_milli=[total],
            block_milli=0,
            days=0,
            standing_milli=0,
            total_milli=total,
            unrated_block_wh=0,
            shares=shares,
            payer_minor=total // 1000,
            carry_milli=total % 1000,
            created_at=_utc(2027, 2, 1),
        )

    rows = [
        row(JAN1 - 1800, 1000, [[g, ga, 9000], [t, ta, 7000], [u, ua, 8000]]),  # 31 Dec
        row(JAN1, 500, [[g, ga, 4500], [t, ta, 3000], [u, ua, 2500]]),  # ends at midnight: Dec
        row(JAN1 + 1800, 2000, [[g, ga, 18000], [t, ta, 14000], [u, ua, 16000]]),
        row(FEB1, 3000, [[g, ga, 27000], [t, ta, 21000], [u, ua, 24000]]),  # ends 1 Feb 00:00
        row(FEB1 + 1800, 4000, [[g, ga, 36000], [t, ta, 28000], [u, ua, 32000]]),  # February
        row(JAN1 + 7200, 100, [[gone, ga, 1234], [u, ua, -1234]]),
        # Another tenant's interval naming the grid's account: never counted.
        row(JAN1 + 3600, 77_777, [[g, ga, 99_999]], tenant=b.other_tenant),
    ]
    carry = {"amount_milli": 400, "partners": sorted([[ga, 250], [ta, 999]])}
    async with api.database.write() as session:
        session.add_all(rows)
        session.add(
            MeterIngestRow(
                meter_id=SERIAL,
                tenant_id=b.tenant_id,
                supply_account_id=b.account_id,
                state={},
                rule_set="test",
                totals={"amount_milli": 0, "energy_wh": 0, "days": 0, "topups": 0},
                carry=carry,
                pending={str(ga): 3},
                updated_at=_utc(2027, 2, 1),
            )
        )


@pytest.fixture
async def berlin(api: Api) -> Berlin:
    b = await _provision(api)
    await _ledger(api, b)
    await _intervals(api, b)
    return b


def _lines(statement: dict[str, Any]) -> set[tuple[str, str, str, int, int]]:
    return {
        (x["code"], x["direction"], x["source"], x["transfers"], x["amount_minor"])
        for x in statement["lines"]
    }


async def _statement(api: Api, key: str, partner: int, first: str, end: str) -> Any:
    return await api.ok("GET", f"/v1/partners/{partner}/statement?from={first}&to={end}", key)


async def test_january_statement_reconciles_with_local_day_boundaries(
    api: Api, berlin: Berlin
) -> None:
    b = berlin
    grid = await _statement(api, b.admin, b.pid("grid"), "2027-01-01", "2027-02-01")
    assert grid["timezone"] == "Europe/Berlin"
    assert grid["start_at"] == "2026-12-31T23:00:00Z"
    assert grid["end_at"] == "2027-01-31T23:00:00Z"
    assert grid["currency"] == "EUR"
    assert grid["ledger_account_id"] == b.acct("grid")
    assert grid["opening_balance_minor"] == 100  # 31 Dec 23:30 local is December
    assert _lines(grid) == {
        ("SPLIT", "IN", "CONSUMPTION", 1, 150),  # 1 Jan 00:30 local (23:30 UTC 31 Dec)
        ("SETTLEMENT", "OUT", "OTHER", 1, -50),  # 31 Jan 23:30 local
    }  # and 1 Feb 00:30 local (23:30 UTC on 31 Jan) is February: not here
    assert grid["total_minor"] == 100
    assert grid["closing_balance_minor"] == 200
    assert (
        grid["opening_balance_minor"] + sum(x["amount_minor"] for x in grid["lines"])
        == (grid["closing_balance_minor"])
    )
    # Energy: the intervals ending in (1 Jan 00:00, 1 Feb 00:00] local, the partner's shares.
    assert grid["intervals"] == 3
    assert grid["energy_wh"] == 2000 + 3000 + 100
    assert grid["consumption_milli"] == 18_000 + 27_000 + 1234
    by_rule = {r["rule_id"]: r for r in grid["rules"]}
    assert by_rule[b.rules["grid"]] == {
        "rule_id": b.rules["grid"],
        "tariff_code": "berlin",
        "kind": "PER_KWH",
        "value": 9000,
        "intervals": 2,
        "energy_wh": 5000,
        "amount_milli": 45_000,
    }
    (gone,) = set(by_rule) - {b.rules["grid"]}
    assert by_rule[gone]["kind"] is None
    assert by_rule[gone]["tariff_code"] is None
    assert by_rule[gone]["amount_milli"] == 1234
    assert grid["unposted"] == {
        "accrued_milli": 46_234,
        "posted_milli": 150_000,
        "difference_milli": 46_234 - 150_000,
        "carry_milli": 250,
        "pending_minor": 3,
    }

    util = await _statement(api, b.admin, b.pid("utility"), "2027-01-01", "2027-02-01")
    assert util["opening_balance_minor"] == 500 - 100 - 80 - 300
    assert _lines(util) == {
        ("CONSUMPTION", "IN", "CONSUMPTION", 1, 700),
        ("SPLIT", "OUT", "CONSUMPTION", 2, -260),
        ("SPLIT", "OUT", "TOPUP", 1, -150),
    }
    assert util["closing_balance_minor"] == 20 + 700 - 260 - 150
    assert util["energy_wh"] == 2000 + 3000 + 100
    assert util["consumption_milli"] == 16_000 + 24_000 - 1234
    assert util["unposted"]["posted_milli"] == (700 - 260) * 1000
    assert util["unposted"]["carry_milli"] == 0
    assert util["unposted"]["pending_minor"] == 0

    kiosk = await _statement(api, b.admin, b.pid("kiosk"), "2027-01-01", "2027-02-01")
    assert (kiosk["opening_balance_minor"], kiosk["closing_balance_minor"]) == (300, 450)
    assert _lines(kiosk) == {("SPLIT", "IN", "TOPUP", 1, 150)}
    assert kiosk["rules"] == []
    assert kiosk["intervals"] == 0

    # Consecutive months tile: December's closing is January's opening.
    december = await _statement(api, b.admin, b.pid("grid"), "2026-12-01", "2027-01-01")
    assert december["closing_balance_minor"] == grid["opening_balance_minor"]
    assert december["energy_wh"] == 1000 + 500  # the interval ending at midnight is December's
    february = await _statement(api, b.admin, b.pid("grid"), "2027-02-01", "2027-03-01")
    assert february["opening_balance_minor"] == grid["closing_balance_minor"]
    assert _lines(february) == {("SPLIT", "IN", "CONSUMPTION", 1, 200)}


async def test_closing_of_everything_is_the_ledger_balance(api: Api, berlin: Berlin) -> None:
    b = berlin
    for name in ("utility", "grid", "tax", "kiosk"):
        balance = await api.ok("GET", f"/v1/partners/{b.pid(name)}/balance", b.support)
        everything = await _statement(api, b.support, b.pid(name), "2026-06-01", "2027-06-01")
        assert everything["opening_balance_minor"] == 0
        assert everything["closing_balance_minor"] == balance["balance_minor"], name
        assert sum(x["amount_minor"] for x in everything["lines"]) == balance["balance_minor"]
        assert balance["balance_minor"] == (
            balance["credits_posted_minor"] - balance["debits_posted_minor"]
        )
        assert balance["ledger_account_id"] == b.acct(name)
        assert balance["as_of"] == "2026-11-26T09:00:00Z"
    grid = await api.ok("GET", f"/v1/partners/{b.pid('grid')}/balance", b.admin)
    assert grid["balance_minor"] == 100 + 150 - 50 + 200 + 10 + 20
    assert grid["currency"] == "EUR"


async def test_a_dst_day_is_its_local_hours(api: Api, berlin: Berlin) -> None:
    b = berlin
    day = await _statement(api, b.admin, b.pid("grid"), "2027-03-28", "2027-03-29")
    assert day["start_at"] == "2027-03-27T23:00:00Z"  # 00:00 CET
    assert day["end_at"] == "2027-03-28T22:00:00Z"  # 00:00 CEST: a 23-hour day
    assert _lines(day) == {("SPLIT", "IN", "CONSUMPTION", 1, 10)}
    assert day["opening_balance_minor"] == 400
    assert day["closing_balance_minor"] == 410


async def test_csv_has_the_same_figures(api: Api, berlin: Berlin) -> None:
    b = berlin
    path = f"/v1/partners/{b.pid('grid')}/statement?from=2027-01-01&to=2027-02-01"
    data = await api.ok("GET", path, b.admin)
    for reply in (
        await api.call("GET", path + "&format=csv", b.admin),
        await api.call("GET", path, b.admin, headers={"Accept": "text/csv"}),
        await api.call(
            "GET", path, b.admin, headers={"Accept": "application/json;q=0.5, text/csv"}
        ),
    ):
        assert reply.status == 200
        assert reply.content_type == "text/csv"
        assert "statement-partner-" in reply.headers["Content-Disposition"]
        records = list(csv.DictReader(io.StringIO(reply.body)))
        assert all(r["partner_id"] == str(b.pid("grid")) for r in records)
        assert all(
            (r["period_from"], r["period_to"]) == ("2027-01-01", "2027-02-01") for r in records
        )
        assert all(r["currency"] == "EUR" for r in records)
        one = {r["record"]: r for r in records if r["record"] not in ("line", "rule")}
        assert int(one["opening_balance"]["amount_minor"]) == data["opening_balance_minor"]
        assert int(one["closing_balance"]["amount_minor"]) == data["closing_balance_minor"]
        assert int(one["total"]["amount_minor"]) == data["total_minor"]
        lines = {
            (r["code"], r["direction"], r["source"], int(r["transfers"]), int(r["amount_minor"]))
            for r in records
            if r["record"] == "line"
        }
        assert lines == _lines(data)
        assert int(one["opening_balance"]["amount_minor"]) + sum(x[4] for x in lines) == int(
            one["closing_balance"]["amount_minor"]
        )
        rules = {
            int(r["rule_id"]): (r["kind"] or None, int(r["energy_wh"]), int(r["amount_milli"]))
            for r in records
            if r["record"] == "rule"
        }
        assert rules == {
            x["rule_id"]: (x["kind"], x["energy_wh"], x["amount_milli"]) for x in data["rules"]
        }
        assert int(one["consumption"]["energy_wh"]) == data["energy_wh"]
        assert int(one["consumption"]["amount_milli"]) == data["consumption_milli"]
        assert (
            int(one["unposted_difference"]["amount_milli"])
            == (data["unposted"]["difference_milli"])
        )
        assert int(one["carry"]["amount_milli"]) == data["unposted"]["carry_milli"]
        assert int(one["pending"]["amount_minor"]) == data["unposted"]["pending_minor"]
    # JSON wins when asked for by name, or preferred by Accept.
    for reply in (
        await api.call("GET", path + "&format=json", b.admin, headers={"Accept": "text/csv"}),
        await api.call(
            "GET", path, b.admin, headers={"Accept": "application/json, text/csv;q=0.5"}
        ),
    ):
        assert reply.content_type == "application/json"
        assert reply.body == data


async def test_scoping_roles_and_bad_queries(api: Api, berlin: Berlin) -> None:
    b = berlin
    grid = b.pid("grid")
    ok = f"/v1/partners/{grid}/statement?from=2027-01-01&to=2027-02-01"
    # Another tenant's staff: 404, exactly like a partner that does not exist.
    for path in (ok, f"/v1/partners/{grid}/balance"):
        assert (await api.call("GET", path, b.other_admin)).status == 404
    missing = await api.call(
        "GET", "/v1/partners/987654/statement?from=2027-01-01&to=2027-02-01", b.admin
    )
    assert missing.status == 404
    assert (await api.call("GET", "/v1/partners/abc/balance", b.admin)).status == 404
    # Roles that may not read partners.
    for key in (b.reseller_key, b.customer_token, ADMIN_KEY):
        assert (await api.call("GET", ok, key)).status == 403
        assert (await api.call("GET", f"/v1/partners/{grid}/balance", key)).status == 403
    assert (await api.call("GET", ok, None)).status == 401
    base = f"/v1/partners/{grid}/statement"
    for query, status, name in (
        ("?to=2027-02-01", 400, "from"),
        ("?from=2027-01-01", 400, "to"),
        ("?from=2027-02-30&to=2027-03-01", 400, "from"),
        ("?from=2027/01/01&to=2027-02-01", 400, "from"),
        ("?from=20270101&to=2027-02-01", 400, "from"),
        ("?from=2027-01-01&to=2027-02-01&format=xml", 400, "format"),
        ("?from=2027-01-01&to=2027-02-01&tz=UTC", 400, "tz"),
        ("?from=2027-01-01&from=2027-01-02&to=2027-02-01", 400, "from"),
        ("?from=2027-01-01&to=2027-01-01", 422, "to"),
        ("?from=2027-02-01&to=2027-01-01", 422, "to"),
        ("?from=2026-01-01&to=2027-01-03", 422, "to"),
    ):
        reply = await api.call("GET", base + query, b.admin)
        assert reply.status == status, (query, reply.body)
        assert reply.content_type == "application/problem+json"
        assert reply.body["errors"][0]["field"] == name, query
    # 366 days is the longest period.
    assert (await api.call("GET", base + "?from=2027-01-01&to=2028-01-02", b.admin)).status == 200
