"""Split-rule use cases: read and replace the rule set of one tariff code and context.

A rule set is the ordered list of :mod:`backend.domain.split` rules that shares the money
of one tariff code, either per top-up (``TOPUP``) or per rated consumption
(``CONSUMPTION``). It is replaced whole — never edited rule by rule — so a set is valid
at every moment: the new set is checked with the domain's own rules
(:func:`backend.domain.split.check_rules` through :func:`backend.domain.split.split`:
exactly one REMAINDER, basis points at most 10 000, only the kinds that apply to the
context) and against the database (the tariff code is published in the caller's tenant,
every partner is one of the tenant's), then written in one transaction with its audit
row. Replacing gives the rules new row ids; consumption ingest fingerprints rule sets, so
it notices the change by content, not by id.

Who may: replacing is tariff work (``tariff.publish``: UTILITY_ADMIN); reading needs
``partner.read`` (UTILITY_ADMIN, SUPPORT), because a rule set names the partners and
their shares. A PLATFORM_ADMIN has no tenant and does not provision inside one, and a
RESELLER or CUSTOMER does not see the utility's partners: all are refused (403).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Final

from backend.adapters.db.engine import Database
from backend.adapters.db.repos import Repositories
from backend.adapters.db.split_rule_repo import RuleToStore, SplitRuleRepository, StoredRule
from backend.adapters.db.tables import PartnerRow
from backend.domain import split
from backend.domain.auth import Action
from backend.domain.fields import ID, Doc, Items, Range
from backend.service.context import Call, audit, require
from backend.service.refusals import FieldError, InvalidInputError, NotFoundError

#: The audit action of a replacement (no permission of its own: see the module docstring).
AUDIT_REPLACE: Final = "split_rules.replace"


# ============================================================================ commands


@dataclass(frozen=True, slots=True, kw_only=True)
class NewSplitRule:
    """One rule of a rule set; its place in the list is its position."""

    kind: Annotated[
        split.RuleKind,
        Doc(
            "PER_KWH, BASIS_POINTS, FIXED_PER_DAY (CONSUMPTION only), FIXED_PER_TOPUP "
            "(TOPUP only) or REMAINDER (exactly one per set)"
        ),
    ]
    partner_id: Annotated[int, ID, Doc("a partner of the caller's tenant")]
    value: Annotated[
        int,
        Range(0, split.MAX_RULE_VALUE),
        Doc(
            "PER_KWH: milli per kWh; BASIS_POINTS: 1/10 000 of the gross amount (0..10000); "
            "FIXED_PER_DAY / FIXED_PER_TOPUP: milli (1/1000 minor unit); REMAINDER: 0",
            9_000,
        ),
    ] = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class NewSplitRuleSet:
    """The whole rule set of one tariff code and context; it replaces the stored one."""

    rules: Annotated[
        list[NewSplitRule],
        Items(1, split.MAX_RULES),
        Doc("the rules in order (position = index); exactly one REMAINDER"),
    ]


# ============================================================================ views


@dataclass(frozen=True, slots=True, kw_only=True)
class SplitRuleView:
    """One stored rule and the partner it pays."""

    id: Annotated[int, Doc("row id; a replaced set gets new ids")]
    position: int
    kind: split.RuleKind
    partner_id: int
    partner_name: str
    ledger_account_id: Annotated[int, Doc("the partner's PARTNER ledger account")]
    value: int
    created_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class SplitRuleSetView:
    """The rule set of one tariff code and context (empty: nothing is split)."""

    tariff_code: str
    applies_to: split.SplitContext
    rules: list[SplitRuleView]


def _rule_view(rule: StoredRule) -> SplitRuleView:
    return SplitRuleView(
        id=rule.id,
        position=rule.position,
        kind=split.RuleKind(rule.kind),
        partner_id=rule.partner_id,
        partner_name=rule.partner_name,
        ledger_account_id=rule.ledger_account_id,
        value=rule.value,
        created_at=rule.created_at,
    )


def _audit_rules(rules: Sequence[StoredRule] | Sequence[NewSplitRule]) -> list[dict[str, Any]]:
    return [{"kind": str(r.kind), "partner_id": r.partner_id, "value": r.value} for r in rules]


# ============================================================================ checks


def check_rule_set(
    context: split.SplitContext,
    rules: Sequence[NewSplitRule],
    partners: Mapping[int, PartnerRow],
) -> tuple[split.SplitRule, ...]:
    """The domain rules of a new set, or :class:`InvalidInputError` naming every fault.

    ``partners`` holds the tenant's partners the rules name (a missing id is another
    tenant's or nobody's: the two answer alike). Per rule: the partner exists and the
    value fits the kind; then the set as a whole by the domain's own split (one REMAINDER,
    basis points total, kinds that apply to ``context``). The REMAINDER partner must be
    the utility's, not a reseller's: a reseller's rules apply only to its own customers,
    so a set whose REMAINDER pays a reseller would have no REMAINDER for everyone else.
    """
    errors: list[FieldError] = []
    domain: list[split.SplitRule] = []
    for i, rule in enumerate(rules):
        partner = partners.get(rule.partner_id)
        if partner is None:
            errors.append(
                FieldError(f"rules[{i}].partner_id", f"no partner {rule.partner_id} in the tenant")
            )
            continue
        if rule.kind is split.RuleKind.REMAINDER and partner.reseller_id is not None:
            errors.append(
                FieldError(
                    f"rules[{i}].partner_id",
                    "the REMAINDER partner must not be a reseller's partner (a reseller's "
                    "rules apply only to its own customers)",
                )
            )
        try:
            domain.append(split.SplitRule(rule.kind, partner.ledger_account_id, rule.value))
        except split.InvalidSplitRuleError as exc:
            errors.append(FieldError(f"rules[{i}].value", str(exc)))
    if not errors:
        try:
            # The domain's own checks of a whole set, for this context: splitting nothing
            # runs check_rules and the kinds-per-context table and has no other effect.
            split.split(0, 0, 0, domain, context=context)
        except split.SplitError as exc:
            errors.append(FieldError("rules", str(exc)))
    if errors:
        summary = "; ".join(f"{e.field}: {e.problem}" for e in errors[:5])
        raise InvalidInputError(f"invalid {context.value} rule set: {summary}", errors)
    return tuple(domain)


# ============================================================================ service


class SplitRuleService:
    """Read and replace rule sets (one unit of work per method)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def get(
        self, call: Call, tariff_code: str, applies_to: split.SplitContext
    ) -> SplitRuleSetView:
        """The stored set of a published tariff code (404 for a code the tenant lacks)."""
        require(call, Action.PARTNER_READ)
        async with self._db.read() as session:
            if await Repositories(session).tariffs.latest(call.scope, tariff_code) is None:
                raise NotFoundError(f"tariff {tariff_code!r} not found")
            rules = await SplitRuleRepository(session).rule_set(
                call.scope, tariff_code, applies_to.value
            )
        return SplitRuleSetView(
            tariff_code=tariff_code,
            applies_to=applies_to,
            rules=[_rule_view(r) for r in rules],
        )

    async def replace(
        self,
        call: Call,
        tariff_code: str,
        applies_to: split.SplitContext,
        new: NewSplitRuleSet,
    ) -> SplitRuleSetView:
        """Replace the set whole, with its audit row, in one transaction; nothing on refusal."""
        require(call, Action.TARIFF_PUBLISH)
        tenant_id = call.scope.tenant_id
        if tenant_id is None:  # pragma: no cover - PLATFORM_ADMIN is refused by require()
            raise NotFoundError("this action needs a tenant-scoped caller")
        async with self._db.write() as session:
            repos = Repositories(session)
            rule_repo = SplitRuleRepository(session)
            # The tenant row's lock serialises replacements: on PostgreSQL two concurrent
            # delete-and-insert transactions would otherwise both insert (READ COMMITTED).
            if await repos.tenants.get(call.scope, tenant_id, lock=True) is None:
                raise NotFoundError(f"tenant {tenant_id} not found")  # pragma: no cover
            if await repos.tariffs.latest(call.scope, tariff_code) is None:
                raise NotFoundError(f"tariff {tariff_code!r} not found")
            partners: dict[int, PartnerRow] = {}
            for partner_id in sorted({r.partner_id for r in new.rules}):
                row = await repos.partners.get(call.scope, partner_id)
                if row is not None:
                    partners[partner_id] = row
            check_rule_set(applies_to, new.rules, partners)
            old = await rule_repo.rule_set(call.scope, tariff_code, applies_to.value)
            await rule_repo.replace(
                call.scope,
                tariff_code=tariff_code,
                applies_to=applies_to.value,
                rules=[
                    RuleToStore(kind=r.kind.value, partner_id=r.partner_id, value=r.value)
                    for r in new.rules
                ],
                now=call.now,
            )
            await audit(
                repos,
                call,
                action=AUDIT_REPLACE,
                target=f"split_rules:{tariff_code}:{applies_to.value}",
                tenant_id=tenant_id,
                detail={
                    "tariff_code": tariff_code,
                    "applies_to": applies_to.value,
                    "rules": _audit_rules(new.rules),
                    "replaced": _audit_rules(old),
                },
            )
            stored = await rule_repo.rule_set(call.scope, tariff_code, applies_to.value)
        return SplitRuleSetView(
            tariff_code=tariff_code,
            applies_to=applies_to,
            rules=[_rule_view(r) for r in stored],
        )


__all__ = [
    "AUDIT_REPLACE",
    "NewSplitRule",
    "NewSplitRuleSet",
    "SplitRuleService",
    "SplitRuleSetView",
    "SplitRuleView",
    "check_rule_set",
]
