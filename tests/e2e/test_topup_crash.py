"""SIGKILL the backend again and again during a stream of top-ups; no payment is lost or doubled.

``backend run`` serves on a SQLite file with the sandbox provider in webhook mode (each
payment completes ~0.2 s after it is created and the sandbox POSTs the signed webhook
back to the same process) and the token dispatcher on a private broker. Clients send
top-ups concurrently and, like any client, retry with the *same* Idempotency-Key after
a connection failure. The process is killed with SIGKILL at random moments and
restarted each time. Afterwards, in the database:

* every SUCCEEDED payment has exactly one TOPUP ledger transfer and exactly one token;
  no other payment has either; every top-up a client saw SUCCEEDED is SUCCEEDED;
* the ledger sums to zero, every balance equals its transfers, and the customers'
  credit equals the money of the succeeded payments;
* each meter's message ids are exactly 1..n (no id lost or reused by a rollback).

Payments whose webhook died with the process stay PENDING: the in-memory sandbox
forgets them on restart (the "provider lost the payment" case), and that is allowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sys
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from sqlalchemy import func, select

from backend.adapters.db.engine import Database
from backend.adapters.db.ledger_repo import LedgerRepository
from backend.adapters.db.ledger_tables import TransferRow
from backend.adapters.db.migrate import upgrade
from backend.adapters.db.tables import MeterRow, PaymentRow, TokenRow
from backend.domain.ledger import derive_id
from backend.keys.store import FileKeyStore
from backend.service.auth import AuthService, password_hasher
from backend.service.context import utc_now
from tests.support.broker import free_port
from tests.support.gateway import open_broker
from tests.support.topups import Customer, World, provision

pytestmark = pytest.mark.e2e

SECRET = "crash-test-token-secret-0123456789abcdef"  # noqa: S105 - a throw-away test secret
KILLS = 6
CLIENTS = 6


@dataclass
class Backend:
    """The backend process under test (restartable)."""

    env: dict[str, str]
    port: int
    log: Path
    proc: asyncio.subprocess.Process | None = None
    starts: int = 0

    async def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.support.topup_backend",
                "backend",
                "run",
                env=self.env,
                stdout=out,
                stderr=out,
            )
        self.starts += 1
        async with aiohttp.ClientSession() as http:
            for _ in range(300):
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"http://127.0.0.1:{self.port}/healthz") as r:
                        if r.status == 200:
                            return
                assert self.proc.returncode is None, self.log.read_text()[-3000:]
                await asyncio.sleep(0.05)
        raise AssertionError("backend did not come up:\n" + self.log.read_text()[-3000:])

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        assert await self.proc.wait() == -signal.SIGKILL

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(self.proc.wait(), 20)


@dataclass
class Ledgerbook:
    """What the clients saw."""

    confirmed: dict[str, str] = field(default_factory=dict)  # key → payment id (SUCCEEDED)
    answered: dict[str, str] = field(default_factory=dict)  # key → payment id (any status)
    failures: Counter[str] = field(default_factory=Counter)


async def client(
    n: int,
    *,
    base: str,
    tokens: dict[int, str],
    world: World,
    book: Ledgerbook,
    stop: asyncio.Event,
) -> None:
    rnd = random.Random(n)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        while not stop.is_set():
            customer: Customer = rnd.choice(world.customers)
            key = f"c{n}-{uuid.uuid4().hex}"
            amount = rnd.randrange(5, 400) * 100 + rnd.choice(
                (0, 10, 50)
            )  # never a magic 02/03/04/09
            for _attempt in range(40):  # a real client retries the same key
                try:
                    async with http.post(
                        f"{base}/v1/accounts/{customer.account_id}/topups",
                        json={"amount_minor": amount, "currency": "EUR"},
                        headers={
                            "Idempotency-Key": key,
                            "Authorization": f"Bearer {tokens[customer.customer_id]}",
                        },
                    ) as r:
                        body = await r.json(content_type=None)
                        if r.status in (200, 201):
                            book.answered[key] = body["payment_id"]
                            if body["status"] == "SUCCEEDED":
                                book.confirmed[key] = body["payment_id"]
                            break
                        book.failures[f"http {r.status}"] += 1
                except (aiohttp.ClientError, TimeoutError) as exc:
                    book.failures[type(exc).__name__] += 1
                await asyncio.sleep(0.1)


async def test_sigkill_during_a_stream_of_topups_loses_and_doubles_nothing(
    tmp_path: Path,
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'backend.db'}"
    await upgrade(url)
    async with Database(url) as db:
        world = await provision(db, customers=8)
        auth = AuthService(
            db, token_secret=SECRET.encode(), customer_token_ttl_s=3600, hasher=password_hasher()
        )
        now = utc_now()
        tokens = {
            c.customer_id: auth.issue_customer_token(c.customer_id, world.tenant_id, now).token
            for c in world.customers
        }
    FileKeyStore(tmp_path / "keys", create=True).generate()
    port = free_port()
    rnd = random.Random(20261126)
    async with open_broker(tmp_path / "broker") as broker:
        env = {
            **os.environ,
            "VOLTCREDIT_DATABASE_URL": url,
            "VOLTCREDIT_HTTP_PORT": str(port),
            "VOLTCREDIT_KEY_DIR": str(tmp_path / "keys"),
            "VOLTCREDIT_MQTT_URL": f"mqtt://127.0.0.1:{broker.port}",
            "VOLTCREDIT_TOKEN_SECRET": SECRET,
        }
        env.pop("VOLTCREDIT_CONFIG", None)
        backend = Backend(env, port, tmp_path / "backend.log")
        book = Ledgerbook()
        await backend.start()
        stop = asyncio.Event()
        base = f"http://127.0.0.1:{port}"
        clients = [
            asyncio.create_task(
                client(n, base=base, tokens=tokens, world=world, book=book, stop=stop),
                name=f"client-{n}",
            )
            for n in range(CLIENTS)
        ]
        try:
            for _ in range(KILLS):
                await asyncio.sleep(rnd.uniform(0.3, 1.2))
                await backend.kill()
                await asyncio.sleep(rnd.uniform(0.0, 0.3))
                await backend.start()
            await asyncio.sleep(1.0)
        finally:
            stop.set()
            await asyncio.gather(*clients)
            await asyncio.sleep(0.5)  # let the last webhooks land
            await backend.stop()

    assert backend.starts == KILLS + 1
    assert len(book.answered) > 50, (len(book.answered), book.failures)

    async with Database(url) as db, db.read() as s:
        payments = (await s.scalars(select(PaymentRow))).all()
        topups = (
            await s.execute(
                select(TransferRow.reference, func.count())
                .where(TransferRow.code == "TOPUP")
                .group_by(TransferRow.reference)
            )
        ).all()
        token_rows = (await s.scalars(select(TokenRow))).all()
        meters = (await s.scalars(select(MeterRow))).all()
        ledger = LedgerRepository(s)
        total = await ledger.sum_of_balances()
        balances = await ledger.balances()
        recomputed = await ledger.balances_from_transfers()
        topup_ids = set(
            (await s.scalars(select(TransferRow.id).where(TransferRow.code == "TOPUP"))).all()
        )

    succeeded = {p.id: p for p in payments if p.status == "SUCCEEDED"}
    by_status = Counter(p.status for p in payments)
    assert len(succeeded) > 20, by_status
    # Exactly one TOPUP credit per succeeded payment, none for the others.
    credit_counts = dict(topups)
    assert credit_counts == {f"payment:{pid}": 1 for pid in succeeded}, by_status
    assert topup_ids == {derive_id("topup", str(pid)) for pid in succeeded}
    # Exactly one token per succeeded payment, none for the others.
    token_payments = Counter(t.payment_id for t in token_rows)
    assert token_payments == dict.fromkeys(succeeded, 1)
    # Every top-up a client saw succeed is succeeded; every answer names a stored payment;
    # each key made one payment.
    for key, pid in book.confirmed.items():
        assert uuid.UUID(pid) in succeeded, key
    stored = {p.id for p in payments}
    for key, pid in book.answered.items():
        assert uuid.UUID(pid) in stored, key
    assert len(payments) == len({(p.supply_account_id, p.idempotency_key) for p in payments})
    # The ledger: sums to zero, balances match their transfers, credit matches money in.
    assert total == 0
    assert balances == recomputed
    prepaid = sum(balances[c.prepaid_ledger_id] for c in world.customers)
    assert prepaid == sum(p.amount_minor for p in succeeded.values())
    # Message ids: 1..n per meter, no gap, no reuse.
    for meter in meters:
        ids = sorted(t.msg_id for t in token_rows if t.meter_id == meter.id)
        assert ids == list(range(1, meter.next_msg_id)), meter.id
    print(
        f"\ncrash test: {KILLS} SIGKILLs, {len(payments)} payments {dict(by_status)}, "
        f"{len(book.confirmed)} confirmed to clients, client retries {dict(book.failures)}"
    )
