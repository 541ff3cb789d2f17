"""Tables of alert notifications and scheduled checks: webhook endpoints, the outbox, check state.

* ``webhook_endpoints``: a utility's receivers of alert notifications: a URL, the alert
  kinds it wants and the HMAC secret its deliveries are signed with. The secret is the
  utility's *shared* secret — we need it in clear to sign — and the API shows it once,
  at creation. Deleting an endpoint sets ``deleted_at`` (its delivery history stays).
* ``notifications``: the outbox, one row per (alert, endpoint) — the unique key is the
  de-duplication: an alert is never notified twice to one endpoint. The deliverer
  claims due rows, POSTs them and records the outcome; all of it is here, so delivery
  survives restarts and several backend instances share the work.
* ``notify_cursor``: one row: every alert with ``id <= alert_id`` has had its outbox
  rows made (the fan-out's high-water mark).
* ``meter_alert_state`` / ``gateway_alert_state``: what the previous scheduled check saw
  (the credit level, whether a staleness or offline episode is under way), so an alert is
  raised once per crossing or episode, not on every check (:mod:`backend.domain.alerting`).

Added by revision 0006.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    String,
    UniqueConstraint,
    Uuid,
)
from sqlalchemy.orm import Mapped, mapped_column

from backend.adapters.db.alert_tables import AlertRow
from backend.adapters.db.base import Base, UTCDateTime
from backend.adapters.db.tables import GatewayRow, MeterRow, TenantRow

_ID = BigInteger().with_variant(Integer, "sqlite")


class WebhookEndpointRow(Base):
    """A tenant's receiver of alert notifications."""

    __tablename__ = "webhook_endpoints"

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey(TenantRow.id), index=True)
    url: Mapped[str] = mapped_column(String(2048))
    #: The HMAC-SHA256 key of the signatures (``whsec_…``; its UTF-8 bytes are the key).
    secret: Mapped[str] = mapped_column(String(128))
    #: Alert kinds (names) it receives.
    kinds: Mapped[list[str]] = mapped_column(JSON)
    description: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class NotificationRow(Base):
    """One alert to deliver to one endpoint, and how its delivery stands."""

    __tablename__ = "notifications"
    __table_args__ = (
        UniqueConstraint("alert_id", "endpoint_id"),
        Index(None, "status", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(BigInteger, index=True)
    alert_id: Mapped[int] = mapped_column(BigInteger, ForeignKey(AlertRow.id))
    endpoint_id: Mapped[int] = mapped_column(BigInteger, ForeignKey(WebhookEndpointRow.id))
    #: Sent as ``Voltcredit-Event-Id`` and in the body: receivers de-duplicate on it.
    event_id: Mapped[uuid.UUID] = mapped_column(Uuid, unique=True)
    #: The JSON body, fixed when the row is made (every attempt sends the same bytes).
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))  # PENDING | DELIVERED | FAILED | CANCELLED
    attempts: Mapped[int] = mapped_column(Integer)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class NotifyCursorRow(Base):
    """The fan-out's high-water mark (a single row, ``id`` 1)."""

    __tablename__ = "notify_cursor"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    alert_id: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class MeterAlertStateRow(Base):
    """What the previous check saw of a meter: its credit level, a staleness episode."""

    __tablename__ = "meter_alert_state"

    meter_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey(MeterRow.id), primary_key=True, autoincrement=False
    )
    tenant_id: Mapped[int] = mapped_column(BigInteger, index=True)
    credit_level: Mapped[str] = mapped_column(String(8))  # OK | LOW | OUT
    stale: Mapped[bool] = mapped_column(Boolean)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class GatewayAlertStateRow(Base):
    """What the previous check saw of a gateway: whether an offline episode is under way."""

    __tablename__ = "gateway_alert_state"

    gateway_id: Mapped[str] = mapped_column(String(64), ForeignKey(GatewayRow.id), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(BigInteger, index=True)
    offline: Mapped[bool] = mapped_column(Boolean)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
