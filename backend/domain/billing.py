"""Billing of one meter's rated consumption (pure): split shares, minor units, held postings.

Between :mod:`backend.domain.consumption` (what to bill) and the ledger (what to post):
for the intervals of one reading, :func:`bill` advances the meter's running split totals
(:func:`~backend.domain.split.split_increment` — shares telescope, so partner totals do
not depend on how readings were cut) and its minor-unit carry
(:func:`~backend.domain.split.to_minor`), and returns the minor units owed per partner.

**Held postings.** Consumption is a fact: the meter has already taken the money. When the
prepaid account is at its debt limit the ledger cannot take the debit, so the amounts
owed are *held* per partner (:attr:`MeterBook.pending`) and posted first, whole, as soon
as the balance allows — normally right after the next top-up (debt recovered first).
Nothing is dropped and nothing posts twice; reconciliation counts held amounts as
already taken from the customer.

**No rule set.** A tariff without CONSUMPTION rules still bills: the amount is held under
:data:`REMAINDER_KEY` and posted to the REMAINDER partner once a rule set exists.

**Rule set changes.** Totals and carry belong to one rule set (its fingerprint). When the
set changes, totals restart at zero; the payer's carry (milli already taken from the
customer but below one minor unit) is kept, fee partners' carries (each below one minor
unit) stay with the old REMAINDER partner, which was paid the difference.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from backend.domain import split
from backend.domain.consumption import Interval
from backend.errors import BackendError

#: ``pending`` key of amounts whose partner is "the REMAINDER partner, once there is one".
REMAINDER_KEY: Final = "REMAINDER"
#: Fingerprint of "no CONSUMPTION rules".
NO_RULES: Final = "none"


class BillingError(BackendError):
    """Billing was called wrongly (our fault): malformed persisted values or rules."""


@dataclass(frozen=True, slots=True)
class RuleRef:
    """A CONSUMPTION rule as billing needs it: its row id and the domain rule."""

    rule_id: int
    rule: split.SplitRule


def fingerprint(rules: Sequence[RuleRef]) -> str:
    """A stable name of a rule set (rule ids, kinds, partners, values, in order)."""
    if not rules:
        return NO_RULES
    text = ";".join(
        f"{r.rule_id}:{r.rule.kind.value}:{r.rule.partner}:{r.rule.value}" for r in rules
    )
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class MeterBook:
    """One meter's billing memory (persisted in ``meter_ingest``)."""

    rule_set: str = NO_RULES
    totals: split.SplitTotals = field(default_factory=split.SplitTotals)
    carry: split.MinorCarry = field(default_factory=split.MinorCarry)
    #: Minor units owed per partner (ledger account id as a string, or REMAINDER_KEY).
    pending: Mapping[str, int] = field(default_factory=dict)

    @property
    def pending_minor(self) -> int:
        """What the customer owes that is not posted yet (the payer's side of ``pending``)."""
        return sum(self.pending.values())


def totals_to_dict(t: split.SplitTotals) -> dict[str, int]:
    """JSON-ready totals."""
    return {"amount_milli": t.amount_milli, "energy_wh": t.energy_wh, "days": t.days}


def totals_from_dict(data: object) -> split.SplitTotals:
    """Inverse of :func:`totals_to_dict`; malformed data raises :class:`BillingError`."""
    if not isinstance(data, Mapping) or set(data) != {"amount_milli", "energy_wh", "days"}:
        raise BillingError(f"malformed split totals {data!r}")
    try:
        return split.SplitTotals(data["amount_milli"], data["energy_wh"], data["days"])
    except split.SplitError as exc:
        raise BillingError(f"malformed split totals: {exc}") from exc


def pending_from_dict(data: object) -> dict[str, int]:
    """A persisted ``pending`` map, checked."""
    if not isinstance(data, Mapping):
        raise BillingError(f"malformed pending map {data!r}")
    out: dict[str, int] = {}
    for key, value in data.items():
        if not isinstance(key, str) or not (key == REMAINDER_KEY or key.isdigit()):
            raise BillingError(f"malformed pending key {key!r}")
        if type(value) is not int:
            raise BillingError(f"malformed pending amount {value!r}")
        out[key] = value
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class Billed:
    """The result of billing one reading's intervals."""

    book: MeterBook
    #: Per interval, each rule's share: ((rule_id, partner, milli), ...).
    shares: tuple[tuple[tuple[int, int, int], ...], ...]
    #: Minor units owed now per partner key (this reading only, before held amounts).
    lines: Mapping[str, int]
    #: Minor units taken from the customer for this reading (= sum of ``lines``).
    payer_minor: int


@dataclass(frozen=True, slots=True)
class RuleSet:
    """A CONSUMPTION rule set compiled for billing: checked once, fingerprinted once.

    ``bill`` evaluates the split's stream arithmetic (:func:`split.accrued`,
    :func:`split.split_increment`, :func:`split.to_minor`) directly on these arrays — the
    same integer formulas, without building a value object per rule and reading (ingest
    bills tens of thousands of readings a second); a property test holds the two equal.
    """

    refs: tuple[RuleRef, ...]
    name: str
    kinds: tuple[split.RuleKind, ...]
    values: tuple[int, ...]
    partners: tuple[int, ...]
    ids: tuple[int, ...]
    remainder: int  #: index of the REMAINDER rule (-1 without rules)

    @classmethod
    def of(cls, rules: Sequence[RuleRef]) -> RuleSet:
        """Compile ``rules`` (checked by :func:`split.check_rules` unless empty)."""
        refs = tuple(rules)
        if refs:
            split.check_rules([r.rule for r in refs])
        kinds = tuple(r.rule.kind for r in refs)
        return cls(
            refs=refs,
            name=fingerprint(refs),
            kinds=kinds,
            values=tuple(r.rule.value for r in refs),
            partners=tuple(r.rule.partner for r in refs),
            ids=tuple(r.rule_id for r in refs),
            remainder=kinds.index(split.RuleKind.REMAINDER) if refs else -1,
        )

    @property
    def remainder_account(self) -> int | None:
        """The REMAINDER partner's ledger account, or ``None`` without rules."""
        return self.partners[self.remainder] if self.refs else None

    def accrued(self, amount: int, energy_wh: int, days: int) -> list[int]:
        """Milli per rule of the running totals (:func:`split.accrued`)."""
        out = []
        for kind, value in zip(self.kinds, self.values, strict=True):
            if kind is split.RuleKind.PER_KWH:
                out.append(value * energy_wh // 1000)
            elif kind is split.RuleKind.BASIS_POINTS:
                out.append(amount * value // split.BASIS_POINTS_PER_UNIT)
            elif kind is split.RuleKind.FIXED_PER_DAY:
                out.append(value * days)
            else:  # REMAINDER (FIXED_PER_TOPUP never applies to consumption: 0 top-ups)
                out.append(0)
        out[self.remainder] = amount - sum(out)
        return out


def bill(
    book: MeterBook, rules: RuleSet | Sequence[RuleRef], intervals: Sequence[Interval]
) -> Billed:
    """Advance ``book`` by ``intervals`` under ``rules``; nothing is posted here.

    Returns the new book (``pending`` unchanged: the caller decides what it can post)
    and the minor units owed per partner for these intervals.
    """
    rs = rules if isinstance(rules, RuleSet) else RuleSet.of(rules)
    if rs.name != book.rule_set:
        book = MeterBook(
            rule_set=rs.name, carry=split.MinorCarry(book.carry.amount_milli), pending=book.pending
        )
    totals = book.totals
    amount, energy, days = totals.amount_milli, totals.energy_wh, totals.days
    payer_carry = book.carry.amount_milli
    carried = dict(book.carry.partners)
    lines: dict[str, int] = {}
    all_shares: list[tuple[tuple[int, int, int], ...]] = []
    payer = 0
    milli = split.MILLI_PER_MINOR
    old = rs.accrued(amount, energy, days) if rs.refs else []
    for iv in intervals:
        add = iv.total_milli
        if add < 0 or iv.import_wh < 0 or iv.days < 0:
            raise BillingError(f"an interval with negative amounts: {iv!r}")
        amount, energy, days = amount + add, energy + iv.import_wh, days + iv.days
        if rs.refs:
            new = rs.accrued(amount, energy, days)
            inc = [n - o for o, n in zip(old, new, strict=True)]
            old = new
            all_shares.append(tuple(zip(rs.ids, rs.partners, inc, strict=True)))
            # split.to_minor: milli per partner in order of first appearance.
            per_partner: dict[int, int] = {}
            for partner, m in zip(rs.partners, inc, strict=True):
                per_partner[partner] = per_partner.get(partner, 0) + m
            rest = rs.partners[rs.remainder]
            payer_minor, payer_carry = divmod(payer_carry + add, milli)
            fee_minor = 0
            for partner, m in per_partner.items():
                if partner == rest:
                    continue
                if m < 0:
                    raise BillingError(f"fee partner {partner} has a negative share {m}")
                minor, carried[partner] = divmod(carried.get(partner, 0) + m, milli)
                fee_minor += minor
                if minor:
                    key = str(partner)
                    lines[key] = lines.get(key, 0) + minor
            rem_minor = payer_minor - fee_minor
            if rem_minor:
                key = str(rest)
                lines[key] = lines.get(key, 0) + rem_minor
            payer += payer_minor
        else:
            m, payer_carry = divmod(payer_carry + add, milli)
            all_shares.append(())
            lines[REMAINDER_KEY] = lines.get(REMAINDER_KEY, 0) + m
            payer += m
    carry = split.MinorCarry(payer_carry, tuple(sorted((p, c) for p, c in carried.items() if c)))
    return Billed(
        book=MeterBook(
            rule_set=rs.name,
            totals=split.SplitTotals(amount, energy, days),
            carry=carry,
            pending=book.pending,
        ),
        shares=tuple(all_shares),
        lines={k: v for k, v in lines.items() if v},
        payer_minor=payer,
    )


def merge(pending: Mapping[str, int], lines: Mapping[str, int]) -> dict[str, int]:
    """``pending + lines`` per partner key, zeros dropped."""
    out = dict(pending)
    for key, value in lines.items():
        out[key] = out.get(key, 0) + value
    return {k: v for k, v in out.items() if v}


def resolve(due: Mapping[str, int], remainder_account: int | None) -> dict[int, int] | None:
    """``due`` with :data:`REMAINDER_KEY` moved to the REMAINDER partner's account.

    ``None`` when something is owed to "the REMAINDER partner" and there is none yet.
    """
    out: dict[int, int] = {}
    for key, value in due.items():
        if key == REMAINDER_KEY:
            if remainder_account is None:
                return None
            account = remainder_account
        else:
            account = int(key)
        out[account] = out.get(account, 0) + value
    return out
