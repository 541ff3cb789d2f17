"""Repositories of tenancy and provisioning: every method takes a ``Scope`` and scopes its own SQL.

Tenant isolation lives here, below the handlers and the use cases (DESIGN §7): a method
adds the WHERE clauses of the caller's :class:`~backend.domain.auth.Scope` to every
query it runs, so a row of another tenant (or of another reseller, or another customer)
is simply not found — it cannot be read, listed, changed, or referred to. What each
role sees of each table is the one table :data:`_VISIBLE` below:

=================  ===================  ====================  ==================
table              tenant staff          RESELLER              CUSTOMER
=================  ===================  ====================  ==================
tenants            its tenant           its tenant            its tenant
api_keys           its tenant's          —                     —
resellers          its tenant's          itself                —
partners           its tenant's          its own               —
tariffs            its tenant's          its tenant's          its tenant's
customers          its tenant's          its own               itself
supply_accounts    its tenant's          its customers'        its own
gateways           its tenant's          —                     —
meters             its tenant's          on its accounts       on its accounts
tokens             its tenant's          on its accounts       on its accounts
audit_log          its tenant's          —                     —
=================  ===================  ====================  ==================

``PLATFORM_ADMIN`` (no tenant) sees every row; the permission table of
:mod:`backend.domain.auth` keeps it to tenants, API keys and the audit log. Inserts are
checked against the same rules (:meth:`ScopedRepository.add`), so a use case cannot write a row
its caller could not see. The only unscoped queries are in :class:`AuthRepository`: they
*produce* a scope (an API key by its prefix, a customer by tenant and e-mail at login),
so there is none to apply yet, and :class:`UniqueIds`, which says only whether a
platform-wide unique id (gateway id, meter serial) is taken.

Writes need a session from :meth:`~backend.adapters.db.engine.Database.write`. Unique
violations become :class:`~backend.service.refusals.ConflictError`; other database
failures :class:`~backend.errors.StorageError` (house style rule 9).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Generic, TypeVar

from sqlalchemy import ColumnElement, false, func, select, text, true, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute

from backend.adapters.db.base import Base
from backend.adapters.db.engine import WRITE_SESSION
from backend.adapters.db.ledger_repo import LedgerRepository
from backend.adapters.db.tables import (
    ApiKeyRow,
    AuditRow,
    CustomerRow,
    GatewayRow,
    MeterRow,
    PartnerRow,
    ResellerRow,
    SupplyAccountRow,
    TariffRow,
    TenantRow,
    TokenRow,
)
from backend.domain.auth import Role, Scope, ScopeError
from backend.domain.fields import MAX_INT64
from backend.domain.ledger import AccountCode, AccountSpec
from backend.errors import StorageError, WriteTransactionRequiredError
from backend.service.refusals import ConflictError

RowT = TypeVar("RowT", bound=Base)

# SQLSTATE unique_violation (PostgreSQL Appendix A); sqlite3 extended result codes.
_PG_UNIQUE_VIOLATION: Final = "23505"
_SQLITE_UNIQUE: Final = frozenset({"SQLITE_CONSTRAINT_PRIMARYKEY", "SQLITE_CONSTRAINT_UNIQUE"})
#: Most rows one page of a list returns.
MAX_PAGE: Final = 500


def _is_unique_violation(exc: IntegrityError) -> bool:
    orig = exc.orig
    return (
        getattr(orig, "sqlstate", None) == _PG_UNIQUE_VIOLATION
        or getattr(orig, "sqlite_errorname", None) in _SQLITE_UNIQUE
    )


@contextmanager
def translated(what: str) -> Iterator[None]:
    """Map SQLAlchemy/driver failures to the backend's tree (house style rule 9).

    Use cases check uniqueness before inserting, under the write lock, to give a precise
    message; a unique violation arriving here anyway means a concurrent writer on
    PostgreSQL took the name first, which is the same conflict.
    """
    try:
        yield
    except IntegrityError as exc:
        if _is_unique_violation(exc):
            raise ConflictError(f"{what}: already exists (written concurrently); retry") from exc
        raise StorageError(f"{what}: the database refused the write: {exc.orig}") from exc
    except DBAPIError as exc:
        raise StorageError(f"{what}: database error: {exc.orig}") from exc


# ------------------------------------------------------------------------- visibility


def _tenant(column: InstrumentedAttribute[int], scope: Scope) -> ColumnElement[bool]:
    return true() if scope.tenant_id is None else column == scope.tenant_id


def _accounts_of(scope: Scope) -> ColumnElement[bool] | None:
    """For RESELLER/CUSTOMER scopes: which supply accounts are theirs (else ``None``)."""
    if scope.reseller_id is not None:
        return SupplyAccountRow.reseller_id == scope.reseller_id
    if scope.customer_id is not None:
        return SupplyAccountRow.customer_id == scope.customer_id
    return None


def _staff_only(column: InstrumentedAttribute[int], scope: Scope) -> ColumnElement[bool]:
    if scope.role in (Role.RESELLER, Role.CUSTOMER):
        return false()
    return _tenant(column, scope)


def _v_tenants(scope: Scope) -> ColumnElement[bool]:
    return _tenant(TenantRow.id, scope)


def _v_api_keys(scope: Scope) -> ColumnElement[bool]:
    if scope.tenant_id is None:
        return true()
    return _staff_only(ApiKeyRow.tenant_id, scope)  # type: ignore[arg-type]


def _v_resellers(scope: Scope) -> ColumnElement[bool]:
    if scope.role is Role.CUSTOMER:
        return false()
    own = true() if scope.reseller_id is None else ResellerRow.id == scope.reseller_id
    return _tenant(ResellerRow.tenant_id, scope) & own


def _v_partners(scope: Scope) -> ColumnElement[bool]:
    if scope.role is Role.CUSTOMER:
        return false()
    own = true() if scope.reseller_id is None else PartnerRow.reseller_id == scope.reseller_id
    return _tenant(PartnerRow.tenant_id, scope) & own


def _v_tariffs(scope: Scope) -> ColumnElement[bool]:
    return _tenant(TariffRow.tenant_id, scope)


def _v_customers(scope: Scope) -> ColumnElement[bool]:
    clause = _tenant(CustomerRow.tenant_id, scope)
    if scope.reseller_id is not None:
        clause = clause & (CustomerRow.reseller_id == scope.reseller_id)
    if scope.customer_id is not None:
        clause = clause & (CustomerRow.id == scope.customer_id)
    return clause


def _v_supply_accounts(scope: Scope) -> ColumnElement[bool]:
    own = _accounts_of(scope)
    clause = _tenant(SupplyAccountRow.tenant_id, scope)
    return clause if own is None else clause & own


def _v_gateways(scope: Scope) -> ColumnElement[bool]:
    return _staff_only(GatewayRow.tenant_id, scope)


def _v_meters(scope: Scope) -> ColumnElement[bool]:
    clause = _tenant(MeterRow.tenant_id, scope)
    own = _accounts_of(scope)
    if own is None:
        return clause
    return clause & MeterRow.supply_account_id.in_(select(SupplyAccountRow.id).where(own))


def _v_tokens(scope: Scope) -> ColumnElement[bool]:
    clause = _tenant(TokenRow.tenant_id, scope)
    own = _accounts_of(scope)
    if own is None:
        return clause
    theirs = select(MeterRow.id).join(
        SupplyAccountRow, MeterRow.supply_account_id == SupplyAccountRow.id
    )
    return clause & TokenRow.meter_id.in_(theirs.where(own))


def _v_audit(scope: Scope) -> ColumnElement[bool]:
    if scope.tenant_id is None:
        return true()
    return _staff_only(AuditRow.tenant_id, scope)  # type: ignore[arg-type]


#: What a scope sees of each table (see the module docstring).
_VISIBLE: Final[Mapping[type[Base], Callable[[Scope], ColumnElement[bool]]]] = {
    TenantRow: _v_tenants,
    ApiKeyRow: _v_api_keys,
    ResellerRow: _v_resellers,
    PartnerRow: _v_partners,
    TariffRow: _v_tariffs,
    CustomerRow: _v_customers,
    SupplyAccountRow: _v_supply_accounts,
    GatewayRow: _v_gateways,
    MeterRow: _v_meters,
    TokenRow: _v_tokens,
    AuditRow: _v_audit,
}


def visible(model: type[Base], scope: Scope) -> ColumnElement[bool]:
    """The WHERE clause restricting ``model`` to what ``scope`` may see."""
    return _VISIBLE[model](scope)


def _row_in_scope(row: Base, scope: Scope) -> bool:
    """Whether a row about to be inserted is one ``scope`` could see (Python-side check)."""
    tenant = row.id if isinstance(row, TenantRow) else getattr(row, "tenant_id", None)
    if scope.tenant_id is not None and tenant != scope.tenant_id:
        return False
    for column, mine in (("reseller_id", scope.reseller_id), ("customer_id", scope.customer_id)):
        if mine is not None and hasattr(row, column) and getattr(row, column) != mine:
            return False
    return True


# ------------------------------------------------------------------------- base


@dataclass(frozen=True, slots=True)
class Page(Generic[RowT]):
    """One page of a list, in ascending key order; ``next_after`` continues it (or ``None``)."""

    rows: list[RowT]
    next_after: Any


class ScopedRepository(Generic[RowT]):
    """Scoped get, list and insert of one table keyed by ``key``."""

    model: type[RowT]

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    @property
    def _key(self) -> InstrumentedAttribute[Any]:
        key: InstrumentedAttribute[Any] = self.model.id  # type: ignore[attr-defined]
        return key

    def _require_write(self) -> None:
        if not self._session.info.get(WRITE_SESSION):
            raise WriteTransactionRequiredError(
                f"{self.model.__tablename__}: writes need a session from Database.write()"
            )

    async def get(self, scope: Scope, key: object, *, lock: bool = False) -> RowT | None:
        """The row with this key if ``scope`` may see it, else ``None`` (never another's)."""
        stmt = select(self.model).where(self._key == key, visible(self.model, scope))
        if lock:
            self._require_write()
            stmt = stmt.with_for_update()
        with translated(f"read {self.model.__tablename__}"):
            return (await self._session.scalars(stmt)).one_or_none()

    async def list(
        self,
        scope: Scope,
        *,
        limit: int,
        after: object = None,
        where: Sequence[ColumnElement[bool]] = (),
    ) -> Page[RowT]:
        """Up to ``limit`` visible rows with keys after ``after``, ascending."""
        if not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"limit must be 1..{MAX_PAGE}")
        stmt = select(self.model).where(visible(self.model, scope), *where)
        if after is not None:
            stmt = stmt.where(self._key > after)
        stmt = stmt.order_by(self._key).limit(limit + 1)
        with translated(f"list {self.model.__tablename__}"):
            rows = list((await self._session.scalars(stmt)).all())
        more = len(rows) > limit
        rows = rows[:limit]
        return Page(rows, getattr(rows[-1], "id") if more else None)  # noqa: B009

    async def add(self, scope: Scope, row: RowT) -> RowT:
        """Insert ``row``; it must be a row ``scope`` could see (else a bug: ScopeError)."""
        self._require_write()
        if not _row_in_scope(row, scope):
            raise ScopeError(f"{scope.actor} may not write this {self.model.__tablename__} row")
        self._session.add(row)
        with translated(f"create {self.model.__tablename__}"):
            await self._session.flush()
        return row

    async def exists(self, scope: Scope, *where: ColumnElement[bool]) -> bool:
        """Whether any visible row matches ``where``."""
        stmt = select(self._key).where(visible(self.model, scope), *where).limit(1)
        with translated(f"read {self.model.__tablename__}"):
            return (await self._session.scalar(stmt)) is not None


class TenantRepository(ScopedRepository[TenantRow]):
    model = TenantRow


class ApiKeyRepository(ScopedRepository[ApiKeyRow]):
    model = ApiKeyRow

    async def revoke(self, scope: Scope, key_id: int, at: datetime) -> ApiKeyRow | None:
        """Mark a visible key revoked (idempotent: the first time stays); ``None`` if unseen."""
        row = await self.get(scope, key_id, lock=True)
        if row is not None and row.revoked_at is None:
            row.revoked_at = at
            with translated("revoke api_key"):
                await self._session.flush()
        return row


class ResellerRepository(ScopedRepository[ResellerRow]):
    model = ResellerRow


class PartnerRepository(ScopedRepository[PartnerRow]):
    model = PartnerRow


class TariffRepository(ScopedRepository[TariffRow]):
    model = TariffRow

    async def latest(self, scope: Scope, code: str) -> TariffRow | None:
        """The highest version of tariff ``code`` visible to ``scope``."""
        stmt = (
            select(TariffRow)
            .where(visible(TariffRow, scope), TariffRow.code == code)
            .order_by(TariffRow.version.desc())
            .limit(1)
        )
        with translated("read tariffs"):
            return (await self._session.scalars(stmt)).one_or_none()

    async def next_numbers(self, scope: Scope, tenant_id: int, code: str) -> tuple[int, int]:
        """``(version, wire_id)`` for a new version of ``code`` in ``tenant_id``.

        The caller must hold the tenant's row lock (:meth:`TenantRepository.get` with
        ``lock=True``) so two publications cannot pick the same numbers.
        """
        mine = (visible(TariffRow, scope), TariffRow.tenant_id == tenant_id)
        with translated("read tariffs"):
            version = await self._session.scalar(
                select(func.coalesce(func.max(TariffRow.version), 0)).where(
                    *mine, TariffRow.code == code
                )
            )
            wire = await self._session.scalar(
                select(func.coalesce(func.max(TariffRow.wire_id), 0)).where(*mine)
            )
        return int(version or 0) + 1, int(wire or 0) + 1


class CustomerRepository(ScopedRepository[CustomerRow]):
    model = CustomerRow


class SupplyAccountRepository(ScopedRepository[SupplyAccountRow]):
    model = SupplyAccountRow


class GatewayRepository(ScopedRepository[GatewayRow]):
    model = GatewayRow


class MeterRepository(ScopedRepository[MeterRow]):
    model = MeterRow

    async def on_tariff(self, scope: Scope, code: str) -> list[int]:
        """Serials of the visible meters whose supply account is on tariff ``code``."""
        stmt = (
            select(MeterRow.id)
            .join(SupplyAccountRow, MeterRow.supply_account_id == SupplyAccountRow.id)
            .where(visible(MeterRow, scope), SupplyAccountRow.tariff_code == code)
            .order_by(MeterRow.id)
        )
        with translated("read meters"):
            return list((await self._session.scalars(stmt)).all())

    async def allocate_msg_ids(self, scope: Scope, serials: Sequence[int]) -> dict[int, int]:
        """Take each meter's next message id (SPEC.md §2.1 ``msg_id``), atomically.

        The meters are first locked in ascending serial order (``SELECT … FOR UPDATE``;
        two issuers of several meters each cannot deadlock), then one
        ``UPDATE … RETURNING`` takes the ids; the locks hold until the caller commits, so
        concurrent issuers (top-ups, tariffs, key rotations) queue and never share an id.
        On SQLite the write transaction already holds the database lock. Meters the scope
        cannot see are left out of the result.
        """
        self._require_write()
        if not serials:
            return {}
        ordered = sorted(serials)
        lock = (
            select(MeterRow.id)
            .where(MeterRow.id.in_(ordered), visible(MeterRow, scope))
            .order_by(MeterRow.id)
            .with_for_update()
        )
        with translated("lock meters"):
            await self._session.execute(lock)
        stmt = (
            update(MeterRow)
            .where(MeterRow.id.in_(ordered), visible(MeterRow, scope))
            .values(next_msg_id=MeterRow.next_msg_id + 1)
            .returning(MeterRow.id, MeterRow.next_msg_id - 1)
            .execution_options(synchronize_session=False)
        )
        with translated("allocate msg ids"):
            result = await self._session.execute(stmt)
        return {int(serial): int(msg_id) for serial, msg_id in result.all()}


class TokenRepository(ScopedRepository[TokenRow]):
    model = TokenRow

    async def add_all(self, scope: Scope, rows: Sequence[TokenRow]) -> None:
        """Insert outbox rows in one flush (each checked like :meth:`add`)."""
        self._require_write()
        for row in rows:
            if not _row_in_scope(row, scope):
                raise ScopeError(f"{scope.actor} may not write a token for tenant {row.tenant_id}")
        self._session.add_all(rows)
        with translated("create tokens"):
            await self._session.flush()


class AuditRepository(ScopedRepository[AuditRow]):
    model = AuditRow

    async def record(
        self,
        scope: Scope,
        *,
        at: datetime,
        tenant_id: int | None,
        action: str,
        target: str,
        request_id: str,
        detail: Mapping[str, Any] | None = None,
    ) -> AuditRow:
        """Append one audit row in the caller's unit of work (committed with the change)."""
        self._require_write()
        row = AuditRow(
            at=at,
            tenant_id=tenant_id,
            actor=scope.actor,
            action=action,
            target=target,
            request_id=request_id,
            detail=dict(detail or {}),
        )
        # Audit rows of a platform action name the tenant acted on, which the platform
        # scope may write; tenant-scoped callers can only write their own tenant's.
        if scope.tenant_id is not None and tenant_id != scope.tenant_id:
            raise ScopeError(f"{scope.actor} may not audit into tenant {tenant_id}")
        self._session.add(row)
        with translated("append audit_log"):
            await self._session.flush()
        return row


class AuthRepository:
    """The unscoped lookups that authenticate a caller (they produce its scope)."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def api_key(self, prefix: str) -> ApiKeyRow | None:
        """The key with this public prefix, revoked or not."""
        with translated("read api_keys"):
            return (
                await self._session.scalars(select(ApiKeyRow).where(ApiKeyRow.prefix == prefix))
            ).one_or_none()

    async def customer(self, tenant_id: int, email: str) -> CustomerRow | None:
        """The customer logging in to ``tenant_id`` with ``email`` (stored lower-case)."""
        stmt = select(CustomerRow).where(
            CustomerRow.tenant_id == tenant_id, CustomerRow.email == email
        )
        with translated("read customers"):
            return (await self._session.scalars(stmt)).one_or_none()


class UniqueIds:
    """Whether a platform-wide unique id is taken: the other unscoped queries.

    Gateway ids are MQTT user names and meter serials are printed on the meters, so both
    are unique across tenants; these answer only yes or no, never whose it is.
    """

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def gateway_taken(self, gateway_id: str) -> bool:
        stmt = select(GatewayRow.id).where(
            (GatewayRow.id == gateway_id) | (GatewayRow.mqtt_username == gateway_id)
        )
        with translated("read gateways"):
            return (await self._session.scalar(stmt.limit(1))) is not None

    async def meter_taken(self, serial: int) -> bool:
        with translated("read meters"):
            return (await self._session.get(MeterRow, serial)) is not None


async def open_ledger_account(
    session: AsyncSession, *, currency: str, code: AccountCode, min_balance: int | None
) -> int:
    """Open a ledger account under a fresh random id; returns the id.

    Ledger ids are caller-chosen (TigerBeetle style). A random 63-bit id needs no shared
    counter between backend instances; the existence check under the write lock makes a
    collision (odds ~n²/2⁶⁴) a retry instead of two owners sharing one account.
    """
    ledger = LedgerRepository(session)
    for _ in range(8):
        account_id = 1 + secrets.randbelow(MAX_INT64)
        if not await ledger.get_accounts([account_id]):
            spec = AccountSpec(id=account_id, currency=currency, code=code, min_balance=min_balance)
            await ledger.create_accounts([spec])
            return account_id
    raise StorageError("could not find a free ledger account id in 8 tries")  # pragma: no cover


async def schema_revisions(session: AsyncSession) -> list[str]:
    """The Alembic revisions the database is at (readiness check); StorageError if unreachable."""
    with translated("read alembic_version"):
        result = await session.execute(text("SELECT version_num FROM alembic_version"))
    return sorted(str(v) for v in result.scalars())


class Repositories:
    """Every repository of one unit of work, on one session."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = s = session
        self.tenants = TenantRepository(s)
        self.api_keys = ApiKeyRepository(s)
        self.resellers = ResellerRepository(s)
        self.partners = PartnerRepository(s)
        self.tariffs = TariffRepository(s)
        self.customers = CustomerRepository(s)
        self.supply_accounts = SupplyAccountRepository(s)
        self.gateways = GatewayRepository(s)
        self.meters = MeterRepository(s)
        self.tokens = TokenRepository(s)
        self.audit = AuditRepository(s)
        self.auth = AuthRepository(s)
        self.unique = UniqueIds(s)
        self.ledger = LedgerRepository(s)
