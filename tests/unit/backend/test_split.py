"""Revenue split: rule checks, largest remainder, stream accrual and minor-unit carry."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backend.domain.split import (
    MAX_RULES,
    InvalidSplitRuleError,
    MinorCarry,
    RuleKind,
    Share,
    SplitContext,
    SplitError,
    SplitRule,
    SplitTotals,
    accrued,
    by_partner,
    check_rules,
    exact_shares,
    split,
    split_increment,
    to_minor,
)
from backend.errors import BackendError

D = 10_000  # exact_shares' denominator
FAST = settings(max_examples=150, deadline=None)

GRID, TAX, VAT, RESELLER, METERING, SUPPLIER = 11, 12, 13, 14, 15, 20

#: A German-style consumption rule set: grid fee and electricity tax per kWh, VAT and a
#: reseller's commission of the gross, a metering fee per day, the supplier the rest.
RULES = (
    SplitRule(RuleKind.PER_KWH, GRID, 8_123),
    SplitRule(RuleKind.PER_KWH, TAX, 2_050),
    SplitRule(RuleKind.BASIS_POINTS, VAT, 1_597),
    SplitRule(RuleKind.BASIS_POINTS, RESELLER, 250),
    SplitRule(RuleKind.FIXED_PER_DAY, METERING, 3_333),
    SplitRule(RuleKind.REMAINDER, SUPPLIER),
)


def amounts(shares: tuple[Share, ...]) -> list[int]:
    return [s.amount_milli for s in shares]


# ----------------------------------------------------------------------------- rules


@pytest.mark.parametrize(
    ("kind", "value"),
    [
        (RuleKind.PER_KWH, -1),
        (RuleKind.PER_KWH, 2**32),
        (RuleKind.BASIS_POINTS, 10_001),
        (RuleKind.FIXED_PER_DAY, -5),
        (RuleKind.FIXED_PER_TOPUP, 2**32),
        (RuleKind.REMAINDER, 1),
        (RuleKind.PER_KWH, True),
        (RuleKind.PER_KWH, 1.5),
    ],
)
def test_rule_value_out_of_range_is_refused(kind: RuleKind, value: Any) -> None:
    with pytest.raises(InvalidSplitRuleError, match=f"{kind.value} rule for partner 1"):
        SplitRule(kind, 1, value)


@pytest.mark.parametrize("partner", [0, -1, 2**63, True, "7"])
def test_rule_partner_must_be_an_account_id(partner: Any) -> None:
    with pytest.raises(InvalidSplitRuleError, match="partner must be a ledger account id"):
        SplitRule(RuleKind.REMAINDER, partner)


def test_rule_kind_must_be_a_rule_kind() -> None:
    with pytest.raises(InvalidSplitRuleError, match="kind must be a RuleKind"):
        SplitRule("PER_KWH", 1, 5)  # type: ignore[arg-type]


def test_rule_bounds_are_inclusive() -> None:
    assert SplitRule(RuleKind.BASIS_POINTS, 2**63 - 1, 10_000).value == 10_000
    assert SplitRule(RuleKind.PER_KWH, 1, 2**32 - 1).value == 2**32 - 1
    assert SplitRule(RuleKind.REMAINDER, 1).value == 0


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ((), "1..32 rules, got 0"),
        ((SplitRule(RuleKind.REMAINDER, 1),) * (MAX_RULES + 1), "1..32 rules, got 33"),
        ((SplitRule(RuleKind.PER_KWH, 1, 5),), "exactly one REMAINDER rule, got 0"),
        ((SplitRule(RuleKind.REMAINDER, 1), SplitRule(RuleKind.REMAINDER, 2)), "got 2"),
        (
            (
                SplitRule(RuleKind.BASIS_POINTS, 1, 6_000),
                SplitRule(RuleKind.BASIS_POINTS, 2, 4_001),
                SplitRule(RuleKind.REMAINDER, 3),
            ),
            "basis points total 10001",
        ),
        (("REMAINDER",), "rules must be SplitRule"),
    ],
)
def test_rule_sets_are_checked(rules: Any, message: str) -> None:
    with pytest.raises(InvalidSplitRuleError, match=message):
        check_rules(rules)


def test_errors_hang_under_backend_error() -> None:
    assert issubclass(InvalidSplitRuleError, SplitError)
    assert issubclass(SplitError, BackendError)


# ----------------------------------------------------------------------------- one amount


def test_split_known_answer() -> None:
    # 1 234 567 milli for 12 345 Wh over 3 days. Exact entitlements:
    #   grid 8123 * 12.345 = 100 278.435, tax 2050 * 12.345 = 25 307.25,
    #   VAT 1 234 567 * 0.1597 = 197 160.3499, reseller * 0.025 = 30 864.175,
    #   metering 3 * 3333 = 9 999; fees 363 609.2099 -> 363 609 in all.
    # Floors sum to 363 608: the one leftover unit goes to the largest fraction (grid .435).
    shares = split(1_234_567, 12_345, 3, RULES)
    assert amounts(shares) == [100_279, 25_307, 197_160, 30_864, 9_999, 870_958]
    assert sum(amounts(shares)) == 1_234_567
    assert [s.rule for s in shares] == list(range(6))
    assert [s.partner for s in shares] == [GRID, TAX, VAT, RESELLER, METERING, SUPPLIER]
    assert shares[-1].kind is RuleKind.REMAINDER
    assert exact_shares(1_234_567, 12_345, 3, 0, RULES) == (
        1_002_784_350,
        253_072_500,
        1_971_603_499,
        308_641_750,
        99_990_000,
        1_234_567 * D - 3_636_092_099,
    )


def test_largest_remainder_ties_go_to_the_earlier_rule() -> None:
    # Three rules of 1/3 each on 1 milli... every fraction is .3333: none rises (floor of
    # the fee total 0.9999 is 0). On 2 milli: fractions .6666 each, fee total 1.9998 -> 1,
    # so one unit is handed out, to the first rule.
    rules = (
        SplitRule(RuleKind.BASIS_POINTS, 1, 3_333),
        SplitRule(RuleKind.BASIS_POINTS, 2, 3_333),
        SplitRule(RuleKind.BASIS_POINTS, 3, 3_333),
        SplitRule(RuleKind.REMAINDER, 4),
    )
    assert amounts(split(1, 0, 0, rules)) == [0, 0, 0, 1]
    assert amounts(split(2, 0, 0, rules)) == [1, 0, 0, 1]
    reordered = (rules[2], rules[0], rules[1], rules[3])
    assert amounts(split(2, 0, 0, reordered)) == [1, 0, 0, 1]  # partner 3 now first


def test_fees_above_the_amount_make_the_remainder_negative() -> None:
    # A free band (amount 0) still owes the grid fee on its 500 Wh: 4 061.5 + 1 025 + 3 333.
    shares = split(0, 500, 1, RULES)
    assert amounts(shares) == [4_061, 1_025, 0, 0, 3_333, -8_419]
    assert sum(amounts(shares)) == 0


def test_topup_split() -> None:
    rules = (
        SplitRule(RuleKind.BASIS_POINTS, RESELLER, 300),
        SplitRule(RuleKind.FIXED_PER_TOPUP, 30, 250_000),
        SplitRule(RuleKind.REMAINDER, SUPPLIER),
    )
    shares = split(20_000_123, 0, 0, rules, context=SplitContext.TOPUP)
    # 3 % of 20 000 123 = 600 003.69 -> 600 003; the fee total 850 003.69 floors to 850 003
    assert amounts(shares) == [600_003, 250_000, 19_150_120]


@pytest.mark.parametrize(
    ("kind", "context"),
    [
        (RuleKind.FIXED_PER_TOPUP, SplitContext.CONSUMPTION),
        (RuleKind.PER_KWH, SplitContext.TOPUP),
        (RuleKind.FIXED_PER_DAY, SplitContext.TOPUP),
    ],
)
def test_rule_kinds_apply_to_their_context(kind: RuleKind, context: SplitContext) -> None:
    rules = (SplitRule(kind, 1, 5), SplitRule(RuleKind.REMAINDER, 2))
    with pytest.raises(InvalidSplitRuleError, match=f"{kind.value} rule does not apply"):
        split(100, 0, 0, rules, context=context)


def test_topup_has_no_energy_or_days() -> None:
    rules = (SplitRule(RuleKind.REMAINDER, 2),)
    with pytest.raises(SplitError, match="no energy and no days"):
        split(100, 1, 0, rules, context=SplitContext.TOPUP)
    with pytest.raises(SplitError, match="no energy and no days"):
        split(100, 0, 1, rules, context=SplitContext.TOPUP)


def test_context_must_be_a_split_context() -> None:
    with pytest.raises(SplitError, match="context must be a SplitContext"):
        split(1, 0, 0, RULES, context="TOPUP")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("args", "name"),
    [
        ((-1, 0, 0), "amount_milli"),
        ((2**63, 0, 0), "amount_milli"),
        ((True, 0, 0), "amount_milli"),
        ((1, -1, 0), "energy_wh"),
        ((1, 1.0, 0), "energy_wh"),
        ((1, 0, -2), "days"),
    ],
)
def test_split_refuses_bad_quantities(args: tuple[Any, Any, Any], name: str) -> None:
    with pytest.raises(SplitError, match=f"{name} must be an int in 0..2\\*\\*63-1"):
        split(*args, RULES)


rule_st = st.one_of(
    st.builds(SplitRule, st.just(RuleKind.PER_KWH), st.integers(1, 9), st.integers(0, 2**32 - 1)),
    st.builds(SplitRule, st.just(RuleKind.BASIS_POINTS), st.integers(1, 9), st.integers(0, 2_000)),
    st.builds(SplitRule, st.just(RuleKind.FIXED_PER_DAY), st.integers(1, 9), st.integers(0, 10**6)),
)


@st.composite
def rule_sets(draw: st.DrawFn) -> tuple[SplitRule, ...]:
    fees, budget = [], 10_000  # basis points may total at most 100 %
    for drawn in draw(st.lists(rule_st, max_size=MAX_RULES - 1)):
        rule = drawn
        if rule.kind is RuleKind.BASIS_POINTS:
            rule = SplitRule(rule.kind, rule.partner, min(rule.value, budget))
            budget -= rule.value
        fees.append(rule)
    where = draw(st.integers(0, len(fees)))
    fees.insert(where, SplitRule(RuleKind.REMAINDER, draw(st.integers(1, 9))))
    return tuple(fees)


def naive(exact: tuple[int, ...], rules: tuple[SplitRule, ...], amount: int) -> list[int]:
    """Floor every fee, the remainder takes the rest (what largest remainder improves on)."""
    out = [0 if r.kind is RuleKind.REMAINDER else e // D for r, e in zip(rules, exact, strict=True)]
    rem = next(i for i, r in enumerate(rules) if r.kind is RuleKind.REMAINDER)
    out[rem] = amount - sum(out)
    return out


@FAST
@given(
    rules=rule_sets(),
    amount=st.integers(0, 2**50),
    energy=st.integers(0, 2**40),
    days=st.integers(0, 3_000),
)
def test_split_properties(
    rules: tuple[SplitRule, ...], amount: int, energy: int, days: int
) -> None:
    shares = split(amount, energy, days, rules)
    got = amounts(shares)
    exact = exact_shares(amount, energy, days, 0, rules)
    fees = [i for i, r in enumerate(rules) if r.kind is not RuleKind.REMAINDER]
    # the shares always sum to the amount
    assert sum(got) == amount
    # every share is within one unit of its exact entitlement; fee shares never negative
    for g, e in zip(got, exact, strict=True):
        assert abs(g * D - e) < D
    assert all(got[i] >= 0 for i in fees)
    # the fee group gets the floor of its exact total
    assert sum(got[i] for i in fees) == sum(exact[i] for i in fees) // D
    # largest remainder: a fee raised above its floor has a fraction >= any fee not raised
    raised = [exact[i] % D for i in fees if got[i] * D > exact[i]]
    kept = [exact[i] % D for i in fees if got[i] * D <= exact[i]]
    if raised and kept:
        assert min(raised) >= max(kept)
    # ... so it is never worse than flooring every fee: per share and in total
    nv = naive(exact, rules, amount)
    assert max(abs(g * D - e) for g, e in zip(got, exact, strict=True)) <= max(
        abs(n * D - e) for n, e in zip(nv, exact, strict=True)
    )
    assert sum(abs(g * D - e) for g, e in zip(got, exact, strict=True)) <= sum(
        abs(n * D - e) for n, e in zip(nv, exact, strict=True)
    )


@FAST
@given(rules=rule_sets(), amount=st.integers(0, 2**40), data=st.data())
def test_split_does_not_depend_on_rule_order_without_ties(
    rules: tuple[SplitRule, ...], amount: int, data: st.DataObject
) -> None:
    energy, days = data.draw(st.integers(0, 10**7)), data.draw(st.integers(0, 400))
    order = data.draw(st.permutations(range(len(rules))))
    exact = exact_shares(amount, energy, days, 0, rules)
    fractions = [
        e % D for r, e in zip(rules, exact, strict=True) if r.kind is not RuleKind.REMAINDER
    ]
    first = amounts(split(amount, energy, days, rules))
    second = amounts(split(amount, energy, days, tuple(rules[i] for i in order)))
    if len(set(fractions)) == len(fractions):
        assert [second[order.index(i)] for i in range(len(rules))] == first
    # with ties only the tie-break (rule position) may differ: totals per kind still agree
    assert sum(second) == sum(first) == amount


# ----------------------------------------------------------------------------- streams


def test_split_totals_are_checked_and_add_up() -> None:
    t = SplitTotals().plus(amount_milli=5, energy_wh=7, days=1).plus(topups=2)
    assert t == SplitTotals(5, 7, 1, 2)
    with pytest.raises(SplitError, match="days must be an int"):
        SplitTotals(days=-1)
    with pytest.raises(SplitError, match="energy_wh must be an int"):
        t.plus(energy_wh=-1)


def test_accrued_floors_each_fee_of_the_totals() -> None:
    totals = SplitTotals(amount_milli=1_234_567, energy_wh=12_345, days=3)
    # floors of the exact values above; the supplier gets the 0.2099 of leftover and more
    assert amounts(accrued(totals, RULES)) == [100_278, 25_307, 197_160, 30_864, 9_999, 870_959]
    with pytest.raises(SplitError, match="totals must be SplitTotals"):
        accrued((1, 2, 3, 0), RULES)  # type: ignore[arg-type]


def test_accrued_counts_topups() -> None:
    rules = (SplitRule(RuleKind.FIXED_PER_TOPUP, 30, 250), SplitRule(RuleKind.REMAINDER, 1))
    assert amounts(accrued(SplitTotals(amount_milli=10_000, topups=3), rules)) == [750, 9_250]


def test_split_increment_refuses_totals_going_back() -> None:
    with pytest.raises(SplitError, match="running total energy_wh went backwards"):
        split_increment(SplitTotals(energy_wh=5), SplitTotals(energy_wh=4), RULES)


interval_st = st.tuples(st.integers(0, 500_000), st.integers(0, 20_000), st.integers(0, 2))


def cut(data: st.DataObject, n: int) -> list[int]:
    """Random cut points of a stream of ``n`` items (the ends of the groups)."""
    inner = data.draw(st.sets(st.integers(1, max(1, n - 1)), max_size=n))
    return sorted({*(i for i in inner if i < n), n})


def post_stream(
    groups: list[tuple[int, int, int]], rules: tuple[SplitRule, ...]
) -> tuple[dict[int, int], MinorCarry, SplitTotals]:
    """Post a stream interval by interval: accrual increments, then minor units with carry."""
    totals, carry, posted = SplitTotals(), MinorCarry(), dict[int, int]()
    for amount, energy, days in groups:
        after = totals.plus(amount_milli=amount, energy_wh=energy, days=days)
        shares = split_increment(totals, after, rules)
        assert sum(amounts(shares)) == amount
        assert all(s.amount_milli >= 0 for s in shares if s.kind is not RuleKind.REMAINDER)
        lines, carry = to_minor(shares, carry)
        for partner, minor in lines:
            posted[partner] = posted.get(partner, 0) + minor
        totals = after
    return posted, carry, totals


@FAST
@given(
    rules=rule_sets(),
    stream=st.lists(interval_st, min_size=1, max_size=30),
    data=st.data(),
)
def test_stream_posts_the_same_ledger_however_it_is_cut(
    rules: tuple[SplitRule, ...], stream: list[tuple[int, int, int]], data: st.DataObject
) -> None:
    def grouped(ends: list[int]) -> list[tuple[int, int, int]]:
        out, start = [], 0
        for end in ends:
            part = stream[start:end]
            amount, energy, days = (sum(x) for x in zip(*part, strict=True))
            out.append((amount, energy, days))
            start = end
        return out

    fine = post_stream(stream, rules)
    coarse = post_stream(grouped(cut(data, len(stream))), rules)
    whole = post_stream(grouped([len(stream)]), rules)
    assert fine == coarse == whole
    posted, carry, totals = fine
    # nothing lost: posted minor units plus the payer's carry are the amount, exactly
    assert sum(posted.values()) * 1000 + carry.amount_milli == totals.amount_milli
    # each fee partner got its accrued milli of the totals, floored to minor units, and
    # the remainder partner the rest of the payer's minor units
    acc = by_partner(accrued(totals, rules))
    rest = next(r.partner for r in rules if r.kind is RuleKind.REMAINDER)
    for partner, milli in acc.items():
        if partner != rest:
            assert posted[partner] == milli // 1000
    assert posted[rest] == totals.amount_milli // 1000 - sum(
        m // 1000 for p, m in acc.items() if p != rest
    )


# ----------------------------------------------------------------------------- minor units


def share(rule: int, partner: int, amount: int, kind: RuleKind = RuleKind.PER_KWH) -> Share:
    return Share(rule=rule, partner=partner, kind=kind, amount_milli=amount)


def test_to_minor_known_answer() -> None:
    shares = (
        share(0, GRID, 1_500),
        share(1, VAT, 2_600),
        share(2, GRID, 600),
        share(3, SUPPLIER, 5_799, RuleKind.REMAINDER),
    )
    carry = MinorCarry(amount_milli=950, partners=((GRID, 950), (99, 5)))
    lines, new = to_minor(shares, carry)
    # payer: 950 + 10 499 = 11 449 -> 11 minor, carry 449
    # grid: 950 + 2 100 = 3 050 -> 3, carry 50; VAT: 2 600 -> 2, carry 600
    # supplier: 11 - 5 = 6; partner 99 keeps its carry untouched
    assert lines == ((GRID, 3), (VAT, 2), (SUPPLIER, 6))
    assert new == MinorCarry(449, ((GRID, 50), (VAT, 600), (99, 5)))


def test_to_minor_remainder_can_go_negative() -> None:
    # 8 milli of grid fee cross a minor unit; the (free) amount does not
    lines, new = to_minor(
        (share(0, GRID, 8), share(1, SUPPLIER, -8, RuleKind.REMAINDER)),
        MinorCarry(0, ((GRID, 995),)),
    )
    assert lines == ((GRID, 1), (SUPPLIER, -1))
    assert new == MinorCarry(0, ((GRID, 3),))


def test_to_minor_refusals() -> None:
    with pytest.raises(SplitError, match="carry must be a MinorCarry"):
        to_minor((), {"amount_milli": 0})  # type: ignore[arg-type]
    with pytest.raises(SplitError, match="shares must be Share values"):
        to_minor(((1, 2),))  # type: ignore[arg-type]
    with pytest.raises(SplitError, match="exactly one REMAINDER partner"):
        to_minor((share(0, 1, 5),))
    with pytest.raises(SplitError, match="exactly one REMAINDER partner"):
        to_minor(
            (share(0, 1, 5, RuleKind.REMAINDER), share(1, 2, 5, RuleKind.REMAINDER)),
        )
    with pytest.raises(SplitError, match="fee partner 1 has a negative share -5"):
        to_minor((share(0, 1, -5), share(1, 2, 5, RuleKind.REMAINDER)))
    with pytest.raises(SplitError, match="negative amount"):
        to_minor((share(0, 1, 0), share(1, 2, -2_000, RuleKind.REMAINDER)))


@pytest.mark.parametrize(
    ("amount", "partners"),
    [
        (1_000, ()),
        (-1, ()),
        (True, ()),
        (0, [(1, 5)]),
        (0, ((1, 0),)),
        (0, ((1, 1_000),)),
        (0, ((0, 5),)),
        (0, ((2, 5), (1, 5))),
        (0, ((1, 5), (1, 6))),
        (0, ((1, 5, 6),)),
        (0, ([1, 5],)),
        (0, ((1, True),)),
    ],
)
def test_carry_is_validated(amount: Any, partners: Any) -> None:
    with pytest.raises(SplitError, match="carry"):
        MinorCarry(amount, partners)


def test_carry_round_trips_through_a_dict() -> None:
    carry = MinorCarry(7, ((3, 999), (2**63 - 1, 1)))
    assert carry.as_dict() == {"amount_milli": 7, "partners": [[3, 999], [2**63 - 1, 1]]}
    assert MinorCarry.from_dict(carry.as_dict()) == carry
    assert MinorCarry.from_dict(MinorCarry().as_dict()) == MinorCarry()


@pytest.mark.parametrize(
    "data",
    [
        [],
        {"amount_milli": 0},
        {"amount_milli": 0, "partners": [], "x": 1},
        {"amount_milli": 0, "partners": {}},
        {"amount_milli": 0, "partners": [(1, 2)]},
        {"amount_milli": 0, "partners": [[1, 2, 3]]},
        {"amount_milli": "0", "partners": []},
    ],
)
def test_carry_from_dict_refuses_malformed(data: object) -> None:
    with pytest.raises(SplitError, match="carry"):
        MinorCarry.from_dict(data)


@FAST
@given(
    stream=st.lists(
        st.lists(st.tuples(st.integers(1, 4), st.integers(0, 5_000)), min_size=1, max_size=5),
        max_size=20,
    ),
    negative=st.integers(0, 3_000),
)
def test_carry_never_loses_a_milli(stream: list[list[tuple[int, int]]], negative: int) -> None:
    carry, posted, fed = MinorCarry(), dict[int, int](), dict[int, int]()
    payer_fed = 0
    for fees in stream:
        # partner 9 is the remainder; it gives up ``negative`` (capped by the fees) now and then
        take = min(negative, sum(a for _, a in fees))
        shares = (
            *(share(i, p, a) for i, (p, a) in enumerate(fees)),
            share(len(fees), 9, -take + (0 if take else 123), RuleKind.REMAINDER),
        )
        before = carry
        lines, carry = to_minor(shares, carry)
        total = sum(s.amount_milli for s in shares)
        assert sum(m for _, m in lines) * 1000 + carry.amount_milli == before.amount_milli + total
        for p, m in by_partner(shares).items():
            fed[p] = fed.get(p, 0) + m
        for p, m in lines:
            posted[p] = posted.get(p, 0) + m
        payer_fed += total
    carried = dict(carry.partners)
    for p, m in fed.items():
        if p != 9:
            assert posted[p] * 1000 + carried.get(p, 0) == m
    # the remainder's implicit carry is the payer's less the fee partners'
    assert sum(posted.values()) * 1000 + carry.amount_milli == payer_fed
    if 9 in fed:
        implicit = carry.amount_milli - sum(carried.values())
        assert posted[9] * 1000 + implicit == fed[9]


def test_by_partner_sums_a_partners_rules() -> None:
    shares = split(1_234_567, 12_345, 3, (*RULES[:-1], SplitRule(RuleKind.REMAINDER, GRID)))
    totals = by_partner(shares)
    assert list(totals) == [GRID, TAX, VAT, RESELLER, METERING]
    assert totals[GRID] == 100_279 + 870_958
    assert sum(totals.values()) == 1_234_567


def test_exact_shares_checks_rules() -> None:
    with pytest.raises(InvalidSplitRuleError):
        exact_shares(1, 0, 0, 0, ())
    assert list(itertools.islice(exact_shares(5, 0, 0, 0, RULES[-1:]), 1)) == [50_000]
