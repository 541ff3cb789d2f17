"""The gateway's durable state in one SQLite file: counters, the reading outbox, tokens, meters.

Tables (schema version 1, ``PRAGMA user_version``):

* ``meta(key, value)`` — ``boot_seq`` (+1 per start) and ``next_seq`` (the next batch
  number; MQTT.md §4: never reused). A new file starts ``next_seq`` at its creation
  time * 1000, so a gateway whose disk was replaced does not reuse numbers the backend
  has already seen (it de-duplicates on ``(gw, seq)``).
* ``outbox(seq, created, payload)`` — encoded ``ReadingBatch`` es waiting for a PUBACK;
  ``outbox_latest(meter, seq)`` — for each meter, the newest outbox row holding a
  reading of it (the cap policy must not drop that reading).
* ``tokens`` — one row per distinct delivery (meter, SHA-256 of the bytes): the message,
  its :class:`~gateway.token_flow.TokenState`, status and credit read back;
  ``replay(meter, window)`` — the gateway's copy of each meter's anti-replay window.
* ``meters`` — reachability and the last good poll of each meter, for the birth
  message and ``voltcredit gateway status``.

**Outbox cap** (``store.outbox_max_bytes``, on the encoded payload bytes): when a new
batch takes the outbox over the cap, the oldest batches are dropped, oldest first,
*except* the readings that are the newest reading of their meter in the outbox: those
are carried forward into a new batch (a new ``seq``) before the old one is deleted.
A batch made only of such readings is kept. So an outage longer than the cap allows
loses resolution (intermediate readings), never a meter's latest cumulative registers —
and since registers are cumulative, never energy (DESIGN §3). The file stays near the
cap because SQLite reuses the pages of deleted rows.

Durability: WAL with ``synchronous=FULL``, so a committed token survives a power cut
before its PUBACK goes out. One connection, used by one thread at a time:
:class:`AsyncStore` runs every call on a dedicated single-thread executor; the CLI
opens its own read-only connection. ``sqlite3`` errors become :class:`StoreError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, ParamSpec, TypeVar

from firmware_protocol import mqtt
from firmware_protocol.errors import ProtocolError
from firmware_protocol.mqtt import Reading, ReadingBatch
from firmware_protocol.replay import ReplayWindow
from firmware_protocol.status import TokenStatus
from gateway.errors import StoreError
from gateway.readings import chunk_readings
from gateway.token_flow import TokenState

SCHEMA_VERSION: Final = 1

_SCHEMA: Final = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE outbox (
    seq INTEGER PRIMARY KEY,
    created INTEGER NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE outbox_latest (meter TEXT PRIMARY KEY, seq INTEGER NOT NULL);
CREATE INDEX outbox_latest_seq ON outbox_latest (seq);
CREATE TABLE tokens (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    meter TEXT NOT NULL,
    token_id INTEGER NOT NULL,
    digest BLOB NOT NULL,
    msg BLOB NOT NULL,
    state TEXT NOT NULL,
    status INTEGER,
    credit_after_milli INTEGER,
    received_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    UNIQUE (meter, digest)
);
CREATE INDEX tokens_open ON tokens (state) WHERE state != 'done';
CREATE TABLE replay (meter TEXT PRIMARY KEY, window BLOB NOT NULL);
CREATE TABLE meters (
    meter TEXT PRIMARY KEY,
    reachable INTEGER NOT NULL,
    last_ok INTEGER,
    last_ts INTEGER,
    last_credit_milli INTEGER,
    last_error TEXT,
    updated_at INTEGER NOT NULL
);
"""

P = ParamSpec("P")
T = TypeVar("T")


def digest(msg: bytes) -> bytes:
    """The key a delivery is recognised by: SHA-256 of the signed bytes."""
    return hashlib.sha256(msg).digest()


# Meter ids are u64 and SQLite integers i64: they are stored as decimal TEXT.
def _m(meter: int) -> str:
    return str(meter)


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenRow:
    """One stored delivery."""

    id: int
    meter: int
    token_id: int
    msg: bytes
    state: TokenState
    status: TokenStatus | None
    credit_after_milli: int | None
    received_at: int
    updated_at: int


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboxRow:
    """One batch waiting to be delivered."""

    seq: int
    created: int
    payload: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class MeterRow:
    """What the gateway last knew of a meter."""

    meter: int
    reachable: bool
    last_ok: int | None
    last_ts: int | None
    last_credit_milli: int | None
    last_error: str | None
    updated_at: int


@dataclass(frozen=True, slots=True, kw_only=True)
class PollOutcome:
    """One meter's result in a poll cycle: a reading, or the error that prevented one."""

    meter: int
    reading: Reading | None
    error: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreStatus:
    """The figures ``voltcredit gateway status`` shows."""

    boot_seq: int
    next_seq: int
    outbox_batches: int
    outbox_bytes: int
    oldest_pending: int | None
    tokens_open: Mapping[str, int]
    oldest_open_token: int | None
    meters: tuple[MeterRow, ...]


class Store:
    """Synchronous access to the store file; see the module docstring for the tables."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: Path, *, now: int) -> Store:
        """Open (creating if needed) the store at ``path`` for reading and writing."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False, timeout=10.0
            )
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open store {path}: {exc}") from exc
        store = cls(conn, path)
        try:
            store._setup(now)
        except BaseException:
            conn.close()
            raise
        return store

    @classmethod
    def open_readonly(cls, path: Path) -> Store:
        """Open an existing store read-only (the status command, while the gateway runs)."""
        if not path.exists():
            raise StoreError(f"no store at {path} (has the gateway run with this config?)")
        try:
            conn = sqlite3.connect(
                f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None, timeout=10.0
            )
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read store {path}: {exc}") from exc
        if version != SCHEMA_VERSION:
            conn.close()
            raise StoreError(
                f"store {path} has schema {version}, this gateway reads {SCHEMA_VERSION}"
            )
        return cls(conn, path)

    def _setup(self, now: int) -> None:
        with self._errors("set up"):
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"store {self.path} has schema {version}, newer than this gateway's "
                    f"{SCHEMA_VERSION}: upgrade the gateway"
                )
            if version == 0:
                with self._tx():
                    # Statement by statement: executescript() would COMMIT the open transaction.
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            self._conn.execute(statement)
                    self._conn.executemany(
                        "INSERT INTO meta (key, value) VALUES (?, ?)",
                        [("boot_seq", 0), ("next_seq", now * 1000)],
                    )
                    self._conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        """Close the connection."""
        with self._errors("close"):
            self._conn.close()

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise StoreError(f"store {self.path}: {what}: {exc}") from exc

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE … COMMIT), rolled back on any error."""
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(f"store {self.path}: begin: {exc}") from exc
        try:
            yield conn
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise StoreError(f"store {self.path}: commit: {exc}") from exc

    def _meta(self, key: str) -> int:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0])

    # ------------------------------------------------------------------ counters

    def begin_boot(self) -> int:
        """Count a start of the gateway; the new ``boot_seq``."""
        with self._errors("boot"), self._tx() as conn:
            conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'boot_seq'")
            return self._meta("boot_seq")

    def boot_seq(self) -> int:
        """The current ``boot_seq``."""
        with self._errors("read boot_seq"):
            return self._meta("boot_seq")

    def next_seq(self) -> int:
        """The ``seq`` the next batch will get."""
        with self._errors("read next_seq"):
            return self._meta("next_seq")

    # ------------------------------------------------------------------ readings

    def record_poll(
        self, gw: str, outcomes: Sequence[PollOutcome], *, now: int, cap_bytes: int
    ) -> list[int]:
        """Store one poll cycle in one transaction: its batches (new seqs) and every meter's state.

        Returns the ``seq`` of each batch written (none if no meter answered).
        """
        readings = [o.reading for o in outcomes if o.reading is not None]
        with self._errors("record poll"), self._tx() as conn:
            seqs = [self._insert_batch(conn, gw, chunk, now) for chunk in chunk_readings(readings)]
            conn.executemany(
                "INSERT INTO meters (meter, reachable, last_ok, last_ts, last_credit_milli,"
                " last_error, updated_at) VALUES (?, 1, ?, ?, ?, NULL, ?)"
                " ON CONFLICT (meter) DO UPDATE SET reachable = 1, last_ok = excluded.last_ok,"
                " last_ts = excluded.last_ts, last_credit_milli = excluded.last_credit_milli,"
                " last_error = NULL, updated_at = excluded.updated_at",
                [
                    (_m(o.reading.meter), now, o.reading.ts, o.reading.credit_milli, now)
                    for o in outcomes
                    if o.reading is not None
                ],
            )
            conn.executemany(
                "INSERT INTO meters (meter, reachable, last_error, updated_at) VALUES (?, 0, ?, ?)"
                " ON CONFLICT (meter) DO UPDATE SET reachable = 0,"
                " last_error = excluded.last_error, updated_at = excluded.updated_at",
                [(_m(o.meter), o.error, now) for o in outcomes if o.reading is None],
            )
            if seqs:
                seqs += self._enforce_cap(conn, gw, cap_bytes)
            return seqs

    def _insert_batch(
        self, conn: sqlite3.Connection, gw: str, readings: tuple[Reading, ...], created: int
    ) -> int:
        seq = self._meta("next_seq")
        payload = mqtt.encode(ReadingBatch(gw=gw, seq=seq, historical=False, readings=readings))
        conn.execute("UPDATE meta SET value = ? WHERE key = 'next_seq'", (seq + 1,))
        conn.execute(
            "INSERT INTO outbox (seq, created, payload) VALUES (?, ?, ?)", (seq, created, payload)
        )
        conn.executemany(
            "INSERT INTO outbox_latest (meter, seq) VALUES (?, ?)"
            " ON CONFLICT (meter) DO UPDATE SET seq = excluded.seq",
            [(_m(r.meter), seq) for r in readings],
        )
        return seq

    def _enforce_cap(self, conn: sqlite3.Connection, gw: str, cap: int) -> list[int]:
        """Apply the cap policy of the module docstring; the seqs of carry-forward batches."""
        total = conn.execute("SELECT COALESCE(SUM(length(payload)), 0) FROM outbox").fetchone()[0]
        if total <= cap:
            return []
        carried: list[Reading] = []
        carried_created: int | None = None
        rows = conn.execute(
            "SELECT seq, created, length(payload) FROM outbox ORDER BY seq"
        ).fetchall()
        for seq, created, size in rows:
            if total <= cap:
                break
            latest = {
                int(m)
                for (m,) in conn.execute("SELECT meter FROM outbox_latest WHERE seq = ?", (seq,))
            }
            (payload,) = conn.execute("SELECT payload FROM outbox WHERE seq = ?", (seq,)).fetchone()
            try:
                batch = mqtt.decode_reading_batch(payload)
            except ProtocolError as exc:  # only this code writes the outbox
                raise StoreError(f"outbox row {seq} does not decode: {exc}") from exc
            keep = [r for r in batch.readings if r.meter in latest]
            if len(keep) == len(batch.readings):
                continue  # every reading is some meter's latest: nothing may go
            conn.execute("DELETE FROM outbox WHERE seq = ?", (seq,))
            total -= size
            carried += keep
            carried_created = created if carried_created is None else carried_created
        return [
            self._insert_batch(conn, gw, chunk, carried_created or 0)
            for chunk in chunk_readings(carried)
        ]

    def pending_batches(self, *, after_seq: int, limit: int) -> list[OutboxRow]:
        """Up to ``limit`` batches with ``seq > after_seq``, oldest first."""
        with self._errors("read outbox"):
            rows = self._conn.execute(
                "SELECT seq, created, payload FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit),
            ).fetchall()
        return [OutboxRow(seq=s, created=c, payload=bytes(p)) for s, c, p in rows]

    def delete_batches(self, seqs: Sequence[int]) -> None:
        """Forget delivered batches (after their PUBACK)."""
        marks = ",".join("?" * len(seqs))
        with self._errors("delete from outbox"), self._tx() as conn:
            conn.execute(f"DELETE FROM outbox WHERE seq IN ({marks})", tuple(seqs))  # noqa: S608 - only '?' marks
            conn.execute(f"DELETE FROM outbox_latest WHERE seq IN ({marks})", tuple(seqs))  # noqa: S608 - only '?' marks

    def outbox_size(self) -> tuple[int, int]:
        """(batches, payload bytes) waiting."""
        with self._errors("read outbox"):
            n, size = self._conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(length(payload)), 0) FROM outbox"
            ).fetchone()
        return int(n), int(size)

    # ------------------------------------------------------------------ tokens

    def find_token(self, meter: int, msg: bytes) -> TokenRow | None:
        """The stored delivery of exactly these bytes to ``meter``, if any."""
        with self._errors("find token"):
            row = self._conn.execute(
                f"SELECT {_ROW_COLUMNS} FROM tokens WHERE meter = ? AND digest = ?",  # noqa: S608 - constant columns
                (_m(meter), digest(msg)),
            ).fetchone()
        return None if row is None else _token_row(row)

    def insert_token(
        self,
        *,
        meter: int,
        token_id: int,
        msg: bytes,
        state: TokenState,
        status: TokenStatus | None,
        credit_after_milli: int | None,
        now: int,
    ) -> TokenRow:
        """Store a new delivery in ``state`` (STORED, or RESULT_READ when answered at once)."""
        with self._errors("insert token"), self._tx() as conn:
            cur = conn.execute(
                "INSERT INTO tokens (meter, token_id, digest, msg, state, status,"
                " credit_after_milli, received_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    _m(meter),
                    token_id,
                    digest(msg),
                    msg,
                    state.value,
                    None if status is None else int(status),
                    credit_after_milli,
                    now,
                    now,
                ),
            )
            row_id = cur.lastrowid
        return TokenRow(
            id=int(row_id or 0),
            meter=meter,
            token_id=token_id,
            msg=msg,
            state=state,
            status=status,
            credit_after_milli=credit_after_milli,
            received_at=now,
            updated_at=now,
        )

    def set_token_result(
        self,
        row_id: int,
        *,
        status: TokenStatus,
        credit_after_milli: int | None,
        window: ReplayWindow | None,
        now: int,
    ) -> None:
        """STORED → RESULT_READ with the meter's answer; the meter's window in the same commit."""
        with self._errors("store token result"), self._tx() as conn:
            (meter,) = conn.execute("SELECT meter FROM tokens WHERE id = ?", (row_id,)).fetchone()
            conn.execute(
                "UPDATE tokens SET state = ?, status = ?, credit_after_milli = ?, updated_at = ?"
                " WHERE id = ?",
                (TokenState.RESULT_READ.value, int(status), credit_after_milli, now, row_id),
            )
            if window is not None:
                conn.execute(
                    "INSERT INTO replay (meter, window) VALUES (?, ?)"
                    " ON CONFLICT (meter) DO UPDATE SET window = excluded.window",
                    (meter, window.to_bytes()),
                )

    def mark_token_done(self, row_id: int, *, now: int) -> None:
        """RESULT_READ → DONE, after the broker acknowledged the result."""
        with self._errors("mark token done"), self._tx() as conn:
            conn.execute(
                "UPDATE tokens SET state = ?, updated_at = ? WHERE id = ?",
                (TokenState.DONE.value, now, row_id),
            )

    def open_tokens(self) -> list[TokenRow]:
        """Every delivery not DONE, in arrival order."""
        with self._errors("read open tokens"):
            rows = self._conn.execute(
                f"SELECT {_ROW_COLUMNS} FROM tokens WHERE state != 'done' ORDER BY id"  # noqa: S608 - constant columns
            ).fetchall()
        return [_token_row(r) for r in rows]

    def replay_window(self, meter: int) -> ReplayWindow:
        """The gateway's copy of ``meter``'s anti-replay window (empty if none yet)."""
        with self._errors("read replay window"):
            row = self._conn.execute(
                "SELECT window FROM replay WHERE meter = ?", (_m(meter),)
            ).fetchone()
        if row is None:
            return ReplayWindow()
        try:
            return ReplayWindow.from_bytes(bytes(row[0]))
        except ProtocolError as exc:
            raise StoreError(f"replay window of meter {meter} is corrupt: {exc}") from exc

    def prune_tokens(self, *, before: int) -> int:
        """Delete DONE deliveries last changed before ``before``; how many went.

        The replay windows stay, so a pruned token delivered again is still recognised
        as already applied (or too old).
        """
        with self._errors("prune tokens"), self._tx() as conn:
            cur = conn.execute(
                "DELETE FROM tokens WHERE state = 'done' AND updated_at < ?", (before,)
            )
            return int(cur.rowcount)

    # ------------------------------------------------------------------ meters & status

    def meter_rows(self) -> dict[int, MeterRow]:
        """What the gateway last knew of each meter it has polled."""
        with self._errors("read meters"):
            rows = self._conn.execute(
                "SELECT meter, reachable, last_ok, last_ts, last_credit_milli, last_error,"
                " updated_at FROM meters"
            ).fetchall()
        return {
            int(m): MeterRow(
                meter=int(m),
                reachable=bool(r),
                last_ok=ok,
                last_ts=ts,
                last_credit_milli=credit,
                last_error=err,
                updated_at=upd,
            )
            for m, r, ok, ts, credit, err, upd in rows
        }

    def status(self) -> StoreStatus:
        """Counters, outbox depth, open tokens and meters, for the status command."""
        with self._errors("read status"):
            n, size, oldest = self._conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(length(payload)), 0), MIN(created) FROM outbox"
            ).fetchone()
            open_counts = dict(
                self._conn.execute(
                    "SELECT state, COUNT(*) FROM tokens WHERE state != 'done' GROUP BY state"
                ).fetchall()
            )
            (oldest_token,) = self._conn.execute(
                "SELECT MIN(received_at) FROM tokens WHERE state != 'done'"
            ).fetchone()
            boot, nxt = self._meta("boot_seq"), self._meta("next_seq")
        meters = self.meter_rows()
        return StoreStatus(
            boot_seq=boot,
            next_seq=nxt,
            outbox_batches=int(n),
            outbox_bytes=int(size),
            oldest_pending=oldest,
            tokens_open={str(k): int(v) for k, v in open_counts.items()},
            oldest_open_token=oldest_token,
            meters=tuple(meters[m] for m in sorted(meters)),
        )


_ROW_COLUMNS: Final = (
    "id, meter, token_id, msg, state, status, credit_after_milli, received_at, updated_at"
)


def _token_row(row: tuple[Any, ...]) -> TokenRow:
    rid, meter, token_id, msg, state, status, credit, received, updated = row
    return TokenRow(
        id=int(rid),
        meter=int(meter),
        token_id=int(token_id),
        msg=bytes(msg),
        state=TokenState(state),
        status=None if status is None else TokenStatus(status),
        credit_after_milli=None if credit is None else int(credit),
        received_at=int(received),
        updated_at=int(updated),
    )


class AsyncStore:
    """The :class:`Store` for asyncio code: each call runs on one dedicated thread.

    One thread keeps SQLite's rule of one connection per thread at a time, keeps calls in
    order, and keeps the event loop free while SQLite waits for the disk (fsync).
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gateway-store")

    async def run(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args, **kwargs)`` on the store thread; ``fn`` is a bound ``Store`` method."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    async def aclose(self) -> None:
        """Close the store on its thread, then stop the thread."""
        await self.run(self.store.close)
        self._executor.shutdown(wait=True)
