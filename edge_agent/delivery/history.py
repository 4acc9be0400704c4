"""The event history: every published rule state, kept with the frame the model saw, in
`state_dir/history.db` (SQLite) and `state_dir/history/<id>.jpg`, bounded by count, age and
bytes (`[history]`; the oldest go first, their files with them).

One thread, `history-writer` (a `writer.Writer` of its own, so rule events never queue behind
answers nor answers behind them), does every write and every query, in order; the rest hand it
steps and never wait. Its queue is bounded (`HISTORY_QUEUE_MAX`): an event that finds it full
is dropped and counted, a query is answered as failed. A write that fails (disk full, a file
where the folder should be) never reaches the rule or an answer: it is logged once per episode
(`history.write_failed`), counted, and the history says `degraded` until a write succeeds.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from edge_agent.delivery.store import store_errors
from edge_agent.delivery.writer import Writer
from edge_agent.errors import StoreError
from edge_agent.log import get_logger
from edge_agent.protocol.history import SNAPSHOT_ID, HistoryEvent, HistoryQuery

log = get_logger("history")
HISTORY_QUEUE_MAX = 256  # events and queries waiting for the disk
ROW_OVERHEAD_BYTES = 64  # what a row costs SQLite beyond its text (ids, numbers, index entries)
SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id TEXT PRIMARY KEY, rule TEXT NOT NULL, camera TEXT NOT NULL, at REAL NOT NULL,
    trigger TEXT NOT NULL, text TEXT, json TEXT, changed INTEGER NOT NULL,
    snapshot INTEGER NOT NULL, bytes INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS events_at ON events (at);
"""
COLUMNS = "id, rule, camera, at, trigger, text, json, changed, snapshot"
WAL_LIMIT_BYTES = 4 * 1024 * 1024  # the write-ahead log is cut back to this after a checkpoint


@dataclass(frozen=True)
class Bounds:
    max_events: int
    max_age_s: float
    max_bytes: int


def images_folder(state_dir: Path) -> Path:
    """Where the history keeps its snapshots (the agent and `edge-agent events --snapshot`)."""
    return state_dir / "history"


def snapshot_file(folder: Path, snapshot_id: str) -> Path | None:
    """Where an event's JPEG lives (None: not an id that can name a file)."""
    return folder / f"{snapshot_id}.jpg" if SNAPSHOT_ID.fullmatch(snapshot_id) else None


class HistoryStore:
    """The database and the image folder; used by one thread. Raises `StoreError` for what
    SQLite or the file system raise."""

    def __init__(self, db_path: Path, images: Path, clock: Callable[[], float] = time.time) -> None:
        self.images = images
        self._clock = clock
        try:
            db_path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(db_path), check_same_thread=False, isolation_level=None)
            # Before the first table: pages the bounds free go back to the file system
            # (`enforce`), so lowering `max_mb` shrinks the file, not only what it holds.
            self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES}")
            self._db.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the history {db_path}: {exc}") from exc

    def close(self) -> None:
        self._db.close()

    def add(self, event: HistoryEvent, jpeg: bytes | None, bounds: Bounds) -> None:
        """The image file first, then the row: a crash between leaves a file the next start
        sweeps, never a row without its file."""
        path = snapshot_file(self.images, event.id) if jpeg else None
        try:
            if path is not None:
                self.images.mkdir(parents=True, exist_ok=True)
                temp = path.with_suffix(".tmp")
                temp.write_bytes(jpeg or b"")
                os.replace(temp, path)
            text_json = json.dumps(event.json, ensure_ascii=False) if event.has_json else None
            size = ROW_OVERHEAD_BYTES + sum(len(v.encode()) for v in (event.id, event.rule, event.camera,
                                                                      event.trigger, event.text or "",
                                                                      text_json or ""))
            self._db.execute(f"INSERT OR REPLACE INTO events ({COLUMNS}, bytes) VALUES (?,?,?,?,?,?,?,?,?,?)",
                             (event.id, event.rule, event.camera, event.at, event.trigger, event.text,
                              text_json, int(event.changed), int(path is not None),
                              size + (len(jpeg) if path is not None and jpeg else 0)))
        except (OSError, sqlite3.Error) as exc:
            if path is not None:
                _unlink(path)
            raise StoreError(str(exc)) from exc
        self.enforce(bounds)

    def enforce(self, bounds: Bounds) -> int:
        """Oldest first: past the age, past the count, past the bytes. Returns events removed."""
        cutoff = self._clock() - bounds.max_age_s
        newest_first = "SELECT id, snapshot, SUM(bytes) OVER (ORDER BY at DESC, rowid DESC) AS running, " \
                       "ROW_NUMBER() OVER (ORDER BY at DESC, rowid DESC) AS n FROM events"
        try:
            doomed = self._db.execute(
                f"SELECT id, snapshot FROM ({newest_first}) WHERE n > ? OR running > ? "
                "UNION SELECT id, snapshot FROM events WHERE at < ?",
                (bounds.max_events, bounds.max_bytes, cutoff)).fetchall()
            if doomed:
                self._db.execute("BEGIN")
                self._db.executemany("DELETE FROM events WHERE id = ?", [(row[0],) for row in doomed])
                self._db.execute("COMMIT")
                # executescript steps it to the end: execute() frees one page only
                self._db.executescript("PRAGMA incremental_vacuum;")
        except sqlite3.Error as exc:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise StoreError(str(exc)) from exc
        for event_id, has_snapshot in doomed:
            path = snapshot_file(self.images, event_id)
            if has_snapshot and path is not None:
                _unlink(path)
        return len(doomed)

    @store_errors
    def sweep(self) -> int:
        """At start: image files no event holds (a crash between file and row, or a delete)."""
        if not self.images.is_dir():
            return 0
        kept = {row[0] for row in self._db.execute("SELECT id FROM events WHERE snapshot = 1")}
        stray = [p for p in self.images.iterdir()
                 if (p.suffix == ".jpg" and p.stem not in kept) or p.suffix == ".tmp"]
        for path in stray:
            _unlink(path)
        return len(stray)

    @store_errors
    def query(self, query: HistoryQuery) -> tuple[list[HistoryEvent], int]:
        """Matching events, newest first, at most `limit`; and how many match in all."""
        where, args = _where(query)
        matched = int(self._db.execute(f"SELECT COUNT(*) FROM events{where}", args).fetchone()[0])
        rows = self._db.execute(f"SELECT {COLUMNS} FROM events{where} ORDER BY at DESC, rowid DESC LIMIT ?",
                                (*args, query.limit)).fetchall()
        return [HistoryEvent(r[0], r[1], r[2], float(r[3]), r[4], r[5], None if r[6] is None else json.loads(r[6]),
                             r[6] is not None, bool(r[7]), bool(r[8])) for r in rows], matched

    @store_errors
    def totals(self) -> tuple[int, int]:
        """(events, bytes) held."""
        count, size = self._db.execute("SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM events").fetchone()
        return int(count), int(size)


def _where(query: HistoryQuery) -> tuple[str, tuple[Any, ...]]:
    terms = [("rule = ?", query.rule), ("camera = ?", query.camera), ("at >= ?", query.since),
             ("at < ?", query.until)]
    used = [(term, value) for term, value in terms if value is not None]
    if not used:
        return "", ()
    return " WHERE " + " AND ".join(term for term, _ in used), tuple(value for _, value in used)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:  # a read-only folder: the next start's sweep tries again
        log.warning("history.unlink_failed", path=str(path), error=str(exc))


Found = Callable[[list[HistoryEvent], int], None]  # (events newest first, how many matched)


class History:
    """The history's door for the rest of the agent: `record` and `query` hand a step to the
    history-writer thread and return at once. `bounds()` is read at every write (a reload may
    change them); the store opens on the thread, at the first step."""

    def __init__(self, state_dir: Path, bounds: Callable[[], Bounds], clock: Callable[[], float] = time.time) -> None:
        self._db_path, self.images = state_dir / "history.db", images_folder(state_dir)
        self._bounds = bounds
        self._clock = clock
        self._store: HistoryStore | None = None
        self._writer = Writer(maxsize=HISTORY_QUEUE_MAX, name="history-writer")
        # written by the history-writer thread only; others read them (ints and a bool)
        self.degraded = False
        self.write_failures = 0
        self.dropped = 0
        self.events = 0
        self.bytes = 0
        self._writer.submit(self._open)

    def record(self, event: HistoryEvent, jpeg: bytes | None) -> None:
        """A published rule state (any thread; never waits)."""
        if not self._writer.submit(lambda: self._write(event, jpeg)):
            self.dropped += 1
            log.warning("history.dropped", rule=event.rule, id=event.id, dropped_total=self.dropped)

    def query(self, query: HistoryQuery, found: Found, failed: Callable[[str], None]) -> None:
        """`found(events, matched)` or `failed(reason)`, later, on the history-writer thread."""
        def step() -> None:
            try:
                events, matched = self._opened().query(query)
            except StoreError as exc:
                log.warning("history.query_failed", error=str(exc))
                failed(f"the history cannot be read: {exc}")
                return
            try:
                found(events, matched)
            except Exception as exc:  # noqa: BLE001 - the request is still answered
                log.exception("history.answer_failed")
                failed(f"internal error: {type(exc).__name__}")
        if not self._writer.submit(step):
            failed(f"the history has {HISTORY_QUEUE_MAX} steps waiting already")

    def rebound(self) -> None:
        """New bounds (a reload): held at once, not at the next event."""
        self._writer.submit(self._open)

    def flush(self, timeout: float) -> bool:
        return self._writer.flush(timeout)

    def close(self, timeout: float) -> None:
        self._writer.close(timeout)
        if self._store is not None and not self._writer.waiting():
            self._store.close()

    def info(self) -> dict[str, Any]:
        """For the status and stats."""
        return {"events": self.events, "bytes": self.bytes, "degraded": self.degraded,
                "write_failures": self.write_failures, "dropped": self.dropped}

    # --- the history-writer thread ---------------------------------------------------------
    def _opened(self) -> HistoryStore:
        if self._store is None:
            self._store = HistoryStore(self._db_path, self.images, self._clock)
        return self._store

    def _open(self) -> None:
        """At start (and on new bounds): bounds that may have changed meanwhile, stray files."""
        try:
            store = self._opened()
            removed, swept = store.enforce(self._bounds()), store.sweep()
            self.events, self.bytes = store.totals()
            log.info("history.opened", events=self.events, bytes=self.bytes, removed=removed, swept=swept)
        except StoreError as exc:
            self._failed(exc)

    def _write(self, event: HistoryEvent, jpeg: bytes | None) -> None:
        try:
            store = self._opened()
            store.add(event, jpeg, self._bounds())
            self.events, self.bytes = store.totals()
        except StoreError as exc:
            self._failed(exc)
            return
        if self.degraded:
            self.degraded = False
            log.info("history.write_recovered", failures=self.write_failures)

    def _failed(self, exc: StoreError) -> None:
        self.write_failures += 1
        if not self.degraded:  # once per episode: a full disk must not flood the log
            self.degraded = True
            log.error("history.write_failed", error=str(exc), failures=self.write_failures)
