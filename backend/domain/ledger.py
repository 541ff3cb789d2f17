"""Double-entry ledger rules (pure): accounts with limits, immutable transfers, linked batches.

Modelled on TigerBeetle (docs.tigerbeetle.com, "Accounts" and "Transfers"), narrowed to
what a prepaid-energy utility needs:

- **Money** is an ``int`` in the currency's minor unit (cents), never a float. Every amount
  and posted total fits a signed 64-bit integer (SQL ``BIGINT``).
- **Balance convention**: ``balance = credits_posted - debits_posted``. A top-up debits the
  payment clearing account and credits the customer's prepaid account, so the prepaid
  balance is the customer's credit (a liability: positive) and the clearing balance is
  what the payment provider holds for us (negative). Every transfer adds the same amount
  to one account's debits and another's credits, so **the balances of all accounts sum to
  zero** — per currency, and therefore overall.
- **Limits**: ``min_balance`` is the lowest balance a debit may leave. ``0`` means no debt;
  ``-500`` allows 5.00 of debt (emergency credit, friendly hours, DESIGN §3); ``None``
  means unlimited (clearing accounts). Credits are never limited.
- **Transfer ids** are caller-chosen 128-bit UUIDs (TigerBeetle's ids are u128), derived
  deterministically from business keys with :func:`derive_id` (e.g. the payment id of a
  top-up), so a retried request posts the same id. The same id posted twice with the same
  content is a no-op that returns the first transfer; with other content it is an
  :class:`~backend.errors.IdempotencyConflictError`. ``created_at`` is not content: a
  retry carries a later clock reading and still matches.
- **Linked batch**: the transfers given to one post succeed or fail together, applied in
  order, each checked against the balances the earlier ones left (TigerBeetle's linked
  chain). A batch of several transfers names one ``linked_group`` UUID, recorded on each
  transfer, so the batch is idempotent as a whole.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Final

from backend.errors import (
    AccountNotFoundError,
    BalanceOverflowError,
    IdempotencyConflictError,
    InvalidAccountError,
    InvalidTransferError,
    LedgerMismatchError,
    LimitExceededError,
)

#: Largest account id, amount or posted total: a signed 64-bit SQL ``BIGINT``.
MAX_INT64: Final = 2**63 - 1
#: Longest transfer reference (a payment id, a reading batch key, a statement line).
REFERENCE_MAX_LEN: Final = 128
#: Most transfers in one linked batch; bounds the SQL ``IN`` lists of a post
#: (TigerBeetle's own batch limit is 8189; ours only needs the top-up split's handful).
MAX_BATCH: Final = 1000
#: Namespace of :func:`derive_id` (uuid5 of the project's URN; fixed forever).
ID_NAMESPACE: Final = uuid.uuid5(uuid.NAMESPACE_URL, "urn:voltcredit:ledger")


class AccountCode(StrEnum):
    """What an account is for; stored as its name."""

    CLEARING = "CLEARING"  # money in flight from a payment provider (unlimited, goes negative)
    PREPAID = "PREPAID"  # a customer's meter credit: a liability, limited by its debt allowance
    PARTNER = "PARTNER"  # what is owed to a utility, reseller or grid operator
    REVENUE = "REVENUE"  # the platform operator's own earnings
    FEE = "FEE"  # payment-provider fees
    TAX = "TAX"  # levies and VAT collected for an authority
    SUSPENSE = "SUSPENSE"  # counter-side of manual adjustments awaiting investigation


class TransferCode(StrEnum):
    """Why money moved; stored as its name."""

    TOPUP = "TOPUP"
    CONSUMPTION = "CONSUMPTION"
    STANDING_CHARGE = "STANDING_CHARGE"
    SPLIT = "SPLIT"
    FEE = "FEE"
    REFUND = "REFUND"
    DEBT_RECOVERY = "DEBT_RECOVERY"
    SETTLEMENT = "SETTLEMENT"
    ADJUSTMENT = "ADJUSTMENT"


def _is_int(value: object) -> bool:
    # bool is an int subclass; True is never a valid amount or id.
    return isinstance(value, int) and not isinstance(value, bool)


def _valid_currency(value: object) -> bool:
    # ISO 4217 alphabetic code: three ASCII capital letters.
    return isinstance(value, str) and len(value) == 3 and value.isascii() and value.isupper()


@dataclass(frozen=True, slots=True, kw_only=True)
class AccountSpec:
    """What an account is: caller-chosen id, currency, purpose and debt limit (immutable)."""

    id: int
    currency: str
    code: AccountCode
    #: Lowest balance a debit may leave (<= 0); ``None`` = unlimited.
    min_balance: int | None

    def __post_init__(self) -> None:
        if not _is_int(self.id) or not 1 <= self.id <= MAX_INT64:
            raise InvalidAccountError(f"account id must be an int in 1..2**63-1, got {self.id!r}")
        if not _valid_currency(self.currency):
            raise InvalidAccountError(
                f"account {self.id}: currency must be an ISO 4217 code like 'EUR', "
                f"got {self.currency!r}"
            )
        if not isinstance(self.code, AccountCode):
            raise InvalidAccountError(f"account {self.id}: code must be an AccountCode")
        if self.min_balance is not None and (
            not _is_int(self.min_balance) or not -MAX_INT64 <= self.min_balance <= 0
        ):
            raise InvalidAccountError(
                f"account {self.id}: min_balance must be None or an int in -(2**63-1)..0, "
                f"got {self.min_balance!r}"
            )


@dataclass(frozen=True, slots=True)
class Account:
    """An account's spec and its posted totals; ``balance = credits_posted - debits_posted``."""

    spec: AccountSpec
    debits_posted: int = 0
    credits_posted: int = 0

    def __post_init__(self) -> None:
        for name in ("debits_posted", "credits_posted"):
            value = getattr(self, name)
            if not _is_int(value) or not 0 <= value <= MAX_INT64:
                raise InvalidAccountError(
                    f"account {self.spec.id}: {name} must be an int in 0..2**63-1, got {value!r}"
                )

    @property
    def id(self) -> int:
        return self.spec.id

    @property
    def currency(self) -> str:
        return self.spec.currency

    @property
    def min_balance(self) -> int | None:
        return self.spec.min_balance

    @property
    def balance(self) -> int:
        """Credits minus debits, in minor units."""
        return self.credits_posted - self.debits_posted


@dataclass(frozen=True, slots=True, kw_only=True)
class Transfer:
    """An immutable movement of ``amount`` minor units from the debit to the credit account."""

    id: uuid.UUID
    debit_account_id: int
    credit_account_id: int
    amount: int
    currency: str
    code: TransferCode
    reference: str
    #: When the transfer was first posted (tz-aware UTC); not part of the idempotent content.
    created_at: datetime
    #: Shared by the transfers of one linked batch; required when a batch has several.
    linked_group: uuid.UUID | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, uuid.UUID):
            raise InvalidTransferError(f"transfer id must be a UUID, got {self.id!r}")
        for name in ("debit_account_id", "credit_account_id"):
            value = getattr(self, name)
            if not _is_int(value) or not 1 <= value <= MAX_INT64:
                raise InvalidTransferError(
                    f"transfer {self.id}: {name} must be an int in 1..2**63-1, got {value!r}"
                )
        if self.debit_account_id == self.credit_account_id:
            raise InvalidTransferError(
                f"transfer {self.id}: debit and credit account are both {self.debit_account_id}"
            )
        if not _is_int(self.amount) or not 1 <= self.amount <= MAX_INT64:
            raise InvalidTransferError(
                f"transfer {self.id}: amount must be an int in 1..2**63-1 minor units, "
                f"got {self.amount!r}"
            )
        if not _valid_currency(self.currency):
            raise InvalidTransferError(
                f"transfer {self.id}: currency must be an ISO 4217 code, got {self.currency!r}"
            )
        if not isinstance(self.code, TransferCode):
            raise InvalidTransferError(f"transfer {self.id}: code must be a TransferCode")
        if (
            not isinstance(self.reference, str)
            or not 1 <= len(self.reference) <= REFERENCE_MAX_LEN
            or not self.reference.isprintable()
        ):
            raise InvalidTransferError(
                f"transfer {self.id}: reference must be 1..{REFERENCE_MAX_LEN} printable "
                f"characters, got {self.reference!r}"
            )
        if not isinstance(self.created_at, datetime) or self.created_at.utcoffset() != timedelta(0):
            raise InvalidTransferError(
                f"transfer {self.id}: created_at must be a tz-aware UTC datetime, "
                f"got {self.created_at!r}"
            )
        if self.linked_group is not None and not isinstance(self.linked_group, uuid.UUID):
            raise InvalidTransferError(f"transfer {self.id}: linked_group must be a UUID or None")


@dataclass(frozen=True, slots=True)
class TransferResult:
    """The outcome of posting one transfer: the stored transfer, and whether this post made it."""

    transfer: Transfer
    created: bool


def derive_id(*parts: str) -> uuid.UUID:
    """A transfer (or linked-group) id derived from business keys, e.g. ``("topup", payment_id)``.

    Each part is length-prefixed before hashing so that ``("a:b", "c")`` and ``("a", "b:c")``
    give different ids (uuid5, RFC 9562 §5.5, under :data:`ID_NAMESPACE`).
    """
    if not parts or not all(isinstance(p, str) and p for p in parts):
        raise InvalidTransferError("derive_id needs one or more non-empty string parts")
    return uuid.uuid5(ID_NAMESPACE, "".join(f"{len(p)}:{p};" for p in parts))


def same_content(a: Transfer, b: Transfer) -> bool:
    """Whether two transfers with the same id say the same thing (everything but created_at)."""
    return (
        a.id == b.id
        and a.debit_account_id == b.debit_account_id
        and a.credit_account_id == b.credit_account_id
        and a.amount == b.amount
        and a.currency == b.currency
        and a.code == b.code
        and a.reference == b.reference
        and a.linked_group == b.linked_group
    )


def validate_batch(transfers: Sequence[Transfer]) -> None:
    """Check the shape of a linked batch: 1..MAX_BATCH transfers, distinct ids, one group."""
    if not 1 <= len(transfers) <= MAX_BATCH:
        raise InvalidTransferError(f"a batch holds 1..{MAX_BATCH} transfers, got {len(transfers)}")
    ids = [t.id for t in transfers]
    if len(set(ids)) != len(ids):
        raise InvalidTransferError("a batch names the same transfer id twice")
    if len(transfers) > 1:
        groups = {t.linked_group for t in transfers}
        if len(groups) != 1 or None in groups:
            raise InvalidTransferError(
                "the transfers of a batch of several must all carry the same linked_group"
            )


def replayed(
    batch: Sequence[Transfer], stored: Mapping[uuid.UUID, Transfer]
) -> list[Transfer] | None:
    """Decide idempotency: ``None`` if the batch is new, the stored transfers if it is a replay.

    ``stored`` holds the already-posted transfers whose ids appear in ``batch``. A batch is
    a replay only if every one of its transfers exists with the same content; a partial
    overlap or any difference is an :class:`IdempotencyConflictError`.
    """
    if not stored:
        return None
    for t in batch:
        old = stored.get(t.id)
        if old is None:
            raise IdempotencyConflictError(
                f"transfer {t.id} is new but others of its batch were posted before"
            )
        if not same_content(old, t):
            raise IdempotencyConflictError(
                f"transfer {t.id} was already posted with different content"
            )
    return [stored[t.id] for t in batch]


def apply(accounts: Mapping[int, Account], transfers: Sequence[Transfer]) -> dict[int, Account]:
    """Post a linked batch to ``accounts``: the new accounts, or raise and change nothing.

    Transfers apply in order; each is checked against the balances the earlier ones left,
    so a batch that first credits then debits an account may pass where the reverse order
    fails (as in a TigerBeetle linked chain). Any failure fails the whole batch.
    """
    validate_batch(transfers)
    result = dict(accounts)
    for t in transfers:
        missing = {t.debit_account_id, t.credit_account_id} - result.keys()
        if missing:
            raise AccountNotFoundError(frozenset(missing))
        debit, credit = result[t.debit_account_id], result[t.credit_account_id]
        for acc in (debit, credit):
            if acc.currency != t.currency:
                raise LedgerMismatchError(
                    f"transfer {t.id} in {t.currency} touches account {acc.id} in {acc.currency}"
                )
        if debit.debits_posted + t.amount > MAX_INT64:
            raise BalanceOverflowError(f"transfer {t.id}: debits of account {debit.id} overflow")
        if credit.credits_posted + t.amount > MAX_INT64:
            raise BalanceOverflowError(f"transfer {t.id}: credits of account {credit.id} overflow")
        debit = Account(debit.spec, debit.debits_posted + t.amount, debit.credits_posted)
        if debit.min_balance is not None and debit.balance < debit.min_balance:
            raise LimitExceededError(
                account_id=debit.id, balance_after=debit.balance, min_balance=debit.min_balance
            )
        result[debit.id] = debit
        result[credit.id] = Account(
            credit.spec, credit.debits_posted, credit.credits_posted + t.amount
        )
    return result
