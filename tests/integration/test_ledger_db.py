"""The ledger on real databases: SQLite (file, WAL) and PostgreSQL, each test in a fresh schema.

Covers migrations against the models, idempotent posts, limits, linked batches, currency
checks, a hypothesis state machine checking the ledger's invariants after every step, and
concurrent writers to one account (no lost update; the second writer waits for the first).
"""

from __future__ import annotations

import asyncio
import io
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import Column, Integer, MetaData, Table, inspect, text, update
from sqlalchemy import event as sa_event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.exc import IntegrityError

from backend.adapters.db.base import UTCDateTime
from backend.adapters.db.engine import Database
from backend.adapters.db.ledger_repo import LedgerRepository
from backend.adapters.db.ledger_tables import AccountRow
from backend.adapters.db.migrate import alembic_config, target_metadata, upgrade
from backend.domain.ledger import (
    Account,
    AccountCode,
    AccountSpec,
    Transfer,
    TransferCode,
    apply,
    derive_id,
)
from backend.errors import (
    AccountNotFoundError,
    IdempotencyConflictError,
    InvalidAccountError,
    InvalidTransferError,
    LedgerError,
    LedgerMismatchError,
    LimitExceededError,
    StorageError,
    WriteTransactionRequiredError,
)
from tests.support.db import BACKENDS, Target, TargetFactory, target_factory

pytestmark = pytest.mark.integration

T0 = datetime(2026, 11, 1, 12, 0, 0, 123456, tzinfo=UTC)

CLEARING = AccountSpec(id=1, currency="EUR", code=AccountCode.CLEARING, min_balance=None)
PREPAID = AccountSpec(id=2, currency="EUR", code=AccountCode.PREPAID, min_balance=-500)
PARTNER = AccountSpec(id=3, currency="EUR", code=AccountCode.PARTNER, min_balance=0)
KES_PREPAID = AccountSpec(id=4, currency="KES", code=AccountCode.PREPAID, min_balance=0)


def _factory(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> TargetFactory:
    """Makes fresh, empty databases of one kind (see tests/support/db.py)."""
    return target_factory(kind, tmp_path, request)


@pytest.fixture(params=BACKENDS)
def fresh(request: pytest.FixtureRequest, tmp_path: Path) -> TargetFactory:
    return _factory(request.param, tmp_path, request)


@pytest.fixture
async def target(fresh: TargetFactory) -> AsyncIterator[Target]:
    async with fresh() as t:
        await upgrade(t.url, **t.engine_kwargs)
        yield t


@pytest.fixture
async def db(target: Target) -> AsyncIterator[Database]:
    async with target.database() as database:
        async with database.write() as s:
            await LedgerRepository(s).create_accounts([CLEARING, PREPAID, PARTNER, KES_PREPAID])
        yield database


def tr(n: int | str, debit: int, credit: int, amount: int, /, **kw: Any) -> Transfer:
    fields: dict[str, Any] = {
        "id": derive_id("test", str(n)),
        "debit_account_id": debit,
        "credit_account_id": credit,
        "amount": amount,
        "currency": "EUR",
        "code": TransferCode.TOPUP,
        "reference": f"ref-{n}",
        "created_at": T0,
    }
    fields.update(kw)
    return Transfer(**fields)


async def post(db: Database, transfers: Sequence[Transfer]) -> list[Any]:
    async with db.write() as s:
        return await LedgerRepository(s).post(transfers)


async def balances(db: Database) -> dict[int, int]:
    async with db.read() as s:
        return await LedgerRepository(s).balances()


async def check_invariants(db: Database) -> dict[int, int]:
    """Sum zero, balances equal their transfers, limits respected; returns the balances."""
    async with db.read() as s:
        repo = LedgerRepository(s)
        assert await repo.sum_of_balances() == 0
        stored = await repo.balances()
        assert stored == await repo.balances_from_transfers()
        accounts = await repo.get_accounts(list(stored))
    for acc in accounts.values():
        assert acc.min_balance is None or acc.balance >= acc.min_balance, acc
    return stored


# --- migrations -----------------------------------------------------------------------------


def _diffs(conn: Connection, metadata: MetaData) -> list[Any]:
    return list(compare_metadata(MigrationContext.configure(conn), metadata))


async def test_migration_matches_the_models(target: Target) -> None:
    await upgrade(target.url, **target.engine_kwargs)  # a second upgrade is a no-op
    async with target.database() as database, database.engine.connect() as conn:
        assert await conn.run_sync(_diffs, target_metadata()) == []
        head = ScriptDirectory.from_config(alembic_config()).get_current_head()
        assert (await conn.execute(text("SELECT version_num FROM alembic_version"))).all() == [
            (head,)
        ]
        # compare_metadata does not look at CHECK constraints: read their names back.
        checks = await conn.run_sync(
            lambda c: {
                ck["name"]
                for table in ("ledger_accounts", "ledger_transfers")
                for ck in inspect(c).get_check_constraints(table)
            }
        )
        assert checks == {
            "ck_ledger_accounts_debits_posted_non_negative",
            "ck_ledger_accounts_credits_posted_non_negative",
            "ck_ledger_accounts_min_balance_non_positive",
            "ck_ledger_accounts_balance_within_limit",
            "ck_ledger_transfers_amount_positive",
            "ck_ledger_transfers_distinct_accounts",
        }
        # The comparison does see differences (it is not vacuously empty).
        extra = MetaData()
        for table in target_metadata().tables.values():
            table.to_metadata(extra)
        Table("not_migrated", extra, Column("id", Integer, primary_key=True))
        diffs = await conn.run_sync(_diffs, extra)
        assert [d[0] for d in diffs] == ["add_table"]


async def test_database_enforces_limits_itself(db: Database) -> None:
    # Defence in depth: even a write that bypasses the domain cannot break a limit.
    with pytest.raises(IntegrityError):
        async with db.write() as s:
            await s.execute(update(AccountRow).where(AccountRow.id == 2).values(debits_posted=501))
    assert (await balances(db))[2] == 0


@pytest.mark.parametrize("fresh", ["sqlite"], indirect=True)
async def test_sqlite_writers_begin_immediate(target: Target) -> None:
    async with target.database() as database:
        seen: list[str] = []
        sa_event.listen(
            database.engine.sync_engine,
            "before_cursor_execute",
            lambda _c, _cur, stmt, *_a: seen.append(stmt) if stmt.startswith("BEGIN") else None,
        )
        async with database.write() as s:
            await s.execute(text("SELECT 1"))
        async with database.read() as s:
            await s.execute(text("SELECT 1"))
        assert seen == ["BEGIN IMMEDIATE", "BEGIN DEFERRED"]
        async with database.engine.connect() as conn:
            mode = (await conn.execute(text("PRAGMA journal_mode"))).scalar()
        assert mode == "wal"


def test_unsupported_url_is_refused() -> None:
    with pytest.raises(StorageError, match="unsupported database URL scheme 'sqlite'"):
        Database("sqlite:///x.db")  # the sync driver would block the event loop


@pytest.mark.parametrize("dialect", [sqlite.dialect(), postgresql.dialect()])
def test_utc_datetime_column_type(dialect: Dialect) -> None:
    col = UTCDateTime()
    plus2 = datetime(2026, 3, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    stored = col.process_bind_param(plus2, dialect)
    assert stored == datetime(2026, 3, 1, 12, 0, tzinfo=None if dialect.name == "sqlite" else UTC)
    assert col.process_result_value(stored, dialect) == plus2
    assert col.process_result_value(plus2, dialect) == plus2
    assert col.process_result_value(plus2, dialect).tzinfo is UTC  # type: ignore[union-attr]
    assert col.process_bind_param(None, dialect) is None
    assert col.process_result_value(None, dialect) is None
    with pytest.raises(ValueError, match="naive datetime"):
        col.process_bind_param(datetime(2026, 3, 1), dialect)  # noqa: DTZ001 - the naive case


async def test_unmigrated_database_is_a_storage_error(fresh: TargetFactory) -> None:
    async with fresh() as t, t.database() as database:
        with pytest.raises(StorageError, match="database error"):
            async with database.write() as s:
                await LedgerRepository(s).post([tr(1, 1, 2, 1)])


@pytest.mark.parametrize("fresh", ["sqlite"], indirect=True)
async def test_alembic_command_line_paths(fresh: TargetFactory) -> None:
    async with fresh() as t:
        # --sql renders the DDL without a database.
        out = io.StringIO()
        config = alembic_config(t.url)
        config.output_buffer = out
        command.upgrade(config, "head", sql=True)
        assert "CREATE TABLE ledger_accounts" in out.getvalue()
        # `alembic upgrade head` with sqlalchemy.url, as a developer would run it.
        await asyncio.to_thread(command.upgrade, alembic_config(t.url), "head")
        async with t.database() as database, database.engine.connect() as conn:
            assert await conn.run_sync(_diffs, target_metadata()) == []


# --- accounts -------------------------------------------------------------------------------


async def test_create_accounts_is_idempotent(db: Database) -> None:
    await post(db, [tr(1, 1, 2, 700)])
    async with db.write() as s:
        again = await LedgerRepository(s).create_accounts([PREPAID])
    assert again == [Account(PREPAID, 0, 700)]
    changed = AccountSpec(id=2, currency="EUR", code=AccountCode.PREPAID, min_balance=-900)
    new = AccountSpec(id=5, currency="EUR", code=AccountCode.REVENUE, min_balance=0)
    with pytest.raises(IdempotencyConflictError, match="account 2"):
        async with db.write() as s:
            await LedgerRepository(s).create_accounts([new, changed])
    async with db.read() as s:
        assert await LedgerRepository(s).get_accounts([2, 5]) == {2: Account(PREPAID, 0, 700)}


async def test_create_accounts_checks_its_input(db: Database) -> None:
    async with db.write() as s:
        repo = LedgerRepository(s)
        with pytest.raises(InvalidAccountError, match=r"1\.\.1000"):
            await repo.create_accounts([])
        with pytest.raises(InvalidAccountError, match="twice"):
            await repo.create_accounts([PARTNER, PARTNER])


async def test_writes_need_a_write_unit_of_work(db: Database) -> None:
    async with db.read() as s:
        with pytest.raises(WriteTransactionRequiredError):
            await LedgerRepository(s).post([tr(1, 1, 2, 1)])
        with pytest.raises(WriteTransactionRequiredError):
            await LedgerRepository(s).create_accounts([CLEARING])


# --- posting --------------------------------------------------------------------------------


async def test_same_id_twice_is_a_noop_returning_the_first(db: Database) -> None:
    first = tr("pay-1", 1, 2, 1_000)
    [r1] = await post(db, [first])
    assert (r1.transfer, r1.created) == (first, True)
    retry = tr("pay-1", 1, 2, 1_000, created_at=T0 + timedelta(minutes=3))
    [r2] = await post(db, [retry])
    assert (r2.transfer, r2.created) == (first, False)  # the first post's created_at
    assert (await balances(db))[2] == 1_000
    async with db.read() as s:
        assert await LedgerRepository(s).get_transfer(first.id) == first
        assert await LedgerRepository(s).get_transfer(uuid.uuid4()) is None


async def test_same_id_other_content_conflicts_and_changes_nothing(db: Database) -> None:
    await post(db, [tr("pay-1", 1, 2, 1_000)])
    before = await balances(db)
    with pytest.raises(IdempotencyConflictError, match="different content"):
        await post(db, [tr("pay-1", 1, 2, 1_001)])
    with pytest.raises(IdempotencyConflictError, match="different content"):
        await post(db, [tr("pay-1", 1, 3, 1_000)])
    assert await balances(db) == before
    await check_invariants(db)


async def test_prepaid_limit_boundary(db: Database) -> None:
    await post(db, [tr("top", 1, 2, 300)])
    with pytest.raises(LimitExceededError) as info:
        await post(db, [tr("use-1", 2, 3, 801, code=TransferCode.CONSUMPTION)])
    assert (info.value.account_id, info.value.balance_after) == (2, -501)
    [ok] = await post(db, [tr("use-2", 2, 3, 800, code=TransferCode.CONSUMPTION)])
    assert ok.created
    assert (await balances(db))[2] == -500  # exactly the emergency-credit limit
    with pytest.raises(LimitExceededError):
        await post(db, [tr("use-3", 2, 3, 1, code=TransferCode.CONSUMPTION)])
    await check_invariants(db)


async def test_linked_batch_is_all_or_nothing(db: Database) -> None:
    group = derive_id("batch", "pay-2")
    topup = tr("pay-2", 1, 2, 1_000, linked_group=group)
    fee = tr("pay-2-fee", 2, 3, 2_000, linked_group=group, code=TransferCode.FEE)
    with pytest.raises(LimitExceededError):
        await post(db, [topup, fee])
    assert set((await balances(db)).values()) == {0}
    async with db.read() as s:
        assert await LedgerRepository(s).get_transfer(topup.id) is None
    fee = tr("pay-2-fee", 2, 3, 30, linked_group=group, code=TransferCode.FEE)
    results = await post(db, [topup, fee])
    assert [r.created for r in results] == [True, True]
    assert await balances(db) == {1: -1_000, 2: 970, 3: 30, 4: 0}
    # Replaying the whole batch is a no-op; a part of it, or a new batch reusing the group, is not.
    assert [r.created for r in await post(db, [topup, fee])] == [False, False]
    extra = tr("pay-2-more", 1, 2, 5, linked_group=group)
    with pytest.raises(IdempotencyConflictError, match="new but others"):
        await post(db, [topup, extra])
    with pytest.raises(IdempotencyConflictError, match="linked_group"):
        await post(db, [extra])
    await check_invariants(db)


async def test_refusals_change_nothing(db: Database) -> None:
    await post(db, [tr("top", 1, 2, 100)])
    before = await balances(db)
    with pytest.raises(LedgerMismatchError, match="KES"):
        await post(db, [tr("x1", 1, 4, 10)])
    with pytest.raises(LedgerMismatchError):
        await post(db, [tr("x2", 1, 4, 10, currency="KES")])
    with pytest.raises(AccountNotFoundError, match=r"\[99\]"):
        await post(db, [tr("x3", 1, 99, 10)])
    with pytest.raises(InvalidTransferError, match="linked_group"):
        await post(db, [tr("x4", 1, 2, 1), tr("x5", 1, 2, 1)])
    assert await balances(db) == before


async def test_refused_post_leaves_the_unit_of_work_usable(db: Database) -> None:
    async with db.write() as s:
        repo = LedgerRepository(s)
        with pytest.raises(LimitExceededError):
            await repo.post([tr("too-much", 2, 3, 501)])
        await repo.post([tr("ok", 1, 2, 5)])
    assert await check_invariants(db) == {1: -5, 2: 5, 3: 0, 4: 0}


# --- concurrency ----------------------------------------------------------------------------


async def test_concurrent_topups_and_consumption_lose_no_update(target: Target) -> None:
    # Two Database objects on one database: like two backend processes (SQLite: two
    # writers meet at BEGIN IMMEDIATE; PostgreSQL: at the account's row lock).
    async with target.database() as a, target.database() as b:
        async with a.write() as s:
            await LedgerRepository(s).create_accounts([CLEARING, PREPAID, PARTNER])
        await post(a, [tr("seed", 1, 2, 5_000)])

        async def one(i: int) -> None:
            t = (
                tr(f"top-{i}", 1, 2, 100 + i)
                if i % 2
                else tr(f"use-{i}", 2, 3, 50 + i, code=TransferCode.CONSUMPTION)
            )
            async with (a if i < 10 else b).write() as s:
                await LedgerRepository(s).post([t])
                await asyncio.sleep(0.002)  # hold the lock a moment so the others queue

        async with asyncio.TaskGroup() as tg:
            for i in range(20):
                tg.create_task(one(i), name=f"post-{i}")
        topped = sum(100 + i for i in range(20) if i % 2)
        used = sum(50 + i for i in range(20) if not i % 2)
        assert await check_invariants(a) == {1: -5_000 - topped, 2: 5_000 + topped - used, 3: used}


async def test_second_writer_waits_for_the_first(target: Target) -> None:
    async with target.database() as a, target.database() as b:
        async with a.write() as s:
            await LedgerRepository(s).create_accounts([CLEARING, PREPAID])
        holding, release = asyncio.Event(), asyncio.Event()

        async def first() -> None:
            async with a.write() as s:
                await LedgerRepository(s).post([tr("first", 1, 2, 10)])
                holding.set()
                await release.wait()

        async def second() -> list[Any]:
            await holding.wait()
            async with b.write() as s:
                return await LedgerRepository(s).post([tr("second", 2, 1, 10)])

        t1 = asyncio.create_task(first())
        t2 = asyncio.create_task(second())
        await holding.wait()
        # The second needs 10 of credit that only the first's commit provides.
        done, _ = await asyncio.wait({t2}, timeout=0.3)
        assert not done, "the second writer must wait for the first to commit"
        release.set()
        await t1
        [result] = await t2
        assert result.created
        assert await check_invariants(a) == {1: 0, 2: 0}


@pytest.mark.parametrize(
    "fresh", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)
async def test_same_id_racing_on_other_accounts_conflicts(target: Target) -> None:
    # Disjoint accounts take no common row lock; the primary key settles the race.
    async with target.database() as a, target.database() as b:
        kes_clearing = AccountSpec(
            id=5, currency="KES", code=AccountCode.CLEARING, min_balance=None
        )
        async with a.write() as s:
            await LedgerRepository(s).create_accounts(
                [CLEARING, PREPAID, kes_clearing, KES_PREPAID]
            )
        holding, release = asyncio.Event(), asyncio.Event()

        async def first() -> None:
            async with a.write() as s:
                await LedgerRepository(s).post([tr("race", 1, 2, 10)])
                holding.set()
                await release.wait()

        async def second() -> None:
            await holding.wait()
            async with b.write() as s:
                await LedgerRepository(s).post([tr("race", 5, 4, 10, currency="KES")])

        t1 = asyncio.create_task(first())
        t2 = asyncio.create_task(second())
        await holding.wait()
        await asyncio.sleep(0.1)
        release.set()
        await t1
        with pytest.raises(IdempotencyConflictError, match="concurrently"):
            await t2
        assert await check_invariants(a) == {1: -10, 2: 10, 4: 0, 5: 0}


# --- the state machine ----------------------------------------------------------------------

MIN_BALANCES = [None, 0, -100, -1_000]


def ledger_machine(fresh: TargetFactory, runner: asyncio.Runner) -> type[RuleBasedStateMachine]:
    """A state machine posting random operations to a fresh database per example."""

    class LedgerMachine(RuleBasedStateMachine):
        accounts = Bundle("accounts")

        def __init__(self) -> None:
            super().__init__()
            self._target_cm = fresh()
            target = runner.run(self._target_cm.__aenter__())
            runner.run(upgrade(target.url, **target.engine_kwargs))
            self.db = target.database()
            self.model: dict[int, Account] = {}
            self.posted: list[list[Transfer]] = []
            self.n = 0

        def _next(self) -> int:
            self.n += 1
            return self.n

        def _post(self, batch: list[Transfer]) -> None:
            # The pure rules are the oracle for what the database must accept or refuse.
            try:
                expected = apply(self.model, batch)
            except LedgerError as exc:
                with pytest.raises(type(exc)):
                    runner.run(post(self.db, batch))
                event(f"refused: {type(exc).__name__}")
                return
            results = runner.run(post(self.db, batch))
            assert [r.created for r in results] == [True] * len(batch)
            self.model = expected
            self.posted.append(batch)
            event(f"posted a batch of {len(batch)}")

        @initialize(target=accounts)
        def open_clearing(self) -> int:
            return self._open("EUR", AccountCode.CLEARING, None)

        @initialize(target=accounts)
        def open_prepaid(self) -> int:
            return self._open("EUR", AccountCode.PREPAID, -500)

        def _open(self, currency: str, code: AccountCode, min_balance: int | None) -> int:
            spec = AccountSpec(
                id=self._next(), currency=currency, code=code, min_balance=min_balance
            )

            async def create() -> list[Account]:
                async with self.db.write() as s:
                    return await LedgerRepository(s).create_accounts([spec])

            assert runner.run(create()) == [Account(spec)]
            self.model[spec.id] = Account(spec)
            return spec.id

        @rule(
            target=accounts,
            currency=st.sampled_from(["EUR", "EUR", "KES"]),
            code=st.sampled_from(AccountCode),
            min_balance=st.sampled_from(MIN_BALANCES),
        )
        def open_account(self, currency: str, code: AccountCode, min_balance: int | None) -> int:
            return self._open(currency, code, min_balance)

        def _leg(self, n: int, debit: int, c: int, amount: int, **kw: Any) -> Transfer | None:
            """A transfer from ``debit`` to the c-th other account of its currency (if any)."""
            currency = self.model[debit].currency
            others = sorted(
                i for i, a in self.model.items() if a.currency == currency and i != debit
            )
            if not others:
                return None
            return tr(n, debit, others[c % len(others)], amount, currency=currency, **kw)

        @rule(debit=accounts, c=st.integers(0, 10**6), amount=st.integers(1, 1_500))
        def transfer(self, debit: int, c: int, amount: int) -> None:
            t = self._leg(self._next(), debit, c, amount)
            if t is not None:
                self._post([t])

        @rule(debit=accounts, credit=accounts, amount=st.integers(1, 100))
        def transfer_any_pair(self, debit: int, credit: int, amount: int) -> None:
            # Any two accounts, often of different currencies: the mismatch path.
            if debit != credit:
                self._post([tr(self._next(), debit, credit, amount, currency="EUR")])

        @rule(
            legs=st.lists(
                st.tuples(st.integers(0, 10**6), st.integers(0, 10**6), st.integers(1, 800)),
                min_size=2,
                max_size=4,
            )
        )
        def linked_batch(self, legs: list[tuple[int, int, int]]) -> None:
            ids = sorted(self.model)
            group = derive_id("group", str(self._next()))
            batch = [
                self._leg(self._next(), ids[d % len(ids)], c, amount, linked_group=group)
                for d, c, amount in legs
            ]
            if all(t is not None for t in batch):
                self._post([t for t in batch if t is not None])

        @precondition(lambda self: bool(self.posted))
        @rule(pick=st.integers(0, 10**6), later=st.integers(1, 10**6))
        def repeat_batch(self, pick: int, later: int) -> None:
            batch = self.posted[pick % len(self.posted)]
            retry = [
                tr(0, t.debit_account_id, t.credit_account_id, t.amount, **_fields(t, later))
                for t in batch
            ]
            results = runner.run(post(self.db, retry))
            assert [(r.transfer, r.created) for r in results] == [(t, False) for t in batch]

        @precondition(lambda self: bool(self.posted))
        @rule(pick=st.integers(0, 10**6), delta=st.integers(1, 50))
        def conflicting_repeat(self, pick: int, delta: int) -> None:
            batch = self.posted[pick % len(self.posted)]
            t = batch[0]
            fields = _fields(t, 0)
            changed = tr(0, t.debit_account_id, t.credit_account_id, t.amount + delta, **fields)
            with pytest.raises(IdempotencyConflictError):
                runner.run(post(self.db, [changed, *batch[1:]]))

        @invariant()
        def ledger_holds(self) -> None:
            stored = runner.run(check_invariants(self.db))
            assert stored == {i: a.balance for i, a in self.model.items()}

        def teardown(self) -> None:
            runner.run(self.db.engine.dispose())
            runner.run(self._target_cm.__aexit__(None, None, None))

    return LedgerMachine


def _fields(t: Transfer, later_s: int) -> dict[str, Any]:
    return {
        "id": t.id,
        "currency": t.currency,
        "code": t.code,
        "reference": t.reference,
        "linked_group": t.linked_group,
        "created_at": t.created_at + timedelta(seconds=later_s),
    }


def test_ledger_state_machine(fresh: TargetFactory) -> None:
    with asyncio.Runner() as runner:
        run_state_machine_as_test(
            ledger_machine(fresh, runner),
            settings=settings(
                max_examples=8,
                stateful_step_count=30,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )
