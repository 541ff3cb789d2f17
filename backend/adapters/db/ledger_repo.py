"""The ledger's repository: opens accounts and posts linked batches in the caller's transaction.

Every write runs in the caller's unit of work, which must come from
:meth:`backend.adapters.db.engine.Database.write` (``BEGIN IMMEDIATE`` on SQLite); the
repository never commits. A post locks the accounts it touches (``SELECT … FOR UPDATE``
in ascending id order on PostgreSQL; the whole database is already write-locked on
SQLite), *then* looks for earlier posts of the same ids — so of two concurrent posts of
one transfer the second sees the first once it gets the lock — and then applies the pure
rules of :mod:`backend.domain.ledger`. A refused post raises before anything is written,
so the caller's transaction stays usable; a database failure raises
:class:`~backend.errors.StorageError` and the unit of work must be rolled back.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.exc import StaleDataError

from backend.adapters.db.engine import WRITE_SESSION
from backend.adapters.db.ledger_tables import AccountRow, TransferRow
from backend.domain.ledger import (
    MAX_BATCH,
    Account,
    AccountSpec,
    Transfer,
    TransferResult,
    apply,
    replayed,
    validate_batch,
)
from backend.errors import (
    IdempotencyConflictError,
    InvalidAccountError,
    StorageError,
    WriteTransactionRequiredError,
)

# SQLSTATE unique_violation (PostgreSQL Appendix A); sqlite3 extended result codes.
_PG_UNIQUE_VIOLATION = "23505"
_SQLITE_UNIQUE = frozenset({"SQLITE_CONSTRAINT_PRIMARYKEY", "SQLITE_CONSTRAINT_UNIQUE"})


def _is_unique_violation(exc: IntegrityError) -> bool:
    orig = exc.orig
    return (
        getattr(orig, "sqlstate", None) == _PG_UNIQUE_VIOLATION
        or getattr(orig, "sqlite_errorname", None) in _SQLITE_UNIQUE
    )


@contextmanager
def _translated(what: str) -> Iterator[None]:
    """Map SQLAlchemy/driver failures to the backend's tree (house style rule 9)."""
    try:
        yield
    except IntegrityError as exc:
        if _is_unique_violation(exc):
            # Only a concurrent writer can get here: ids are looked up under lock first.
            raise IdempotencyConflictError(
                f"{what}: the same id was written concurrently by another transaction; retry"
            ) from exc
        raise StorageError(f"{what}: the database refused the write: {exc.orig}") from exc
    except StaleDataError as exc:
        raise StorageError(f"{what}: an account changed under us (written without a lock)") from exc
    except DBAPIError as exc:
        raise StorageError(f"{what}: database error: {exc.orig}") from exc


class LedgerRepository:
    """Ledger accounts and transfers in one session (one unit of work)."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    def _require_write(self) -> None:
        if not self._session.info.get(WRITE_SESSION):
            raise WriteTransactionRequiredError(
                "ledger writes need a session from Database.write() (BEGIN IMMEDIATE on SQLite)"
            )

    async def _lock_accounts(self, ids: set[int]) -> dict[int, AccountRow]:
        # Ascending id order: two posts touching the same accounts queue instead of
        # deadlocking. populate_existing: rows already in this session are refreshed
        # with what we read under the lock. SQLite ignores FOR UPDATE (already locked).
        stmt = (
            select(AccountRow)
            .where(AccountRow.id.in_(sorted(ids)))
            .order_by(AccountRow.id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
        rows = (await self._session.scalars(stmt)).all()
        return {row.id: row for row in rows}

    async def create_accounts(self, specs: Sequence[AccountSpec]) -> list[Account]:
        """Open accounts; an existing id with the same spec is returned as it stands.

        An existing id with another spec is an :class:`IdempotencyConflictError`.
        """
        self._require_write()
        if not 1 <= len(specs) <= MAX_BATCH:
            raise InvalidAccountError(f"create 1..{MAX_BATCH} accounts at a time, got {len(specs)}")
        if len({s.id for s in specs}) != len(specs):
            raise InvalidAccountError("the same account id appears twice in one call")
        with _translated("create_accounts"):
            existing = await self._lock_accounts({s.id for s in specs})
            for spec in specs:
                row = existing.get(spec.id)
                if row is not None and row.to_domain().spec != spec:
                    raise IdempotencyConflictError(
                        f"account {spec.id} already exists with another spec"
                    )
            rows = [existing.get(spec.id) or AccountRow.from_spec(spec) for spec in specs]
            self._session.add_all([row for row in rows if row.id not in existing])
            await self._session.flush()
        return [row.to_domain() for row in rows]

    async def post(self, transfers: Sequence[Transfer]) -> list[TransferResult]:
        """Post one linked batch atomically; replays return the stored transfers.

        Raises :class:`~backend.errors.LedgerError` subclasses for refusals (nothing
        written) and :class:`StorageError` for database failures.
        """
        validate_batch(transfers)
        self._require_write()
        with _translated("post"):
            rows = await self._lock_accounts(
                {t.debit_account_id for t in transfers} | {t.credit_account_id for t in transfers}
            )
            found = await self._session.scalars(
                select(TransferRow).where(TransferRow.id.in_([t.id for t in transfers]))
            )
            again = replayed(transfers, {row.id: row.to_domain() for row in found})
            if again is not None:
                return [TransferResult(t, created=False) for t in again]
            group = transfers[0].linked_group
            if group is not None and await self._group_used(group):
                raise IdempotencyConflictError(
                    f"linked_group {group} was already used by another batch"
                )
            after = apply({i: row.to_domain() for i, row in rows.items()}, transfers)
            for account_id, account in after.items():
                row = rows[account_id]
                row.debits_posted = account.debits_posted
                row.credits_posted = account.credits_posted
            self._session.add_all([TransferRow.from_domain(t) for t in transfers])
            await self._session.flush()
        return [TransferResult(t, created=True) for t in transfers]

    async def _group_used(self, group: uuid.UUID) -> bool:
        stmt = select(TransferRow.id).where(TransferRow.linked_group == group).limit(1)
        return (await self._session.scalar(stmt)) is not None

    async def get_transfer(self, transfer_id: uuid.UUID) -> Transfer | None:
        """The stored transfer with this id, or ``None``."""
        with _translated("get_transfer"):
            row = await self._session.get(TransferRow, transfer_id)
        return None if row is None else row.to_domain()

    async def get_accounts(self, ids: Sequence[int]) -> dict[int, Account]:
        """The accounts with these ids that exist (read without locking)."""
        stmt = (
            select(AccountRow)
            .where(AccountRow.id.in_(ids))
            .execution_options(populate_existing=True)
        )
        with _translated("get_accounts"):
            rows = (await self._session.scalars(stmt)).all()
        return {row.id: row.to_domain() for row in rows}

    async def balances(self) -> dict[int, int]:
        """Every account's balance (credits - debits), by id."""
        stmt = select(AccountRow.id, AccountRow.credits_posted - AccountRow.debits_posted)
        with _translated("balances"):
            result = await self._session.execute(stmt)
        return {account_id: int(balance) for account_id, balance in result}

    async def sum_of_balances(self) -> int:
        """The sum of all balances; 0 in any consistent ledger."""
        stmt = select(
            func.coalesce(func.sum(AccountRow.credits_posted - AccountRow.debits_posted), 0)
        )
        with _translated("sum_of_balances"):
            total = await self._session.scalar(stmt)
        # PostgreSQL sums BIGINT into NUMERIC (a Decimal here); the value is integral.
        return int(total or 0)

    async def balances_from_transfers(self) -> dict[int, int]:
        """Every account's balance recomputed from its transfers (reconciliation)."""
        credited = select(TransferRow.credit_account_id, func.sum(TransferRow.amount)).group_by(
            TransferRow.credit_account_id
        )
        debited = select(TransferRow.debit_account_id, func.sum(TransferRow.amount)).group_by(
            TransferRow.debit_account_id
        )
        with _translated("balances_from_transfers"):
            totals = dict.fromkeys((await self._session.scalars(select(AccountRow.id))).all(), 0)
            for account_id, amount in await self._session.execute(credited):
                totals[account_id] += int(amount)
            for account_id, amount in await self._session.execute(debited):
                totals[account_id] -= int(amount)
        return totals
