"""The token path's table and intake decisions, table-first (no I/O)."""

from __future__ import annotations

import pytest

from firmware_protocol import messages
from firmware_protocol.messages import Ed25519Signer
from firmware_protocol.mqtt import TokenDelivery
from firmware_protocol.replay import ReplayWindow
from firmware_protocol.status import TokenStatus
from firmware_protocol.vectors import TEST_SEED_2
from gateway.errors import TokenFlowError
from gateway.token_flow import (
    RESUME,
    TRANSITIONS,
    Action,
    IntakeKind,
    Known,
    TokenEvent,
    TokenState,
    decide_intake,
    next_state,
    window_after,
)
from tests.support.meters import FORGER, SIGNER, credit_token

METER = 4_500_000_001
NOW = 1_790_000_000
TRUSTED = {SIGNER.key_id: SIGNER.private_key.public_key()}

S, R, D = TokenState.STORED, TokenState.RESULT_READ, TokenState.DONE
E = TokenEvent


@pytest.mark.parametrize(
    ("state", "event", "after"),
    [
        (None, E.ACCEPT, S),
        (None, E.ANSWER, R),
        (S, E.METER_ANSWERED, R),
        (S, E.METER_UNREACHABLE, S),
        (R, E.PUBLISHED, D),
    ],
)
def test_allowed_transitions(
    state: TokenState | None, event: TokenEvent, after: TokenState
) -> None:
    assert next_state(state, event) is after


def test_every_other_transition_is_refused() -> None:
    for state in (None, *TokenState):
        for event in TokenEvent:
            if (state, event) in TRANSITIONS:
                continue
            with pytest.raises(TokenFlowError, match=f"token event {event.value} is not allowed"):
                next_state(state, event)


def test_resume_table_writes_stored_publishes_results_and_leaves_done_alone() -> None:
    assert RESUME == {S: Action.WRITE, R: Action.PUBLISH, D: Action.NOTHING}
    # Following RESUME from any state ends at DONE using only allowed transitions.
    for start in TokenState:
        state = start
        for _ in range(3):
            action = RESUME[state]
            if action is Action.WRITE:
                state = next_state(state, E.METER_ANSWERED)
            elif action is Action.PUBLISH:
                state = next_state(state, E.PUBLISHED)
        assert state is D


def delivery(msg: bytes, token_id: int = 1, meter: int = METER) -> TokenDelivery:
    return TokenDelivery(msg=msg, token_id=token_id, meter=meter)


def decide(
    d: TokenDelivery,
    *,
    served: bool = True,
    known: Known | None = None,
    window: ReplayWindow | None = None,
):  # type: ignore[no-untyped-def]
    return decide_intake(
        d,
        meter_served=served,
        known=known,
        trusted=TRUSTED,
        window=window or ReplayWindow(),
        now=NOW,
    )


STRANGER = Ed25519Signer(99, messages.load_private_key(TEST_SEED_2))

# (case, delivery, expected kind, expected status, expected token id)
CASES = [
    ("valid", delivery(credit_token(METER, 1, 500, now=NOW)), IntakeKind.STORE, None, 1),
    (
        "forged",
        delivery(credit_token(METER, 1, 500, now=NOW, signer=FORGER)),
        IntakeKind.ANSWER,
        TokenStatus.BAD_SIGNATURE,
        1,
    ),
    (
        "unknown key",
        delivery(credit_token(METER, 1, 500, now=NOW, signer=STRANGER)),
        IntakeKind.ANSWER,
        TokenStatus.UNKNOWN_KEY,
        1,
    ),
    (
        "foreign",
        delivery(credit_token(METER + 1, 1, 500, now=NOW)),
        IntakeKind.ANSWER,
        TokenStatus.WRONG_METER,
        1,
    ),
    (
        "expired",
        delivery(credit_token(METER, 1, 500, now=NOW, valid_from=NOW - 100, valid_s=50)),
        IntakeKind.ANSWER,
        TokenStatus.EXPIRED,
        1,
    ),
    (
        "not yet valid",
        delivery(credit_token(METER, 1, 500, now=NOW, valid_from=NOW + 301)),
        IntakeKind.ANSWER,
        TokenStatus.NOT_YET_VALID,
        1,
    ),
    ("garbage", delivery(b"\x02" + bytes(100)), IntakeKind.ANSWER, TokenStatus.UNKNOWN_VERSION, 1),
    (
        "id mismatch",
        delivery(credit_token(METER, 2, 500, now=NOW), token_id=3),
        IntakeKind.ANSWER,
        TokenStatus.MALFORMED,
        3,
    ),
]


@pytest.mark.parametrize(
    ("case", "d", "kind", "status", "token_id"), CASES, ids=[c[0] for c in CASES]
)
def test_intake_checks_before_touching_the_meter(
    case: str, d: TokenDelivery, kind: IntakeKind, status: TokenStatus | None, token_id: int
) -> None:
    intake = decide(d)
    assert (intake.kind, intake.status, intake.token_id) == (kind, status, token_id)
    if kind is IntakeKind.STORE:
        assert intake.message is not None
        assert intake.message.header.msg_id == token_id
    else:
        assert intake.message is None
        assert intake.reason


def test_a_meter_not_served_is_wrong_meter_without_verifying() -> None:
    intake = decide(delivery(b"junk"), served=False)
    assert (intake.kind, intake.status) == (IntakeKind.ANSWER, TokenStatus.WRONG_METER)


def test_replay_window_answers_already_applied_and_too_old() -> None:
    window = ReplayWindow().accept(100)
    applied = decide(delivery(credit_token(METER, 100, 5, now=NOW), token_id=100), window=window)
    assert (applied.kind, applied.status, applied.token_id) == (
        IntakeKind.ANSWER,
        TokenStatus.ALREADY_APPLIED,
        100,
    )
    old = decide(delivery(credit_token(METER, 30, 5, now=NOW), token_id=30), window=window)
    assert (old.kind, old.status) == (IntakeKind.ANSWER, TokenStatus.TOO_OLD)
    newer = decide(delivery(credit_token(METER, 99, 5, now=NOW), token_id=99), window=window)
    assert newer.kind is IntakeKind.STORE  # out of order, inside the window, not seen


def test_repeats_of_the_same_bytes() -> None:
    d = delivery(credit_token(METER, 1, 500, now=NOW))
    done = decide(d, known=Known(state=D, status=TokenStatus.ACCEPTED, credit_after_milli=7))
    assert (done.kind, done.status, done.credit_after_milli) == (
        IntakeKind.REPUBLISH,
        TokenStatus.ACCEPTED,
        7,
    )
    for state in (S, R):
        busy = decide(d, known=Known(state=state, status=None, credit_after_milli=None))
        assert (busy.kind, busy.status) == (IntakeKind.IN_PROGRESS, TokenStatus.PENDING)


@pytest.mark.parametrize(
    ("status", "moves"),
    [(s, s.applied) for s in TokenStatus],
)
def test_window_moves_only_when_the_meter_applied(status: TokenStatus, moves: bool) -> None:
    window = ReplayWindow().accept(5)
    after = window_after(window, 7, status)
    assert (after != window) is moves
    assert window_after(after, 7, status) == after  # idempotent
