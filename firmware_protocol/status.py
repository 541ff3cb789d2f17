"""Outcome codes of a signed message at a meter, shared by Modbus, MQTT and the backend.

Modelled on the DLMS/COSEM Token Gateway (IC 115) ``token_status_code``
(format / authentication / validation / execution OK-or-fail) but split finer, so a
result says *why* a message was refused. The numeric values are wire values: they
appear in the meter's token status register and in MQTT token results; never renumber.
"""

from __future__ import annotations

import enum

from firmware_protocol import errors


class TokenStatus(enum.IntEnum):
    """What a meter did with the last signed message written to it."""

    NONE = 0  #: nothing written since power-up of a new meter
    ACCEPTED = 1  #: verified and applied exactly once
    ALREADY_APPLIED = 2  #: a duplicate of an id applied before; nothing changed
    BAD_SIGNATURE = 3  #: the signature does not verify
    WRONG_METER = 4  #: addressed to another meter
    EXPIRED = 5  #: past its expiry time
    UNKNOWN_KEY = 6  #: signed by a key the meter does not trust
    MALFORMED = 7  #: does not parse
    TOO_OLD = 8  #: id below the anti-replay window
    NOT_YET_VALID = 9  #: issued too far in the future
    PENDING = 10  #: written and committed, being processed (transient)
    UNKNOWN_VERSION = 11  #: a version or message type the meter does not speak
    REFUSED = 12  #: valid, but the meter cannot apply it (e.g. credit would overflow)

    @property
    def applied(self) -> bool:
        """True when the message's effect is in the meter (now or from an earlier delivery)."""
        return self in (TokenStatus.ACCEPTED, TokenStatus.ALREADY_APPLIED)

    @property
    def final(self) -> bool:
        """True for every outcome except the transient ones."""
        return self not in (TokenStatus.NONE, TokenStatus.PENDING)


#: Refusal → outcome code, most specific first (SPEC.md §4).
_BY_ERROR: tuple[tuple[type[errors.ProtocolError], TokenStatus], ...] = (
    (errors.UnknownVersionError, TokenStatus.UNKNOWN_VERSION),
    (errors.MalformedError, TokenStatus.MALFORMED),
    (errors.SignatureError, TokenStatus.BAD_SIGNATURE),
    (errors.UnknownKeyError, TokenStatus.UNKNOWN_KEY),
    (errors.WrongMeterError, TokenStatus.WRONG_METER),
    (errors.ExpiredError, TokenStatus.EXPIRED),
    (errors.NotYetValidError, TokenStatus.NOT_YET_VALID),
    (errors.AlreadyAppliedError, TokenStatus.ALREADY_APPLIED),
    (errors.TooOldError, TokenStatus.TOO_OLD),
)


def status_for_error(exc: errors.ProtocolError) -> TokenStatus:
    """The outcome a meter reports for a refused message; anything else is REFUSED."""
    for kind, status in _BY_ERROR:
        if isinstance(exc, kind):
            return status
    return TokenStatus.REFUSED
