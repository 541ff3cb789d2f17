"""Ledger tables: accounts with their posted totals, and the immutable transfers between them.

The database re-checks the ledger's invariants the domain already enforces (positive
amounts, two distinct accounts, limits respected), so a bug elsewhere cannot commit a
broken ledger. Codes are stored as their names in plain strings, not native enums, so
adding a code needs no migration.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import BigInteger, CheckConstraint, ForeignKey, Index, Integer, String, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from backend.adapters.db.base import Base, UTCDateTime
from backend.domain.ledger import Account, AccountCode, AccountSpec, Transfer, TransferCode


class AccountRow(Base):
    """One ledger account; ``version`` counts the postings that changed it."""

    __tablename__ = "ledger_accounts"
    __table_args__ = (
        CheckConstraint("debits_posted >= 0", name="debits_posted_non_negative"),
        CheckConstraint("credits_posted >= 0", name="credits_posted_non_negative"),
        CheckConstraint("min_balance IS NULL OR min_balance <= 0", name="min_balance_non_positive"),
        CheckConstraint(
            "min_balance IS NULL OR credits_posted - debits_posted >= min_balance",
            name="balance_within_limit",
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    currency: Mapped[str] = mapped_column(String(3))
    code: Mapped[str] = mapped_column(String(32))
    min_balance: Mapped[int | None] = mapped_column(BigInteger)
    debits_posted: Mapped[int] = mapped_column(BigInteger, default=0)
    credits_posted: Mapped[int] = mapped_column(BigInteger, default=0)
    # Optimistic check on top of the row locks: an UPDATE that finds another version
    # (someone wrote without locking) fails instead of losing that write.
    version: Mapped[int] = mapped_column(Integer, default=1)

    __mapper_args__ = {"version_id_col": version}  # noqa: RUF012 - SQLAlchemy's declared form

    @classmethod
    def from_spec(cls, spec: AccountSpec) -> AccountRow:
        return cls(
            id=spec.id,
            currency=spec.currency,
            code=spec.code.value,
            min_balance=spec.min_balance,
            debits_posted=0,
            credits_posted=0,
        )

    def to_domain(self) -> Account:
        spec = AccountSpec(
            id=self.id,
            currency=self.currency,
            code=AccountCode(self.code),
            min_balance=self.min_balance,
        )
        return Account(spec, self.debits_posted, self.credits_posted)


class TransferRow(Base):
    """One posted transfer; never updated nor deleted."""

    __tablename__ = "ledger_transfers"
    __table_args__ = (
        CheckConstraint("amount > 0", name="amount_positive"),
        CheckConstraint("debit_account_id <> credit_account_id", name="distinct_accounts"),
        # An account's statement and the recomputation of its balance read by account, in time.
        Index(None, "debit_account_id", "created_at"),
        Index(None, "credit_account_id", "created_at"),
        Index(None, "linked_group"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    debit_account_id: Mapped[int] = mapped_column(BigInteger, ForeignKey(AccountRow.id))
    credit_account_id: Mapped[int] = mapped_column(BigInteger, ForeignKey(AccountRow.id))
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    code: Mapped[str] = mapped_column(String(32))
    reference: Mapped[str] = mapped_column(String(128))
    linked_group: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)

    @classmethod
    def from_domain(cls, t: Transfer) -> TransferRow:
        return cls(
            id=t.id,
            debit_account_id=t.debit_account_id,
            credit_account_id=t.credit_account_id,
            amount=t.amount,
            currency=t.currency,
            code=t.code.value,
            reference=t.reference,
            linked_group=t.linked_group,
            created_at=t.created_at,
        )

    def to_domain(self) -> Transfer:
        return Transfer(
            id=self.id,
            debit_account_id=self.debit_account_id,
            credit_account_id=self.credit_account_id,
            amount=self.amount,
            currency=self.currency,
            code=TransferCode(self.code),
            reference=self.reference,
            linked_group=self.linked_group,
            created_at=self.created_at,
        )
