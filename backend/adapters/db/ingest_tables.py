"""Tables of consumption ingest (issue 6): batches seen, per-meter ingest state, billed intervals.

Times of readings are Unix seconds (``BIGINT``), as on the wire: ingest writes tens of
thousands of rows a second and compares them with reading ``ts`` values, and a second
converts cheaply to any local calendar when a history or statement is built.

* ``reading_batches``: one row per ``(gateway, seq)`` ever ingested — the de-duplication
  key of DESIGN §5. A batch delivered twice (QoS 1 redelivery, two backend instances,
  a gateway resending after a crash) finds its row and changes nothing.
* ``meter_ingest``: per meter, the pure ingest state (:mod:`backend.domain.consumption`),
  the running split totals and minor-unit carry of its rule set
  (:mod:`backend.domain.split`), money owed to partners but not yet posted because the
  prepaid account was at its debt limit (``pending``), and the newest live values
  (credit, relay, power) for the customer view, alerts and reconciliation.
* ``consumption_intervals``: one row per billed interval (one per tariff segment): energy
  and charge per band, standing charges, each rule's share (milli) and the minor units
  posted to the ledger for it. It is the consumption profile (history by hour/day/month)
  and the evidence behind every statement line. Raw readings are not kept: the intervals
  carry everything billed, and the gateways and meters keep the readings themselves.
"""

from __future__ import annotations

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
)
from sqlalchemy.orm import Mapped, mapped_column

from backend.adapters.db.base import Base, UTCDateTime
from backend.adapters.db.tables import MeterRow, SupplyAccountRow, TenantRow

_ID = BigInteger().with_variant(Integer, "sqlite")


class ReadingBatchRow(Base):
    """A readings batch already ingested: ``(gateway, seq)`` is the de-duplication key."""

    __tablename__ = "reading_batches"

    gateway_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    readings: Mapped[int] = mapped_column(Integer)
    historical: Mapped[bool] = mapped_column(Boolean)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)


class MeterIngestRow(Base):
    """One meter's ingest state, split stream and newest live values."""

    __tablename__ = "meter_ingest"

    meter_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey(MeterRow.id), primary_key=True, autoincrement=False
    )
    tenant_id: Mapped[int] = mapped_column(ForeignKey(TenantRow.id), index=True)
    supply_account_id: Mapped[int] = mapped_column(ForeignKey(SupplyAccountRow.id), index=True)
    #: consumption.state_to_dict
    state: Mapped[dict[str, Any]] = mapped_column(JSON)
    #: Fingerprint of the CONSUMPTION rule set the totals and carry belong to.
    rule_set: Mapped[str] = mapped_column(String(64))
    #: split.SplitTotals as a dict (amount_milli, energy_wh, days, topups).
    totals: Mapped[dict[str, Any]] = mapped_column(JSON)
    #: split.MinorCarry.as_dict
    carry: Mapped[dict[str, Any]] = mapped_column(JSON)
    #: Minor units per partner ledger account owed but not yet posted ({"id": minor}).
    pending: Mapped[dict[str, Any]] = mapped_column(JSON)
    last_ts: Mapped[int | None] = mapped_column(BigInteger)
    last_credit_milli: Mapped[int | None] = mapped_column(BigInteger)
    last_relay: Mapped[str | None] = mapped_column(String(16))
    last_power_w: Mapped[int | None] = mapped_column(BigInteger)
    last_import_wh: Mapped[int | None] = mapped_column(BigInteger)
    last_token_id: Mapped[int | None] = mapped_column(BigInteger)
    #: The reason of the last quarantined reading while the meter is in quarantine
    #: (one alert per episode); cleared by the next billed reading.
    quarantine: Mapped[str | None] = mapped_column(String(32))
    #: Meter credit minus the ledger's expectation at the newest billed reading (milli).
    reconcile_diff_milli: Mapped[int | None] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class ConsumptionIntervalRow(Base):
    """One billed interval of one meter under one tariff (``(from_ts, to_ts]``, Unix s)."""

    __tablename__ = "consumption_intervals"
    __table_args__ = (
        UniqueConstraint("meter_id", "to_ts", "tariff_id"),
        Index(None, "supply_account_id", "to_ts"),
        Index(None, "tenant_id", "to_ts"),
    )

    id: Mapped[int] = mapped_column(_ID, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(BigInteger)
    supply_account_id: Mapped[int] = mapped_column(BigInteger)
    meter_id: Mapped[int] = mapped_column(BigInteger)
    #: The tariff's wire id (``tariffs.wire_id``).
    tariff_id: Mapped[int] = mapped_column(BigInteger)
    from_ts: Mapped[int] = mapped_column(BigInteger)
    to_ts: Mapped[int] = mapped_column(BigInteger)
    import_wh: Mapped[int] = mapped_column(BigInteger)
    #: Wh per tariff band, in band order.
    band_wh: Mapped[list[int]] = mapped_column(JSON)
    #: Energy charge per band (milli), without the block adder.
    band_milli: Mapped[list[int]] = mapped_column(JSON)
    block_milli: Mapped[int] = mapped_column(BigInteger)
    days: Mapped[int] = mapped_column(Integer)
    standing_milli: Mapped[int] = mapped_column(BigInteger)
    #: Energy + block + standing charge (milli): what the meter took for this interval.
    total_milli: Mapped[int] = mapped_column(BigInteger)
    #: Energy whose block adder could not be rated (INGEST.md §6).
    unrated_block_wh: Mapped[int] = mapped_column(BigInteger)
    #: Each rule's share: [[split_rules.id, partner ledger account, milli], ...].
    shares: Mapped[list[list[int]]] = mapped_column(JSON)
    #: Minor units taken from the prepaid account for this reading (posted or pending).
    payer_minor: Mapped[int] = mapped_column(BigInteger)
    #: The payer's carry after this interval (0..999 milli not yet in minor units).
    carry_milli: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
