"""What must survive a crash or power cut, in one SQLite file in the state directory:
the outbox (answers the broker has not acknowledged yet) and the ids of recent requests with
their answers (so a redelivered or re-sent request is answered again, never run twice).

One connection, used by the delivery-writer thread (delivery/writer.py) once the agent runs:
nothing on the MQTT network thread waits for this file. A lock still guards it (start-up and
close run elsewhere). WAL mode with synchronous=NORMAL keeps a committed row across a process
crash; a power cut may lose the last transaction, which costs at most a re-run, never a
doubled answer.

This module and the event history (`history.py`, a database of its own) are the ones that
import sqlite3: every public method raises `StoreError` for what SQLite raises (disk full, a
damaged file), opening raises `ConfigError`.
"""

from __future__ import annotations

import functools
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from edge_agent.errors import ConfigError, StoreError
from edge_agent.log import get_logger

log = get_logger("store")
_F = TypeVar("_F", bound=Callable[..., object])
SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL, payload BLOB NOT NULL, correlation BLOB,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS seen (
    request_id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    topic TEXT, payload BLOB, correlation BLOB
);
-- Expiry runs on every request: without these it scans the table (100k ids: 15 ms a request).
CREATE INDEX IF NOT EXISTS seen_created ON seen (created);
CREATE INDEX IF NOT EXISTS outbox_created ON outbox (created);
"""


@dataclass(frozen=True)
class Outgoing:
    row: int
    topic: str
    payload: bytes
    correlation: bytes | None


@dataclass(frozen=True)
class SeenAnswer:
    topic: str
    payload: bytes
    correlation: bytes | None


def store_errors(method: _F) -> _F:
    """The boundary: an `sqlite3.Error` leaves `method` as `StoreError`, with the same text.
    tests/faults.py wraps its injected failures in it, so they cross the translation as real ones do."""
    @functools.wraps(method)
    def translated(*args: object, **kwargs: object) -> object:
        try:
            return method(*args, **kwargs)
        except sqlite3.Error as exc:
            raise StoreError(str(exc)) from exc
    return translated  # type: ignore[return-value]


class Store:
    def __init__(self, path: Path, *, outbox_max_items: int, outbox_max_age_s: float,
                 dedup_window_s: float, clock=time.time) -> None:  # noqa: ANN001 - tests pass a fake clock
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._db = _open(path)
            except sqlite3.OperationalError:
                raise
            except sqlite3.DatabaseError as exc:
                # Damaged (a power cut on an SD card): what it held is a cache of guarantees,
                # not data. Keep it aside for a post-mortem and start empty, rather than
                # refusing to start until someone logs in.
                aside = _move_aside(path)
                log.error("store.damaged", path=str(path), error=str(exc), moved_to=str(aside))
                self._db = _open(path)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError([f"state_dir: cannot open the state database {path}: {exc}"]) from exc
        self._lock = threading.Lock()
        self._clock = clock
        self.outbox_max_items = outbox_max_items
        self.outbox_max_age_s = outbox_max_age_s
        self.dedup_window_s = dedup_window_s
        self.dropped = 0  # outbox entries dropped by the bounds since start

    @store_errors
    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- outbox --------------------------------------------------------------------------
    @store_errors
    def put(self, topic: str, payload: bytes, correlation: bytes | None) -> int:
        """Store an answer before it is published; bounded: oldest dropped first, counted."""
        with self._lock:
            cursor = self._db.execute(
                "INSERT INTO outbox (topic, payload, correlation, created) VALUES (?, ?, ?, ?)",
                (topic, payload, correlation, self._clock()))
            self._enforce_bounds()
            return int(cursor.lastrowid or 0)

    @store_errors
    def done(self, row: int) -> None:
        """The broker acknowledged it (PUBACK)."""
        with self._lock:
            self._db.execute("DELETE FROM outbox WHERE id = ?", (row,))

    @store_errors
    def pending(self) -> list[Outgoing]:
        """Unacknowledged answers, oldest first (after expiring what is too old)."""
        with self._lock:
            self._enforce_bounds()
            rows = self._db.execute(
                "SELECT id, topic, payload, correlation FROM outbox ORDER BY id").fetchall()
        return [Outgoing(r[0], r[1], bytes(r[2]), None if r[3] is None else bytes(r[3])) for r in rows]

    @store_errors
    def outbox_rows(self, topic: str, payload: bytes, correlation: bytes | None) -> list[int]:
        """The outbox rows holding this very answer (not yet acknowledged by the broker)."""
        with self._lock:
            return [r[0] for r in self._db.execute(
                "SELECT id FROM outbox WHERE topic = ? AND payload = ? AND correlation IS ?",
                (topic, payload, correlation))]

    @store_errors
    def outbox_size(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def _enforce_bounds(self) -> None:
        old = self._db.execute("DELETE FROM outbox WHERE created < ?",
                               (self._clock() - self.outbox_max_age_s,)).rowcount
        over = self._db.execute(
            "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox ORDER BY id DESC LIMIT -1 OFFSET ?)",
            (self.outbox_max_items,)).rowcount
        if old or over:
            self.dropped += old + over
            log.warning("outbox.dropped", too_old=old, over_limit=over, dropped_total=self.dropped)

    # --- de-duplication ---------------------------------------------------------------------
    def now(self) -> float:
        """The store's clock: what `seen` times are measured in."""
        return self._clock()

    @store_errors
    def answered_ids(self) -> list[tuple[str, float]]:
        """Ids answered within the window, with when each was first seen (the in-memory index
        is loaded from them at start)."""
        with self._lock:
            return [(r[0], float(r[1])) for r in self._db.execute(
                "SELECT request_id, created FROM seen WHERE payload IS NOT NULL AND created >= ? "
                "ORDER BY created", (self._clock() - self.dedup_window_s,))]

    @store_errors
    def first_sight(self, request_id: str) -> bool | SeenAnswer:
        """True: new, now recorded as in progress. False: seen, still in progress (its answer
        will come). SeenAnswer: answered before, within the window: publish that again."""
        now = self._clock()
        with self._lock:
            self._db.execute("DELETE FROM seen WHERE created < ?", (now - self.dedup_window_s,))
            row = self._db.execute("SELECT topic, payload, correlation FROM seen WHERE request_id = ?",
                                   (request_id,)).fetchone()
            if row is None:
                self._db.execute("INSERT INTO seen (request_id, created) VALUES (?, ?)", (request_id, now))
                return True
        if row[1] is None:
            return False
        return SeenAnswer(row[0], bytes(row[1]), None if row[2] is None else bytes(row[2]))

    @store_errors
    def answered(self, request_id: str, topic: str, payload: bytes, correlation: bytes | None) -> int:
        """Record the answer and put it in the outbox, in one transaction; returns the outbox row."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.execute(
                    "INSERT INTO seen (request_id, created, topic, payload, correlation) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT(request_id) DO UPDATE SET topic = excluded.topic, "
                    "payload = excluded.payload, correlation = excluded.correlation",
                    (request_id, self._clock(), topic, payload, correlation))
                cursor = self._db.execute(
                    "INSERT INTO outbox (topic, payload, correlation, created) VALUES (?, ?, ?, ?)",
                    (topic, payload, correlation, self._clock()))
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # SQLite ends it by itself on some errors (disk full)
                    self._db.execute("ROLLBACK")
                raise
            self._enforce_bounds()
            return int(cursor.lastrowid or 0)

    @store_errors
    def reset_in_progress(self) -> None:
        """At start-up: ids a previous process took but never answered may run again."""
        with self._lock:
            self._db.execute("DELETE FROM seen WHERE payload IS NULL")

    @store_errors
    def forget(self, request_id: str) -> None:
        """A request that was refused before running (busy, stopping): a re-send may run."""
        with self._lock:
            self._db.execute("DELETE FROM seen WHERE request_id = ? AND payload IS NULL", (request_id,))


def _open(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(SCHEMA)
        db.execute("SELECT COUNT(*) FROM outbox").fetchone()
        db.execute("SELECT COUNT(*) FROM seen").fetchone()
    except sqlite3.Error:
        db.close()
        raise
    return db


def _move_aside(path: Path) -> Path:
    aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}")
    for suffix in ("", "-wal", "-shm"):
        part = Path(f"{path}{suffix}")
        if part.exists():
            os.replace(part, Path(f"{aside}{suffix}"))
    return aside
