"""The meter's credit/relay state machine as one table (house style rule 2).

Every time something changes (energy consumed, a top-up, emergency credit, a friendly
period starting or ending, a button, a remote command) the meter *settles*: it walks
:data:`CREDIT_RULES` top to bottom and the first row whose condition holds gives the
credit state and whether supply is allowed. :data:`RECONNECT` then says how an open
relay may close when supply becomes allowed again.

Decisions (a real meter's behaviour, after the UK smart prepayment spec SMETS2 and
DLMS/COSEM Account/Credit classes, simplified):

* Emergency credit (EC) may be taken when credit is low or exhausted (and the debt is
  still above ``-emergency_limit``, else it could not restore supply); it lets credit
  fall to ``-emergency_limit``. It is repaid by the next top-up (credit is one signed
  number, so a top-up repays EC and friendly-hours debt first, automatically).
* EC is used once: a meter DISCONNECTED with EC spent returns to supply only when a
  top-up brings credit above zero. A smaller top-up lowers the debt but must not re-open
  the unused part of the EC allowance (``disconnected`` keeps the EC row shut), or
  repeated small top-ups would keep a meter on supply in permanent debt.
* Friendly hours never *disconnect*: a meter that is supplying when credit runs out in
  a friendly period keeps supplying and goes into debt. They do not *reconnect* a
  meter that was already off.
* ``OUT_OF_CREDIT`` is not produced by this table: the meter acts at once, so "credit
  exhausted, disconnection due" is never observable; it stays in the enum for meters
  that disconnect after a delay.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from firmware_protocol.modbus_map import CreditState


@dataclass(frozen=True, slots=True)
class Conditions:
    """What the table looks at."""

    credit_milli: int
    low_threshold_milli: int
    ec_active: bool
    ec_limit_milli: int
    friendly: bool
    supplying: bool  #: the relay is closed right now
    #: the meter is already DISCONNECTED for lack of credit: emergency credit it had taken
    #: is spent and does not come back with a top-up that leaves credit <= 0
    disconnected: bool = False


@dataclass(frozen=True, slots=True)
class Rule:
    """One row: when ``when`` holds, the meter is in ``state`` and supply is ``allowed``."""

    name: str
    when: Callable[[Conditions], bool]
    state: CreditState
    allowed: bool


CREDIT_RULES: Final[tuple[Rule, ...]] = (
    Rule(
        "credit above threshold",
        lambda c: c.credit_milli > c.low_threshold_milli,
        CreditState.IN_CREDIT,
        allowed=True,
    ),
    Rule(
        "credit low but positive",
        lambda c: c.credit_milli > 0,
        CreditState.LOW_CREDIT,
        allowed=True,
    ),
    Rule(
        "emergency credit left",
        lambda c: c.ec_active and not c.disconnected and c.credit_milli > -c.ec_limit_milli,
        CreditState.EMERGENCY_IN_USE,
        allowed=True,
    ),
    Rule(
        "friendly hours while supplying",
        lambda c: c.friendly and c.supplying,
        CreditState.FRIENDLY_HOURS_DEBT,
        allowed=True,
    ),
    Rule(
        "exhausted, emergency credit not yet taken and still enough",
        # Only offered while it can restore supply: from a debt at or beyond the limit
        # (friendly-hours debt, standing charges while off) taking EC would just spend it.
        lambda c: not c.ec_active and c.credit_milli > -c.ec_limit_milli,
        CreditState.EMERGENCY_AVAILABLE,
        allowed=False,
    ),
    Rule("exhausted", lambda _c: True, CreditState.DISCONNECTED, allowed=False),
)


def settle(conditions: Conditions) -> Rule:
    """The first rule that holds (the last row always does)."""
    for rule in CREDIT_RULES:
        if rule.when(conditions):
            return rule
    raise AssertionError("unreachable: the last rule always holds")  # pragma: no cover


def ec_may_activate(state: CreditState, *, ec_active: bool, ec_limit_milli: int) -> bool:
    """Emergency credit can be taken once, when credit is low or exhausted."""
    return (
        not ec_active
        and ec_limit_milli > 0
        and state
        in (
            CreditState.LOW_CREDIT,
            CreditState.EMERGENCY_AVAILABLE,
            CreditState.FRIENDLY_HOURS_DEBT,
        )
    )


class Cause(enum.Enum):
    """What made supply allowed again: decides how the relay closes."""

    CREDIT = "credit"  #: a top-up (or time passing, e.g. a tariff change)
    EMERGENCY = "emergency"  #: the customer took emergency credit
    BUTTON = "button"  #: the customer pressed the button
    REMOTE = "remote"  #: a remote CONNECT


class Reconnect(enum.Enum):
    """How an open relay reacts when supply becomes allowed."""

    CLOSE = "close"
    ARM = "arm"  #: wait for the customer's button (RELAY_ARMED)


#: (cause, auto_reconnect configured) → what the relay does. The customer's own actions
#: close at once; a top-up or a remote CONNECT closes only on meters configured to
#: reconnect automatically, otherwise it arms the relay for the button (safety: nobody
#: is surprised by an appliance switching on).
RECONNECT: Final[dict[tuple[Cause, bool], Reconnect]] = {
    (Cause.CREDIT, True): Reconnect.CLOSE,
    (Cause.CREDIT, False): Reconnect.ARM,
    (Cause.REMOTE, True): Reconnect.CLOSE,
    (Cause.REMOTE, False): Reconnect.ARM,
    (Cause.EMERGENCY, True): Reconnect.CLOSE,
    (Cause.EMERGENCY, False): Reconnect.CLOSE,
    (Cause.BUTTON, True): Reconnect.CLOSE,
    (Cause.BUTTON, False): Reconnect.CLOSE,
}
