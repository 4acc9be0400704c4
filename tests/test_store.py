"""The on-disk outbox and de-duplication store (real SQLite files, a fake clock)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from edge_agent.errors import ConfigError, StoreError
from edge_agent.delivery.store import SeenAnswer, Store


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def open_store(path: Path, clock: Clock, **bounds: float) -> Store:
    settings = {"outbox_max_items": 100, "outbox_max_age_s": 3600, "dedup_window_s": 600, **bounds}
    return Store(path / "state.db", clock=clock, **settings)  # type: ignore[arg-type]


def cap_at_current_size(store: Store) -> None:
    """The disk is full: the file may not grow by a page (SQLite's own limit, per connection)."""
    store._db.execute("PRAGMA max_page_count = 1")  # SQLite keeps it at the current page count


def test_outbox_survives_reopen_in_order(tmp_path: Path) -> None:
    clock = Clock()
    store = open_store(tmp_path, clock)
    first = store.put("a/1", b"one", b"c1")
    store.put("a/2", b"two", None)
    store.done(first)
    store.close()
    again = open_store(tmp_path, clock)
    assert [(o.topic, o.payload, o.correlation) for o in again.pending()] == [("a/2", b"two", None)]


def test_outbox_drops_oldest_beyond_its_bounds_and_counts(tmp_path: Path) -> None:
    clock = Clock()
    store = open_store(tmp_path, clock, outbox_max_items=3, outbox_max_age_s=60)
    for n in range(5):
        store.put("t", str(n).encode(), None)
    assert [o.payload for o in store.pending()] == [b"2", b"3", b"4"] and store.dropped == 2
    clock.now += 61
    assert store.pending() == [] and store.dropped == 5


def test_dedup_new_in_progress_answered_and_window(tmp_path: Path) -> None:
    clock = Clock()
    store = open_store(tmp_path, clock, dedup_window_s=100)
    assert store.first_sight("q1") is True
    assert store.first_sight("q1") is False  # running: its answer will come
    row = store.answered("q1", "replies", b"answer", b"corr")
    assert store.pending()[0].row == row
    assert store.first_sight("q1") == SeenAnswer("replies", b"answer", b"corr")
    clock.now += 101
    assert store.first_sight("q1") is True  # outside the window: a new request


def test_refused_request_may_be_sent_again(tmp_path: Path) -> None:
    store = open_store(tmp_path, Clock())
    assert store.first_sight("busy-1") is True
    store.forget("busy-1")
    assert store.first_sight("busy-1") is True


def test_dedup_survives_reopen(tmp_path: Path) -> None:
    clock = Clock()
    store = open_store(tmp_path, clock)
    store.first_sight("q9")
    store.answered("q9", "t", b"a", None)
    store.close()
    assert isinstance(open_store(tmp_path, clock).first_sight("q9"), SeenAnswer)


def test_a_damaged_database_is_moved_aside_and_started_empty(tmp_path: Path) -> None:
    """A power cut can leave garbage: the daemon must still start (the store is a cache of
    guarantees), keeping the damaged file for a post-mortem."""
    damaged = tmp_path / "state.db"
    damaged.write_bytes(b"this is not a database" * 200)
    store = open_store(tmp_path, Clock())
    assert store.first_sight("r1") is True and store.outbox_size() == 0
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("state.db.damaged-")]
    assert len(kept) == 1 and kept[0].read_bytes().startswith(b"this is not a database")


def test_an_unwritable_state_dir_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="cannot open the state database"):
        Store(blocker / "sub" / "state.db", outbox_max_items=1, outbox_max_age_s=1, dedup_window_s=1)


def test_a_full_database_fails_as_a_store_error(tmp_path: Path) -> None:
    """SQLite's "database or disk is full" leaves the store as StoreError (the same text, the
    SQLite error as its cause); what is stored stays readable and the store usable."""
    store = open_store(tmp_path, Clock())
    row = store.put("t", b"before", None)
    cap_at_current_size(store)
    big = b"x" * 65536  # needs new pages
    for write in (lambda: store.put("t", big, None), lambda: store.answered("q1", "t", big, None)):
        with pytest.raises(StoreError, match="database or disk is full") as info:
            write()
        assert isinstance(info.value.__cause__, sqlite3.OperationalError)
    assert [o.row for o in store.pending()] == [row] and store.outbox_size() == 1
    assert store.first_sight("q1") is True  # the failed answer left no half of itself
    store.done(row)
    assert store.outbox_size() == 0


def test_a_page_damaged_at_run_time_fails_as_a_store_error(tmp_path: Path) -> None:
    """A page of the outbox table turns to garbage after the store checked the file at start
    (opening counts rows through an index, so it does not notice): reading it is a StoreError."""
    clock = Clock()
    store = open_store(tmp_path, clock, outbox_max_items=1000)
    marker = b"answer-body-" * 40
    for _ in range(50):
        store.put("t", marker, None)
    store.close()
    data = bytearray((tmp_path / "state.db").read_bytes())
    page = 4096
    damaged = [start for start in range(0, len(data), page) if marker in data[start:start + page]]
    assert damaged and not any(tmp_path.glob("state.db-wal*"))  # checkpointed into the file at close
    for start in damaged:
        data[start:start + page] = b"\xff" * page
    (tmp_path / "state.db").write_bytes(bytes(data))
    store = open_store(tmp_path, clock, outbox_max_items=1000)
    assert not list(tmp_path.glob("state.db.damaged-*"))  # not noticed at start
    with pytest.raises(StoreError, match="malformed") as info:
        store.pending()
    assert isinstance(info.value.__cause__, sqlite3.DatabaseError)
