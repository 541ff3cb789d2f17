"""The credit/relay transition table, tested table-first: every row, the order between rows."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firmware_protocol.modbus_map import CreditState
from meter_sim.states import (
    CREDIT_RULES,
    RECONNECT,
    Cause,
    Conditions,
    Reconnect,
    ec_may_activate,
    settle,
)

LOW = 500  # low-credit threshold
EC = 1_000  # emergency credit limit

S = CreditState


def cond(
    credit: int,
    *,
    low: int = LOW,
    ec_active: bool = False,
    ec_limit: int = EC,
    friendly: bool = False,
    supplying: bool = True,
    disconnected: bool = False,
) -> Conditions:
    return Conditions(
        credit_milli=credit,
        low_threshold_milli=low,
        ec_active=ec_active,
        ec_limit_milli=ec_limit,
        friendly=friendly,
        supplying=supplying,
        disconnected=disconnected,
    )


# (id, conditions, expected state, supply allowed). Rows are grouped by the rule that
# must win; the "beats" rows pin the order: a later rule's condition also holds there.
TABLE: list[tuple[str, Conditions, CreditState, bool]] = [
    # 1. credit above threshold
    ("above-threshold", cond(LOW + 1), S.IN_CREDIT, True),
    ("above-threshold beats everything", cond(LOW + 1, ec_active=True, friendly=True,
                                              supplying=False, disconnected=True),
     S.IN_CREDIT, True),
    ("threshold 0, 1 milli", cond(1, low=0), S.IN_CREDIT, True),
    # 2. credit low but positive
    ("at threshold is low", cond(LOW), S.LOW_CREDIT, True),
    ("1 milli is low", cond(1), S.LOW_CREDIT, True),
    ("low beats emergency in use", cond(1, ec_active=True), S.LOW_CREDIT, True),
    ("low beats friendly", cond(1, friendly=True), S.LOW_CREDIT, True),
    ("low while open: allowed", cond(1, supplying=False), S.LOW_CREDIT, True),
    ("low after a disconnection", cond(1, disconnected=True, ec_active=True), S.LOW_CREDIT,
     True),
    # 3. emergency credit left
    ("zero credit on EC", cond(0, ec_active=True), S.EMERGENCY_IN_USE, True),
    ("last milli of EC", cond(-EC + 1, ec_active=True), S.EMERGENCY_IN_USE, True),
    ("EC while open (just requested)", cond(-5, ec_active=True, supplying=False),
     S.EMERGENCY_IN_USE, True),
    ("EC beats friendly", cond(-5, ec_active=True, friendly=True), S.EMERGENCY_IN_USE, True),
    # 4. friendly hours while supplying
    ("friendly keeps supply at 0", cond(0, friendly=True), S.FRIENDLY_HOURS_DEBT, True),
    ("friendly beats EC available", cond(-50_000, friendly=True), S.FRIENDLY_HOURS_DEBT,
     True),
    ("friendly beats EC exhausted", cond(-EC, ec_active=True, friendly=True),
     S.FRIENDLY_HOURS_DEBT, True),
    ("friendly without EC configured", cond(-1, ec_limit=0, friendly=True),
     S.FRIENDLY_HOURS_DEBT, True),
    # 5. exhausted, emergency credit not yet taken
    ("exhausted at 0", cond(0), S.EMERGENCY_AVAILABLE, False),
    ("last milli before the EC limit", cond(-EC + 1), S.EMERGENCY_AVAILABLE, False),
    ("friendly does not reconnect", cond(-1, friendly=True, supplying=False),
     S.EMERGENCY_AVAILABLE, False),
    # 6. exhausted
    ("EC exhausted exactly", cond(-EC, ec_active=True), S.DISCONNECTED, False),
    ("EC overdrawn", cond(-EC - 1, ec_active=True), S.DISCONNECTED, False),
    # EC is no longer offered once the debt reaches the limit: it could not restore supply.
    ("debt at the EC limit, EC not taken", cond(-EC), S.DISCONNECTED, False),
    ("deep debt, EC not taken", cond(-10 * EC, friendly=True, supplying=False),
     S.DISCONNECTED, False),
    ("no EC configured", cond(0, ec_limit=0), S.DISCONNECTED, False),
    ("friendly, off, EC spent", cond(-EC, ec_active=True, friendly=True, supplying=False),
     S.DISCONNECTED, False),
    ("friendly, off, no EC", cond(0, ec_limit=0, friendly=True, supplying=False),
     S.DISCONNECTED, False),
    # A partial top-up after EC ran out leaves credit inside the EC allowance: the
    # allowance was spent once and must not re-open (only credit > 0 reconnects).
    ("disconnected stays off inside EC range", cond(-EC + 1, ec_active=True, supplying=False,
                                                    disconnected=True),
     S.DISCONNECTED, False),
    ("disconnected stays off at 0", cond(0, ec_active=True, supplying=False,
                                         disconnected=True),
     S.DISCONNECTED, False),
]  # fmt: skip


@pytest.mark.parametrize(
    ("conditions", "state", "allowed"),
    [pytest.param(c, s, a, id=name) for name, c, s, a in TABLE],
)
def test_credit_rules_table(conditions: Conditions, state: CreditState, allowed: bool) -> None:
    rule = settle(conditions)
    assert (rule.state, rule.allowed) == (state, allowed)


def test_every_rule_is_reached_by_the_table() -> None:
    reached = {settle(c).name for _, c, _, _ in TABLE}
    assert reached == {rule.name for rule in CREDIT_RULES}


def test_rules_are_ordered_as_documented() -> None:
    assert [(r.state, r.allowed) for r in CREDIT_RULES] == [
        (S.IN_CREDIT, True),
        (S.LOW_CREDIT, True),
        (S.EMERGENCY_IN_USE, True),
        (S.FRIENDLY_HOURS_DEBT, True),
        (S.EMERGENCY_AVAILABLE, False),
        (S.DISCONNECTED, False),
    ]
    # OUT_OF_CREDIT is never produced (the meter disconnects at once; states.py docstring).
    assert S.OUT_OF_CREDIT not in {r.state for r in CREDIT_RULES}


def test_disconnected_defaults_to_false() -> None:
    c = Conditions(
        credit_milli=-1, low_threshold_milli=0, ec_active=True, ec_limit_milli=10,
        friendly=False, supplying=False,
    )  # fmt: skip
    assert c.disconnected is False
    assert settle(c).state is S.EMERGENCY_IN_USE


@given(
    st.builds(
        Conditions,
        credit_milli=st.integers(-5_000, 5_000),
        low_threshold_milli=st.integers(0, 2_000),
        ec_active=st.booleans(),
        ec_limit_milli=st.integers(0, 2_000),
        friendly=st.booleans(),
        supplying=st.booleans(),
        disconnected=st.booleans(),
    )
)
def test_settle_is_first_match_and_invariants_hold(c: Conditions) -> None:
    credit, low, ec_limit = c.credit_milli, c.low_threshold_milli, c.ec_limit_milli
    ec_active, friendly, supplying = c.ec_active, c.friendly, c.supplying
    rule = settle(c)
    assert rule is next(r for r in CREDIT_RULES if r.when(c))
    # Supply with no credit only on emergency credit or in a friendly period already on.
    if rule.allowed and credit <= 0:
        assert (ec_active and credit > -ec_limit and not c.disconnected) or (friendly and supplying)
    # Positive credit always allows supply; the low-credit flag follows the threshold.
    if credit > 0:
        assert rule.allowed
        assert rule.state is (S.IN_CREDIT if credit > low else S.LOW_CREDIT)
    # A meter that is off never comes back through friendly hours.
    if not supplying and credit <= 0 and not ec_active:
        assert not rule.allowed


# --------------------------------------------------------------------------- reconnect


@pytest.mark.parametrize(
    ("cause", "auto", "expected"),
    [
        (Cause.CREDIT, True, Reconnect.CLOSE),
        (Cause.CREDIT, False, Reconnect.ARM),
        (Cause.REMOTE, True, Reconnect.CLOSE),
        (Cause.REMOTE, False, Reconnect.ARM),
        (Cause.EMERGENCY, True, Reconnect.CLOSE),
        (Cause.EMERGENCY, False, Reconnect.CLOSE),
        (Cause.BUTTON, True, Reconnect.CLOSE),
        (Cause.BUTTON, False, Reconnect.CLOSE),
    ],
)
def test_reconnect_table(cause: Cause, auto: bool, expected: Reconnect) -> None:
    assert RECONNECT[(cause, auto)] is expected


def test_reconnect_table_is_complete() -> None:
    assert set(RECONNECT) == set(itertools.product(Cause, (True, False)))


# --------------------------------------------------------------------------- EC offer


@pytest.mark.parametrize("state", list(CreditState))
@pytest.mark.parametrize("ec_active", [False, True])
@pytest.mark.parametrize("limit", [0, EC])
def test_ec_may_activate(state: CreditState, ec_active: bool, limit: int) -> None:
    offered = state in (S.LOW_CREDIT, S.EMERGENCY_AVAILABLE, S.FRIENDLY_HOURS_DEBT)
    expected = offered and not ec_active and limit > 0
    assert ec_may_activate(state, ec_active=ec_active, ec_limit_milli=limit) is expected
