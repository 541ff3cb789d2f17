"""The token outbox's queries for the dispatcher: claim due tokens, find one by (meter, msg id).

All system use (no caller scope): the dispatcher serves every tenant. Claims lock the
rows they take with ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so several backend
instances draining one outbox each take different tokens instead of queueing on each
other's locks (PostgreSQL docs, "The Locking Clause"); on SQLite the write transaction
already excludes every other writer.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Final

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from backend.adapters.db.engine import WRITE_SESSION
from backend.adapters.db.tables import MeterRow, TokenRow
from backend.adapters.db.topup_repo import translated
from backend.domain.topups import TokenState
from backend.errors import WriteTransactionRequiredError

_IN_FLIGHT: Final = (TokenState.PENDING.value, TokenState.SENT.value)


class TokenRepository:
    """Outbox rows in one write unit of work."""

    def __init__(self, session: AsyncSession) -> None:
        if not session.info.get(WRITE_SESSION):
            raise WriteTransactionRequiredError("the token outbox needs a Database.write() session")
        self._session = session

    async def claim_due(self, now: datetime, limit: int) -> Sequence[tuple[TokenRow, str]]:
        """Up to ``limit`` in-flight tokens due at ``now``, oldest due first, with their gateway.

        The rows stay locked until the caller's transaction ends; the caller moves each
        one's ``next_attempt_at`` into the future before committing, which is the lease.
        """
        stmt = (
            select(TokenRow, MeterRow.gateway_id)
            .join(MeterRow, MeterRow.id == TokenRow.meter_id)
            .where(TokenRow.status.in_(_IN_FLIGHT), TokenRow.next_attempt_at <= now)
            .order_by(TokenRow.next_attempt_at, TokenRow.id)
            .limit(limit)
            .with_for_update(skip_locked=True, of=TokenRow)
            .execution_options(populate_existing=True)
        )
        with translated("claim_due"):
            rows = (await self._session.execute(stmt)).all()
        return [(token, str(gw)) for token, gw in rows]

    async def lock_token(self, meter_id: int, msg_id: int) -> TokenRow | None:
        """The token ``msg_id`` of a meter, locked for update."""
        stmt = (
            select(TokenRow)
            .where(TokenRow.meter_id == meter_id, TokenRow.msg_id == msg_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
        with translated("lock_token"):
            row: TokenRow | None = (await self._session.scalars(stmt)).first()
        return row

    async def lock_meter(self, meter_id: int) -> MeterRow | None:
        """A meter, locked for update (its last reported credit changes)."""
        stmt = (
            select(MeterRow)
            .where(MeterRow.id == meter_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
        with translated("lock_meter"):
            row: MeterRow | None = (await self._session.scalars(stmt)).first()
        return row
