"""Top-ups per second through the HTTP API into the token outbox, on SQLite and PostgreSQL.

The backend's application (``create_app`` with the top-up routes) serves in this process
with the sandbox provider in *instant* mode, so each request is the whole top-up: HTTP →
auth (customer bearer token) → payment row + audit (one write transaction) → provider →
settlement (the second: ledger batch with two split transfers, message id under the
meter's lock, Ed25519 signature, token row, audit). The dispatcher is off: this measures
the path *into* the outbox. A load generator in a separate process keeps ``LEVELS``
requests in flight (one: the latency of a top-up alone; many: throughput), each with a
fresh Idempotency-Key, for ``SECONDS``, and reports each request's latency.

Baselines in the same run and on the same database: a bare ledger post (one TOPUP
transfer, one committed write transaction each, the same concurrency) and ``GET
/healthz`` through the same server (HTTP without any database work).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import socket
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from backend.adapters.db.engine import Database
from backend.adapters.db.ledger_repo import LedgerRepository
from backend.api.app import ROUTE_MODULES, create_app
from backend.api.context import AUTH, DATABASE
from backend.api.routes.topups import TOPUP_SETTINGS
from backend.config import BackendConfig
from backend.domain.ledger import AccountCode, AccountSpec, Transfer, TransferCode, derive_id
from backend.service.context import utc_now
from backend.service.topup_runtime import SandboxMode, TopupSettings
from tests.bench.common import Report
from tests.support.topups import PG_DSN, StaticSigners, Target, counts, fresh_target, provision

#: Requests in flight: one (the latency of a top-up alone) and many (throughput).
LEVELS = (1, 16)
#: Requests in flight for the baselines.
CONCURRENCY = 16
SECONDS = 5.0
CUSTOMERS = 64
MODULES = tuple(dict.fromkeys((*ROUTE_MODULES, "backend.api.routes.topups")))
Request = tuple[str, str, dict[str, Any] | None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pg_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            return True
    except OSError:
        return False


# ----------------------------------------------------------------------- load generator


async def _load(url: str, requests: list[Request], seconds: float, concurrency: int) -> list[float]:
    """Keep ``concurrency`` requests in flight for ``seconds``; the latency (s) of each."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker(n: int) -> None:
        i = n
        while time.perf_counter() < deadline:
            method, path, auth_body = requests[i % len(requests)]
            i += concurrency
            headers = {}
            body = None
            if auth_body is not None:
                headers = {"Authorization": auth_body["auth"], "Idempotency-Key": uuid.uuid4().hex}
                body = auth_body["body"]
            start = time.perf_counter()
            async with http.request(method, url + path, json=body, headers=headers) as r:
                await r.read()
                if r.status >= 300:
                    raise RuntimeError(f"{method} {path}: {r.status} {await r.text()}")
            latencies.append(time.perf_counter() - start)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:
        await asyncio.gather(*(worker(n) for n in range(concurrency)))
    return latencies


def _load_process(
    conn: Connection, url: str, requests: list[Request], seconds: float, concurrency: int
) -> None:  # pragma: no cover - runs in the child
    conn.send(asyncio.run(_load(url, requests, seconds, concurrency)))
    conn.close()


def _drive(url: str, requests: list[Request], seconds: float, concurrency: int) -> list[float]:
    """Run the load generator in its own process (it must not share our event loop)."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_load_process, args=(child, url, requests, seconds, concurrency))
    proc.start()
    latencies: list[float] = parent.recv()
    proc.join()
    return latencies


# ----------------------------------------------------------------------- server side


@contextlib.asynccontextmanager
async def _serve(target: Target) -> AsyncIterator[tuple[str, web.Application]]:
    port = _free_port()
    config = BackendConfig(
        database_url=target.url,
        http_port=port,
        token_secret=b"b" * 32,
        mqtt_url="mqtt://127.0.0.1:1",
    )
    app = create_app(
        config, engine_kwargs=target.engine_kwargs, key_store=StaticSigners(), route_modules=MODULES
    )
    app[TOPUP_SETTINGS] = TopupSettings(sandbox_mode=SandboxMode.INSTANT, dispatch=False)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        yield f"http://127.0.0.1:{port}", app
    finally:
        await runner.cleanup()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _bench_db(report: Report, kind: str, tmp: Path) -> None:
    dsn = PG_DSN if kind == "postgresql" else None
    async with fresh_target(kind, tmp, dsn) as target, _serve(target) as (url, app):
        db: Database = app[DATABASE]
        world = await provision(db, customers=CUSTOMERS)
        now = utc_now()
        topups = []
        for c in world.customers:
            token = app[AUTH].issue_customer_token(c.customer_id, world.tenant_id, now).token
            topups.append(
                (
                    "POST",
                    f"/v1/accounts/{c.account_id}/topups",
                    {
                        "auth": f"Bearer {token}",
                        "body": {"amount_minor": 2_000, "currency": "EUR"},
                    },
                )
            )
        loop = asyncio.get_running_loop()
        for level in LEVELS:
            before = await counts(db)
            lat = await loop.run_in_executor(None, _drive, url, topups, SECONDS, level)
            after = await counts(db)
            assert after.tokens - before.tokens == len(lat), (before, after, len(lat))
            report.add(
                f"top-ups via HTTP into the outbox, {level} in flight ({kind})",
                len(lat) / SECONDS,
                "topups/s",
                p50_ms=round(statistics.median(lat) * 1000, 1),
                p99_ms=round(_percentile(lat, 0.99) * 1000, 1),
            )
        async with db.read() as s:
            assert await LedgerRepository(s).sum_of_balances() == 0
        health = await loop.run_in_executor(
            None, _drive, url, [("GET", "/healthz", None)], SECONDS / 2, CONCURRENCY
        )
        report.add(
            f"baseline: GET /healthz, same server ({kind})",
            len(health) / (SECONDS / 2),
            "requests/s",
            p50_ms=round(statistics.median(health) * 1000, 2),
        )
        rate, p50 = await _bare_ledger_posts(db, world.clearing_id, SECONDS / 2)
        report.add(
            f"baseline: bare ledger post, one per txn ({kind})",
            rate,
            "txn/s",
            p50_ms=round(p50 * 1000, 1),
            concurrency=CONCURRENCY,
        )


async def _bare_ledger_posts(db: Database, clearing: int, seconds: float) -> tuple[float, float]:
    """One TOPUP transfer per committed write transaction, CONCURRENCY writers at once."""
    target_ids = list(range(9_000_001, 9_000_001 + CONCURRENCY))
    async with db.write() as s:
        await LedgerRepository(s).create_accounts(
            [
                AccountSpec(id=i, currency="EUR", code=AccountCode.PREPAID, min_balance=0)
                for i in target_ids
            ]
        )
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def writer(account: int) -> None:
        n = 0
        while time.perf_counter() < deadline:
            n += 1
            start = time.perf_counter()
            async with db.write() as s:
                await LedgerRepository(s).post(
                    [
                        Transfer(
                            id=derive_id("bench", str(account), str(n)),
                            debit_account_id=clearing,
                            credit_account_id=account,
                            amount=100,
                            currency="EUR",
                            code=TransferCode.TOPUP,
                            reference=f"bench:{account}:{n}",
                            created_at=utc_now(),
                        )
                    ]
                )
            latencies.append(time.perf_counter() - start)

    await asyncio.gather(*(writer(a) for a in target_ids))
    return len(latencies) / seconds, statistics.median(latencies)


def run() -> Report:
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    report = Report("topups")
    kinds = ["sqlite"] + (["postgresql"] if _pg_up() else [])
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            print(f"{kind}: {LEVELS} requests in flight, {SECONDS:.0f} s each")
            asyncio.run(_bench_db(report, kind, Path(tmp)))
    report.notes.append(
        "`python -m tests.bench topups`; server and load generator are separate processes "
        f"sharing the machine's {os.cpu_count()} cores; sandbox provider in instant mode; "
        "SQLite in WAL with synchronous=FULL; PostgreSQL on the same host"
    )
    report.notes.append(
        f"1-minute load average {load_before:.1f} before and {os.getloadavg()[0]:.1f} after "
        "the run (other work on the machine shows up here: compare with the baselines)"
    )
    if "postgresql" not in kinds:
        report.notes.append("PostgreSQL was not reachable on 127.0.0.1:5432: not measured")
    return report
