"""Top-up requests and settlement on SQLite and PostgreSQL: idempotency, webhooks, atomicity.

The sandbox provider runs in synchronous mode: a test completes a payment with
``sandbox.complete()`` and feeds the signed webhook it returns to the service, exactly as
the HTTP endpoint would. ``InstantSandbox`` settles inside the request instead.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event as sa_event
from sqlalchemy import select

from backend.adapters.db.alert_tables import AlertRow
from backend.adapters.db.engine import Database
from backend.adapters.db.ledger_repo import LedgerRepository
from backend.adapters.db.ledger_tables import TransferRow
from backend.adapters.db.tables import AuditRow, MeterRow, PaymentRow, TokenRow, WebhookEventRow
from backend.adapters.instant_sandbox import InstantSandbox
from backend.domain.auth import Role, Scope
from backend.domain.ledger import AccountCode, TransferCode, derive_id
from backend.domain.split import InvalidSplitRuleError
from backend.domain.topups import PaymentState, TokenState
from backend.errors import LimitExceededError, StorageError
from backend.payments.base import PaymentStatus, WebhookEvent
from backend.payments.errors import (
    PaymentProviderError,
    WebhookSignatureError,
    WebhookTooOldError,
)
from backend.payments.sandbox import SIGNATURE_HEADER, SandboxProvider
from backend.service.accounts import AccountService
from backend.service.context import Call, PageRequest
from backend.service.errors import (
    IdempotencyKeyReusedError,
    NotFoundError,
    SettlementMismatchError,
    TopupRefusedError,
    UnknownPaymentError,
    UnknownProviderError,
)
from backend.service.refusals import PermissionDeniedError
from backend.service.topups import SettleOutcome, TopupService
from firmware_protocol import messages
from firmware_protocol.units import currency
from tests.support.topups import (
    COMMISSION_BP,
    FEE_MINOR,
    T0,
    Clock,
    StaticSigners,
    Target,
    World,
    as_call,
    counts,
    fresh_target,
    ledger_sum,
    provision,
)

pytestmark = pytest.mark.integration

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
SECRET = b"whsec_test_secret_for_the_sandbox"


@pytest.fixture(params=BACKENDS)
async def target(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Target]:
    dsn = request.getfixturevalue("postgres_dsn") if request.param == "postgresql" else None
    async with fresh_target(request.param, tmp_path, dsn) as t:
        yield t


@pytest.fixture
async def db(target: Target) -> AsyncIterator[Database]:
    async with target.database() as database:
        yield database


@pytest.fixture
async def world(db: Database) -> World:
    return await provision(db, customers=2, without_meter=True)


@dataclasses.dataclass
class Rig:
    db: Database
    world: World
    clock: Clock
    sandbox: SandboxProvider
    signers: StaticSigners
    service: TopupService
    accounts: AccountService
    woken: list[int]


def make_rig(db: Database, world: World, *, instant: bool = False) -> Rig:
    clock = Clock()
    sandbox = SandboxProvider(secret=SECRET, clock=clock)
    signers = StaticSigners()
    woken: list[int] = []
    provider = InstantSandbox(sandbox) if instant else sandbox
    service = TopupService(
        db,
        providers={"sandbox": provider},
        default_provider="sandbox",
        signers=signers,
        clock=clock,
        on_token_issued=lambda: woken.append(1),
    )
    return Rig(db, world, clock, sandbox, signers, service, AccountService(db), woken)


@pytest.fixture
def rig(db: Database, world: World) -> Rig:
    return make_rig(db, world)


def scope_of(rig: Rig, i: int = 0) -> Call:
    """Customer ``i`` calling now."""
    return rig.world.customers[i].call(rig.world.tenant_id, rig.clock.now)


async def topup(rig: Rig, amount: int = 2_000, key: str = "key-1", i: int = 0) -> uuid.UUID:
    result = await rig.service.request_topup(
        scope_of(rig, i),
        rig.world.customers[i].account_id,
        amount_minor=amount,
        currency="EUR",
        idempotency_key=key,
    )
    return result.payment_id


async def payment(db: Database, pid: uuid.UUID) -> PaymentRow:
    async with db.read() as s:
        row = await s.get(PaymentRow, pid)
    assert row is not None
    return row


async def deliver(rig: Rig, pid: uuid.UUID) -> tuple[dict[str, str], bytes]:
    """Complete the payment at the sandbox; the signed webhook it would POST."""
    row = await payment(rig.db, pid)
    assert row.provider_payment_id is not None
    hook = rig.sandbox.complete(row.provider_payment_id)
    return dict(hook.headers), hook.body


async def balance_of(db: Database, account_id: int) -> int:
    async with db.read() as s:
        accounts = await LedgerRepository(s).get_accounts([account_id])
    return accounts[account_id].balance


# --- the golden path ---------------------------------------------------------------------


async def test_topup_settles_once_with_splits_and_a_signed_token(rig: Rig) -> None:
    w = rig.world
    c = w.customers[0]
    result = await rig.service.request_topup(
        scope_of(rig), c.account_id, amount_minor=2_000, currency="EUR", idempotency_key="k1"
    )
    assert result.status is PaymentState.PENDING
    assert not result.replayed
    assert result.provider == "sandbox"
    assert result.provider_payment_id is not None
    assert result.client_secret is not None
    assert (await counts(rig.db)).tokens == 0

    headers, body = await deliver(rig, result.payment_id)
    settled = await rig.service.handle_webhook("sandbox", headers, body)
    assert settled.outcome is SettleOutcome.SETTLED
    assert settled.payment_id == result.payment_id
    assert settled.status is PaymentState.SUCCEEDED
    assert rig.woken == [1]

    commission = 2_000 * COMMISSION_BP // 10_000
    assert await balance_of(rig.db, c.prepaid_ledger_id) == 2_000  # the customer's full amount
    assert await balance_of(rig.db, w.clearing_id) == -2_000
    assert await balance_of(rig.db, w.commission_id) == commission
    assert await balance_of(rig.db, w.fee_id) == FEE_MINOR
    assert await balance_of(rig.db, w.utility_id) == -(commission + FEE_MINOR)
    assert await ledger_sum(rig.db) == 0

    async with rig.db.read() as s:
        token = (await s.scalars(select(TokenRow))).one()
        topup_transfer = await s.get(TransferRow, derive_id("topup", str(result.payment_id)))
    assert topup_transfer is not None
    assert topup_transfer.code == "TOPUP"
    assert topup_transfer.linked_group == derive_id("topup-batch", str(result.payment_id))
    assert (token.meter_id, token.msg_id, token.kind) == (c.meter_id, 1, "CREDIT")
    assert token.status == TokenState.PENDING
    assert token.payment_id == result.payment_id
    assert token.next_attempt_at == T0
    # The token verifies with the public key and says exactly what was paid.
    public = {1: rig.signers.signer.private_key.public_key()}
    credit = messages.verify(token.message, public, meter_id=c.meter_id, now=int(T0.timestamp()))
    assert isinstance(credit, messages.CreditToken)
    assert credit.amount_minor == 2_000
    assert credit.currency == currency("EUR")
    assert credit.header.msg_id == 1
    assert credit.header.expires_at - credit.header.issued_at == 30 * 86_400
    async with rig.db.read() as s:
        meter = await s.get(MeterRow, c.meter_id)
    assert meter is not None
    assert meter.next_msg_id == 2

    receipt = await rig.accounts.receipt(scope_of(rig), result.payment_id)
    assert receipt.status is PaymentState.SUCCEEDED
    assert (receipt.amount_minor, receipt.credited_minor) == (2_000, 2_000)
    assert receipt.fees_minor == FEE_MINOR
    assert receipt.taxes_minor == 0
    assert [
        (x.code, x.payee, x.payee_kind, x.payee_account_code, x.amount_minor) for x in receipt.lines
    ] == [
        (TransferCode.TOPUP, "", "", AccountCode.PREPAID, 2_000),
        (TransferCode.SPLIT, "Kiosk commission", "RESELLER", AccountCode.PARTNER, commission),
        (TransferCode.FEE, "Card fees", "PAYMENT_FEE", AccountCode.PARTNER, FEE_MINOR),
    ]
    assert (receipt.token_msg_id, receipt.token_status) == (1, TokenState.PENDING)
    assert receipt.settled_at == T0

    balance = await rig.accounts.balance(scope_of(rig), c.account_id)
    assert balance.ledger_balance_minor == 2_000
    assert balance.currency == "EUR"
    assert (balance.tokens_in_flight, balance.in_flight_minor) == (1, 2_000)
    assert balance.meter_id == c.meter_id
    assert balance.meter_credit_milli is None

    history = (await rig.accounts.token_history(scope_of(rig), c.account_id)).items
    assert [(t.msg_id, t.amount_minor, t.status) for t in history] == [
        (1, 2_000, TokenState.PENDING)
    ]


async def test_second_topup_takes_the_next_message_id(rig: Rig) -> None:
    for n, key in enumerate(["a", "b", "c"], start=1):
        pid = await topup(rig, 1_000 + 10 * n, key)
        await rig.service.handle_webhook("sandbox", *await deliver(rig, pid))
    account = rig.world.customers[0].account_id
    history = await rig.accounts.token_history(scope_of(rig), account)
    assert [t.msg_id for t in history.items] == [3, 2, 1]
    assert history.next_after is None
    page = await rig.accounts.token_history(scope_of(rig), account, PageRequest(limit=2))
    assert ([t.msg_id for t in page.items], page.next_after) == ([3, 2], 2)
    page = await rig.accounts.token_history(scope_of(rig), account, PageRequest(limit=2, after=2))
    assert ([t.msg_id for t in page.items], page.next_after) == ([1], None)


# --- idempotency -------------------------------------------------------------------------


async def test_ten_concurrent_identical_topups_credit_once(db: Database, world: World) -> None:
    # InstantSandbox: every request settles itself, so all ten race to settle as well.
    rig = make_rig(db, world, instant=True)
    results = await asyncio.gather(*(topup(rig, 2_500, "same-key") for _ in range(10)))
    assert len(set(results)) == 1
    c = await counts(db)
    assert (c.payments, c.topup_transfers, c.tokens) == (1, 1, 1)
    assert await balance_of(db, world.customers[0].prepaid_ledger_id) == 2_500
    assert (await payment(db, results[0])).status == PaymentState.SUCCEEDED
    assert await ledger_sum(db) == 0


async def test_ten_concurrent_topups_from_two_database_handles(
    target: Target, world: World
) -> None:
    # Two Database objects on one file/schema behave like two backend processes: on SQLite
    # they meet in the busy handler instead of one in-process lock.
    async with target.database() as db1, target.database() as db2:
        rigs = [make_rig(d, world, instant=True) for d in (db1, db2)]
        # One shared sandbox, as one payment provider serves every instance.
        shared = rigs[0].sandbox
        for r in rigs[1:]:
            r.service._providers["sandbox"] = InstantSandbox(shared)
        results = await asyncio.gather(*(topup(rigs[i % 2], 3_000, "k2") for i in range(10)))
        assert len(set(results)) == 1
        c = await counts(db1)
        assert (c.payments, c.topup_transfers, c.tokens) == (1, 1, 1)


async def test_replay_returns_the_same_payment(rig: Rig) -> None:
    first = await rig.service.request_topup(
        scope_of(rig),
        rig.world.customers[0].account_id,
        amount_minor=900,
        currency="EUR",
        idempotency_key="r",
    )
    again = await rig.service.request_topup(
        scope_of(rig),
        rig.world.customers[0].account_id,
        amount_minor=900,
        currency="EUR",
        idempotency_key="r",
    )
    assert again.payment_id == first.payment_id
    assert again.replayed
    assert again.provider_payment_id == first.provider_payment_id
    await rig.service.handle_webhook("sandbox", *await deliver(rig, first.payment_id))
    settled = await rig.service.request_topup(
        scope_of(rig),
        rig.world.customers[0].account_id,
        amount_minor=900,
        currency="EUR",
        idempotency_key="r",
    )
    assert (settled.status, settled.replayed) == (PaymentState.SUCCEEDED, True)
    assert (await counts(rig.db)).topup_transfers == 1


async def test_same_key_with_another_request_is_refused(rig: Rig) -> None:
    await topup(rig, 1_000, "dup")
    with pytest.raises(IdempotencyKeyReusedError, match="different top-up"):
        await topup(rig, 1_001, "dup")
    assert (await counts(rig.db)).payments == 1
    # The same key on another account is another payment.
    await topup(rig, 1_000, "dup", i=1)
    assert (await counts(rig.db)).payments == 2


# --- validation and scope ----------------------------------------------------------------


INVALID = [
    (499, "EUR", "k", "amount must be 500..50000"),
    (50_001, "EUR", "k", "amount must be 500..50000"),
    (1_000, "USD", "k", "currency must be EUR"),
    (0, "EUR", "k", "positive integer"),
    (True, "EUR", "k", "positive integer"),
    (1_000, "EUR", "has space", "Idempotency-Key"),
    (1_000, "EUR", "", "Idempotency-Key"),
    (1_000, "EUR", "x" * 129, "Idempotency-Key"),
    (1_000, 978, "k", "currency"),
]


async def test_invalid_requests_are_refused(rig: Rig) -> None:
    # One database for all cases (each would otherwise pay for a migration).
    for amount, cur, key, match in INVALID:
        with pytest.raises(TopupRefusedError, match=match):
            await rig.service.request_topup(
                scope_of(rig),
                rig.world.customers[0].account_id,
                amount_minor=amount,  # type: ignore[arg-type]
                currency=cur,  # type: ignore[arg-type]
                idempotency_key=key,
            )
    assert (await counts(rig.db)).payments == 0


async def test_account_without_meter_is_refused(rig: Rig) -> None:
    nm = rig.world.no_meter
    assert nm is not None
    with pytest.raises(TopupRefusedError, match="no meter"):
        await rig.service.request_topup(
            nm.call(rig.world.tenant_id),
            nm.account_id,
            amount_minor=1_000,
            currency="EUR",
            idempotency_key="k",
        )


async def test_other_customers_account_is_not_found(rig: Rig) -> None:
    other = rig.world.customers[1].account_id
    with pytest.raises(NotFoundError):
        await rig.service.request_topup(
            scope_of(rig, 0), other, amount_minor=1_000, currency="EUR", idempotency_key="k"
        )
    pid = await topup(rig, 1_000, "mine", i=1)
    with pytest.raises(NotFoundError):
        await rig.accounts.receipt(scope_of(rig, 0), pid)
    with pytest.raises(NotFoundError):
        await rig.accounts.balance(scope_of(rig, 0), other)
    with pytest.raises(NotFoundError):
        await rig.accounts.token_history(scope_of(rig, 0), other)
    other_tenant = Scope(role=Role.UTILITY_ADMIN, actor="k", tenant_id=rig.world.tenant_id + 1)
    with pytest.raises(NotFoundError):
        await rig.accounts.balance(as_call(other_tenant), other)
    # The utility admin sees every account of its tenant.
    assert (await rig.accounts.receipt(as_call(rig.world.admin), pid)).payment_id == pid


async def test_roles_without_the_permission_are_refused(rig: Rig) -> None:
    support = Scope(role=Role.SUPPORT, actor="k", tenant_id=rig.world.tenant_id)
    with pytest.raises(PermissionDeniedError):
        await rig.service.request_topup(
            as_call(support),
            rig.world.customers[0].account_id,
            amount_minor=1_000,
            currency="EUR",
            idempotency_key="k",
        )
    platform = Scope(role=Role.PLATFORM_ADMIN, actor="k")
    with pytest.raises(PermissionDeniedError):
        await rig.accounts.balance(as_call(platform), rig.world.customers[0].account_id)
    # Support may read.
    balance = await rig.accounts.balance(as_call(support), rig.world.customers[0].account_id)
    assert balance.ledger_balance_minor == 0


# --- webhooks: replayed, forged, late ---------------------------------------------------


async def test_replayed_webhook_is_a_no_op(rig: Rig) -> None:
    pid = await topup(rig)
    headers, body = await deliver(rig, pid)
    assert (await rig.service.handle_webhook("sandbox", headers, body)).outcome is (
        SettleOutcome.SETTLED
    )
    before = await counts(rig.db)
    # The very same delivery again, and a fresh redelivery (same event id, new signature).
    assert (await rig.service.handle_webhook("sandbox", headers, body)).outcome is (
        SettleOutcome.DUPLICATE
    )
    rig.clock.now += timedelta(seconds=60)
    again = await deliver(rig, pid)
    assert again[0] != headers
    assert (await rig.service.handle_webhook("sandbox", *again)).outcome is (
        SettleOutcome.DUPLICATE
    )
    assert await counts(rig.db) == before
    assert await balance_of(rig.db, rig.world.customers[0].prepaid_ledger_id) == 2_000
    assert rig.woken == [1]


async def test_concurrent_duplicate_webhooks_settle_once(rig: Rig) -> None:
    pid = await topup(rig)
    headers, body = await deliver(rig, pid)
    outcomes = await asyncio.gather(
        *(rig.service.handle_webhook("sandbox", headers, body) for _ in range(8))
    )
    assert sorted(o.outcome for o in outcomes) == sorted(
        [SettleOutcome.SETTLED] + [SettleOutcome.DUPLICATE] * 7
    )
    c = await counts(rig.db)
    assert (c.topup_transfers, c.tokens) == (1, 1)


async def test_forged_webhook_changes_nothing(rig: Rig) -> None:
    pid = await topup(rig)
    headers, body = await deliver(rig, pid)
    tampered = body.replace(b'"amount":2000', b'"amount":9000')
    assert tampered != body
    with pytest.raises(WebhookSignatureError):
        await rig.service.handle_webhook("sandbox", headers, tampered)
    forger = SandboxProvider(secret=b"not-our-secret", clock=rig.clock)
    forged_header = headers[SIGNATURE_HEADER].split(",v1=")[0] + ",v1=" + "0" * 64
    with pytest.raises(WebhookSignatureError):
        await rig.service.handle_webhook("sandbox", {SIGNATURE_HEADER: forged_header}, body)
    with pytest.raises(WebhookSignatureError):
        await rig.service.handle_webhook("sandbox", {}, body)
    del forger
    assert (await payment(rig.db, pid)).status == PaymentState.PENDING
    c = await counts(rig.db)
    assert (c.transfers, c.tokens) == (0, 0)
    async with rig.db.read() as s:
        assert (await s.scalars(select(WebhookEventRow))).all() == []


async def test_late_webhook_is_refused(rig: Rig) -> None:
    pid = await topup(rig)
    headers, body = await deliver(rig, pid)  # signed at T0
    rig.clock.now = T0 + timedelta(seconds=301)
    with pytest.raises(WebhookTooOldError):
        await rig.service.handle_webhook("sandbox", headers, body)
    rig.clock.now = T0 - timedelta(seconds=301)  # from the future
    with pytest.raises(WebhookTooOldError):
        await rig.service.handle_webhook("sandbox", headers, body)
    assert (await payment(rig.db, pid)).status == PaymentState.PENDING
    assert (await counts(rig.db)).transfers == 0
    # Inside the window it settles.
    rig.clock.now = T0 + timedelta(seconds=299)
    assert (await rig.service.handle_webhook("sandbox", headers, body)).outcome is (
        SettleOutcome.SETTLED
    )


async def test_unknown_provider_and_unknown_payment(rig: Rig) -> None:
    with pytest.raises(UnknownProviderError):
        await rig.service.handle_webhook("paypal", {}, b"{}")
    event = WebhookEvent(
        provider="sandbox",
        event_id="evt_1",
        type="payment.succeeded",
        provider_payment_id="sbx_pay_nobody",
        status=PaymentStatus.SUCCEEDED,
        amount_minor=1_000,
        currency="EUR",
        created_at=T0,
        raw=b"{}",
    )
    with pytest.raises(UnknownPaymentError):
        await rig.service.settle_event(event)
    async with rig.db.read() as s:
        assert (await s.scalars(select(WebhookEventRow))).all() == []  # redelivery will retry


async def test_declined_payment_posts_nothing(rig: Rig) -> None:
    pid = await topup(rig, 1_002)  # sandbox magic: declined
    settled = await rig.service.handle_webhook("sandbox", *await deliver(rig, pid))
    assert (settled.outcome, settled.status) == (SettleOutcome.UPDATED, PaymentState.FAILED)
    c = await counts(rig.db)
    assert (c.transfers, c.tokens) == (0, 0)
    receipt = await rig.accounts.receipt(scope_of(rig), pid)
    assert (receipt.status, receipt.credited_minor, receipt.lines) == (
        PaymentState.FAILED,
        0,
        [],
    )
    assert receipt.token_msg_id is None
    # A later success for the same provider payment still settles (Stripe retries).
    row = await payment(rig.db, pid)
    assert row.provider_payment_id is not None
    success = WebhookEvent(
        provider="sandbox",
        event_id="evt_retry",
        type="payment.succeeded",
        provider_payment_id=row.provider_payment_id,
        status=PaymentStatus.SUCCEEDED,
        amount_minor=1_002,
        currency="EUR",
        created_at=T0,
        raw=b"{}",
    )
    assert (await rig.service.settle_event(success)).outcome is SettleOutcome.SETTLED
    assert (await counts(rig.db)).tokens == 1


async def test_amount_mismatch_raises_an_alert_and_credits_nothing(rig: Rig) -> None:
    pid = await topup(rig)
    row = await payment(rig.db, pid)
    assert row.provider_payment_id is not None
    event = WebhookEvent(
        provider="sandbox",
        event_id="evt_x",
        type="payment.succeeded",
        provider_payment_id=row.provider_payment_id,
        status=PaymentStatus.SUCCEEDED,
        amount_minor=1_999,
        currency="EUR",
        created_at=T0,
        raw=b"{}",
    )
    with pytest.raises(SettlementMismatchError, match="1999 EUR"):
        await rig.service.settle_event(event)
    assert (await counts(rig.db)).transfers == 0
    async with rig.db.read() as s:
        alerts = (await s.scalars(select(AlertRow))).all()
    assert [(a.kind, a.payment_id) for a in alerts] == [("PAYMENT_MISMATCH", pid)]


# --- atomicity ---------------------------------------------------------------------------


async def assert_nothing_settled(rig: Rig, pid: uuid.UUID) -> None:
    c = await counts(rig.db)
    assert (c.transfers, c.tokens) == (0, 0)
    assert (await payment(rig.db, pid)).status == PaymentState.PENDING
    async with rig.db.read() as s:
        assert (await s.scalars(select(WebhookEventRow))).all() == []
        meter = await s.get(MeterRow, rig.world.customers[0].meter_id)
        balances = await LedgerRepository(s).balances()
    assert meter is not None
    assert meter.next_msg_id == 1
    assert set(balances.values()) == {0}
    assert await ledger_sum(rig.db) == 0
    assert rig.woken == []


async def test_failure_after_the_ledger_post_commits_nothing(rig: Rig) -> None:
    pid = await topup(rig)
    headers, body = await deliver(rig, pid)
    # The database connection dies right after the ledger transfers were written, inside
    # the settlement's transaction (the token row and message id are already written too).
    written: list[str] = []

    def crash_after_ledger(_c: Any, _cur: Any, statement: str, *_a: Any) -> None:
        written.append(statement.split()[2] if statement.startswith("INSERT") else "")
        if statement.startswith("INSERT INTO ledger_transfers"):
            raise OSError("connection lost after the ledger post")

    sa_event.listen(rig.db.engine.sync_engine, "after_cursor_execute", crash_after_ledger)
    try:
        with pytest.raises(Exception, match="connection lost after the ledger post"):
            await rig.service.handle_webhook("sandbox", headers, body)
    finally:
        sa_event.remove(rig.db.engine.sync_engine, "after_cursor_execute", crash_after_ledger)
    assert {"webhook_events", "tokens", "ledger_transfers"} <= set(written)
    await assert_nothing_settled(rig, pid)
    # The provider redelivers; now it goes through, once.
    assert (await rig.service.handle_webhook("sandbox", headers, body)).outcome is (
        SettleOutcome.SETTLED
    )
    c = await counts(rig.db)
    assert (c.topup_transfers, c.tokens) == (1, 1)


async def test_a_failing_signer_commits_nothing(rig: Rig) -> None:
    pid = await topup(rig)
    headers, body = await deliver(rig, pid)
    rig.signers.fail = RuntimeError("HSM unreachable")
    with pytest.raises(RuntimeError, match="HSM unreachable"):
        await rig.service.handle_webhook("sandbox", headers, body)
    await assert_nothing_settled(rig, pid)
    rig.signers.fail = None
    assert (await rig.service.handle_webhook("sandbox", headers, body)).outcome is (
        SettleOutcome.SETTLED
    )


async def test_broken_split_configuration_rolls_back(db: Database) -> None:
    world = await provision(db, customers=1)
    rig = make_rig(db, world)
    async with db.write() as s:
        from backend.adapters.db.tables import SplitRuleRow

        remainder = select(SplitRuleRow).where(SplitRuleRow.kind == "REMAINDER")
        for r in (await s.scalars(remainder)).all():
            await s.delete(r)  # nobody to pay the shares any more
    pid = await topup(rig)
    with pytest.raises(InvalidSplitRuleError, match="exactly one REMAINDER"):
        await rig.service.handle_webhook("sandbox", *await deliver(rig, pid))
    assert (await counts(rig.db)).transfers == 0
    assert (await payment(rig.db, pid)).status == PaymentState.PENDING
    async with db.read() as s:
        alerts = (await s.scalars(select(AlertRow))).all()
    assert [(a.kind, a.payment_id) for a in alerts] == [("SETTLEMENT_REFUSED", pid)]


async def test_a_limited_utility_account_refuses_the_splits_loudly(db: Database) -> None:
    # Provisioned with min_balance 0, the utility cannot pay a commission before it has
    # earned anything: the settlement is refused whole (no half-posted books) and alerted.
    world = await provision(db, customers=1, utility_limit=0)
    rig = make_rig(db, world, instant=True)
    with pytest.raises(LimitExceededError):
        await topup(rig)
    c = await counts(db)
    assert (c.payments, c.transfers, c.tokens) == (1, 0, 0)
    async with db.read() as s:
        alerts = (await s.scalars(select(AlertRow))).all()
    assert [a.kind for a in alerts] == ["SETTLEMENT_REFUSED"]


async def test_no_rules_means_one_transfer(db: Database) -> None:
    world = await provision(db, customers=1, rules=False, first_meter=8_000_001)
    rig = make_rig(db, world, instant=True)
    pid = await topup(rig, 700, "k")
    receipt = await rig.accounts.receipt(rig.world.customers[0].call(world.tenant_id), pid)
    assert [(x.code, x.amount_minor) for x in receipt.lines] == [(TransferCode.TOPUP, 700)]
    assert receipt.fees_minor == 0


# --- provider trouble and reconciliation -------------------------------------------------


async def test_provider_outage_leaves_a_created_payment_to_retry(rig: Rig) -> None:
    with pytest.raises(PaymentProviderError) as info:
        await topup(rig, 1_009, "out")  # sandbox magic: unavailable
    assert info.value.retryable
    rows = await counts(rig.db)
    assert rows.payments == 1
    async with rig.db.read() as s:
        row = (await s.scalars(select(PaymentRow))).one()
    assert (row.status, row.provider_payment_id) == (PaymentState.CREATED, None)


async def test_reconcile_settles_a_payment_whose_webhook_was_lost(rig: Rig) -> None:
    pid = await topup(rig, 1_004, "stall")  # sandbox magic: stays pending
    row = await payment(rig.db, pid)
    assert row.provider_payment_id is not None
    assert await rig.service.reconcile(older_than_s=60) == 0  # too young to poll
    rig.sandbox.complete(row.provider_payment_id)  # completes; the webhook is "lost"
    rig.clock.now = T0 + timedelta(seconds=61)
    assert await rig.service.reconcile(older_than_s=60) == 1
    assert (await payment(rig.db, pid)).status == PaymentState.SUCCEEDED
    rig.clock.now = T0 + timedelta(seconds=200)
    assert await rig.service.reconcile(older_than_s=60) == 0
    assert (await counts(rig.db)).tokens == 1


async def test_reconcile_repeats_the_create_after_a_crash_before_recording(rig: Rig) -> None:
    # A crash after the payment row was written but before the provider's answer was
    # stored: the row is CREATED without a provider id.
    async with rig.db.write() as s:
        from backend.adapters.db.topup_repo import TopupRepository

        repo = TopupRepository(s)
        c = rig.world.customers[0]
        await repo.add_payment(
            PaymentRow(
                id=uuid.uuid4(),
                tenant_id=rig.world.tenant_id,
                reseller_id=rig.world.reseller_id,
                supply_account_id=c.account_id,
                idempotency_key="crashed",
                request_hash="x" * 64,
                provider="sandbox",
                provider_payment_id=None,
                amount_minor=1_500,
                currency="EUR",
                status="CREATED",
                created_at=T0,
                updated_at=T0,
                settled_at=None,
            )
        )
    rig.clock.now = T0 + timedelta(seconds=120)
    assert await rig.service.reconcile(older_than_s=60) == 0  # asked; the sandbox says pending
    async with rig.db.read() as s:
        row = (await s.scalars(select(PaymentRow))).one()
    assert row.status == PaymentState.PENDING
    assert row.provider_payment_id is not None
    # A provider that forgot the payment (sandbox restart) leaves it pending, polled later.
    rig.service._providers["sandbox"] = SandboxProvider(secret=SECRET, clock=rig.clock)
    rig.clock.now = T0 + timedelta(seconds=300)
    assert await rig.service.reconcile(older_than_s=60) == 0
    async with rig.db.read() as s:
        row = (await s.scalars(select(PaymentRow))).one()
    assert row.status == PaymentState.PENDING
    assert row.updated_at == rig.clock.now


def test_default_provider_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not configured"):
        TopupService(
            Database(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}"),
            providers={},
            default_provider="sandbox",
            signers=StaticSigners(),
        )


# --- edges -------------------------------------------------------------------------------


async def test_genuine_event_of_another_type_is_acknowledged_and_ignored(rig: Rig) -> None:
    from backend.payments.webhooks import format_signature_header

    body = json.dumps({"id": "evt_other", "type": "payment.refunded", "created": 0}).encode()
    header = format_signature_header(body, timestamp=int(T0.timestamp()), secrets=[SECRET])
    settled = await rig.service.handle_webhook("sandbox", {SIGNATURE_HEADER: header}, body)
    assert settled.outcome is SettleOutcome.IGNORED
    assert (await counts(rig.db)).transfers == 0


async def test_meter_gone_before_settlement_credits_and_alerts(rig: Rig) -> None:
    pid = await topup(rig)
    async with rig.db.write() as s:
        meter = await s.get(MeterRow, rig.world.customers[0].meter_id)
        await s.delete(meter)
    settled = await rig.service.handle_webhook("sandbox", *await deliver(rig, pid))
    assert settled.outcome is SettleOutcome.SETTLED
    c = await counts(rig.db)
    assert (c.topup_transfers, c.tokens) == (1, 0)
    assert await balance_of(rig.db, rig.world.customers[0].prepaid_ledger_id) == 2_000
    async with rig.db.read() as s:
        alerts = (await s.scalars(select(AlertRow))).all()
    assert [(a.kind, a.payment_id) for a in alerts] == [("NO_METER", pid)]
    # Without a meter the balance has no meter fields and the history is empty.
    balance = await rig.accounts.balance(scope_of(rig), rig.world.customers[0].account_id)
    assert (balance.meter_id, balance.tokens_in_flight) == (None, 0)
    history = await rig.accounts.token_history(scope_of(rig), rig.world.customers[0].account_id)
    assert history.items == []


async def test_a_meter_out_of_message_ids_refuses_to_settle(rig: Rig) -> None:
    pid = await topup(rig)
    async with rig.db.write() as s:
        meter = await s.get(MeterRow, rig.world.customers[0].meter_id)
        assert meter is not None
        meter.next_msg_id = 2**32
    with pytest.raises(StorageError, match="every message id"):
        await rig.service.handle_webhook("sandbox", *await deliver(rig, pid))
    assert (await counts(rig.db)).transfers == 0


async def test_audit_rows_name_who_did_what(rig: Rig) -> None:
    pid = await topup(rig)
    await rig.service.handle_webhook("sandbox", *await deliver(rig, pid))
    async with rig.db.read() as s:
        rows = (await s.scalars(select(AuditRow).order_by(AuditRow.id))).all()
    customer = rig.world.customers[0].customer_id
    assert [(r.actor, r.action, r.target) for r in rows] == [
        (f"customer:{customer}", "topup.create", f"payment:{pid}"),
        (f"customer:{customer}", "payment.pending", f"payment:{pid}"),
        ("provider:sandbox", "payment.succeeded", f"payment:{pid}"),
    ]
