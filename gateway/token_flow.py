"""The token path as a table: states, events, transitions, what to do on restart, intake decisions.

Everything that decides the fate of a delivered signed message (credit token, tariff or
key change) lives here, free of I/O (house style rule 2, after h11's ``_state.py``); the
service only executes what these functions return and persists the state.

Life cycle of one delivery (DESIGN §6 step 4)::

    (new) ──ACCEPT──▶ STORED ──METER_ANSWERED──▶ RESULT_READ ──PUBLISHED──▶ DONE
      │                 ▲  │                          ▲
      │                 └──┘ METER_UNREACHABLE        │
      └──────────────────────ANSWER───────────────────┘  (refused by the gateway, or
                                                          already applied per its window)

* ``STORED``: verified by the gateway and stored, then acknowledged to the broker
  (PUBACK); not yet known to be processed by the meter.
* ``RESULT_READ``: the outcome is known and stored (the meter's status and credit, or
  the gateway's own refusal); not yet published.
* ``DONE``: the result was published and the broker acknowledged it.

Restart recovery (:data:`RESUME`): ``STORED`` is written to the meter again — safe,
because the meter's anti-replay window answers ``already_applied`` if the first write
got through (SPEC.md §3) — and ``RESULT_READ`` is published again.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from firmware_protocol import messages
from firmware_protocol.errors import ProtocolError
from firmware_protocol.mqtt import TokenDelivery
from firmware_protocol.replay import ReplayWindow, Verdict
from firmware_protocol.status import TokenStatus, status_for_error
from gateway.errors import TokenFlowError


class TokenState(enum.StrEnum):
    """Where a stored delivery stands; the value is what the store keeps."""

    STORED = "stored"
    RESULT_READ = "result_read"
    DONE = "done"


class TokenEvent(enum.Enum):
    """What can happen to a delivery."""

    ACCEPT = "accept"  #: intake: the gateway's checks passed; store it for the meter
    ANSWER = "answer"  #: intake: the outcome is known without the meter
    METER_ANSWERED = "meter_answered"  #: the meter processed it and reported a final status
    METER_UNREACHABLE = "meter_unreachable"  #: no final status from the meter: retry later
    PUBLISHED = "published"  #: the result was acknowledged by the broker


class Action(enum.Enum):
    """What the worker does with a delivery in a given state."""

    WRITE = "write"  #: write the message to the meter and read its status and credit
    PUBLISH = "publish"  #: publish the stored result
    NOTHING = "nothing"


#: ``(state, event) → next state``; ``None`` is a delivery not stored yet. Anything else
#: is a bug and raises :class:`TokenFlowError`.
TRANSITIONS: Final[Mapping[tuple[TokenState | None, TokenEvent], TokenState]] = MappingProxyType(
    {
        (None, TokenEvent.ACCEPT): TokenState.STORED,
        (None, TokenEvent.ANSWER): TokenState.RESULT_READ,
        (TokenState.STORED, TokenEvent.METER_ANSWERED): TokenState.RESULT_READ,
        (TokenState.STORED, TokenEvent.METER_UNREACHABLE): TokenState.STORED,
        (TokenState.RESULT_READ, TokenEvent.PUBLISHED): TokenState.DONE,
    }
)

#: What to do with a delivery found in the store at start-up (or still open later).
RESUME: Final[Mapping[TokenState, Action]] = MappingProxyType(
    {
        TokenState.STORED: Action.WRITE,
        TokenState.RESULT_READ: Action.PUBLISH,
        TokenState.DONE: Action.NOTHING,
    }
)


def next_state(state: TokenState | None, event: TokenEvent) -> TokenState:
    """The state after ``event``; raises :class:`TokenFlowError` if the table forbids it."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise TokenFlowError(
            f"token event {event.value} is not allowed in state {state or 'new'}"
        ) from None


# ------------------------------------------------------------------------------ intake


class IntakeKind(enum.Enum):
    """What to do with a token delivery that just arrived."""

    STORE = "store"  #: new and valid: store as STORED, acknowledge, write to the meter
    ANSWER = "answer"  #: outcome known now: store as RESULT_READ, acknowledge, publish
    REPUBLISH = "republish"  #: the same bytes were completed before: publish that result again
    IN_PROGRESS = "in_progress"  #: the same bytes are stored and not done: report pending


@dataclass(frozen=True, slots=True, kw_only=True)
class Known:
    """An earlier delivery of the same bytes to the same meter, as the store has it."""

    state: TokenState
    status: TokenStatus | None
    credit_after_milli: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Intake:
    """The decision for one delivery.

    ``token_id`` is what the result will carry: the signed ``msg_id`` once verified, else
    the delivery's own (unverified) claim, which is what the sender correlates on.
    """

    kind: IntakeKind
    token_id: int
    status: TokenStatus | None = None
    credit_after_milli: int | None = None
    message: messages.Message | None = None
    reason: str = ""


def decide_intake(
    delivery: TokenDelivery,
    *,
    meter_served: bool,
    known: Known | None,
    trusted: Mapping[int, Ed25519PublicKey],
    window: ReplayWindow,
    now: int,
) -> Intake:
    """Decide before touching the meter: duplicates, then signature, key, meter, expiry, replay.

    The meter repeats every check itself; the gateway checks first so that a forged,
    foreign, expired or replayed message never reaches the meter's token block.
    """
    claimed = delivery.token_id
    if known is not None:
        if known.state is TokenState.DONE:
            return Intake(
                kind=IntakeKind.REPUBLISH,
                token_id=claimed,
                status=known.status,
                credit_after_milli=known.credit_after_milli,
                reason="delivered again after completion",
            )
        return Intake(
            kind=IntakeKind.IN_PROGRESS,
            token_id=claimed,
            status=TokenStatus.PENDING,
            reason="delivered again while in progress",
        )
    if not meter_served:
        return Intake(
            kind=IntakeKind.ANSWER,
            token_id=claimed,
            status=TokenStatus.WRONG_METER,
            reason=f"meter {delivery.meter} is not served by this gateway",
        )
    try:
        message = messages.verify(delivery.msg, trusted, meter_id=delivery.meter, now=now)
    except ProtocolError as exc:
        return Intake(
            kind=IntakeKind.ANSWER, token_id=claimed, status=status_for_error(exc), reason=str(exc)
        )
    msg_id = message.header.msg_id
    if msg_id != claimed:
        return Intake(
            kind=IntakeKind.ANSWER,
            token_id=claimed,
            status=TokenStatus.MALFORMED,
            reason=f"delivery says token_id {claimed}, the signed message says {msg_id}",
        )
    verdict = window.verdict(msg_id)
    if verdict is Verdict.ALREADY_APPLIED:
        return Intake(
            kind=IntakeKind.ANSWER,
            token_id=msg_id,
            status=TokenStatus.ALREADY_APPLIED,
            reason="the meter applied this id before (gateway's window)",
        )
    if verdict is Verdict.TOO_OLD:
        return Intake(
            kind=IntakeKind.ANSWER,
            token_id=msg_id,
            status=TokenStatus.TOO_OLD,
            reason=f"id below the window (highest {window.highest})",
        )
    return Intake(kind=IntakeKind.STORE, token_id=msg_id, message=message)


def window_after(window: ReplayWindow, msg_id: int, status: TokenStatus) -> ReplayWindow:
    """The gateway's copy of the meter's window after the meter reported ``status`` for ``msg_id``.

    Only an applied outcome moves it (the meter moved its own then); anything else, or an
    id the window already holds, leaves it as it was.
    """
    if status.applied and window.verdict(msg_id) is Verdict.NEW:
        return window.accept(msg_id)
    return window
