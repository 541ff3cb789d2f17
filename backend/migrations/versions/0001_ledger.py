"""Ledger: accounts with posted totals and limits, immutable transfers.

Revision ID: 0001
Revises:
Create Date: 2026-11-26

Written by hand, frozen: later schema changes are new revisions, never edits here.
Names are wrapped in ``op.f()`` (final) so the naming convention is not applied twice.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "ledger_accounts",
        sa.Column("id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("code", sa.String(length=32), nullable=False),
        sa.Column("min_balance", sa.BigInteger(), nullable=True),
        sa.Column("debits_posted", sa.BigInteger(), nullable=False),
        sa.Column("credits_posted", sa.BigInteger(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.CheckConstraint(
            "debits_posted >= 0", name=op.f("ck_ledger_accounts_debits_posted_non_negative")
        ),
        sa.CheckConstraint(
            "credits_posted >= 0", name=op.f("ck_ledger_accounts_credits_posted_non_negative")
        ),
        sa.CheckConstraint(
            "min_balance IS NULL OR min_balance <= 0",
            name=op.f("ck_ledger_accounts_min_balance_non_positive"),
        ),
        sa.CheckConstraint(
            "min_balance IS NULL OR credits_posted - debits_posted >= min_balance",
            name=op.f("ck_ledger_accounts_balance_within_limit"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger_accounts")),
    )
    op.create_table(
        "ledger_transfers",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("debit_account_id", sa.BigInteger(), nullable=False),
        sa.Column("credit_account_id", sa.BigInteger(), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("code", sa.String(length=32), nullable=False),
        sa.Column("reference", sa.String(length=128), nullable=False),
        sa.Column("linked_group", sa.Uuid(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("amount > 0", name=op.f("ck_ledger_transfers_amount_positive")),
        sa.CheckConstraint(
            "debit_account_id <> credit_account_id",
            name=op.f("ck_ledger_transfers_distinct_accounts"),
        ),
        sa.ForeignKeyConstraint(
            ["debit_account_id"],
            ["ledger_accounts.id"],
            name=op.f("fk_ledger_transfers_debit_account_id_ledger_accounts"),
        ),
        sa.ForeignKeyConstraint(
            ["credit_account_id"],
            ["ledger_accounts.id"],
            name=op.f("fk_ledger_transfers_credit_account_id_ledger_accounts"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger_transfers")),
    )
    op.create_index(
        op.f("ix_ledger_transfers_debit_account_id_created_at"),
        "ledger_transfers",
        ["debit_account_id", "created_at"],
    )
    op.create_index(
        op.f("ix_ledger_transfers_credit_account_id_created_at"),
        "ledger_transfers",
        ["credit_account_id", "created_at"],
    )
    op.create_index(op.f("ix_ledger_transfers_linked_group"), "ledger_transfers", ["linked_group"])


def downgrade() -> None:
    op.drop_table("ledger_transfers")
    op.drop_table("ledger_accounts")
