"""Key rotation through the token outbox: one step's key-change message queued for every meter.

:mod:`backend.keys.rotation` plans and signs; this module gives it the database: in one
write unit of work it locks every meter (all tenants: the signing key is platform-wide)
in ascending serial order, as :meth:`MeterRepository.allocate_msg_ids` does for top-ups
and tariffs so no two issuers deadlock, takes each meter's next ``msg_id`` (SPEC.md §2.1:
key changes share the anti-replay sequence with credit tokens), and inserts one
``KEY_CHANGE`` row per meter into the ``tokens`` outbox as ``PENDING``, due now, plus an
audit row. The dispatcher delivers it like any other token (DESIGN §6).

Idempotent per target key: a meter that already has a ``PENDING``, ``SENT`` or
``APPLIED`` key change of the same action for the same key gets nothing new, so running a
step again only fills in meters that were attached since, or whose message was
``REJECTED`` (expired undelivered, refused). The rows are recognised by decoding the
stored message bytes (:func:`firmware_protocol.messages.decode_unverified`; they are
our own signed messages), so the schema needs no column for it.

The operator's procedure (``voltcredit keys rotate``, README "backend"): generate a NEXT
key, ``rotate --step add``, wait until every ADD is ``APPLIED``, ``activate`` the new key,
restart the backends, ``rotate --step revoke``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Final, Literal

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from backend.adapters.db.engine import Database
from backend.adapters.db.repos import Repositories, translated
from backend.adapters.db.tables import MeterRow, TokenRow
from backend.domain.auth import Role, Scope
from backend.domain.topups import TokenState
from backend.keys import rotation
from backend.keys.errors import RotationError
from backend.keys.rotation import MeterSlot, RotationPlan, RotationStep
from backend.keys.store import KeyStore
from firmware_protocol import messages
from firmware_protocol.errors import ProtocolError

#: Who the audit log names for a rotation queued from the command line.
ACTOR: Final = "system:keys-cli"
KIND: Final = "KEY_CHANGE"
#: Outbox states in which a key change still counts as sent (REJECTED ones are redone).
_LIVE_STATES: Final = (TokenState.PENDING, TokenState.SENT, TokenState.APPLIED)
_ACTIONS: Final = {"add": messages.KeyAction.ADD, "revoke": messages.KeyAction.REVOKE}

Step = Literal["add", "revoke"]


@dataclass(frozen=True, slots=True)
class RotationReport:
    """What one :func:`queue_rotation_step` call did."""

    step: RotationStep
    signing_key_id: int
    target_key_id: int
    #: ``(meter_id, msg_id)`` of each message queued now, in ascending meter order.
    queued: tuple[tuple[int, int], ...]
    #: Meters left alone: a live key change for the same key was queued before.
    already_queued: tuple[int, ...]
    #: Of those, the meters that reported it applied (the rest are PENDING or SENT).
    applied: tuple[int, ...]
    issued_at: int
    expires_at: int

    @property
    def meters(self) -> int:
        """How many meters the platform has (queued now or before)."""
        return len(self.queued) + len(self.already_queued)

    @property
    def complete(self) -> bool:
        """True when every meter has applied this step (nothing queued, nothing in flight)."""
        return not self.queued and len(self.applied) == len(self.already_queued)


async def queue_rotation_step(
    db: Database,
    store: KeyStore,
    *,
    step: Step,
    now: dt.datetime,
    validity: dt.timedelta = rotation.DEFAULT_VALIDITY,
    request_id: str | None = None,
) -> RotationReport:
    """Queue ``step``'s signed key change for every meter that lacks one (module docstring)."""
    action = _ACTIONS.get(step)
    if action is None:
        raise RotationError(f"step must be 'add' or 'revoke', got {step!r}")
    # Plan for no meters first: checks the store (a NEXT key to add, a RETIRED one to
    # revoke) and the validity window before the database lock is taken.
    empty = _plan(store, step, [], now=now, validity=validity, key_id=None)
    target = empty.target_key_id
    issued_at, expires_at = rotation.validity_window(now, validity)
    scope = Scope(role=Role.PLATFORM_ADMIN, actor=ACTOR)
    async with db.write() as session:
        repos = Repositories(session)
        # Lock first (ascending ids), then read the outbox: a concurrent run of the same
        # step waits here and then sees this one's rows, so it queues no duplicates.
        lock = select(MeterRow.id, MeterRow.tenant_id).order_by(MeterRow.id).with_for_update()
        with translated("lock meters"):
            tenants = {int(m): int(t) for m, t in (await session.execute(lock)).all()}
        have = await _meters_with_live_change(session, action, target)
        todo = sorted(m for m in tenants if m not in have)
        slots: list[MeterSlot] = []
        if todo:
            msg_ids = await repos.meters.allocate_msg_ids(scope, todo)
            spent = sorted(m for m, i in msg_ids.items() if i > messages.U32_MAX)
            if spent:
                raise RotationError(f"meters {spent} have used every u32 message id")
            slots = [MeterSlot(m, msg_ids[m]) for m in todo]
        # Ed25519 signing is CPU work: one thread hop for the batch keeps the loop free.
        plan = await asyncio.to_thread(
            _plan, store, step, slots, now=now, validity=validity, key_id=target
        )
        await repos.tokens.add_all(
            scope,
            [
                TokenRow(
                    tenant_id=tenants[p.meter_id],
                    meter_id=p.meter_id,
                    msg_id=p.message.header.msg_id,
                    kind=KIND,
                    payment_id=None,
                    amount_minor=None,
                    message=p.data,
                    status=TokenState.PENDING.value,
                    attempts=0,
                    next_attempt_at=now,
                    created_at=now,
                )
                for p in plan.messages
            ],
        )
        report = RotationReport(
            step=plan.step,
            signing_key_id=plan.signing_key_id,
            target_key_id=target,
            queued=tuple((p.meter_id, p.message.header.msg_id) for p in plan.messages),
            already_queued=tuple(sorted(m for m in tenants if m in have)),
            applied=tuple(sorted(m for m in tenants if have.get(m) is TokenState.APPLIED)),
            issued_at=issued_at,
            expires_at=expires_at,
        )
        # One platform-level row (tenant_id NULL): the rotation is not any tenant's act.
        await repos.audit.record(
            scope,
            at=now,
            tenant_id=None,
            action=f"key.rotate_{step}",
            target=f"key:{target}",
            request_id=request_id or f"keys-cli-{uuid.uuid4().hex[:12]}",
            detail={
                "step": step,
                "signing_key_id": plan.signing_key_id,
                "target_key_id": target,
                "messages_queued": len(report.queued),
                "already_queued": len(report.already_queued),
                "applied": len(report.applied),
                "expires_at": expires_at,
            },
        )
    return report


def _plan(
    store: KeyStore,
    step: Step,
    slots: list[MeterSlot],
    *,
    now: dt.datetime,
    validity: dt.timedelta,
    key_id: int | None,
) -> RotationPlan:
    if step == "add":
        return rotation.plan_add(store, slots, now=now, validity=validity, key_id=key_id)
    return rotation.plan_revoke(store, slots, now=now, validity=validity, key_id=key_id)


async def _meters_with_live_change(
    session: AsyncSession, action: messages.KeyAction, target: int
) -> dict[int, TokenState]:
    """Meters with a PENDING/SENT/APPLIED key change doing ``action`` to key ``target``.

    A meter with several (a step run again while one was in flight cannot make that, but
    a hand-queued row could) counts as APPLIED if any of them is.
    """
    stmt = select(TokenRow.meter_id, TokenRow.status, TokenRow.message).where(
        TokenRow.kind == KIND, TokenRow.status.in_([s.value for s in _LIVE_STATES])
    )
    with translated("read key changes"):
        rows = (await session.execute(stmt)).all()
    found: dict[int, TokenState] = {}
    for meter, status, data in rows:
        if _does(data, action, target) and found.get(int(meter)) is not TokenState.APPLIED:
            found[int(meter)] = TokenState(status)
    return found


def _does(data: bytes, action: messages.KeyAction, target: int) -> bool:
    try:
        message = messages.decode_unverified(data)
    except ProtocolError as exc:
        # Only this module writes KEY_CHANGE rows, from encode(): a row that does not
        # decode is corruption, and guessing "not done" could queue a duplicate.
        raise RotationError(f"a stored key-change message does not decode: {exc}") from exc
    if not isinstance(message, messages.KeyChange):
        raise RotationError(
            f"a stored KEY_CHANGE row holds a {type(message).__name__} (meter "
            f"{message.header.meter_id}, msg_id {message.header.msg_id})"
        )
    return message.action is action and message.target_key_id == target
