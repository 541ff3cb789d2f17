"""Fixtures of the top-up → token tests: fresh databases, a provisioned tenant, keys, scopes.

The world built by :func:`provision` is written with the table classes directly, not
through the provisioning API, so these tests depend only on the schema:

* tenant "Volta" (EUR, top-ups 5.00..500.00), clearing account, a UTILITY partner
  (unlimited: it pays the top-up splits), a reseller with a RESELLER partner earning
  2.5 % commission on top-ups, and a PAYMENT_FEE partner taking 0.30 per top-up;
* customers with one supply account (PREPAID, debt limit 5.00) and one meter each on
  gateway ``gw-1``; optionally an account without a meter.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from backend.adapters.db.engine import Database
from backend.adapters.db.ledger_repo import LedgerRepository
from backend.adapters.db.ledger_tables import TransferRow
from backend.adapters.db.migrate import upgrade
from backend.adapters.db.tables import (
    CustomerRow,
    GatewayRow,
    MeterRow,
    PartnerRow,
    PaymentRow,
    ResellerRow,
    SplitRuleRow,
    SupplyAccountRow,
    TenantRow,
    TokenRow,
)
from backend.domain.auth import Role, Scope
from backend.domain.ledger import AccountCode, AccountSpec
from backend.service.context import Call
from firmware_protocol.messages import Ed25519Signer, Signer

T0 = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)
PG_DSN = os.environ.get("VOLTCREDIT_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
GATEWAY = "gw-1"
COMMISSION_BP = 250
FEE_MINOR = 30


@dataclass(frozen=True)
class Target:
    """A database for one test: URL and engine arguments."""

    url: str
    engine_kwargs: dict[str, Any] = field(default_factory=dict)

    def database(self) -> Database:
        return Database(self.url, **self.engine_kwargs)


@contextlib.asynccontextmanager
async def fresh_target(kind: str, tmp_path: Path, dsn: str | None = None) -> AsyncIterator[Target]:
    """A migrated, empty database: a new SQLite file, or a new PostgreSQL schema."""
    if kind == "sqlite":
        target = Target(f"sqlite+aiosqlite:///{tmp_path / f'topups-{uuid.uuid4().hex}.db'}")
        await upgrade(target.url)
        yield target
        return
    import asyncpg

    dsn = dsn or PG_DSN
    url = make_url(dsn).set(drivername="postgresql+asyncpg")
    schema = f"topups_test_{uuid.uuid4().hex}"
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f'CREATE SCHEMA "{schema}"')
        target = Target(
            url.render_as_string(hide_password=False),
            {"connect_args": {"server_settings": {"search_path": schema}}},
        )
        await upgrade(target.url, **target.engine_kwargs)
        yield target
    finally:
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.close()


def as_call(scope: Scope, now: datetime = T0) -> Call:
    """A use-case call by ``scope`` at ``now``."""
    return Call(scope=scope, request_id=f"test-{uuid.uuid4().hex[:8]}", now=now)


@dataclass(frozen=True)
class Customer:
    customer_id: int
    account_id: int
    prepaid_ledger_id: int
    meter_id: int | None

    def scope(self, tenant_id: int) -> Scope:
        return Scope(
            role=Role.CUSTOMER,
            actor=f"customer:{self.customer_id}",
            tenant_id=tenant_id,
            customer_id=self.customer_id,
        )

    def call(self, tenant_id: int, now: datetime = T0) -> Call:
        return as_call(self.scope(tenant_id), now)


@dataclass(frozen=True)
class World:
    tenant_id: int
    clearing_id: int
    utility_id: int
    reseller_id: int
    commission_id: int
    fee_id: int
    customers: list[Customer]
    no_meter: Customer | None

    @property
    def admin(self) -> Scope:
        return Scope(role=Role.UTILITY_ADMIN, actor="api_key:1", tenant_id=self.tenant_id)


class _Ids:
    def __init__(self) -> None:
        self.n = 1000

    def __call__(self) -> int:
        self.n += 1
        return self.n


async def provision(
    db: Database,
    *,
    customers: int = 2,
    rules: bool = True,
    without_meter: bool = False,
    first_meter: int = 7_000_001,
    gateway: str = GATEWAY,
    utility_limit: int | None = None,
) -> World:
    """Create the tenant, partners, rules, customers, accounts and meters described above."""
    ids = _Ids()
    clearing, utility, commission, fee = ids(), ids(), ids(), ids()
    async with db.write() as s:
        ledger = LedgerRepository(s)
        await ledger.create_accounts(
            [
                AccountSpec(
                    id=clearing, currency="EUR", code=AccountCode.CLEARING, min_balance=None
                ),
                AccountSpec(
                    id=utility, currency="EUR", code=AccountCode.PARTNER, min_balance=utility_limit
                ),
                AccountSpec(id=commission, currency="EUR", code=AccountCode.PARTNER, min_balance=0),
                AccountSpec(id=fee, currency="EUR", code=AccountCode.PARTNER, min_balance=0),
            ]
        )
        tenant = TenantRow(
            name="Volta",
            currency="EUR",
            timezone="Europe/Berlin",
            min_topup_minor=500,
            max_topup_minor=50_000,
            clearing_account_id=clearing,
            created_at=T0,
        )
        s.add(tenant)
        await s.flush()
        reseller = ResellerRow(tenant_id=tenant.id, name="Kiosk", created_at=T0)
        s.add(reseller)
        await s.flush()
        partners = [
            PartnerRow(
                tenant_id=tenant.id,
                reseller_id=None,
                name="Volta Utility",
                kind="UTILITY",
                ledger_account_id=utility,
                created_at=T0,
            ),
            PartnerRow(
                tenant_id=tenant.id,
                reseller_id=reseller.id,
                name="Kiosk commission",
                kind="RESELLER",
                ledger_account_id=commission,
                created_at=T0,
            ),
            PartnerRow(
                tenant_id=tenant.id,
                reseller_id=None,
                name="Card fees",
                kind="PAYMENT_FEE",
                ledger_account_id=fee,
                created_at=T0,
            ),
        ]
        s.add_all(partners)
        await s.flush()
        if rules:
            s.add_all(
                [
                    SplitRuleRow(
                        tenant_id=tenant.id,
                        tariff_code="HOME",
                        applies_to="TOPUP",
                        kind="BASIS_POINTS",
                        partner_id=partners[1].id,
                        value=COMMISSION_BP,
                        position=1,
                        created_at=T0,
                    ),
                    SplitRuleRow(
                        tenant_id=tenant.id,
                        tariff_code="HOME",
                        applies_to="TOPUP",
                        kind="FIXED_PER_TOPUP",
                        partner_id=partners[2].id,
                        value=FEE_MINOR * 1000,  # milli
                        position=2,
                        created_at=T0,
                    ),
                    # The utility pays the shares (and keeps the rest when consumed).
                    SplitRuleRow(
                        tenant_id=tenant.id,
                        tariff_code="HOME",
                        applies_to="TOPUP",
                        kind="REMAINDER",
                        partner_id=partners[0].id,
                        value=0,
                        position=9,
                        created_at=T0,
                    ),
                    # Applies to consumption, not to top-ups: must be left alone here.
                    SplitRuleRow(
                        tenant_id=tenant.id,
                        tariff_code="HOME",
                        applies_to="CONSUMPTION",
                        kind="PER_KWH",
                        partner_id=partners[0].id,
                        value=100,
                        position=3,
                        created_at=T0,
                    ),
                ]
            )
        s.add(
            GatewayRow(
                id=gateway,
                tenant_id=tenant.id,
                mqtt_username=gateway,
                mqtt_password_hash="x",  # noqa: S106 - a placeholder hash, never checked
                online=False,
                boot_seq=0,
                created_at=T0,
            )
        )
        made: list[Customer] = []
        for i in range(customers + (1 if without_meter else 0)):
            prepaid = ids()
            await ledger.create_accounts(
                [
                    AccountSpec(
                        id=prepaid, currency="EUR", code=AccountCode.PREPAID, min_balance=-500
                    )
                ]
            )
            customer = CustomerRow(
                tenant_id=tenant.id,
                reseller_id=reseller.id,
                name=f"Customer {i}",
                email=f"c{i}@example.org",
                password_hash="x",  # noqa: S106 - a placeholder hash, never checked
                created_at=T0,
            )
            s.add(customer)
            await s.flush()
            account = SupplyAccountRow(
                tenant_id=tenant.id,
                reseller_id=reseller.id,
                customer_id=customer.id,
                ledger_account_id=prepaid,
                tariff_code="HOME",
                label=f"Flat {i}",
                debt_limit_minor=500,
                low_credit_minor=200,
                created_at=T0,
            )
            s.add(account)
            await s.flush()
            meter_id: int | None = None
            if i < customers:
                meter_id = first_meter + i
                s.add(
                    MeterRow(
                        id=meter_id,
                        tenant_id=tenant.id,
                        gateway_id=gateway,
                        supply_account_id=account.id,
                        modbus_unit=None,
                        next_msg_id=1,
                        last_credit_milli=None,
                        last_reading_at=None,
                        created_at=T0,
                    )
                )
            made.append(Customer(customer.id, account.id, prepaid, meter_id))
        tenant_id = tenant.id
        reseller_id = reseller.id
    return World(
        tenant_id=tenant_id,
        clearing_id=clearing,
        utility_id=utility,
        reseller_id=reseller_id,
        commission_id=commission,
        fee_id=fee,
        customers=made[:customers],
        no_meter=made[customers] if without_meter else None,
    )


class StaticSigners:
    """A key store with one ACTIVE key (or one that fails, to test rollbacks)."""

    def __init__(
        self,
        key_id: int = 1,
        *,
        seed: bytes = bytes(range(32)),
        signer: Ed25519Signer | None = None,
    ) -> None:
        self.signer = signer or Ed25519Signer(key_id, Ed25519PrivateKey.from_private_bytes(seed))
        self.fail: Exception | None = None

    def active_signer(self) -> Signer:
        if self.fail is not None:
            raise self.fail
        return self.signer


@dataclass
class Counts:
    payments: int
    topup_transfers: int
    transfers: int
    tokens: int


async def counts(db: Database) -> Counts:
    async with db.read() as s:

        async def n(stmt: Any) -> int:
            return int(await s.scalar(stmt) or 0)

        return Counts(
            payments=await n(select(func.count()).select_from(PaymentRow)),
            topup_transfers=await n(
                select(func.count()).select_from(TransferRow).where(TransferRow.code == "TOPUP")
            ),
            transfers=await n(select(func.count()).select_from(TransferRow)),
            tokens=await n(select(func.count()).select_from(TokenRow)),
        )


async def ledger_sum(db: Database) -> int:
    async with db.read() as s:
        repo = LedgerRepository(s)
        assert await repo.balances() == await repo.balances_from_transfers()
        return await repo.sum_of_balances()


class Clock:
    """A clock that stays where the test puts it (``clock.now = …``)."""

    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now
