"""Consumption ingest: reading batches from gateways → billed intervals → ledger postings.

One call of :meth:`IngestService.ingest` is one write unit of work over any number of
batches (the runtime hands it whatever arrived together, up to a bound), so a second of
readings costs a few statements, not one transaction per reading:

1. **Batches** are de-duplicated on ``(gateway, seq)`` (DESIGN §5): a batch seen before
   changes nothing. A gateway may only report its own meters; others are skipped with an
   ``UNKNOWN_METER`` alert.
2. **Readings** go through each meter's pure state machine
   (:func:`backend.domain.consumption.ingest`, which de-duplicates on ``(meter, ts)``,
   handles late, reordered and gap-spanning readings, rollover and resets, and quarantines
   the implausible) with the meter's tariff history, rated with
   ``firmware_protocol.rating`` like the meter rates itself.
3. **Billing** (:func:`backend.domain.billing.bill`) splits each interval's charge by the
   tariff's CONSUMPTION rules into minor units per partner, carrying milli per account.
4. **Ledger**: per meter and unit of work one linked posting: prepaid → REMAINDER partner
   (CONSUMPTION) and REMAINDER → each fee partner (SPLIT), reference
   ``consumption:{meter}:{ts}`` with ids derived from it. A prepaid account at its debt
   limit holds the amounts (posted first, whole, once the balance allows).
5. **Reconciliation** at the newest billed reading: the meter's credit against the
   ledger's expectation (balance - held - carry) when every credit token issued has been
   applied by the meter (its ``last_token_id``); a new difference beyond one rating unit
   raises a ``RECONCILIATION`` alert with the evidence. The ledger is never "fixed".

Everything commits together or not at all; the runtime acknowledges the MQTT messages
only after the commit, so a crash anywhere redelivers them and step 1 or the meter's
baseline makes the redelivery a no-op.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from backend.adapters.db.alert_tables import AlertKind
from backend.adapters.db.engine import Database
from backend.adapters.db.ingest_repo import (
    IngestRepository,
    IngestRow,
    MeterInfo,
    RuleRow,
    TariffVersion,
)
from backend.domain import billing, consumption, split
from backend.domain.ledger import Account, Transfer, TransferCode, apply, derive_id
from backend.errors import LedgerError
from firmware_protocol.mqtt import GatewayState, Reading, ReadingBatch
from firmware_protocol.tariff import tariff_from_dict

log = logging.getLogger(__name__)

#: Reconciliation tolerance: one rating unit (milli).
RECONCILE_TOLERANCE_MILLI: Final = 1


def utc_now() -> datetime:
    """The service clock (tz-aware UTC)."""
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class IncomingBatch:
    """A decoded readings batch as it arrived (the topic's gateway, checked by the codec)."""

    batch: ReadingBatch
    received_at: datetime


@dataclass(frozen=True, slots=True)
class LiveUpdate:
    """The newest live values of a supply account's meter (for server-sent events)."""

    supply_account_id: int
    meter_id: int
    ts: int
    credit_milli: int
    relay: str
    power_w: int
    import_wh: int


@dataclass(slots=True)
class IngestReport:
    """What one unit of work did (counts)."""

    batches: int = 0
    duplicate_batches: int = 0
    readings: int = 0
    billed: int = 0
    first: int = 0
    duplicates: int = 0
    historical: int = 0
    quarantined: int = 0
    unknown: int = 0
    transfers: int = 0
    alerts: int = 0
    live: list[LiveUpdate] = field(default_factory=list)


@dataclass(slots=True)
class _Meter:
    """One meter's working state within a unit of work."""

    info: MeterInfo
    row: IngestRow | None
    state: consumption.MeterIngestState
    book: billing.MeterBook
    quarantine: str | None
    reconcile_diff: int | None
    last: Reading | None = None  # newest reading accepted for live values
    last_billed: Reading | None = None  # newest billed or first reading
    lines: dict[str, int] = field(default_factory=dict)
    billed_ts: int | None = None
    changed: bool = False


class IngestService:
    """Consumption ingest over one database; one :meth:`ingest` call = one unit of work."""

    def __init__(
        self,
        db: Database,
        *,
        clock: Callable[[], datetime] = utc_now,
        policy: consumption.IngestPolicy = consumption.DEFAULT_POLICY,
    ) -> None:
        self._db = db
        self._clock = clock
        self._policy = policy
        self._tariff_sig: tuple[int, int] | None = None
        self._tariffs: dict[tuple[int, str], list[TariffVersion]] = {}
        self._histories: dict[tuple[int, str, int], consumption.TariffHistory] = {}
        self._unknown_alerted: set[tuple[str, int]] = set()

    # ------------------------------------------------------------------ gateways

    async def gateway_state(self, state: GatewayState, gateway_id: str) -> bool:
        """Record a gateway's retained presence message; True if it was newer than stored."""
        at = datetime.fromtimestamp(state.ts, UTC)
        async with self._db.write() as session:
            return await IngestRepository(session).gateway_state(
                gateway_id, online=state.online, boot_seq=state.boot_seq, at=at
            )

    # ------------------------------------------------------------------ readings

    async def ingest(self, incoming: Sequence[IncomingBatch]) -> IngestReport:
        """Ingest batches in one unit of work; returns what happened."""
        report = IngestReport()
        if not incoming:
            return report
        now = self._clock()
        async with self._db.write() as session:
            repo = IngestRepository(session)
            keys = [(i.batch.gw, i.batch.seq) for i in incoming]
            seen = await repo.seen_batches(keys)
            fresh: list[IncomingBatch] = []
            batch_rows: list[dict[str, Any]] = []
            taken: set[tuple[str, int]] = set(seen)
            for item in incoming:
                key = (item.batch.gw, item.batch.seq)
                if key in taken:
                    report.duplicate_batches += 1
                    continue
                taken.add(key)
                fresh.append(item)
                batch_rows.append(
                    {
                        "gateway_id": item.batch.gw,
                        "seq": item.batch.seq,
                        "readings": len(item.batch.readings),
                        "historical": item.batch.historical,
                        "received_at": item.received_at,
                    }
                )
            report.batches = len(fresh)
            if not fresh:
                return report
            await repo.add_batches(batch_rows)
            meter_ids = {r.meter for item in fresh for r in item.batch.readings}
            infos = await repo.meters(meter_ids)
            await self._refresh_tariffs(
                repo, {(m.tenant_id, m.tariff_code) for m in infos.values()}
            )
            rows = await repo.ingest_rows(infos)
            meters: dict[int, _Meter] = {}
            alerts: list[dict[str, Any]] = []
            intervals: list[dict[str, Any]] = []
            for item in fresh:
                received = int(item.received_at.timestamp())
                for reading in item.batch.readings:
                    report.readings += 1
                    info = infos.get(reading.meter)
                    if info is None or info.gateway_id != item.batch.gw:
                        report.unknown += 1
                        self._unknown(item.batch.gw, reading.meter, info, now, alerts)
                        continue
                    m = meters.get(reading.meter)
                    if m is None:
                        m = meters[reading.meter] = self._load(info, rows.get(reading.meter))
                    self._one(m, reading, received, now, report, alerts, intervals)
            rules = await repo.consumption_rules(
                {(m.info.tenant_id, m.info.tariff_code) for m in meters.values()}
            )
            await self._post(repo, meters, rules, now, report, alerts, intervals)
            report.live = await self._save(repo, meters, now)
            await repo.add_intervals(intervals)
            await repo.add_alerts(alerts)
            report.alerts = len(alerts)
        return report

    # ------------------------------------------------------------------ steps

    async def _refresh_tariffs(self, repo: IngestRepository, keys: set[tuple[int, str]]) -> None:
        sig = await repo.tariff_signature()
        if sig != self._tariff_sig:
            self._tariffs.clear()
            self._histories.clear()
            self._tariff_sig = sig
        missing = keys - self._tariffs.keys()
        if missing:
            self._tariffs.update(await repo.tariff_versions(missing))

    def _history(self, info: MeterInfo) -> consumption.TariffHistory:
        created = int(info.created_at.timestamp())
        key = (info.tenant_id, info.tariff_code, created)
        history = self._histories.get(key)
        if history is None:
            entries: list[consumption.ActiveTariff] = []
            for v in self._tariffs.get((info.tenant_id, info.tariff_code), []):
                # A version already in force when the meter was provisioned reached it with
                # the meter's first tariff message: the meter activated it then, not earlier
                # (meter_sim activates a late message at once; INGEST.md §5).
                at = max(int(v.activation_at.timestamp()), created)
                tariff = tariff_from_dict(v.body)
                if entries and entries[-1].activation >= at:
                    entries[-1] = consumption.ActiveTariff(tariff, entries[-1].activation)
                    continue
                entries.append(consumption.ActiveTariff(tariff, at))
            history = consumption.TariffHistory(tuple(entries))
            self._histories[key] = history
        return history

    def _load(self, info: MeterInfo, row: IngestRow | None) -> _Meter:
        if row is None:
            return _Meter(
                info=info,
                row=None,
                state=consumption.MeterIngestState(meter=info.meter_id),
                book=billing.MeterBook(),
                quarantine=None,
                reconcile_diff=None,
            )
        return _Meter(
            info=info,
            row=row,
            state=consumption.state_from_dict(row.state),
            book=billing.MeterBook(
                rule_set=row.rule_set,
                totals=billing.totals_from_dict(row.totals),
                carry=split.MinorCarry.from_dict(row.carry),
                pending=billing.pending_from_dict(row.pending),
            ),
            quarantine=row.quarantine,
            reconcile_diff=row.reconcile_diff_milli,
        )

    def _unknown(
        self,
        gw: str,
        meter: int,
        info: MeterInfo | None,
        now: datetime,
        alerts: list[dict[str, Any]],
    ) -> None:
        if (gw, meter) in self._unknown_alerted or info is None:
            # A meter nobody provisioned has no tenant to tell; log it once.
            if (gw, meter) not in self._unknown_alerted:
                log.warning("gateway %s reports meter %d, which is not provisioned", gw, meter)
                self._unknown_alerted.add((gw, meter))
            return
        self._unknown_alerted.add((gw, meter))
        alerts.append(
            _alert(
                info.tenant_id,
                AlertKind.UNKNOWN_METER,
                now,
                meter,
                {"gateway": gw, "provisioned_on": info.gateway_id},
            )
        )

    def _one(  # noqa: PLR0917 - one step of ingest's loop, all of its working state
        self,
        m: _Meter,
        reading: Reading,
        received: int,
        now: datetime,
        report: IngestReport,
        alerts: list[dict[str, Any]],
        intervals: list[dict[str, Any]],
    ) -> None:
        state, outcome = consumption.ingest(
            m.state, reading, self._history(m.info), policy=self._policy, received_at=received
        )
        m.state = state
        if isinstance(outcome, consumption.Duplicate):
            report.duplicates += 1
            return
        if isinstance(outcome, consumption.Historical):
            report.historical += 1
            return
        m.changed = True
        if isinstance(outcome, consumption.Quarantined):
            report.quarantined += 1
            if outcome.reason is not consumption.QuarantineReason.FUTURE_TIMESTAMP:
                self._live(m, reading)
            if m.quarantine != outcome.reason.value:
                m.quarantine = outcome.reason.value
                alerts.append(
                    _alert(
                        m.info.tenant_id,
                        AlertKind.READING_QUARANTINED,
                        now,
                        reading.meter,
                        {
                            "reason": outcome.reason.value,
                            "detail": outcome.detail,
                            "ts": outcome.ts,
                            "evidence": dict(outcome.evidence),
                        },
                    )
                )
            return
        self._live(m, reading)
        m.last_billed = reading
        m.quarantine = None
        if isinstance(outcome, consumption.FirstReading):
            report.first += 1
            return
        report.billed += 1
        if isinstance(outcome, consumption.TariffChanged):
            segments: Sequence[consumption.Interval] = outcome.segments
            if outcome.unrated is not None:
                u = outcome.unrated
                alerts.append(
                    _alert(
                        m.info.tenant_id,
                        AlertKind.UNRATED_ENERGY,
                        now,
                        reading.meter,
                        {
                            "energy_wh": u.energy_wh,
                            "from_ts": u.from_ts,
                            "to_ts": u.to_ts,
                            "tariff_ids": list(u.tariff_ids),
                        },
                    )
                )
        else:
            segments = (outcome,)
        m.billed_ts = reading.ts
        intervals.extend(_interval_row(m, iv, now) for iv in segments)

    async def _post(  # noqa: PLR0917 - the unit of work's working state, named
        self,
        repo: IngestRepository,
        meters: dict[int, _Meter],
        rules_by_key: dict[tuple[int, str], list[RuleRow]],
        now: datetime,
        report: IngestReport,
        alerts: list[dict[str, Any]],
        intervals: list[dict[str, Any]],
    ) -> None:
        """Bill every meter's new intervals, then post what the ledger can take."""
        by_meter: dict[int, list[dict[str, Any]]] = {}
        for row in intervals:
            by_meter.setdefault(row["meter_id"], []).append(row)
        compiled: dict[tuple[int, str, int | None], billing.RuleSet] = {}

        def rule_set_of(m: _Meter) -> billing.RuleSet:
            # One compiled rule set per tariff and reseller in this unit of work.
            key = (m.info.tenant_id, m.info.tariff_code, m.info.reseller_id)
            found = compiled.get(key)
            if found is None:
                rows = rules_by_key.get((m.info.tenant_id, m.info.tariff_code), [])
                found = compiled[key] = billing.RuleSet.of(_rule_refs(rows, m.info))
            return found

        for meter_id, rows in by_meter.items():
            m = meters[meter_id]
            rule_set = rule_set_of(m)
            first_bill = m.book.rule_set != billing.NO_RULES or m.book.totals == split.SplitTotals()
            for row in rows:
                billed = billing.bill(m.book, rule_set, (row.pop("_interval"),))
                m.book = billed.book
                row["shares"] = [list(s) for s in billed.shares[0]]
                row["payer_minor"] = billed.payer_minor
                row["carry_milli"] = billed.book.carry.amount_milli
                m.lines = billing.merge(m.lines, billed.lines)
            if not rule_set.refs and first_bill:
                alerts.append(
                    _alert(
                        m.info.tenant_id,
                        AlertKind.NO_SPLIT_RULES,
                        now,
                        meter_id,
                        {"tariff_code": m.info.tariff_code},
                    )
                )
        # Post: every meter with something due (new lines or held amounts).
        due_meters = [m for m in meters.values() if m.lines or m.book.pending]
        account_ids: set[int] = set()
        for m in due_meters:
            account_ids.add(m.info.prepaid_account_id)
            account_ids.update(int(k) for k in m.book.pending if k != billing.REMAINDER_KEY)
            account_ids.update(int(k) for k in m.lines if k != billing.REMAINDER_KEY)
            rem = rule_set_of(m).remainder_account
            if rem is not None:
                account_ids.add(rem)
        accounts = await repo.lock_accounts(account_ids)
        touched: dict[int, Account] = {}
        transfers: list[Transfer] = []
        for m in due_meters:
            rule_set = rule_set_of(m)
            had_pending = bool(m.book.pending)
            due = billing.merge(m.book.pending, m.lines)
            m.lines = {}
            posting = _posting(m, due, rule_set.remainder_account, accounts, now)
            if posting is None:
                if not had_pending and due and rule_set.refs:
                    alerts.append(
                        _alert(
                            m.info.tenant_id,
                            AlertKind.DEBT_LIMIT_REACHED,
                            now,
                            m.info.meter_id,
                            {
                                "held_minor": sum(due.values()),
                                "prepaid_account": m.info.prepaid_account_id,
                            },
                        )
                    )
                m.book = dataclasses.replace(m.book, pending=due)
                m.changed = True
                continue
            new_accounts, batch = posting
            accounts.update(new_accounts)
            touched.update(new_accounts)
            transfers.extend(batch)
            m.book = dataclasses.replace(m.book, pending={})
            m.changed = True
        await repo.post(list(touched.values()), transfers)
        report.transfers += len(transfers)
        await self._reconcile(repo, meters, accounts, now, alerts)

    async def _reconcile(
        self,
        repo: IngestRepository,
        meters: dict[int, _Meter],
        accounts: dict[int, Account],
        now: datetime,
        alerts: list[dict[str, Any]],
    ) -> None:
        candidates = [m for m in meters.values() if m.last_billed is not None]
        if not candidates:
            return
        missing = {m.info.prepaid_account_id for m in candidates} - accounts.keys()
        if missing:
            accounts.update(await repo.lock_accounts(missing))
        issued = await repo.last_credit_tokens(m.info.meter_id for m in candidates)
        for m in candidates:
            reading = m.last_billed
            assert reading is not None  # noqa: S101 - filtered above
            if issued.get(m.info.meter_id, 0) > reading.last_token_id:
                continue  # a credit token is on its way: the meter cannot show it yet
            balance = accounts[m.info.prepaid_account_id].balance
            expected = (
                balance - m.book.pending_minor
            ) * split.MILLI_PER_MINOR - m.book.carry.amount_milli
            diff = reading.credit_milli - expected
            previous = m.reconcile_diff
            m.reconcile_diff = diff
            m.changed = True
            if abs(diff) > RECONCILE_TOLERANCE_MILLI and (
                previous is None or abs(diff - previous) > RECONCILE_TOLERANCE_MILLI
            ):
                alerts.append(
                    _alert(
                        m.info.tenant_id,
                        AlertKind.RECONCILIATION,
                        now,
                        m.info.meter_id,
                        {
                            "ts": reading.ts,
                            "meter_credit_milli": reading.credit_milli,
                            "expected_milli": expected,
                            "difference_milli": diff,
                            "previous_difference_milli": previous,
                            "ledger_balance_minor": balance,
                            "held_minor": m.book.pending_minor,
                            "carry_milli": m.book.carry.amount_milli,
                            "meter_last_token_id": reading.last_token_id,
                        },
                    )
                )

    def _live(self, m: _Meter, reading: Reading) -> None:
        if m.last is None or reading.ts >= m.last.ts:
            m.last = reading

    async def _save(
        self, repo: IngestRepository, meters: dict[int, _Meter], now: datetime
    ) -> list[LiveUpdate]:
        live: list[LiveUpdate] = []
        new: list[dict[str, Any]] = []
        changed: list[dict[str, Any]] = []
        touch: list[dict[str, Any]] = []
        for m in meters.values():
            if not m.changed:
                continue
            row = m.row
            last = m.last
            keep_live = last is None or (
                row is not None and row.last_ts is not None and row.last_ts > last.ts
            )
            values: dict[str, Any] = {
                "meter_id": m.info.meter_id,
                "tenant_id": m.info.tenant_id,
                "supply_account_id": m.info.supply_account_id,
                "state": consumption.state_to_dict(m.state),
                "rule_set": m.book.rule_set,
                "totals": billing.totals_to_dict(m.book.totals),
                "carry": m.book.carry.as_dict(),
                "pending": dict(m.book.pending),
                "quarantine": m.quarantine,
                "reconcile_diff_milli": m.reconcile_diff,
                "updated_at": now,
            }
            if keep_live:
                assert row is not None or last is None  # noqa: S101 - by keep_live
                values.update(
                    {
                        "last_ts": None if row is None else row.last_ts,
                        "last_credit_milli": None if row is None else row.last_credit_milli,
                        "last_relay": None if row is None else row.last_relay,
                        "last_power_w": None if row is None else row.last_power_w,
                        "last_import_wh": None if row is None else row.last_import_wh,
                        "last_token_id": None if row is None else row.last_token_id,
                    }
                )
            else:
                assert last is not None  # noqa: S101 - by keep_live
                values.update(
                    {
                        "last_ts": last.ts,
                        "last_credit_milli": last.credit_milli,
                        "last_relay": last.relay.value,
                        "last_power_w": last.power_w,
                        "last_import_wh": last.import_wh,
                        "last_token_id": last.last_token_id,
                    }
                )
                touch.append(
                    {
                        "id": m.info.meter_id,
                        "at": datetime.fromtimestamp(last.ts, UTC),
                        "credit": last.credit_milli,
                    }
                )
                live.append(
                    LiveUpdate(
                        supply_account_id=m.info.supply_account_id,
                        meter_id=m.info.meter_id,
                        ts=last.ts,
                        credit_milli=last.credit_milli,
                        relay=last.relay.value,
                        power_w=last.power_w,
                        import_wh=last.import_wh,
                    )
                )
            (new if row is None else changed).append(values)
        await repo.save_ingest_rows(new, changed)
        await repo.touch_meters(touch)
        return live


# ----------------------------------------------------------------------------- helpers


def _alert(
    tenant_id: int, kind: AlertKind, at: datetime, meter_id: int | None, detail: dict[str, Any]
) -> dict[str, Any]:
    return {
        "tenant_id": tenant_id,
        "kind": kind.value,
        "meter_id": meter_id,
        "token_id": None,
        "payment_id": None,
        "detail": detail,
        "created_at": at,
        "resolved_at": None,
    }


def _rule_refs(rows: Sequence[RuleRow], info: MeterInfo) -> list[billing.RuleRef]:
    """The rules that apply to this meter's account (a reseller's rules only to its own)."""
    out = []
    for r in rows:
        if r.partner_reseller_id is not None and r.partner_reseller_id != info.reseller_id:
            continue
        out.append(
            billing.RuleRef(
                r.rule_id, split.SplitRule(split.RuleKind(r.kind), r.partner_account_id, r.value)
            )
        )
    return out


def _interval_row(m: _Meter, iv: consumption.Interval, now: datetime) -> dict[str, Any]:
    return {
        "tenant_id": m.info.tenant_id,
        "supply_account_id": m.info.supply_account_id,
        "meter_id": iv.meter,
        "tariff_id": iv.tariff_id,
        "from_ts": iv.from_ts,
        "to_ts": iv.to_ts,
        "import_wh": iv.import_wh,
        "band_wh": list(iv.charge.energy_wh),
        "band_milli": list(iv.charge.energy_milli),
        "block_milli": iv.charge.block_milli,
        "days": iv.days,
        "standing_milli": iv.standing_milli,
        "total_milli": iv.total_milli,
        "unrated_block_wh": iv.unrated_block_wh,
        "created_at": now,
        "_interval": iv,
    }


def _posting(
    m: _Meter,
    due: dict[str, int],
    remainder: int | None,
    accounts: dict[int, Account],
    now: datetime,
) -> tuple[dict[int, Account], list[Transfer]] | None:
    """The transfers that post ``due`` for meter ``m``, applied; ``None``: hold it."""
    if not due:
        return {}, []
    resolved = billing.resolve(due, remainder)
    if resolved is None or remainder is None:
        return None
    prepaid = accounts[m.info.prepaid_account_id]
    currency = prepaid.currency
    ts = m.billed_ts if m.billed_ts is not None else 0
    reference = f"consumption:{m.info.meter_id}:{ts}"
    payer = sum(resolved.values())
    transfers: list[Transfer] = []
    group = derive_id("consumption", str(m.info.meter_id), str(ts), "group")

    def add(debit: int, credit: int, amount: int, code: TransferCode, tag: str) -> None:
        transfers.append(
            Transfer(
                id=derive_id("consumption", str(m.info.meter_id), str(ts), tag),
                debit_account_id=debit,
                credit_account_id=credit,
                amount=amount,
                currency=currency,
                code=code,
                reference=reference,
                created_at=now,
                linked_group=group,
            )
        )

    if payer > 0:
        add(prepaid.id, remainder, payer, TransferCode.CONSUMPTION, "payer")
    for account, minor in sorted(resolved.items()):
        if account == remainder or minor == 0:
            continue
        if minor > 0:
            add(remainder, account, minor, TransferCode.SPLIT, str(account))
        else:
            add(account, remainder, -minor, TransferCode.SPLIT, str(account))
    if not transfers:
        return {}, []
    if len(transfers) == 1:
        transfers[0] = dataclasses.replace(transfers[0], linked_group=None)
    involved = {t.debit_account_id for t in transfers} | {t.credit_account_id for t in transfers}
    if not involved <= accounts.keys():
        return None
    try:
        after = apply({i: accounts[i] for i in involved}, transfers)
    except LedgerError:
        return None
    return after, transfers


__all__ = [
    "IncomingBatch",
    "IngestReport",
    "IngestService",
    "LiveUpdate",
    "utc_now",
]
