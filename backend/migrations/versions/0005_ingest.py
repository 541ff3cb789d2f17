"""Consumption ingest: batches seen, per-meter ingest state, billed intervals.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26

Written from ``backend/adapters/db/ingest_tables.py`` by autogenerate and checked against
it by the migrations test; frozen: later schema changes are new revisions.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "consumption_intervals",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("tenant_id", sa.BigInteger(), nullable=False),
        sa.Column("supply_account_id", sa.BigInteger(), nullable=False),
        sa.Column("meter_id", sa.BigInteger(), nullable=False),
        sa.Column("tariff_id", sa.BigInteger(), nullable=False),
        sa.Column("from_ts", sa.BigInteger(), nullable=False),
        sa.Column("to_ts", sa.BigInteger(), nullable=False),
        sa.Column("import_wh", sa.BigInteger(), nullable=False),
        sa.Column("band_wh", sa.JSON(), nullable=False),
        sa.Column("band_milli", sa.JSON(), nullable=False),
        sa.Column("block_milli", sa.BigInteger(), nullable=False),
        sa.Column("days", sa.Integer(), nullable=False),
        sa.Column("standing_milli", sa.BigInteger(), nullable=False),
        sa.Column("total_milli", sa.BigInteger(), nullable=False),
        sa.Column("unrated_block_wh", sa.BigInteger(), nullable=False),
        sa.Column("shares", sa.JSON(), nullable=False),
        sa.Column("payer_minor", sa.BigInteger(), nullable=False),
        sa.Column("carry_milli", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_consumption_intervals")),
        sa.UniqueConstraint(
            "meter_id",
            "to_ts",
            "tariff_id",
            name=op.f("uq_consumption_intervals_meter_id_to_ts_tariff_id"),
        ),
    )
    with op.batch_alter_table("consumption_intervals", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_consumption_intervals_supply_account_id_to_ts"),
            ["supply_account_id", "to_ts"],
            unique=False,
        )
        batch_op.create_index(
            batch_op.f("ix_consumption_intervals_tenant_id_to_ts"),
            ["tenant_id", "to_ts"],
            unique=False,
        )

    op.create_table(
        "reading_batches",
        sa.Column("gateway_id", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("readings", sa.Integer(), nullable=False),
        sa.Column("historical", sa.Boolean(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("gateway_id", "seq", name=op.f("pk_reading_batches")),
    )
    op.create_table(
        "meter_ingest",
        sa.Column("meter_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column(
            "tenant_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column(
            "supply_account_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            nullable=False,
        ),
        sa.Column("state", sa.JSON(), nullable=False),
        sa.Column("rule_set", sa.String(length=64), nullable=False),
        sa.Column("totals", sa.JSON(), nullable=False),
        sa.Column("carry", sa.JSON(), nullable=False),
        sa.Column("pending", sa.JSON(), nullable=False),
        sa.Column("last_ts", sa.BigInteger(), nullable=True),
        sa.Column("last_credit_milli", sa.BigInteger(), nullable=True),
        sa.Column("last_relay", sa.String(length=16), nullable=True),
        sa.Column("last_power_w", sa.BigInteger(), nullable=True),
        sa.Column("last_import_wh", sa.BigInteger(), nullable=True),
        sa.Column("last_token_id", sa.BigInteger(), nullable=True),
        sa.Column("quarantine", sa.String(length=32), nullable=True),
        sa.Column("reconcile_diff_milli", sa.BigInteger(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["meter_id"], ["meters.id"], name=op.f("fk_meter_ingest_meter_id_meters")
        ),
        sa.ForeignKeyConstraint(
            ["supply_account_id"],
            ["supply_accounts.id"],
            name=op.f("fk_meter_ingest_supply_account_id_supply_accounts"),
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_meter_ingest_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("meter_id", name=op.f("pk_meter_ingest")),
    )
    with op.batch_alter_table("meter_ingest", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_meter_ingest_supply_account_id"), ["supply_account_id"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_meter_ingest_tenant_id"), ["tenant_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("meter_ingest", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_meter_ingest_tenant_id"))
        batch_op.drop_index(batch_op.f("ix_meter_ingest_supply_account_id"))

    op.drop_table("meter_ingest")
    op.drop_table("reading_batches")
    with op.batch_alter_table("consumption_intervals", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_consumption_intervals_tenant_id_to_ts"))
        batch_op.drop_index(batch_op.f("ix_consumption_intervals_supply_account_id_to_ts"))

    op.drop_table("consumption_intervals")
