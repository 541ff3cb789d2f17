"""Exception tree of firmware_protocol: every way a message or value can be refused.

ProtocolError                      root: anything this package refuses
├── MalformedError                 the bytes/JSON do not parse (peer's fault)
│   ├── UnknownVersionError        a version byte or field this build does not speak
│   └── PayloadTooLargeError       over a documented size bound
├── SignatureError                 the Ed25519 signature does not verify
├── UnknownKeyError                the signing key id is not trusted
├── WrongMeterError                the message names another meter
├── ExpiredError                   past its expiry time
├── NotYetValidError               issued in the future beyond the allowed skew
├── ReplayError                    already applied / older than the anti-replay window
│   ├── AlreadyAppliedError        this id was accepted before (a duplicate, not an attack)
│   └── TooOldError                below the window: cannot tell, refuse
├── TariffError                    a tariff that is internally inconsistent
└── UnitError                      a money/energy value out of range or of the wrong kind

Errors raised for bytes that came from outside are the peer's fault
(``peer_fault = True``); errors from building a message with bad arguments are ours.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Root of everything firmware_protocol refuses."""

    #: True when the refused input came from the other side (a peer's fault).
    peer_fault: bool = True


class MalformedError(ProtocolError):
    """Bytes or JSON that do not parse into a valid message."""


class UnknownVersionError(MalformedError):
    """A protocol version or message type this build does not speak."""


class PayloadTooLargeError(MalformedError):
    """Input larger than its documented bound."""


class SignatureError(ProtocolError):
    """The Ed25519 signature does not verify against the named key."""


class UnknownKeyError(ProtocolError):
    """The message is signed with a key id the verifier does not trust."""


class WrongMeterError(ProtocolError):
    """A valid message addressed to another meter."""


class ExpiredError(ProtocolError):
    """A valid message whose expiry time has passed."""


class NotYetValidError(ProtocolError):
    """A valid message issued in the future beyond the allowed clock skew."""


class ReplayError(ProtocolError):
    """The message id was seen before or is too old to judge."""


class AlreadyAppliedError(ReplayError):
    """This message id was already accepted: a duplicate delivery, not a forgery."""


class TooOldError(ReplayError):
    """The message id is below the anti-replay window."""


class TariffError(ProtocolError):
    """A tariff whose fields contradict each other."""

    peer_fault = False


class UnitError(ProtocolError):
    """A money or energy value of the wrong type or out of range."""

    peer_fault = False
