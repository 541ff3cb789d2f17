"""Key rotation queued through the token outbox, on SQLite and PostgreSQL, down to a meter.

The world of :func:`tests.support.topups.provision` (three meters of tenant "Volta"),
plus a second tenant owning the third meter: rotation is platform-wide. The key store is
a real :class:`FileKeyStore` (key 1 ACTIVE, key 2 NEXT); the queued message bytes are fed
to :mod:`meter_sim.core` meters commissioned with key 1, as the dispatcher would.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import select, update

from backend.adapters.db.engine import Database
from backend.adapters.db.tables import AuditRow, MeterRow, TenantRow, TokenRow
from backend.cli import main
from backend.keys.errors import RotationError
from backend.keys.rotation import RotationStep
from backend.keys.store import FileKeyStore
from backend.service.key_rotation import ACTOR, queue_rotation_step
from firmware_protocol import messages
from firmware_protocol.messages import CreditToken, Header, KeyAction, KeyChange
from firmware_protocol.status import TokenStatus
from firmware_protocol.tariff import flat_tariff
from firmware_protocol.units import currency
from meter_sim import core
from meter_sim.core import MeterConfig, MeterState
from tests.support.topups import T0, Target, World, fresh_target, provision

pytestmark = pytest.mark.integration

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
EUR = currency("EUR")
T0_S = int(T0.timestamp())
TARIFF = flat_tariff(tariff_id=1, currency=EUR, timezone="UTC", price_milli_per_kwh=300_000)
METERS = (7_000_001, 7_000_002, 7_000_003)
USED = 5  # meter 2 has used msg ids 1..4 already


@pytest.fixture(params=BACKENDS)
async def target(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Target]:
    dsn = request.getfixturevalue("postgres_dsn") if request.param == "postgresql" else None
    async with fresh_target(request.param, tmp_path, dsn) as t:
        yield t


@pytest.fixture
async def db(target: Target) -> AsyncIterator[Database]:
    async with target.database() as database:
        world = await provision(database, customers=3)
        await _second_tenant(database, world)
        async with database.write() as s:
            await s.execute(
                update(MeterRow).where(MeterRow.id == METERS[1]).values(next_msg_id=USED)
            )
        yield database


@pytest.fixture
def store(tmp_path: Path) -> FileKeyStore:
    """Key 1 ACTIVE (meters are commissioned with it), key 2 NEXT."""
    s = FileKeyStore(tmp_path / "keys", create=True)
    s.generate()
    s.generate()
    return s


async def _second_tenant(db: Database, world: World) -> int:
    """Move the third meter to a tenant of its own (the rest of its world can stay)."""
    async with db.write() as s:
        other = TenantRow(
            name="Other",
            currency="EUR",
            timezone="UTC",
            min_topup_minor=100,
            max_topup_minor=1000,
            clearing_account_id=world.clearing_id,
            created_at=T0,
        )
        s.add(other)
        await s.flush()
        await s.execute(update(MeterRow).where(MeterRow.id == METERS[2]).values(tenant_id=other.id))
        return other.id


async def _tokens(db: Database) -> list[TokenRow]:
    async with db.read() as s:
        rows = await s.scalars(select(TokenRow).order_by(TokenRow.meter_id, TokenRow.msg_id))
        return list(rows)


async def _next_ids(db: Database) -> dict[int, int]:
    async with db.read() as s:
        return dict((await s.execute(select(MeterRow.id, MeterRow.next_msg_id))).all())


async def _set_status(db: Database, meter_id: int, status: str) -> None:
    async with db.write() as s:
        await s.execute(update(TokenRow).where(TokenRow.meter_id == meter_id).values(status=status))


def _commission(store: FileKeyStore, meter_id: int) -> tuple[MeterConfig, MeterState]:
    config = MeterConfig(meter_id=meter_id, currency=EUR)
    state = core.new_meter(
        config, tariff=TARIFF, trusted_keys={1: store.info(1).public_key}, now=T0_S
    )
    return config, state


def _credit(signer: messages.Signer, meter_id: int, msg_id: int) -> bytes:
    header = Header(
        key_id=signer.key_id,
        meter_id=meter_id,
        msg_id=msg_id,
        issued_at=T0_S,
        expires_at=T0_S + 3600,
    )
    return messages.encode(CreditToken(header, EUR, 500), signer)


# --------------------------------------------------------------------------- queueing


async def test_add_queues_one_signed_key_change_per_meter_of_every_tenant(
    db: Database, store: FileKeyStore
) -> None:
    report = await queue_rotation_step(db, store, step="add", now=T0, request_id="req-1")

    assert (report.step, report.signing_key_id, report.target_key_id) == (RotationStep.ADD, 1, 2)
    assert report.queued == ((METERS[0], 1), (METERS[1], USED), (METERS[2], 1))
    assert (report.already_queued, report.applied, report.meters) == ((), (), 3)
    assert not report.complete
    assert (report.issued_at, report.expires_at) == (T0_S, T0_S + 7 * 86_400)
    tokens = await _tokens(db)
    assert [(t.meter_id, t.msg_id, t.kind, t.status) for t in tokens] == [
        (METERS[0], 1, "KEY_CHANGE", "PENDING"),
        (METERS[1], USED, "KEY_CHANGE", "PENDING"),
        (METERS[2], 1, "KEY_CHANGE", "PENDING"),
    ]
    async with db.read() as s:
        tenants = dict((await s.execute(select(MeterRow.id, MeterRow.tenant_id))).all())
    for t in tokens:
        assert t.tenant_id == tenants[t.meter_id]
        assert (t.attempts, t.next_attempt_at, t.created_at) == (0, T0, T0)
        assert (t.payment_id, t.amount_minor, t.completed_at) == (None, None, None)
        # Signed by the ACTIVE key 1: verifiable with its public key alone.
        msg = messages.verify(
            t.message,
            {1: messages.load_public_key(store.info(1).public_key)},
            meter_id=t.meter_id,
            now=T0_S,
        )
        assert msg == KeyChange(
            Header(
                key_id=1,
                meter_id=t.meter_id,
                msg_id=t.msg_id,
                issued_at=T0_S,
                expires_at=T0_S + 7 * 86_400,
            ),
            KeyAction.ADD,
            2,
            store.info(2).public_key,
        )
    assert tenants[METERS[2]] != tenants[METERS[0]]
    assert await _next_ids(db) == {METERS[0]: 2, METERS[1]: USED + 1, METERS[2]: 2}
    async with db.read() as s:
        (row,) = (await s.scalars(select(AuditRow))).all()
    assert (row.actor, row.action, row.target, row.tenant_id, row.request_id) == (
        ACTOR,
        "key.rotate_add",
        "key:2",
        None,
        "req-1",
    )
    assert row.detail == {
        "step": "add",
        "signing_key_id": 1,
        "target_key_id": 2,
        "messages_queued": 3,
        "already_queued": 0,
        "applied": 0,
        "expires_at": T0_S + 7 * 86_400,
    }


async def test_running_a_step_twice_queues_nothing_new(db: Database, store: FileKeyStore) -> None:
    await queue_rotation_step(db, store, step="add", now=T0)
    before = [(t.meter_id, t.msg_id) for t in await _tokens(db)]
    ids = await _next_ids(db)

    again = await queue_rotation_step(db, store, step="add", now=T0 + dt.timedelta(hours=1))

    assert again.queued == ()
    assert again.already_queued == METERS
    assert [(t.meter_id, t.msg_id) for t in await _tokens(db)] == before
    assert await _next_ids(db) == ids  # no msg id was spent on nothing
    async with db.read() as s:
        audits = (await s.scalars(select(AuditRow).order_by(AuditRow.id))).all()
    assert [a.detail["messages_queued"] for a in audits] == [3, 0]


async def test_progress_is_counted_and_rejected_meters_are_filled_in(
    db: Database, store: FileKeyStore
) -> None:
    await queue_rotation_step(db, store, step="add", now=T0)
    await _set_status(db, METERS[0], "APPLIED")
    await _set_status(db, METERS[1], "SENT")
    await _set_status(db, METERS[2], "REJECTED")  # e.g. expired undelivered

    again = await queue_rotation_step(db, store, step="add", now=T0)

    assert again.queued == ((METERS[2], 2),)  # next id after its rejected one
    assert (again.already_queued, again.applied) == (METERS[:2], METERS[:1])
    assert not again.complete
    await _set_status(db, METERS[1], "APPLIED")
    async with db.write() as s:
        await s.execute(
            update(TokenRow)
            .where(TokenRow.meter_id == METERS[2], TokenRow.msg_id == 2)
            .values(status="APPLIED")
        )
    done = await queue_rotation_step(db, store, step="add", now=T0)
    assert (done.queued, done.applied) == ((), METERS)
    assert done.complete


async def test_revoke_follows_with_consecutive_msg_ids(db: Database, store: FileKeyStore) -> None:
    await queue_rotation_step(db, store, step="add", now=T0)
    store.activate(2)

    report = await queue_rotation_step(db, store, step="revoke", now=T0)

    assert (report.step, report.signing_key_id, report.target_key_id) == (
        RotationStep.REVOKE,
        2,
        1,
    )
    assert report.queued == ((METERS[0], 2), (METERS[1], USED + 1), (METERS[2], 2))
    # The ADD rows of key 2 do not count as a revoke of key 1 (and vice versa).
    assert report.already_queued == ()
    assert (await queue_rotation_step(db, store, step="revoke", now=T0)).queued == ()


async def test_a_step_the_store_is_not_at_writes_nothing(db: Database, store: FileKeyStore) -> None:
    with pytest.raises(RotationError, match="no RETIRED key"):
        await queue_rotation_step(db, store, step="revoke", now=T0)
    with pytest.raises(RotationError, match="step must be"):
        await queue_rotation_step(db, store, step="swap", now=T0)  # type: ignore[arg-type]
    store.activate(2)
    with pytest.raises(RotationError, match="no NEXT key"):
        await queue_rotation_step(db, store, step="add", now=T0)
    assert await _tokens(db) == []
    assert await _next_ids(db) == {METERS[0]: 1, METERS[1]: USED, METERS[2]: 1}


async def test_a_key_change_row_that_does_not_decode_is_refused(
    db: Database, store: FileKeyStore
) -> None:
    await queue_rotation_step(db, store, step="add", now=T0)
    async with db.write() as s:
        await s.execute(
            update(TokenRow).where(TokenRow.meter_id == METERS[0]).values(message=b"\x01junk")
        )
    with pytest.raises(RotationError, match="does not decode"):
        await queue_rotation_step(db, store, step="add", now=T0)


async def test_a_key_change_row_holding_another_message_is_refused(
    db: Database, store: FileKeyStore
) -> None:
    await queue_rotation_step(db, store, step="add", now=T0)
    credit = _credit(store.active_signer(), METERS[0], 1)
    async with db.write() as s:
        await s.execute(
            update(TokenRow).where(TokenRow.meter_id == METERS[0]).values(message=credit)
        )
    with pytest.raises(RotationError, match="holds a CreditToken"):
        await queue_rotation_step(db, store, step="add", now=T0)
    ids = await _next_ids(db)
    assert ids[METERS[1]] == USED + 1  # the failed run rolled back: nothing spent


async def test_a_meter_out_of_msg_ids_stops_the_step(db: Database, store: FileKeyStore) -> None:
    async with db.write() as s:
        await s.execute(update(MeterRow).where(MeterRow.id == METERS[0]).values(next_msg_id=2**32))
    with pytest.raises(RotationError, match=rf"meters \[{METERS[0]}\] have used every u32"):
        await queue_rotation_step(db, store, step="add", now=T0)
    assert await _tokens(db) == []
    assert (await _next_ids(db))[METERS[1]] == USED  # rolled back


async def test_concurrent_runs_queue_each_meter_once(db: Database, store: FileKeyStore) -> None:
    results = await asyncio.gather(
        *(queue_rotation_step(db, store, step="add", now=T0) for _ in range(3))
    )
    assert sorted(len(r.queued) for r in results) == [0, 0, 3]
    assert len(await _tokens(db)) == 3


# --------------------------------------------------------------------------- end to end


async def test_queued_messages_move_meters_from_the_old_key_to_the_new(
    db: Database, store: FileKeyStore
) -> None:
    meters = {m: _commission(store, m) for m in METERS}
    old_signer = store.active_signer()

    await queue_rotation_step(db, store, step="add", now=T0)
    for t in await _tokens(db):
        config, state = meters[t.meter_id]
        state = core.write_message(state, config, t.message)
        assert state.token_status is TokenStatus.ACCEPTED
        assert dict(state.trusted_keys) == store.public_keys()  # keys 1 and 2
        meters[t.meter_id] = (config, state)
        await _set_status(db, t.meter_id, "APPLIED")
    assert (await queue_rotation_step(db, store, step="add", now=T0)).complete

    store.activate(2)
    await queue_rotation_step(db, store, step="revoke", now=T0)
    revokes = [t for t in await _tokens(db) if t.status == "PENDING"]
    assert len(revokes) == 3
    new_signer = store.active_signer()
    assert new_signer.key_id == 2
    for t in revokes:
        config, state = meters[t.meter_id]
        state = core.write_message(state, config, t.message)
        assert state.token_status is TokenStatus.ACCEPTED
        assert dict(state.trusted_keys) == {2: store.info(2).public_key}
        # Trusts only the new key now: a credit signed by the old one is refused.
        refused = core.write_message(state, config, _credit(old_signer, t.meter_id, 100))
        assert refused.token_status is TokenStatus.UNKNOWN_KEY
        accepted = core.write_message(state, config, _credit(new_signer, t.meter_id, 100))
        assert accepted.token_status is TokenStatus.ACCEPTED


async def test_a_revoke_reaching_a_meter_that_missed_the_add_is_refused_harmlessly(
    db: Database, store: FileKeyStore
) -> None:
    config, state = _commission(store, METERS[0])
    store.activate(2)
    await queue_rotation_step(db, store, step="revoke", now=T0)
    (t, *_) = await _tokens(db)
    after = core.write_message(state, config, t.message)
    assert after.token_status is TokenStatus.UNKNOWN_KEY
    assert dataclasses.replace(after, token_status=state.token_status).trusted_keys == (
        (1, store.info(1).public_key),
    )


# --------------------------------------------------------------------------- CLI


def test_cli_rotate_queues_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db_file = tmp_path / "vc.db"
    url = f"sqlite+aiosqlite:///{db_file}"
    store = FileKeyStore(tmp_path / "keys", create=True)
    store.generate()
    store.generate()
    config = tmp_path / "backend.toml"
    config.write_text(f'[database]\nurl = "{url}"\n[keys]\ndir = "{tmp_path / "keys"}"\n')

    async def setup() -> None:
        from backend.adapters.db.migrate import upgrade

        await upgrade(url)
        async with Database(url) as db:
            await provision(db, customers=2)

    asyncio.run(setup())

    assert main(["keys", "rotate", "--step", "add", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "ADD of key 2, signed by key 1: queued 2 message(s)" in out
    assert "meter 7000001 msg_id 1" in out
    assert "meter 7000002 msg_id 1" in out
    assert "keys activate 2" in out

    assert main(["keys", "rotate", "--step", "add", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "queued 0 message(s), 2 meter(s) already had one, 2 meter(s) in all; 0 applied" in out

    # A store at the wrong step: one line on stderr, exit code 1.
    assert main(["keys", "rotate", "--step", "revoke", "--config", str(config)]) == 1
    assert "no RETIRED key to revoke" in capsys.readouterr().err

    async def applied() -> None:
        async with Database(url) as db, db.write() as s:
            await s.execute(update(TokenRow).values(status="APPLIED"))

    asyncio.run(applied())
    assert main(["keys", "rotate", "--step", "add", "--config", str(config)]) == 0
    assert "every meter has applied the ADD of key 2" in capsys.readouterr().out
    assert main(["keys", "activate", "2", "--dir", str(tmp_path / "keys")]) == 0
    capsys.readouterr()
    assert main(["keys", "rotate", "--step", "revoke", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "REVOKE of key 1, signed by key 2: queued 2 message(s)" in out
    assert "meter 7000001 msg_id 2" in out
    assert "next:" not in out


def test_cli_rotate_refuses_a_bad_config_or_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[database]\nurl = "mysql://x"\n')
    assert main(["keys", "rotate", "--step", "add", "--config", str(bad)]) == 1
    assert "database.url" in capsys.readouterr().err

    store_dir = tmp_path / "keys"
    FileKeyStore(store_dir, create=True).generate()
    missing = tmp_path / "no-such.db"
    cfg = tmp_path / "ok.toml"
    cfg.write_text(f'[database]\nurl = "sqlite+aiosqlite:///{missing}"\n')
    rotate = ["keys", "rotate", "--step", "add", "--config", str(cfg), "--dir", str(store_dir)]
    assert main(rotate) == 1
    assert f"no SQLite database at '{missing}'" in capsys.readouterr().err
    assert not missing.exists()

    # Nothing listens on port 1: the connection error is one line, not a traceback.
    cfg.write_text('[database]\nurl = "postgresql+asyncpg://nobody@127.0.0.1:1/none"\n')
    assert main(rotate) == 1
    assert capsys.readouterr().err.startswith("voltcredit keys: error:")
