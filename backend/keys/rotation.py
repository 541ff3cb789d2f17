"""Key rotation planned as pure functions: which signed key-change message each meter gets.

The procedure is SPEC.md §2.4's *add new (signed by old), switch, revoke old (signed by
new)*, in three steps over the key store's life cycle (:mod:`backend.keys.store`):

====  =======  ==========================================================================
step  name     what happens
====  =======  ==========================================================================
1     ADD      every meter gets ``KeyChange(ADD, new id, new public key)`` signed by the
               ACTIVE key: :func:`plan_add`. The new key is NEXT in the store.
2     SWITCH   once every meter reported the ADD applied (``ACCEPTED`` or already
               applied), ``store.activate(new id)``: no message. The backend signs with
               the new key from now on; the old key is RETIRED.
3     REVOKE   every meter gets ``KeyChange(REVOKE, old id)`` signed by the new ACTIVE
               key: :func:`plan_revoke`, with fresh message ids.
====  =======  ==========================================================================

Why this order, and why each message is signed by the key it is: a meter refuses to
revoke its last key and the key that signed the revoke (``meter_sim.core._key_change``,
SPEC.md §2.4), so the revoke must be signed by the new key and can only come after the
add. Switching before a meter holds the new key would make it reject every new token
as ``UNKNOWN_KEY``; revoking before the switch would do the same to tokens still signed
with the old key. A revoke sent to a meter that missed the add is rejected
(``UNKNOWN_KEY``, it does not know the signer), so no plan can lock a meter out.

Message ids: key-change messages share the per-meter id sequence with credit tokens
(SPEC.md §2.1, the anti-replay window), so the caller allocates one id per meter in
the database (``meters.next_msg_id``) and passes it in a :class:`MeterSlot`; these
functions only sign. Nothing here reads a clock or a file: ``now`` and ``validity``
are arguments, and the store is used only through the :class:`KeyStore` interface.

The database-driven rotation (later: allocate ids, queue the messages in the token
outbox, watch the results, then switch and revoke) calls these functions;
``voltcredit keys plan-rotation`` prints the same plans for a hand-run rotation.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from backend.keys.errors import RotationError
from backend.keys.store import KeyInfo, KeyState, KeyStore
from firmware_protocol.messages import (
    PUBLIC_KEY_LEN,
    U32_MAX,
    U64_MAX,
    Header,
    KeyAction,
    KeyChange,
    encode,
)

_EPOCH: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_SECOND: Final = dt.timedelta(seconds=1)
#: Long enough for a gateway that is offline for a few days to still deliver it.
DEFAULT_VALIDITY: Final = dt.timedelta(days=7)


class RotationStep(enum.IntEnum):
    """The three steps of a rotation (see the module docstring)."""

    ADD = 1
    SWITCH = 2
    REVOKE = 3


@dataclass(frozen=True, slots=True)
class MeterSlot:
    """A meter and the message id the caller allocated for its key-change message."""

    meter_id: int
    msg_id: int

    def __post_init__(self) -> None:
        # Same ranges as the header (SPEC.md §2.1), checked here to name the meter.
        if type(self.meter_id) is not int or not 1 <= self.meter_id <= U64_MAX:
            raise RotationError(f"meter_id must be an integer 1..2**64-1, got {self.meter_id!r}")
        if type(self.msg_id) is not int or not 1 <= self.msg_id <= U32_MAX:
            raise RotationError(
                f"meter {self.meter_id}: msg_id must be an integer 1..2**32-1, got {self.msg_id!r}"
            )


@dataclass(frozen=True, slots=True)
class PlannedKeyChange:
    """One meter's signed key-change message, ready for the token outbox."""

    meter_id: int
    message: KeyChange
    data: bytes  # header ‖ body ‖ signature (SPEC.md §2.4), 127 bytes


@dataclass(frozen=True, slots=True)
class RotationPlan:
    """The messages of one step: ``target_key_id`` added or revoked, signed by another key."""

    step: RotationStep
    signing_key_id: int
    target_key_id: int
    messages: tuple[PlannedKeyChange, ...]


def plan_rotation(
    store: KeyStore,
    meters: Sequence[MeterSlot],
    *,
    now: dt.datetime,
    validity: dt.timedelta = DEFAULT_VALIDITY,
) -> RotationPlan:
    """The messages of the step the store is at: ADD while a key is NEXT, else REVOKE.

    With a NEXT key, that is step 1 for the newest NEXT key (step 2 is the operator's or
    the dispatcher's ``activate`` once the adds are applied). Without one, it is step 3
    for the most recently retired key. The store does not know which meters already
    applied a step (the database does), so calling this again repeats the step.
    """
    infos = store.list()
    if any(i.state is KeyState.NEXT for i in infos):
        return plan_add(store, meters, now=now, validity=validity)
    if any(i.state is KeyState.RETIRED for i in infos):
        return plan_revoke(store, meters, now=now, validity=validity)
    raise RotationError("nothing to rotate: generate a NEXT key first")


def plan_add(
    store: KeyStore,
    meters: Sequence[MeterSlot],
    *,
    now: dt.datetime,
    validity: dt.timedelta = DEFAULT_VALIDITY,
    key_id: int | None = None,
) -> RotationPlan:
    """Step 1: ADD the NEXT key ``key_id`` (default: the newest) signed by the ACTIVE key."""
    infos = store.list()
    if key_id is None:
        candidates = [i.key_id for i in infos if i.state is KeyState.NEXT]
        if not candidates:
            raise RotationError("no NEXT key to add: run `voltcredit keys generate` first")
        key_id = max(candidates)
    target = _find(infos, key_id)
    if target.state is not KeyState.NEXT:
        raise RotationError(
            f"key {key_id} is {target.state.value}: only a NEXT key is added to meters"
        )
    return _plan(
        store,
        meters,
        step=RotationStep.ADD,
        action=KeyAction.ADD,
        target=target.key_id,
        public_key=target.public_key,
        now=now,
        validity=validity,
    )


def plan_revoke(
    store: KeyStore,
    meters: Sequence[MeterSlot],
    *,
    now: dt.datetime,
    validity: dt.timedelta = DEFAULT_VALIDITY,
    key_id: int | None = None,
) -> RotationPlan:
    """Step 3: REVOKE the RETIRED key ``key_id`` (default: the last retired), signed by ACTIVE.

    Send each message only to a meter whose ADD of the now ACTIVE key was applied.
    """
    infos = store.list()
    if key_id is None:
        retired = [i for i in infos if i.state is KeyState.RETIRED]
        if not retired:
            raise RotationError("no RETIRED key to revoke: activate the NEXT key first (step 2)")
        key_id = max(retired, key=lambda i: (i.retired_at, i.key_id)).key_id
    target = _find(infos, key_id)
    if target.state is not KeyState.RETIRED:
        # An ACTIVE target would be revoked by its own signature, which meters refuse;
        # a NEXT key is being rolled out, not retired.
        raise RotationError(
            f"key {key_id} is {target.state.value}: only a RETIRED key is revoked from meters"
        )
    return _plan(
        store,
        meters,
        step=RotationStep.REVOKE,
        action=KeyAction.REVOKE,
        target=target.key_id,
        public_key=bytes(PUBLIC_KEY_LEN),  # SPEC.md §2.4: 32 zero bytes for a revoke
        now=now,
        validity=validity,
    )


def validity_window(now: dt.datetime, validity: dt.timedelta) -> tuple[int, int]:
    """``(issued_at, expires_at)`` as wire Unix seconds (u32) from an aware ``now``."""
    if now.utcoffset() is None:
        raise RotationError("now must be a timezone-aware datetime")
    if validity < _SECOND:
        raise RotationError(f"validity must be at least one second, got {validity}")
    issued_at = (now - _EPOCH) // _SECOND  # floor, in integers: no float on the wire path
    expires_at = issued_at + validity // _SECOND
    if issued_at < 0 or expires_at > U32_MAX:
        raise RotationError(f"validity window {issued_at}..{expires_at} does not fit u32 seconds")
    return issued_at, expires_at


def _find(infos: Iterable[KeyInfo], key_id: int) -> KeyInfo:
    for info in infos:
        if info.key_id == key_id:
            return info
    raise RotationError(f"no key {key_id} in the key store")


def _plan(
    store: KeyStore,
    meters: Sequence[MeterSlot],
    *,
    step: RotationStep,
    action: KeyAction,
    target: int,
    public_key: bytes,
    now: dt.datetime,
    validity: dt.timedelta,
) -> RotationPlan:
    issued_at, expires_at = validity_window(now, validity)
    seen: set[int] = set()
    for slot in meters:
        if slot.meter_id in seen:
            raise RotationError(f"meter {slot.meter_id} appears twice")
        seen.add(slot.meter_id)
    signer = store.active_signer()
    planned = []
    for slot in meters:
        message = KeyChange(
            Header(
                key_id=signer.key_id,
                meter_id=slot.meter_id,
                msg_id=slot.msg_id,
                issued_at=issued_at,
                expires_at=expires_at,
            ),
            action,
            target,
            public_key,
        )
        planned.append(PlannedKeyChange(slot.meter_id, message, encode(message, signer)))
    return RotationPlan(step, signer.key_id, target, tuple(planned))
