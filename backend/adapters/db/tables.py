"""Tables of tenancy, provisioning, payments and the token outbox (issue 5).

Every tenant-owned row carries ``tenant_id`` (and ``reseller_id`` where a reseller owns
it), so repositories scope each query in SQL (DESIGN §7). Money is ``BIGINT`` minor units,
meter credit ``BIGINT`` rating units (milli), times tz-aware UTC. Enumerations are stored
as their names in plain strings (adding one needs no migration). Meter serials are
``BIGINT``: voltcredit meters are numbered below 2**63 (the wire field is u64; the backend
refuses larger serials at provisioning).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
    Uuid,
)
from sqlalchemy.orm import Mapped, mapped_column

from backend.adapters.db.base import Base, UTCDateTime
from backend.adapters.db.ledger_tables import AccountRow

_ID = BigInteger().with_variant(Integer, "sqlite")  # SQLite autoincrements INTEGER PRIMARY KEY


class TenantRow(Base):
    """A utility: owns resellers, customers, tariffs, gateways and meters."""

    __tablename__ = "tenants"
    __table_args__ = (
        CheckConstraint("min_topup_minor > 0", name="min_topup_positive"),
        CheckConstraint("max_topup_minor >= min_topup_minor", name="topup_range"),
    )

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    currency: Mapped[str] = mapped_column(String(3))
    timezone: Mapped[str] = mapped_column(String(64))
    min_topup_minor: Mapped[int] = mapped_column(BigInteger)
    max_topup_minor: Mapped[int] = mapped_column(BigInteger)
    clearing_account_id: Mapped[int] = mapped_column(BigInteger, ForeignKey(AccountRow.id))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class ResellerRow(Base):
    """A reseller selling a utility's power; sees only its own customers."""

    __tablename__ = "resellers"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey(TenantRow.id), index=True)
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class PartnerRow(Base):
    """Someone who earns a share of the money: utility, grid operator, reseller, tax, fees."""

    __tablename__ = "partners"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey(TenantRow.id), index=True)
    reseller_id: Mapped[int | None] = mapped_column(ForeignKey(ResellerRow.id))
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(32))
    ledger_account_id: Mapped[int] = mapped_column(BigInteger, ForeignKey(AccountRow.id))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class TariffRow(Base):
    """One published version of a tariff; ``wire_id`` is the u32 id meters see."""

    __tablename__ = "tariffs"
    __table_args__ = (
        UniqueConstraint("tenant_id", "code", "version"),
        UniqueConstraint("tenant_id", "wire_id"),
    )

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey(TenantRow.id), index=True)
    code: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    wire_id: Mapped[int] = mapped_column(BigInteger)
    body: Mapped[dict[str, Any]] = mapped_column(JSON)  # firmware_protocol tariff_to_dict
    activation_at: Mapped[datetime] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class SplitRuleRow(Base):
    """How money of a tariff (per top-up or per rated consumption) is shared out."""

    __tablename__ = "split_rules"

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey(TenantRow.id), index=True)
    tariff_code: Mapped[str] = mapped_column(String(64))
    applies_to: Mapped[str] = mapped_column(String(16))  # TOPUP | CONSUMPTION
    kind: Mapped[str] = mapped_column(String(32))  # PER_KWH | BASIS_POINTS | FIXED | REMAINDER
    partner_id: Mapped[int] = mapped_column(ForeignKey(PartnerRow.id))
    value: Mapped[int] = mapped_column(BigInteger)
    position: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class CustomerRow(Base):
    """A person who logs in to the app; owns supply accounts."""

    __tablename__ = "customers"
    __table_args__ = (UniqueConstraint("tenant_id", "email"),)

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey(TenantRow.id), index=True)
    reseller_id: Mapped[int | None] = mapped_column(ForeignKey(ResellerRow.id), index=True)
    name: Mapped[str] = mapped_column(String(200))
    email: Mapped[str] = mapped_column(String(254))
    password_hash: Mapped[str] = mapped_column(String(255))  # argon2id
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class SupplyAccountRow(Base):
    """One supply point's prepaid account: a PREPAID ledger account and its tariff."""

    __tablename__ = "supply_accounts"
    __table_args__ = (CheckConstraint("debt_limit_minor >= 0", name="debt_limit_non_negative"),)

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey(TenantRow.id), index=True)
    reseller_id: Mapped[int | None] = mapped_column(ForeignKey(ResellerRow.id), index=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey(CustomerRow.id), index=True)
    ledger_account_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey(AccountRow.id), unique=True
    )
    tariff_code: Mapped[str] = mapped_column(String(64))
    label: Mapped[str] = mapped_column(String(200))
    debt_limit_minor: Mapped[int] = mapped_column(BigInteger)
    low_credit_minor: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class GatewayRow(Base):
    """A gateway and its MQTT identity (the password is shown once, stored hashed)."""

    __tablename__ = "gateways"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey(TenantRow.id), index=True)
    mqtt_username: Mapped[str] = mapped_column(String(64), unique=True)
    mqtt_password_hash: Mapped[str] = mapped_column(String(255))
    online: Mapped[bool] = mapped_column(Boolean, default=False)
    boot_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    state_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class MeterRow(Base):
    """A meter (serial number), its gateway, its supply account and its message counter."""

    __tablename__ = "meters"
    __table_args__ = (
        CheckConstraint("id > 0", name="serial_positive"),
        CheckConstraint("next_msg_id >= 1", name="next_msg_id_positive"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    tenant_id: Mapped[int] = mapped_column(ForeignKey(TenantRow.id), index=True)
    gateway_id: Mapped[str] = mapped_column(ForeignKey(GatewayRow.id), index=True)
    supply_account_id: Mapped[int] = mapped_column(ForeignKey(SupplyAccountRow.id), unique=True)
    modbus_unit: Mapped[int | None] = mapped_column(Integer)
    next_msg_id: Mapped[int] = mapped_column(BigInteger, default=1)
    last_credit_milli: Mapped[int | None] = mapped_column(BigInteger)
    last_reading_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class PaymentRow(Base):
    """A top-up payment, from request to provider outcome; one per idempotency key."""

    __tablename__ = "payments"
    __table_args__ = (
        UniqueConstraint("supply_account_id", "idempotency_key"),
        UniqueConstraint("provider", "provider_payment_id"),
        CheckConstraint("amount_minor > 0", name="amount_positive"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey(TenantRow.id), index=True)
    reseller_id: Mapped[int | None] = mapped_column(ForeignKey(ResellerRow.id))
    supply_account_id: Mapped[int] = mapped_column(ForeignKey(SupplyAccountRow.id), index=True)
    idempotency_key: Mapped[str] = mapped_column(String(128))
    request_hash: Mapped[str] = mapped_column(String(64))
    provider: Mapped[str] = mapped_column(String(32))
    provider_payment_id: Mapped[str | None] = mapped_column(String(255))
    amount_minor: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    status: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    settled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class WebhookEventRow(Base):
    """A provider webhook already processed (de-duplication by provider event id)."""

    __tablename__ = "webhook_events"

    provider: Mapped[str] = mapped_column(String(32), primary_key=True)
    event_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    payment_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)


class TokenRow(Base):
    """A signed message for a meter: the outbox the dispatcher drains (DESIGN §6)."""

    __tablename__ = "tokens"
    __table_args__ = (
        UniqueConstraint("meter_id", "msg_id"),
        Index(None, "status", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey(TenantRow.id), index=True)
    meter_id: Mapped[int] = mapped_column(BigInteger, ForeignKey(MeterRow.id))
    msg_id: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(16))  # CREDIT | TARIFF | KEY_CHANGE
    payment_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey(PaymentRow.id), unique=True)
    amount_minor: Mapped[int | None] = mapped_column(BigInteger)
    message: Mapped[bytes] = mapped_column(LargeBinary)
    status: Mapped[str] = mapped_column(String(16))  # PENDING | SENT | APPLIED | REJECTED
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime)
    result_status: Mapped[str | None] = mapped_column(String(32))
    credit_after_milli: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class ApiKeyRow(Base):
    """A staff/system API key: only a hash of the secret is kept (shown once at creation)."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    secret_hash: Mapped[str] = mapped_column(String(64))  # SHA-256 hex of a 256-bit secret
    role: Mapped[str] = mapped_column(
        String(32)
    )  # PLATFORM_ADMIN | UTILITY_ADMIN | RESELLER | SUPPORT
    tenant_id: Mapped[int | None] = mapped_column(ForeignKey(TenantRow.id), index=True)
    reseller_id: Mapped[int | None] = mapped_column(ForeignKey(ResellerRow.id))
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class IdempotencyKeyRow(Base):
    """A stored response for an API request made with an ``Idempotency-Key`` header."""

    __tablename__ = "idempotency_keys"

    scope: Mapped[str] = mapped_column(String(128), primary_key=True)  # who: key or customer
    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int] = mapped_column(Integer)
    response: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class AuditRow(Base):
    """Append-only record of every state-changing call: who, what, when, request id."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    tenant_id: Mapped[int | None] = mapped_column(BigInteger, index=True)
    actor: Mapped[str] = mapped_column(String(128))  # "api_key:12", "customer:7", "system"
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(128))
    request_id: Mapped[str] = mapped_column(String(64))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON)
