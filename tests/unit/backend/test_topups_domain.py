"""Pure rules of the top-up path: payment and token tables, top-up splits, retry back-off."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backend.domain.split import InvalidSplitRuleError, SplitError
from backend.domain.topups import (
    PAYMENT_TRANSITIONS,
    PaymentState,
    Report,
    SplitLine,
    TokenState,
    TopupRule,
    TopupSplit,
    payment_step,
    retry_delay_s,
    token_step,
    topup_split,
)
from firmware_protocol.status import TokenStatus

P, R = PaymentState, Report

# The whole payment table, written out: (state, report) → (new state, settles).
PAYMENT_TABLE = {
    # A success report settles from every unsettled state (money was taken).
    **{(s, R.SUCCEEDED): (P.SUCCEEDED, True) for s in P if s is not P.SUCCEEDED},
    # Nothing moves a settled payment.
    **{(P.SUCCEEDED, r): (P.SUCCEEDED, False) for r in R},
    # CANCELED is final for everything but money.
    **{(P.CANCELED, r): (P.CANCELED, False) for r in R if r is not R.SUCCEEDED},
    # The open states (and FAILED, which a Stripe retry can reopen) follow the report.
    **{
        (s, r): (P(r.value), False)
        for s in (P.CREATED, P.PENDING, P.REQUIRES_ACTION, P.FAILED)
        for r in (R.PENDING, R.REQUIRES_ACTION, R.FAILED, R.CANCELED)
    },
}


def test_payment_table_is_complete_and_as_written() -> None:
    assert set(PAYMENT_TRANSITIONS) == {(s, r) for s in P for r in R}
    for (state, report), (new, settles) in PAYMENT_TABLE.items():
        step = payment_step(state, report)
        assert (step.state, step.settle) == (new, settles), (state, report)
    assert len(PAYMENT_TABLE) == len(PAYMENT_TRANSITIONS)
    assert [s for s in P if s.settled] == [P.SUCCEEDED]


@pytest.mark.parametrize(
    ("state", "status", "expected"),
    [
        (TokenState.PENDING, TokenStatus.ACCEPTED, (TokenState.APPLIED, True, False)),
        (TokenState.SENT, TokenStatus.ALREADY_APPLIED, (TokenState.APPLIED, True, False)),
        (TokenState.APPLIED, TokenStatus.ACCEPTED, (TokenState.APPLIED, False, False)),
        (TokenState.SENT, TokenStatus.BAD_SIGNATURE, (TokenState.REJECTED, True, True)),
        (TokenState.PENDING, TokenStatus.EXPIRED, (TokenState.REJECTED, True, True)),
        (TokenState.REJECTED, TokenStatus.TOO_OLD, (TokenState.REJECTED, False, False)),
        (TokenState.APPLIED, TokenStatus.TOO_OLD, (TokenState.APPLIED, False, False)),
        (TokenState.REJECTED, TokenStatus.ALREADY_APPLIED, (TokenState.APPLIED, True, False)),
        (TokenState.SENT, TokenStatus.PENDING, (TokenState.SENT, False, False)),
        (TokenState.SENT, TokenStatus.NONE, (TokenState.SENT, False, False)),
    ],
)
def test_token_results(
    state: TokenState, status: TokenStatus, expected: tuple[TokenState, bool, bool]
) -> None:
    step = token_step(state, status)
    assert (step.state, step.changed, step.alert) == expected


def test_every_final_refusal_rejects_an_in_flight_token() -> None:
    for status in TokenStatus:
        for state in (TokenState.PENDING, TokenState.SENT):
            step = token_step(state, status)
            if not status.final:
                assert step.state is state
            elif status.applied:
                assert step.state is TokenState.APPLIED
            else:
                assert (step.state, step.alert) == (TokenState.REJECTED, True)
    assert [s for s in TokenState if s.in_flight] == [TokenState.PENDING, TokenState.SENT]


def test_retry_delay_doubles_up_to_the_cap_with_equal_jitter() -> None:
    top = [retry_delay_s(a, base_s=5, cap_s=60, uniform=lambda _lo, hi: hi) for a in range(1, 7)]
    assert top == [5, 10, 20, 40, 60, 60]
    low = [retry_delay_s(a, base_s=5, cap_s=60, uniform=lambda lo, _hi: lo) for a in (1, 5)]
    assert low == [2.5, 30]
    assert retry_delay_s(10_000, base_s=1, cap_s=300, uniform=lambda _lo, hi: hi) == 300
    with pytest.raises(ValueError, match="attempts"):
        retry_delay_s(0, base_s=1, cap_s=2, uniform=lambda lo, _hi: lo)


def rule(kind: str, value: int, account: int, pkind: str = "RESELLER") -> TopupRule:
    return TopupRule(kind=kind, value=value, partner_account_id=account, partner_kind=pkind)


UTILITY = rule("REMAINDER", 0, 1, "UTILITY")


def test_topup_split_pays_fee_shares_from_the_remainder_partner() -> None:
    shares = topup_split(
        2_000,
        [
            rule("BASIS_POINTS", 250, 100),
            rule("FIXED_PER_TOPUP", 30_000, 200, "PAYMENT_FEE"),
            UTILITY,
        ],
    )
    assert shares == TopupSplit(
        1,
        (
            SplitLine(partner_account_id=100, partner_kind="RESELLER", amount_minor=50),
            SplitLine(partner_account_id=200, partner_kind="PAYMENT_FEE", amount_minor=30),
        ),
    )
    # Floored to minor units (the fraction stays with the payer); a zero share is no line.
    assert topup_split(39, [rule("BASIS_POINTS", 250, 100), UTILITY]) == TopupSplit(1, ())
    assert topup_split(41, [rule("BASIS_POINTS", 250, 100), UTILITY]) == TopupSplit(
        1, (SplitLine(partner_account_id=100, partner_kind="RESELLER", amount_minor=1),)
    )
    assert topup_split(100, [rule("FIXED_PER_TOPUP", 999, 100), UTILITY]) == TopupSplit(1, ())
    # One partner holding two rules gets one line.
    both = [rule("BASIS_POINTS", 100, 100), rule("FIXED_PER_TOPUP", 5_000, 100), UTILITY]
    assert topup_split(1_000, both) == TopupSplit(
        1, (SplitLine(partner_account_id=100, partner_kind="RESELLER", amount_minor=15),)
    )
    # Fees larger than the amount are paid anyway (the payer's remainder goes negative).
    big = topup_split(10, [rule("FIXED_PER_TOPUP", 50_000, 100), UTILITY])
    assert big is not None
    assert big.lines[0].amount_minor == 50
    assert topup_split(100, []) is None


@pytest.mark.parametrize(
    ("amount", "rules", "error", "match"),
    [
        (100, [rule("BASIS_POINTS", 250, 100)], InvalidSplitRuleError, "exactly one REMAINDER"),
        (100, [rule("PER_KWH", 5, 100), UTILITY], InvalidSplitRuleError, "does not apply"),
        (100, [rule("FIXED", 5, 100), UTILITY], InvalidSplitRuleError, "TOPUP rule set"),
        (100, [rule("BASIS_POINTS", 10_001, 100), UTILITY], InvalidSplitRuleError, "0..10000"),
        (100, [UTILITY, UTILITY], InvalidSplitRuleError, "exactly one REMAINDER"),
        (0, [UTILITY], SplitError, "a top-up is"),
        (2**32, [UTILITY], SplitError, "a top-up is"),
    ],
)
def test_rule_sets_that_cannot_apply_to_a_topup(
    amount: int, rules: list[TopupRule], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        topup_split(amount, rules)


@given(
    amount=st.integers(1, 2**32 - 1),
    bps=st.lists(st.integers(0, 2_500), max_size=4),
)
def test_basis_point_shares_never_exceed_their_exact_value(amount: int, bps: list[int]) -> None:
    rules = [rule("BASIS_POINTS", b, 100 + i) for i, b in enumerate(bps)]
    shares = topup_split(amount, [*rules, UTILITY])
    assert shares is not None
    paid = {line.partner_account_id: line.amount_minor for line in shares.lines}
    for i, b in enumerate(bps):
        exact = amount * b / 10_000
        assert exact - 1 < paid.get(100 + i, 0) <= exact
    assert sum(paid.values()) <= amount
