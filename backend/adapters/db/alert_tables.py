"""The ``alerts`` table: things an operator must look at (a rejected token, a money mismatch).

Alerts are rows, not log lines, so they survive restarts, can be listed per tenant and
acknowledged. They are written in the same unit of work as the state change that raised
them (a token marked REJECTED and its alert commit together). Added by revision 0004.
"""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, Index, Integer, String, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from backend.adapters.db.base import Base, UTCDateTime
from backend.adapters.db.tables import TenantRow

_ID = BigInteger().with_variant(Integer, "sqlite")


class AlertKind(enum.StrEnum):
    """What went wrong; stored as its name."""

    # S105: "TOKEN" in a name makes ruff suspect a password; these are alert kinds.
    TOKEN_REJECTED = "TOKEN_REJECTED"  # noqa: S105 - a meter or gateway refused a credit token
    TOKEN_UNCONFIRMED = "TOKEN_UNCONFIRMED"  # noqa: S105 - no result until the token expired
    PAYMENT_MISMATCH = "PAYMENT_MISMATCH"  #: provider reported another amount or currency
    NO_METER = "NO_METER"  #: a top-up settled for an account without a meter: no token
    SETTLEMENT_REFUSED = "SETTLEMENT_REFUSED"  #: split rules or a ledger limit refused it
    # Consumption ingest (issue 6), raised in the ingest unit of work.
    READING_QUARANTINED = "READING_QUARANTINED"  #: a reading was not billed (jump, reset, …)
    UNRATED_ENERGY = "UNRATED_ENERGY"  #: energy across a tariff change left for manual settlement
    UNKNOWN_METER = "UNKNOWN_METER"  #: a gateway reported a meter not provisioned on it
    NO_SPLIT_RULES = "NO_SPLIT_RULES"  #: consumption rated but the tariff has no CONSUMPTION rules
    DEBT_LIMIT_REACHED = "DEBT_LIMIT_REACHED"  #: consumption held back: prepaid at its debt limit
    RECONCILIATION = "RECONCILIATION"  #: meter credit differs from the ledger's expectation
    # Scheduled checks.
    LOW_CREDIT = "LOW_CREDIT"  #: credit fell below the account's low-credit threshold
    OUT_OF_CREDIT = "OUT_OF_CREDIT"  #: credit at or below zero
    METER_STALE = "METER_STALE"  #: no reading from a meter for too long
    GATEWAY_OFFLINE = "GATEWAY_OFFLINE"  #: a gateway's state is offline or silent for too long


class AlertRow(Base):
    """One alert, scoped to a tenant; ``resolved_at`` is set when an operator closes it."""

    __tablename__ = "alerts"
    __table_args__ = (Index(None, "tenant_id", "created_at"),)

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey(TenantRow.id))
    kind: Mapped[str] = mapped_column(String(32))
    meter_id: Mapped[int | None] = mapped_column(BigInteger)
    token_id: Mapped[int | None] = mapped_column(BigInteger)
    payment_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    resolved_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
