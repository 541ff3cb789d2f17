"""Revenue split (pure): a rated amount shared among partners by rules, exact to the rating unit.

Rules per tariff or product (DESIGN §3, issue 6), each naming a partner (a ledger account
id) and a ``value``:

=================  ==========================================================  ==========
kind               exact entitlement                                           applies to
=================  ==========================================================  ==========
PER_KWH            ``value`` milli per kWh * energy: ``value * wh / 1000``      consumption
BASIS_POINTS       ``value`` / 10 000 of the gross amount                      both
FIXED_PER_DAY      ``value`` milli per local day begun                         consumption
FIXED_PER_TOPUP    ``value`` milli per top-up                                  top-up
REMAINDER          the amount less every other share (exactly one such rule)   both
=================  ==========================================================  ==========

Money is in rating units (*milli*, 1/1000 of a minor unit); entitlements are exact
rationals (kept as integer numerators over 10 000, so no floats and no ``Fraction``).

**Shortfall.** Fees are owed on energy whatever the retail price (a free-hours band still
pays the grid fee), so fee shares are never capped: when they exceed the amount the
REMAINDER share is *negative* — the remainder partner (normally the supplier) pays the
difference. Every fee share is ``>= 0``; only the remainder share can be negative. Post a
split as ``payer → remainder partner`` for the amount and ``remainder partner → fee
partner`` for each fee (``TransferCode.CONSUMPTION`` then ``SPLIT``), so every transfer
amount is ``>= 0``.

Two roundings, for two kinds of money flow (INGEST.md explains the choice):

* :func:`split` — **one amount** (a top-up, a one-off): the fee shares together get the
  floor of their exact total, distributed by **largest remainder** (Hamilton; ties by rule
  position), and the REMAINDER partner absorbs the leftover fraction. Every share is
  within one rating unit of its exact entitlement.
* :func:`accrued` / :func:`split_increment` — **a stream** (consumption intervals of one
  account): shares are functions of the running totals (amount, Wh, days, top-ups); each
  fee share is the floor of its exact entitlement of the totals and an interval's share
  is the difference of two such values. Like the band charges of RATING.md §4 they
  telescope: partner totals do not depend on how readings were cut into intervals, and
  a fee partner is never more than 1 milli short over the account's life.

:func:`to_minor` turns milli shares into ledger minor units with a small carried
remainder per account (:class:`MinorCarry`) so nothing is ever lost; it too depends only
on running totals, so a stream posts the same ledger however it was cut.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from backend.domain.ledger import MAX_INT64
from backend.errors import BackendError

#: Basis points in one whole (100.00 %).
BASIS_POINTS_PER_UNIT: Final = 10_000
#: Rating units per minor unit (units.MILLI_PER_MINOR; repeated to keep this module's
#: arithmetic self-describing).
MILLI_PER_MINOR: Final = 1000
#: Most rules in one rule set (the split_rules rows of one tariff and context).
MAX_RULES: Final = 32
#: Largest per-kWh fee or fixed fee value, like a band price (u32 milli).
MAX_RULE_VALUE: Final = 2**32 - 1
# Entitlements are numerators over this denominator: 10 000 for basis points, and
# per-kWh fees (value * wh / 1000) as value * wh * 10.
_DENOMINATOR: Final = BASIS_POINTS_PER_UNIT
_WH_SCALE: Final = _DENOMINATOR // 1000


class SplitError(BackendError):
    """A split was refused: bad amounts, a bad carry, or rules that cannot apply."""


class InvalidSplitRuleError(SplitError):
    """A rule or rule set that breaks the rules (value range, partner, one REMAINDER)."""


class RuleKind(enum.StrEnum):
    """What a rule's ``value`` means (``split_rules.kind``)."""

    PER_KWH = "PER_KWH"  #: value milli per kWh of energy
    BASIS_POINTS = "BASIS_POINTS"  #: value / 10 000 of the gross amount
    FIXED_PER_DAY = "FIXED_PER_DAY"  #: value milli per local day begun
    FIXED_PER_TOPUP = "FIXED_PER_TOPUP"  #: value milli per top-up
    REMAINDER = "REMAINDER"  #: what is left (value 0)


class SplitContext(enum.StrEnum):
    """What is being split by :func:`split` (``split_rules.applies_to``)."""

    CONSUMPTION = "CONSUMPTION"
    TOPUP = "TOPUP"


_ALLOWED: Final = {
    SplitContext.CONSUMPTION: frozenset(
        {RuleKind.PER_KWH, RuleKind.BASIS_POINTS, RuleKind.FIXED_PER_DAY, RuleKind.REMAINDER}
    ),
    SplitContext.TOPUP: frozenset(
        {RuleKind.BASIS_POINTS, RuleKind.FIXED_PER_TOPUP, RuleKind.REMAINDER}
    ),
}


def _is_int(value: object) -> bool:
    return type(value) is int  # bool is an int subclass and never a valid amount


@dataclass(frozen=True, slots=True)
class SplitRule:
    """One rule: ``kind`` of share for ``partner`` (a ledger account id), sized by ``value``."""

    kind: RuleKind
    partner: int
    value: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.kind, RuleKind):
            raise InvalidSplitRuleError(f"kind must be a RuleKind, got {self.kind!r}")
        if not _is_int(self.partner) or not 1 <= self.partner <= MAX_INT64:
            raise InvalidSplitRuleError(
                f"partner must be a ledger account id in 1..2**63-1, got {self.partner!r}"
            )
        if self.kind is RuleKind.REMAINDER:
            hi = 0
        elif self.kind is RuleKind.BASIS_POINTS:
            hi = BASIS_POINTS_PER_UNIT
        else:
            hi = MAX_RULE_VALUE
        if not _is_int(self.value) or not 0 <= self.value <= hi:
            raise InvalidSplitRuleError(
                f"{self.kind.value} rule for partner {self.partner}: value must be in 0..{hi}, "
                f"got {self.value!r}"
            )


@dataclass(frozen=True, slots=True)
class Share:
    """The share of rule number ``rule`` (its position): ``amount_milli`` for ``partner``."""

    rule: int
    partner: int
    kind: RuleKind
    amount_milli: int


def check_rules(rules: Sequence[SplitRule]) -> tuple[SplitRule, ...]:
    """The rules as a tuple, or :class:`InvalidSplitRuleError`.

    1..:data:`MAX_RULES` rules, exactly one REMAINDER, basis points summing to at most
    10 000 (more would make the remainder negative on every amount).
    """
    rules = tuple(rules)
    if not 1 <= len(rules) <= MAX_RULES:
        raise InvalidSplitRuleError(f"a rule set holds 1..{MAX_RULES} rules, got {len(rules)}")
    for rule in rules:
        if not isinstance(rule, SplitRule):
            raise InvalidSplitRuleError(f"rules must be SplitRule, got {rule!r}")
    remainders = sum(r.kind is RuleKind.REMAINDER for r in rules)
    if remainders != 1:
        raise InvalidSplitRuleError(
            f"a rule set needs exactly one REMAINDER rule, got {remainders}"
        )
    bp = sum(r.value for r in rules if r.kind is RuleKind.BASIS_POINTS)
    if bp > BASIS_POINTS_PER_UNIT:
        raise InvalidSplitRuleError(f"basis points total {bp}, more than {BASIS_POINTS_PER_UNIT}")
    return rules


def _quantity(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_INT64:
        raise SplitError(f"{name} must be an int in 0..2**63-1, got {value!r}")
    return value


def _numerator(rule: SplitRule, amount: int, energy_wh: int, days: int, topups: int) -> int:
    """Exact entitlement of a non-REMAINDER rule, times :data:`_DENOMINATOR`."""
    match rule.kind:
        case RuleKind.PER_KWH:
            return rule.value * energy_wh * _WH_SCALE
        case RuleKind.BASIS_POINTS:
            return amount * rule.value
        case RuleKind.FIXED_PER_DAY:
            return rule.value * days * _DENOMINATOR
        case _:  # FIXED_PER_TOPUP; REMAINDER never reaches here
            return rule.value * topups * _DENOMINATOR


def exact_shares(
    amount_milli: int,
    energy_wh: int,
    days: int,
    topups: int,
    rules: Sequence[SplitRule],
) -> tuple[int, ...]:
    """Each rule's exact entitlement times 10 000 (REMAINDER: amount less the others).

    The exact values the roundings approximate; exposed for tests and for statements.
    """
    rules = check_rules(rules)
    nums = [
        0 if r.kind is RuleKind.REMAINDER else _numerator(r, amount_milli, energy_wh, days, topups)
        for r in rules
    ]
    rest = amount_milli * _DENOMINATOR - sum(nums)
    return tuple(
        rest if r.kind is RuleKind.REMAINDER else n for r, n in zip(rules, nums, strict=True)
    )


def _shares(rules: tuple[SplitRule, ...], amounts: Sequence[int]) -> tuple[Share, ...]:
    return tuple(
        Share(rule=i, partner=r.partner, kind=r.kind, amount_milli=a)
        for i, (r, a) in enumerate(zip(rules, amounts, strict=True))
    )


def split(
    amount_milli: int,
    energy_wh: int,
    days: int,
    rules: Sequence[SplitRule],
    *,
    context: SplitContext = SplitContext.CONSUMPTION,
) -> tuple[Share, ...]:
    """Share one amount among the rules; one :class:`Share` per rule, in rule order.

    Largest remainder among the fee rules (everything but REMAINDER): their shares sum to
    the floor of their exact total, each is its exact entitlement floored or raised by
    one, the raised ones being those with the largest fractional parts (ties: earlier rule
    first). The REMAINDER share is the amount less the fee shares, so the shares sum to
    ``amount_milli`` exactly; it is negative when fees exceed the amount (module
    docstring). In a TOPUP split ``energy_wh`` and ``days`` must be 0 and the amount is one
    top-up; a rule kind that does not apply to the context is refused.
    """
    rules = check_rules(rules)
    if not isinstance(context, SplitContext):
        raise SplitError(f"context must be a SplitContext, got {context!r}")
    amount = _quantity(amount_milli, "amount_milli")
    energy = _quantity(energy_wh, "energy_wh")
    n_days = _quantity(days, "days")
    for r in rules:
        if r.kind not in _ALLOWED[context]:
            raise InvalidSplitRuleError(
                f"a {r.kind.value} rule does not apply to a {context.value} split"
            )
    if context is SplitContext.TOPUP and (energy or n_days):
        raise SplitError("a TOPUP split has no energy and no days")
    topups = 1 if context is SplitContext.TOPUP else 0
    exact = exact_shares(amount, energy, n_days, topups, rules)
    fees = [i for i, r in enumerate(rules) if r.kind is not RuleKind.REMAINDER]
    out = [0] * len(rules)
    for i in fees:
        out[i] = exact[i] // _DENOMINATOR
    leftover = sum(exact[i] for i in fees) // _DENOMINATOR - sum(out)
    # Largest fractional part first; Python's sort is stable, so equal parts keep rule order.
    for i in sorted(fees, key=lambda i: -(exact[i] % _DENOMINATOR))[:leftover]:
        out[i] += 1
    rem = next(i for i, r in enumerate(rules) if r.kind is RuleKind.REMAINDER)
    out[rem] = amount - sum(out)
    return _shares(rules, out)


# ----------------------------------------------------------------------------- streams


@dataclass(frozen=True, slots=True)
class SplitTotals:
    """Running totals of one account's stream under one rule set (persisted by the caller)."""

    amount_milli: int = 0
    energy_wh: int = 0
    days: int = 0
    topups: int = 0

    def __post_init__(self) -> None:
        for name in ("amount_milli", "energy_wh", "days", "topups"):
            _quantity(getattr(self, name), name)

    def plus(
        self, *, amount_milli: int = 0, energy_wh: int = 0, days: int = 0, topups: int = 0
    ) -> SplitTotals:
        """The totals after one more interval (or top-up)."""
        return SplitTotals(
            self.amount_milli + _quantity(amount_milli, "amount_milli"),
            self.energy_wh + _quantity(energy_wh, "energy_wh"),
            self.days + _quantity(days, "days"),
            self.topups + _quantity(topups, "topups"),
        )


def accrued(totals: SplitTotals, rules: Sequence[SplitRule]) -> tuple[Share, ...]:
    """Shares of the running totals: each fee share floored, REMAINDER takes the rest.

    Each fee share is a non-decreasing function of the totals, so the increments of a
    stream (:func:`split_increment`) are never negative for a fee partner.
    """
    rules = check_rules(rules)
    if not isinstance(totals, SplitTotals):
        raise SplitError(f"totals must be SplitTotals, got {totals!r}")
    return _shares(rules, _accrued(totals, rules))


def _accrued(totals: SplitTotals, rules: tuple[SplitRule, ...]) -> list[int]:
    """:func:`accrued` in milli per rule, for rules already checked."""
    out = [
        0
        if r.kind is RuleKind.REMAINDER
        else _numerator(r, totals.amount_milli, totals.energy_wh, totals.days, totals.topups)
        // _DENOMINATOR
        for r in rules
    ]
    rem = next(i for i, r in enumerate(rules) if r.kind is RuleKind.REMAINDER)
    out[rem] = totals.amount_milli - sum(out)
    return out


def split_increment(
    before: SplitTotals, after: SplitTotals, rules: Sequence[SplitRule]
) -> tuple[Share, ...]:
    """Shares of the stream between two running totals: ``accrued(after) - accrued(before)``.

    They sum to ``after.amount_milli - before.amount_milli``; any chain of increments
    from ``a`` to ``b`` sums, per rule, to ``split_increment(a, b)``.
    """
    for name in ("amount_milli", "energy_wh", "days", "topups"):
        if getattr(after, name) < getattr(before, name):
            raise SplitError(f"running total {name} went backwards")
    rules = check_rules(rules)
    if not isinstance(before, SplitTotals) or not isinstance(after, SplitTotals):
        raise SplitError("split_increment takes two SplitTotals")
    old = _accrued(before, rules)
    new = _accrued(after, rules)
    return _shares(rules, [n - o for o, n in zip(old, new, strict=True)])


def by_partner(shares: Iterable[Share]) -> dict[int, int]:
    """Milli per partner (a partner may hold several rules), in order of first appearance."""
    out: dict[int, int] = {}
    for s in shares:
        out[s.partner] = out.get(s.partner, 0) + s.amount_milli
    return out


# ----------------------------------------------------------------------------- minor units


@dataclass(frozen=True, slots=True)
class MinorCarry:
    """Milli of one account not yet posted in minor units (persisted by the caller).

    ``amount_milli``: of the payer's debits, ``0..999``. ``partners``: per fee partner,
    ascending, each ``1..999`` (zeros are left out). The remainder partner has no entry:
    it absorbs the difference, so its implicit carry is ``amount_milli`` less the others.
    """

    amount_milli: int = 0
    partners: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if not _is_int(self.amount_milli) or not 0 <= self.amount_milli < MILLI_PER_MINOR:
            raise SplitError(f"carry amount_milli must be 0..999, got {self.amount_milli!r}")
        if type(self.partners) is not tuple:
            raise SplitError("carry partners must be a tuple of (partner, milli) pairs")
        last = 0
        for pair in self.partners:
            if (
                type(pair) is not tuple
                or len(pair) != 2
                or not all(_is_int(x) for x in pair)
                or not last < pair[0] <= MAX_INT64
                or not 1 <= pair[1] < MILLI_PER_MINOR
            ):
                raise SplitError(
                    "carry partners must be (partner, 1..999) pairs, ascending by partner, "
                    f"got {pair!r}"
                )
            last = pair[0]

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready dict."""
        return {"amount_milli": self.amount_milli, "partners": [list(p) for p in self.partners]}

    @classmethod
    def from_dict(cls, data: object) -> MinorCarry:
        """Inverse of :meth:`as_dict`; anything malformed raises :class:`SplitError`."""
        if not isinstance(data, Mapping) or set(data) != {"amount_milli", "partners"}:
            raise SplitError("a carry is an object with amount_milli and partners")
        partners = data["partners"]
        if not isinstance(partners, list) or not all(isinstance(p, list) for p in partners):
            raise SplitError("carry partners must be a list of [partner, milli] pairs")
        return cls(data["amount_milli"], tuple(tuple(p) for p in partners))


def to_minor(
    shares: Sequence[Share], carry: MinorCarry = MinorCarry()
) -> tuple[tuple[tuple[int, int], ...], MinorCarry]:
    """Minor units per partner for a split, and the carry to keep for next time.

    Returns ``((partner, minor), ...)`` in order of first appearance, summing to what the
    payer is debited: ``(carry.amount_milli + Σ shares) div 1000``. A fee partner gets
    ``(its carry + its milli) div 1000`` and keeps the rest; the REMAINDER partner (all of
    its rules together) gets the difference, which can be negative when the fees cross a
    minor unit that the amount does not. Exact: payer minor * 1000 + new
    ``amount_milli`` = old ``amount_milli`` + Σ shares, and per fee partner likewise. Over
    a stream each partner's posted total is a function of its running milli total only.
    """
    if not isinstance(carry, MinorCarry):
        raise SplitError(f"carry must be a MinorCarry, got {carry!r}")
    shares = tuple(shares)
    if not all(isinstance(s, Share) for s in shares):
        raise SplitError("shares must be Share values")
    remainders = {s.partner for s in shares if s.kind is RuleKind.REMAINDER}
    if len(remainders) != 1:
        raise SplitError("the shares of one split name exactly one REMAINDER partner")
    (rest,) = remainders
    milli = by_partner(shares)
    for partner, amount in milli.items():
        if amount < 0 and partner != rest:
            raise SplitError(f"fee partner {partner} has a negative share {amount}")
    payer_minor, amount_carry = divmod(carry.amount_milli + sum(milli.values()), MILLI_PER_MINOR)
    if payer_minor < 0:
        raise SplitError("the shares sum to a negative amount")
    carried = dict(carry.partners)
    out: dict[int, int] = {}
    for partner, amount in milli.items():
        if partner != rest:
            out[partner], carried[partner] = divmod(
                carried.get(partner, 0) + amount, MILLI_PER_MINOR
            )
    fee_minor = sum(out.values())
    lines = tuple((p, payer_minor - fee_minor if p == rest else out[p]) for p in milli)
    new_carry = MinorCarry(amount_carry, tuple(sorted((p, c) for p, c in carried.items() if c)))
    return lines, new_carry
