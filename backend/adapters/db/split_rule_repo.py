"""The split_rules repository: one rule set (tariff code, context) read and replaced, scoped.

``split_rules`` is not in the tenancy table of :mod:`backend.adapters.db.repos`; its
scoping lives here, by the same rule: tenant staff see their tenant's rule sets, every
other scope sees none (a rule set names partners and their shares, which only the
utility's staff may read). A replacement deletes the set's rows and inserts the new ones
in the caller's write unit of work, so readers see the old set or the new one, never a
mix; the caller serialises replacements of a tenant by holding the tenant row's lock.
Rule ids are never reused (see :meth:`SplitRuleRepository.replace`): billed intervals
name the rules that shared them, by id, for good.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ColumnElement, delete, false, select
from sqlalchemy.ext.asyncio import AsyncSession

from backend.adapters.db.engine import WRITE_SESSION
from backend.adapters.db.repos import translated
from backend.adapters.db.tables import PartnerRow, SplitRuleRow
from backend.domain.auth import Role, Scope, ScopeError
from backend.errors import WriteTransactionRequiredError


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredRule:
    """One stored rule with what the API shows of its partner."""

    id: int
    position: int
    kind: str
    partner_id: int
    partner_name: str
    ledger_account_id: int
    value: int
    created_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class RuleToStore:
    """One rule of a new set (``position`` is its index in the set)."""

    kind: str
    partner_id: int
    value: int


def visible_rules(scope: Scope) -> ColumnElement[bool]:
    """The WHERE clause restricting ``split_rules`` to what ``scope`` may see."""
    if scope.tenant_id is None or scope.role in (Role.RESELLER, Role.CUSTOMER):
        return false()
    return SplitRuleRow.tenant_id == scope.tenant_id


class SplitRuleRepository:
    """Rule sets of one unit of work."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def rule_set(self, scope: Scope, tariff_code: str, applies_to: str) -> list[StoredRule]:
        """The visible rules of ``(tariff_code, applies_to)`` in position order."""
        stmt = (
            select(SplitRuleRow, PartnerRow.name, PartnerRow.ledger_account_id)
            .join(PartnerRow, PartnerRow.id == SplitRuleRow.partner_id)
            .where(
                visible_rules(scope),
                SplitRuleRow.tariff_code == tariff_code,
                SplitRuleRow.applies_to == applies_to,
            )
            .order_by(SplitRuleRow.position, SplitRuleRow.id)
        )
        with translated("read split_rules"):
            rows = (await self._session.execute(stmt)).all()
        return [
            StoredRule(
                id=rule.id,
                position=rule.position,
                kind=rule.kind,
                partner_id=rule.partner_id,
                partner_name=name,
                ledger_account_id=account,
                value=rule.value,
                created_at=rule.created_at,
            )
            for rule, name, account in rows
        ]

    async def by_ids(self, scope: Scope, ids: Sequence[int]) -> dict[int, SplitRuleRow]:
        """The visible rule rows among ``ids`` (rules replaced since are simply absent)."""
        if not ids:
            return {}
        stmt = select(SplitRuleRow).where(visible_rules(scope), SplitRuleRow.id.in_(sorted(ids)))
        with translated("read split_rules"):
            return {row.id: row for row in (await self._session.scalars(stmt)).all()}

    async def replace(
        self,
        scope: Scope,
        *,
        tariff_code: str,
        applies_to: str,
        rules: Sequence[RuleToStore],
        now: datetime,
    ) -> None:
        """Insert ``rules`` (positions 0..n-1), then delete the set's old rows (caller's UoW)."""
        if not self._session.info.get(WRITE_SESSION):
            raise WriteTransactionRequiredError(
                "split_rules: writes need a session from Database.write()"
            )
        tenant_id = scope.tenant_id
        if tenant_id is None or scope.role in (Role.RESELLER, Role.CUSTOMER):
            raise ScopeError(f"{scope.actor} may not write split rules")
        in_set = (
            SplitRuleRow.tenant_id == tenant_id,
            SplitRuleRow.tariff_code == tariff_code,
            SplitRuleRow.applies_to == applies_to,
        )
        with translated("replace split_rules"):
            old = list((await self._session.scalars(select(SplitRuleRow.id).where(*in_set))).all())
            # Insert first, delete after: SQLite hands out max(rowid) + 1 (no AUTOINCREMENT),
            # so deleting first could give the new rules the ids of the old ones, and the
            # shares billed under an old rule (consumption_intervals.shares name rule ids)
            # would be shown under the new rule in statements.
            self._session.add_all(
                [
                    SplitRuleRow(
                        tenant_id=tenant_id,
                        tariff_code=tariff_code,
                        applies_to=applies_to,
                        kind=rule.kind,
                        partner_id=rule.partner_id,
                        value=rule.value,
                        position=position,
                        created_at=now,
                    )
                    for position, rule in enumerate(rules)
                ]
            )
            await self._session.flush()
            if old:
                await self._session.execute(
                    delete(SplitRuleRow)
                    .where(*in_set, SplitRuleRow.id.in_(old))
                    .execution_options(synchronize_session=False)
                )
