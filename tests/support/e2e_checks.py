"""What the end-to-end tests read back and assert: the backend's tables, read in one transaction.

:func:`snapshot` reads payments, tokens, transfers, ingest state, billed intervals, reading
batches and the ledger's balances in one read transaction (so they agree with each other
while the system runs on). :func:`settled` says when the system has come to rest after a
test's last top-up, and the ``check_*`` functions assert the invariants every end-to-end
test of money and energy shares (see their docstrings).
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select

from backend.adapters.db.engine import Database
from backend.adapters.db.ingest_tables import (
    ConsumptionIntervalRow,
    MeterIngestRow,
    ReadingBatchRow,
)
from backend.adapters.db.ledger_repo import LedgerRepository
from backend.adapters.db.ledger_tables import TransferRow
from backend.adapters.db.tables import MeterRow, PaymentRow, SupplyAccountRow, TokenRow


@dataclass
class Snapshot:
    """What the backend stored, read in one transaction."""

    payments: list[PaymentRow]
    tokens: list[TokenRow]
    transfers: list[TransferRow]
    ingest: dict[int, MeterIngestRow]
    intervals: dict[int, list[ConsumptionIntervalRow]]
    batches: list[ReadingBatchRow]
    meters: dict[int, MeterRow]
    prepaid: dict[int, int]  # meter → its supply account's PREPAID ledger account
    ledger_sum: int
    balances: dict[int, int]
    recomputed: dict[int, int]

    def credit_tokens(self, meter: int) -> list[TokenRow]:
        return [t for t in self.tokens if t.meter_id == meter and t.kind == "CREDIT"]

    def applied_minor(self, meter: int) -> int:
        return sum(t.amount_minor or 0 for t in self.credit_tokens(meter) if t.status == "APPLIED")


async def snapshot(db: Database) -> Snapshot:
    async with db.read() as s:
        if not db.is_sqlite:
            # One snapshot for every query (the system writes on meanwhile): PostgreSQL's
            # READ COMMITTED would take a new one per statement. (A SQLite read transaction
            # keeps the snapshot of its first read.)
            await s.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        intervals: dict[int, list[ConsumptionIntervalRow]] = {}
        for iv in (
            await s.scalars(
                select(ConsumptionIntervalRow).order_by(
                    ConsumptionIntervalRow.meter_id,
                    ConsumptionIntervalRow.to_ts,
                    ConsumptionIntervalRow.id,
                )
            )
        ).all():
            intervals.setdefault(iv.meter_id, []).append(iv)
        meters = {m.id: m for m in (await s.scalars(select(MeterRow))).all()}
        accounts = {a.id: a for a in (await s.scalars(select(SupplyAccountRow))).all()}
        ledger = LedgerRepository(s)
        return Snapshot(
            payments=list((await s.scalars(select(PaymentRow))).all()),
            tokens=list((await s.scalars(select(TokenRow))).all()),
            transfers=list((await s.scalars(select(TransferRow))).all()),
            ingest={r.meter_id: r for r in (await s.scalars(select(MeterIngestRow))).all()},
            intervals=intervals,
            batches=list(
                (await s.scalars(select(ReadingBatchRow).order_by(ReadingBatchRow.seq))).all()
            ),
            meters=meters,
            prepaid={
                m.id: accounts[m.supply_account_id].ledger_account_id for m in meters.values()
            },
            ledger_sum=await ledger.sum_of_balances(),
            balances=await ledger.balances(),
            recomputed=await ledger.balances_from_transfers(),
        )


def settled(snap: Snapshot, *, backend_since: datetime) -> bool:
    """At rest: every payment the running backend took settled, every token final, every
    meter's newest billed reading taken after its last credit token.

    A payment made before ``backend_since`` (the running backend's start) may stay PENDING:
    the sandbox provider of the process that took it is gone, and with it the webhook.
    """
    if any(p.status == "PENDING" and p.created_at >= backend_since for p in snap.payments):
        return False
    if any(t.status not in ("APPLIED", "REJECTED") for t in snap.tokens):
        return False
    for meter in snap.meters:
        row = snap.ingest.get(meter)
        last = max((t.msg_id for t in snap.credit_tokens(meter)), default=0)
        if row is None or row.reconcile_diff_milli is None:
            return False
        if (row.last_token_id or 0) < last or row.quarantine is not None or row.pending:
            return False
        ivs = snap.intervals.get(meter, [])
        if last and (not ivs or ivs[-1].to_ts != row.last_ts):
            return False
    return True


# ----------------------------------------------------------------------------- checks


def check_ledger(snap: Snapshot) -> None:
    """The ledger sums to zero, balances equal their transfers, nothing is posted twice."""
    assert snap.ledger_sum == 0
    for account in snap.balances.keys() | snap.recomputed.keys():
        assert snap.balances.get(account, 0) == snap.recomputed.get(account, 0), account
    # Transfer ids derive from these references, so the database refuses a second posting
    # with the same id; this also catches one posted under another id.
    per_reference = Counter(
        (t.code, t.reference) for t in snap.transfers if t.code in ("TOPUP", "CONSUMPTION")
    )
    doubled = {k: n for k, n in per_reference.items() if n > 1}
    assert not doubled, doubled


def check_topups(snap: Snapshot) -> None:
    """Every settled payment has one TOPUP transfer and one token, APPLIED once; no others."""
    succeeded = {p.id: p for p in snap.payments if p.status == "SUCCEEDED"}
    topups = Counter(t.reference for t in snap.transfers if t.code == "TOPUP")
    assert topups == Counter({f"payment:{pid}": 1 for pid in succeeded})
    credit = [t for t in snap.tokens if t.kind == "CREDIT"]
    assert Counter(t.payment_id for t in credit) == Counter(dict.fromkeys(succeeded, 1))
    statuses = Counter(t.status for t in credit)
    assert statuses == Counter({"APPLIED": len(succeeded)}), statuses
    # ALREADY_APPLIED: the meter had applied it at an attempt whose answer was lost (a
    # SIGKILL between the write and the reply); the credit went on once all the same.
    final = Counter(t.result_status for t in credit)
    assert set(final) <= {"ACCEPTED", "ALREADY_APPLIED"}, final
    for t in credit:
        assert t.amount_minor == succeeded[t.payment_id].amount_minor  # type: ignore[index]
    # Message ids per meter: 1..n, no gap, no reuse.
    for meter, row in snap.meters.items():
        ids = sorted(t.msg_id for t in snap.tokens if t.meter_id == meter)
        assert ids == list(range(1, row.next_msg_id)), (meter, ids)


def check_meter_accounts(snap: Snapshot) -> None:
    """Per meter: the billed chain is gap-free, billing is exact, the meter agrees to the milli.

    The meters start with zero credit and nothing consumed at ingest's first reading (see
    the module docstring), so at the newest billed reading the meter's credit must be
    exactly the top-ups it applied less everything billed, and the ledger's expectation
    (``reconcile_diff_milli``) must be exactly that credit.
    """
    for meter in snap.meters:
        row = snap.ingest[meter]
        ivs = snap.intervals.get(meter, [])
        assert ivs, f"meter {meter}: nothing billed"
        baseline = row.state["baseline"]
        # A chain: each interval starts where the previous ended (one per tariff segment).
        for a, b in itertools.pairwise(ivs):
            assert b.from_ts == a.to_ts, (meter, a.to_ts, b.from_ts)
        assert ivs[-1].to_ts == baseline["ts"] == row.last_ts
        total = sum(iv.total_milli for iv in ivs)
        for iv in ivs:
            assert sum(iv.band_milli) + iv.block_milli + iv.standing_milli == iv.total_milli
            assert sum(s[2] for s in iv.shares) == iv.total_milli
        payer = sum(iv.payer_minor for iv in ivs)
        assert payer * 1000 + ivs[-1].carry_milli == total, meter
        prepaid = snap.prepaid[meter]
        consumed = [
            t for t in snap.transfers if t.code == "CONSUMPTION" and t.debit_account_id == prepaid
        ]
        pending = sum(int(v) for v in row.pending.values())
        assert sum(t.amount for t in consumed) + pending == payer, meter
        applied = snap.applied_minor(meter)
        topped = sum(
            t.amount for t in snap.transfers if t.code == "TOPUP" and t.credit_account_id == prepaid
        )
        assert topped == applied, meter
        others = [
            (t.code, t.reference, t.amount)
            for t in snap.transfers
            if prepaid in (t.debit_account_id, t.credit_account_id)
            and t.code not in ("TOPUP", "CONSUMPTION")
        ]
        assert snap.balances[prepaid] == applied - sum(t.amount for t in consumed), (
            meter,
            snap.balances[prepaid],
            applied,
            others,
        )
        assert row.last_credit_milli == applied * 1000 - total, (meter, row.last_credit_milli)
        assert row.reconcile_diff_milli == 0, (meter, row.reconcile_diff_milli)
        assert row.last_import_wh == baseline["import_wh"] == sum(iv.import_wh for iv in ivs)
