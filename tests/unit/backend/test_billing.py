"""Billing of rated intervals: the compiled rule set equals the split module's stream rules."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from backend.domain import billing, split
from backend.domain.consumption import Interval
from firmware_protocol import rating


def interval(amount: int, wh: int, days: int) -> Interval:
    return Interval(
        meter=1,
        tariff_id=1,
        activation=0,
        from_ts=0,
        to_ts=1,
        import_wh=wh,
        charge=rating.Charge((wh,), (amount,), 0, 0, amount),
        days=days,
        standing_milli=0,
    )


def reference(
    book: billing.MeterBook, rules: list[billing.RuleRef], intervals: list[Interval]
) -> tuple[dict[str, int], int, split.MinorCarry, split.SplitTotals, list[tuple[int, ...]]]:
    """What bill must give, from split.split_increment and split.to_minor step by step."""
    domain = [r.rule for r in rules]
    totals, carry = book.totals, book.carry
    lines: dict[str, int] = {}
    payer = 0
    shares_out: list[tuple[int, ...]] = []
    for iv in intervals:
        after = totals.plus(amount_milli=iv.total_milli, energy_wh=iv.import_wh, days=iv.days)
        shares = split.split_increment(totals, after, domain)
        minor, carry = split.to_minor(shares, carry)
        shares_out.append(tuple(s.amount_milli for s in shares))
        for partner, m in minor:
            lines[str(partner)] = lines.get(str(partner), 0) + m
            payer += m
        totals = after
    return {k: v for k, v in lines.items() if v}, payer, carry, totals, shares_out


@st.composite
def rule_sets(draw: st.DrawFn) -> list[billing.RuleRef]:
    partners = draw(st.lists(st.integers(1, 6), min_size=1, max_size=5))
    rest = draw(st.integers(1, 6))
    rules: list[split.SplitRule] = []
    bp_left = 10_000
    for p in partners:
        kind = draw(
            st.sampled_from(
                [split.RuleKind.PER_KWH, split.RuleKind.BASIS_POINTS, split.RuleKind.FIXED_PER_DAY]
            )
        )
        if kind is split.RuleKind.BASIS_POINTS:
            value = draw(st.integers(0, bp_left))
            bp_left -= value
        else:
            value = draw(st.integers(0, 400_000))
        rules.append(split.SplitRule(kind, p, value))
    at = draw(st.integers(0, len(rules)))
    rules.insert(at, split.SplitRule(split.RuleKind.REMAINDER, rest, 0))
    return [billing.RuleRef(100 + i, r) for i, r in enumerate(rules)]


intervals_st = st.lists(
    st.tuples(st.integers(0, 2_000_000), st.integers(0, 5_000), st.integers(0, 2)).map(
        lambda t: interval(*t)
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(rules=rule_sets(), chunks=st.lists(intervals_st, min_size=1, max_size=4))
def test_bill_equals_the_split_stream_rules_however_the_stream_is_cut(
    rules: list[billing.RuleRef], chunks: list[list[Interval]]
) -> None:
    book = billing.MeterBook()
    compiled = billing.RuleSet.of(rules)
    every: list[Interval] = []
    lines: dict[str, int] = {}
    payer = 0
    shares: list[tuple[int, ...]] = []
    for chunk in chunks:
        out = billing.bill(book, compiled, chunk)
        book = out.book
        lines = billing.merge(lines, out.lines)
        payer += out.payer_minor
        shares += [tuple(m for _, _, m in s) for s in out.shares]
        assert sum(out.lines.values()) == out.payer_minor
        for per_interval, iv in zip(out.shares, chunk, strict=True):
            assert sum(m for _, _, m in per_interval) == iv.total_milli
        every += chunk
    ref_lines, ref_payer, ref_carry, ref_totals, ref_shares = reference(
        billing.MeterBook(rule_set=compiled.name), rules, every
    )
    assert lines == ref_lines
    assert payer == ref_payer
    assert book.carry == ref_carry
    assert book.totals == ref_totals
    assert shares == ref_shares
    # Exact: minor units posted x 1000 + carry = milli billed.
    assert payer * 1000 + book.carry.amount_milli == sum(iv.total_milli for iv in every)


def test_without_rules_everything_is_owed_to_the_remainder_partner_to_be() -> None:
    out = billing.bill(billing.MeterBook(), [], [interval(1_500, 10, 0), interval(700, 3, 1)])
    assert out.lines == {billing.REMAINDER_KEY: 2}
    assert out.book.carry.amount_milli == 200
    assert out.book.rule_set == billing.NO_RULES
    assert billing.resolve(out.lines, None) is None
    assert billing.resolve(out.lines, 77) == {77: 2}


def test_a_new_rule_set_restarts_the_totals_and_keeps_the_payers_carry() -> None:
    a = [billing.RuleRef(1, split.SplitRule(split.RuleKind.REMAINDER, 9, 0))]
    b = [
        billing.RuleRef(2, split.SplitRule(split.RuleKind.PER_KWH, 8, 100_000)),
        billing.RuleRef(3, split.SplitRule(split.RuleKind.REMAINDER, 9, 0)),
    ]
    first = billing.bill(billing.MeterBook(), a, [interval(2_500, 10, 0)])
    assert first.book.carry.amount_milli == 500
    second = billing.bill(first.book, b, [interval(1_000, 20, 0)])
    assert second.book.totals == split.SplitTotals(1_000, 20, 0)
    assert second.book.rule_set == billing.fingerprint(b)
    # 500 carried + 1 000 billed = 1 minor unit for the payer, 500 milli carried on;
    # the grid fee (20 Wh x 100 000 / 1 000 = 2 000 milli) takes 2 minor units from the
    # REMAINDER partner, which got 1: it pays one minor unit out of its own pocket.
    assert second.payer_minor == 1
    assert second.lines == {"8": 2, "9": -1}
