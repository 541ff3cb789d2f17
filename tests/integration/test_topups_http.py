"""The top-up routes over real HTTP: the app served on a loopback port, the sandbox POSTing
its signed webhooks back to it, customers authenticated with bearer tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from backend.adapters.db.engine import Database
from backend.api.app import ROUTE_MODULES, create_app
from backend.api.context import AUTH, DATABASE
from backend.api.routes.topups import (
    TOPUP_RUNTIME,
    TOPUP_SETTINGS,
    mqtt_settings,
    settings_from_config,
)
from backend.config import BackendConfig
from backend.service.topup_runtime import SandboxMode, TopupSettings
from tests.support.broker import free_port
from tests.support.topups import Clock, StaticSigners, World, counts, fresh_target, provision

pytestmark = pytest.mark.integration

MODULES = tuple(dict.fromkeys((*ROUTE_MODULES, "backend.api.routes.topups")))


@dataclass
class Served:
    base: str
    app: web.Application
    http: aiohttp.ClientSession
    world: World
    clock: Clock

    @property
    def db(self) -> Database:
        return self.app[DATABASE]

    def token(self, i: int = 0) -> str:
        c = self.world.customers[i]
        return (
            self.app[AUTH]
            .issue_customer_token(c.customer_id, self.world.tenant_id, self.clock())
            .token
        )

    async def call(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        json_body: Any = None,
        headers: dict[str, str] | None = None,
        data: bytes | None = None,
    ) -> tuple[int, Any, Any]:
        h = dict(headers or {})
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        async with self.http.request(
            method, self.base + path, json=json_body, data=data, headers=h
        ) as r:
            text = await r.text()
            return r.status, (json.loads(text) if text else None), r.headers

    async def topup(self, amount: int, key: str | None, i: int = 0) -> tuple[int, Any, Any]:
        headers = {} if key is None else {"Idempotency-Key": key}
        account = self.world.customers[i].account_id
        return await self.call(
            "POST",
            f"/v1/accounts/{account}/topups",
            token=self.token(i),
            json_body={"amount_minor": amount, "currency": "EUR"},
            headers=headers,
        )


@contextlib.asynccontextmanager
async def served(tmp_path: Path, *, mode: SandboxMode) -> AsyncIterator[Served]:
    port = free_port()
    clock = Clock()
    async with fresh_target("sqlite", tmp_path) as target:
        config = BackendConfig(
            database_url=target.url,
            http_port=port,
            token_secret=b"t" * 32,
            mqtt_url="mqtt://127.0.0.1:1",
        )
        app = create_app(config, key_store=StaticSigners(), clock=clock, route_modules=MODULES)
        base = settings_from_config(config)
        app[TOPUP_SETTINGS] = TopupSettings(
            mqtt=base.mqtt,
            sandbox_mode=mode,
            sandbox_webhook_url=base.sandbox_webhook_url if mode is SandboxMode.WEBHOOK else None,
            sandbox_completion_delay_s=0.05,
            dispatch=False,
        )
        runner = web.AppRunner(app)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", port).start()
            world = await provision(app[DATABASE], customers=2)
            async with aiohttp.ClientSession() as http:
                yield Served(f"http://127.0.0.1:{port}", app, http, world, clock)
        finally:
            await runner.cleanup()


@pytest.fixture
async def webhook_app(tmp_path: Path) -> AsyncIterator[Served]:
    async with served(tmp_path, mode=SandboxMode.WEBHOOK) as s:
        yield s


async def poll(s: Served, path: str, token: str, done: Any, timeout: float = 10.0) -> Any:  # noqa: ASYNC109
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        status, body, _ = await s.call("GET", path, token=token)
        if status == 200 and done(body):
            return body
        assert loop.time() < deadline, f"{path}: {status} {body}"
        await asyncio.sleep(0.05)


async def test_topup_settles_through_the_sandbox_webhook(webhook_app: Served) -> None:
    s = webhook_app
    status, body, headers = await s.topup(2_000, None)
    assert status == 400
    assert headers["Content-Type"].startswith("application/problem+json")
    assert body["errors"] == [{"field": "Idempotency-Key", "problem": "this header is required"}]

    status, first, headers = await s.topup(2_000, "k-1")
    assert status == 201, first
    assert "Idempotent-Replayed" not in headers
    assert first["status"] in ("PENDING", "SUCCEEDED")
    assert first["amount_minor"] == 2_000
    status, again, headers = await s.topup(2_000, "k-1")
    assert status == 200
    assert headers["Idempotent-Replayed"] == "true"
    assert again["payment_id"] == first["payment_id"]
    status, body, _ = await s.topup(2_100, "k-1")
    assert (status, body["type"]) == (409, "urn:voltcredit:problem:payment-conflict")

    # The sandbox completes the payment and POSTs its signed webhook to this server.
    receipt = await poll(
        s,
        f"/v1/payments/{first['payment_id']}/receipt",
        s.token(),
        lambda b: b["status"] == "SUCCEEDED",
    )
    assert receipt["credited_minor"] == 2_000
    assert receipt["token_msg_id"] == 1
    assert receipt["token_status"] == "PENDING"  # noqa: S105 - a token state, not a secret
    assert [line["code"] for line in receipt["lines"]] == ["TOPUP", "SPLIT", "FEE"]

    account = s.world.customers[0].account_id
    status, balance, _ = await s.call("GET", f"/v1/accounts/{account}/balance", token=s.token())
    assert status == 200
    assert (balance["ledger_balance_minor"], balance["tokens_in_flight"]) == (2_000, 1)
    status, tokens, _ = await s.call("GET", f"/v1/accounts/{account}/tokens", token=s.token())
    assert status == 200
    assert [t["msg_id"] for t in tokens["items"]] == [1]
    assert tokens["next_after"] is None
    c = await counts(s.db)
    assert (c.payments, c.topup_transfers, c.tokens) == (1, 1, 1)


async def test_webhook_endpoint_refuses_forged_and_late_and_ignores_replays(
    webhook_app: Served,
) -> None:
    s = webhook_app
    # A stalled payment (magic amount ...04): we complete it by hand to hold its webhook.
    status, created, _ = await s.topup(1_004, "stall")
    assert status == 201
    sandbox = s.app[TOPUP_RUNTIME].sandbox
    hook = sandbox.complete(created["provider_payment_id"])
    # Completing in webhook mode also POSTs it; wait for that, then replay it ourselves.
    await poll(
        s,
        f"/v1/payments/{created['payment_id']}/receipt",
        s.token(),
        lambda b: b["status"] == "SUCCEEDED",
    )
    status, ack, _ = await s.call(
        "POST", "/v1/webhooks/sandbox", data=hook.body, headers=dict(hook.headers)
    )
    assert (status, ack["outcome"]) == (200, "DUPLICATE")
    tampered = hook.body.replace(b"1004", b"9004")
    status, body, _ = await s.call(
        "POST", "/v1/webhooks/sandbox", data=tampered, headers=dict(hook.headers)
    )
    assert (status, body["type"]) == (400, "urn:voltcredit:problem:webhook-rejected")
    status, body, _ = await s.call("POST", "/v1/webhooks/sandbox", data=hook.body)
    assert status == 400
    s.clock.now += timedelta(minutes=6)
    status, body, _ = await s.call(
        "POST", "/v1/webhooks/sandbox", data=hook.body, headers=dict(hook.headers)
    )
    assert status == 400
    assert "tolerance" in body["detail"] or "old" in body["detail"]
    status, body, _ = await s.call("POST", "/v1/webhooks/paypal", data=b"{}")
    assert status == 404
    c = await counts(s.db)
    assert (c.payments, c.topup_transfers, c.tokens) == (1, 1, 1)


async def test_http_scoping_and_authentication(webhook_app: Served) -> None:
    s = webhook_app
    mine, other = (c.account_id for c in s.world.customers)
    status, _, _ = await s.call("GET", f"/v1/accounts/{mine}/balance")
    assert status == 401
    status, _, _ = await s.call("GET", f"/v1/accounts/{other}/balance", token=s.token(0))
    assert status == 404
    status, _, _ = await s.call("GET", "/v1/payments/not-a-uuid/receipt", token=s.token())
    assert status == 404
    status, _, _ = await s.call("GET", f"/v1/payments/{uuid.uuid4()}/receipt", token=s.token())
    assert status == 404
    status, body, _ = await s.call(
        "POST",
        f"/v1/accounts/{mine}/topups",
        token=s.token(),
        json_body={"amount_minor": 2_000, "currency": "EUR"},
        headers={"Idempotency-Key": "x" * 129},
    )
    assert status == 400
    status, body, _ = await s.topup(10, "small")
    assert (status, body["type"]) == (422, "urn:voltcredit:problem:invalid-payment")
    status, doc, _ = await s.call("GET", "/openapi.json")
    assert status == 200
    for path in (
        "/v1/accounts/{account_id}/topups",
        "/v1/accounts/{account_id}/balance",
        "/v1/accounts/{account_id}/tokens",
        "/v1/payments/{payment_id}/receipt",
        "/v1/webhooks/{provider}",
    ):
        assert path in doc["paths"], path
    assert doc["paths"]["/v1/webhooks/{provider}"]["post"]["security"] == []


async def test_ten_concurrent_identical_http_topups_credit_once(tmp_path: Path) -> None:
    async with served(tmp_path, mode=SandboxMode.INSTANT) as s:
        results = await asyncio.gather(*(s.topup(3_000, "same") for _ in range(10)))
        assert sorted(r[0] for r in results) == [200] * 9 + [201]
        assert len({r[1]["payment_id"] for r in results}) == 1
        assert {r[1]["status"] for r in results} == {"SUCCEEDED"}
        c = await counts(s.db)
        assert (c.payments, c.topup_transfers, c.tokens) == (1, 1, 1)


def test_settings_from_config() -> None:
    config = BackendConfig(
        http_host="0.0.0.0",  # noqa: S104 - a config value under test; nothing binds
        http_port=8080,
        mqtt_url="mqtts://u%40x:p@broker:8884",
    )
    settings = settings_from_config(config)
    assert settings.sandbox_mode is SandboxMode.WEBHOOK
    assert settings.sandbox_webhook_url == "http://127.0.0.1:8080/v1/webhooks/sandbox"
    assert (settings.mqtt.host, settings.mqtt.port, settings.mqtt.tls) == ("broker", 8884, True)
    assert (settings.mqtt.username, settings.mqtt.password) == ("u@x", "p")
    free = settings_from_config(BackendConfig(http_port=0))
    assert (free.sandbox_mode, free.sandbox_webhook_url) == (SandboxMode.INSTANT, None)
    plain = mqtt_settings("mqtt://h", client_id="c", shared=True)
    assert (plain.port, plain.tls, plain.shared_subscriptions, plain.username) == (
        1883,
        False,
        True,
        None,
    )
    with pytest.raises(ValueError, match="webhook"):
        TopupSettings(sandbox_mode=SandboxMode.WEBHOOK)


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"{not json", 400),
        (b'{"amount_minor": 500, "currency": "EUR", "tip": 1}', 422),  # unknown field
        (b'{"amount_minor": "500", "currency": "EUR"}', 422),  # wrong type
        (b'{"amount_minor": true, "currency": "EUR"}', 422),  # bool is not an integer
        (b'{"amount_minor": 5.5, "currency": "EUR"}', 422),  # no fractions of a cent
        (b'{"amount_minor": 0, "currency": "EUR"}', 422),  # below the tenant minimum
        (b'{"amount_minor": 500, "currency": "KES"}', 422),  # not the tenant's currency
        (b'{"currency": "EUR"}', 422),  # missing amount
    ],
)
async def test_malformed_topups_are_refused_and_change_nothing(
    webhook_app: Served, body: bytes, status: int
) -> None:
    s = webhook_app
    account = s.world.customers[0].account_id
    before = await counts(s.db)
    got, problem, headers = await s.call(
        "POST",
        f"/v1/accounts/{account}/topups",
        token=s.token(),
        data=body,
        headers={"Idempotency-Key": "bad-1", "Content-Type": "application/json"},
    )
    assert got == status, problem
    assert headers["Content-Type"].startswith("application/problem+json")
    assert problem["detail"]
    assert await counts(s.db) == before
    # Another customer's account is not found, whatever the body.
    other = s.world.customers[1].account_id
    got, _, _ = await s.call(
        "POST",
        f"/v1/accounts/{other}/topups",
        token=s.token(0),
        json_body={"amount_minor": 500, "currency": "EUR"},
        headers={"Idempotency-Key": "bad-2"},
    )
    assert got == 404
    assert await counts(s.db) == before
