"""Rules of the top-up → token path (pure): payment and token life cycles, top-up splits, retries.

Two state machines, each a table (house style rule 2), and the arithmetic the services
apply inside their units of work:

**Payment** (one row per ``(supply account, Idempotency-Key)``)::

    CREATED ──provider answers──▶ PENDING ⇄ REQUIRES_ACTION
       │                            │
       └────────────┬───────────────┘
                    ├──succeeded──▶ SUCCEEDED   (final: ledger credit + token, exactly once)
                    ├──failed─────▶ FAILED      (a later "succeeded" still settles: a Stripe
                    │                            customer may retry on the same PaymentIntent)
                    └──canceled───▶ CANCELED

A provider that reports ``succeeded`` has taken the customer's money, so that report
settles from *every* unsettled state, even ``CANCELED`` (which should never happen and is
logged by the service). Nothing moves a payment out of ``SUCCEEDED``: refunds are a
separate flow with their own transfers.

**Token** (the outbox row of one signed message)::

    PENDING ──published──▶ SENT ──(no result; backoff)──▶ SENT …
                             │
                             ├──accepted / already applied──▶ APPLIED
                             └──refused (bad signature, expired, …)──▶ REJECTED

A result is idempotent: the same outcome again changes nothing. ``APPLIED`` is the truth
whenever a meter says so — also after ``REJECTED`` (a refusal for a re-delivery, e.g.
``too_old``, can arrive before the lost acceptance of the first delivery is re-reported) —
and a refusal never demotes ``APPLIED``. A rejected token is never re-issued under a new id
by this code: an operator looks at the alert (DESIGN §6).

**Money flow of a top-up** (one linked ledger batch, DESIGN §3 and §6 step 2)::

    CLEARING  ──amount──▶ PREPAID                  (TOPUP: the customer's credit)
    REMAINDER ──share───▶ partner of each fee rule (SPLIT; FEE for a PAYMENT_FEE partner)

The customer's credit — ledger and meter token alike — is always the full amount paid.
Per-top-up split rules (a reseller's sales commission, a payment-processing fee) are the
seller's cost of selling: they are paid by the rule set's REMAINDER partner (normally
the utility: what the platform owes it), not out of the customer's credit and not out of
the clearing account (which must keep mirroring what the provider holds for us). The
rule set and its arithmetic are the revenue split's (:mod:`backend.domain.split`); the
REMAINDER share is not posted at top-up, because the amount is not earned until consumed.
The payer's account therefore runs ahead negative until consumption earns it money:
provision it without a lower limit (``min_balance`` ``None``); a limit that refuses a
share makes the settlement fail loudly (alert, non-2xx to the provider, which
redelivers) rather than credit the customer with the books half-posted. A rule whose
partner belongs to a reseller applies only to the top-ups of that reseller's customers.
Customer-paid fees (credit < amount) are not supported yet.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from backend.domain import split
from backend.domain.split import InvalidSplitRuleError, SplitError
from firmware_protocol.status import TokenStatus
from firmware_protocol.units import MILLI_PER_MINOR

#: Validity of an issued credit token; the dispatcher gives up on it (with an alert) after.
TOKEN_TTL_S: Final = 30 * 24 * 3600
#: Largest top-up a credit token can carry (its amount field is a u32, SPEC.md §2.2).
MAX_TOKEN_AMOUNT_MINOR: Final = 2**32 - 1
#: Largest per-meter message id (a u32 in the signed header).
MAX_MSG_ID: Final = 2**32 - 1
#: ``split_rules.applies_to`` of the rules applied at top-up time.
APPLIES_TO_TOPUP: Final = split.SplitContext.TOPUP.value
#: ``partners.kind`` whose shares are payment fees (posted as FEE, shown as fees).
FEE_PARTNER_KIND: Final = "PAYMENT_FEE"
#: ``partners.kind`` whose shares are taxes (shown as taxes on a receipt).
TAX_PARTNER_KIND: Final = "TAX_AUTHORITY"


class PaymentState(enum.StrEnum):
    """Where a payment stands in our database; stored as its name."""

    CREATED = "CREATED"  #: row written, the provider has not answered yet
    PENDING = "PENDING"
    REQUIRES_ACTION = "REQUIRES_ACTION"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELED = "CANCELED"

    @property
    def settled(self) -> bool:
        """True once the money has been credited (nothing changes it afterwards)."""
        return self is PaymentState.SUCCEEDED


class Report(enum.StrEnum):
    """What a provider says about a payment (an intent, a webhook, a status poll)."""

    PENDING = "PENDING"
    REQUIRES_ACTION = "REQUIRES_ACTION"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELED = "CANCELED"


@dataclass(frozen=True, slots=True)
class PaymentStep:
    """The outcome of a report: the new state, and whether this step credits the money."""

    state: PaymentState
    settle: bool


_P = PaymentState
_UNSETTLED: Final = (_P.CREATED, _P.PENDING, _P.REQUIRES_ACTION, _P.FAILED, _P.CANCELED)


def _payment_table() -> dict[tuple[PaymentState, Report], PaymentStep]:
    table: dict[tuple[PaymentState, Report], PaymentStep] = {}
    for state in PaymentState:
        for report in Report:
            table[state, report] = PaymentStep(state, settle=False)  # default: no change
    for state in _UNSETTLED:
        table[state, Report.SUCCEEDED] = PaymentStep(_P.SUCCEEDED, settle=True)
    for state in (_P.CREATED, _P.PENDING, _P.REQUIRES_ACTION, _P.FAILED):
        table[state, Report.FAILED] = PaymentStep(_P.FAILED, settle=False)
        table[state, Report.CANCELED] = PaymentStep(_P.CANCELED, settle=False)
    for state in (_P.CREATED, _P.PENDING, _P.REQUIRES_ACTION, _P.FAILED):
        # FAILED → PENDING: the customer tries again on the same provider payment.
        table[state, Report.PENDING] = PaymentStep(_P.PENDING, settle=False)
        table[state, Report.REQUIRES_ACTION] = PaymentStep(_P.REQUIRES_ACTION, settle=False)
    return table


#: (state, report) → step, for every pair.
PAYMENT_TRANSITIONS: Final = MappingProxyType(_payment_table())


def payment_step(state: PaymentState, report: Report) -> PaymentStep:
    """Where a payment in ``state`` goes when the provider reports ``report``."""
    return PAYMENT_TRANSITIONS[state, report]


class TokenState(enum.StrEnum):
    """Where an outbox token stands; stored as its name."""

    PENDING = "PENDING"  #: issued, never published
    SENT = "SENT"  #: published at least once, no final result yet
    APPLIED = "APPLIED"  #: the meter has the credit
    REJECTED = "REJECTED"  #: refused by the meter or the gateway, or given up on

    @property
    def in_flight(self) -> bool:
        """True while the dispatcher still (re)publishes the token."""
        return self in (TokenState.PENDING, TokenState.SENT)


#: ``tokens.result_status`` of a token given up on at expiry without any final result.
UNCONFIRMED: Final = "UNCONFIRMED"


@dataclass(frozen=True, slots=True)
class TokenStep:
    """The outcome of a token result: the new state, and whether to raise an alert."""

    state: TokenState
    changed: bool
    alert: bool


def token_step(state: TokenState, status: TokenStatus) -> TokenStep:
    """Where a token in ``state`` goes on a result carrying ``status``.

    Transient statuses (``none``, ``pending``) change nothing. See the module docstring for
    why ``APPLIED`` wins over ``REJECTED`` in both orders.
    """
    if not status.final:
        return TokenStep(state, changed=False, alert=False)
    if status.applied:
        return TokenStep(TokenState.APPLIED, changed=state is not TokenState.APPLIED, alert=False)
    if state.in_flight:
        return TokenStep(TokenState.REJECTED, changed=True, alert=True)
    return TokenStep(state, changed=False, alert=False)


def retry_delay_s(
    attempts: int, *, base_s: float, cap_s: float, uniform: Callable[[float, float], float]
) -> float:
    """Seconds until the next publish of a token already published ``attempts`` times (>= 1).

    Capped exponential growth with equal jitter (AWS Architecture Blog, "Exponential
    Backoff And Jitter", 2015): ``base * 2**(attempts-1)`` up to ``cap``, spread over
    ``[d/2, d]`` so a broker restart does not bring every retry back in the same instant.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    nominal = min(cap_s, base_s * 2 ** min(attempts - 1, 62))
    return uniform(nominal / 2, nominal)


@dataclass(frozen=True, slots=True, kw_only=True)
class TopupRule:
    """One ``split_rules`` row of a TOPUP rule set, with its partner's account and kind."""

    kind: str
    value: int
    partner_account_id: int
    partner_kind: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SplitLine:
    """One share of a top-up paid out now: ``amount_minor`` to a partner's account."""

    partner_account_id: int
    partner_kind: str
    amount_minor: int


@dataclass(frozen=True, slots=True)
class TopupSplit:
    """The shares paid out at top-up time, all by ``payer_account_id`` (the REMAINDER partner)."""

    payer_account_id: int
    lines: tuple[SplitLine, ...]


def topup_split(amount_minor: int, rules: Sequence[TopupRule]) -> TopupSplit | None:
    """The shares of a top-up under its TOPUP rule set; ``None`` when there are no rules.

    The rule set is the revenue split's (:func:`backend.domain.split.split`, context
    TOPUP: BASIS_POINTS, FIXED_PER_TOPUP in milli, exactly one REMAINDER), applied to the
    amount in rating units. The fee shares are paid now, in whole minor units (floored;
    the fraction stays with the payer, so nothing is lost), by the REMAINDER partner —
    normally the utility. The REMAINDER share itself is not posted: the amount stays the
    customer's credit until consumption is rated.
    """
    if not rules:
        return None
    if not 1 <= amount_minor <= MAX_TOKEN_AMOUNT_MINOR:
        raise SplitError(f"a top-up is 1..{MAX_TOKEN_AMOUNT_MINOR} minor units, got {amount_minor}")
    try:
        domain_rules = [
            split.SplitRule(split.RuleKind(r.kind), r.partner_account_id, r.value) for r in rules
        ]
    except ValueError as exc:  # an unknown kind
        raise InvalidSplitRuleError(f"TOPUP rule set: {exc}") from exc
    shares = split.split(
        amount_minor * MILLI_PER_MINOR, 0, 0, domain_rules, context=split.SplitContext.TOPUP
    )
    minor, _carry = split.to_minor(shares)  # a fresh carry: fee shares floored
    payer = next(s.partner for s in shares if s.kind is split.RuleKind.REMAINDER)
    kinds = {r.partner_account_id: r.partner_kind for r in rules}
    return TopupSplit(
        payer,
        tuple(
            SplitLine(partner_account_id=p, partner_kind=kinds[p], amount_minor=m)
            for p, m in minor
            if p != payer and m > 0
        ),
    )
