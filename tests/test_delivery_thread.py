"""Delivery's threads: nothing paho's network thread calls (admit, error replies, release,
on_acked, replay) touches SQLite or waits for it; the delivery-writer thread alone owns the
store and the outbox book-keeping. Real SQLite files, a recording stand-in for the broker link."""

from __future__ import annotations

import ast
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from structlog.testing import capture_logs

from edge_agent.delivery.outbox import DUPLICATE, NEW, Delivery
from edge_agent.delivery.store import Store
from edge_agent.mqtt import Incoming

REPO = Path(__file__).resolve().parent.parent
LOCK_HELD_S = 1.5  # another process holds the write lock this long (SQLite's busy timeout: 5 s)
QUICK_S = 0.5  # a generous bound for a call that must not wait for the disk


class Link:
    """The broker link, safe to call from several threads at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.acked: list[int] = []
        self.published: list[tuple[str, bytes]] = []
        self._confirm: list[Callable[[], None]] = []

    def ack(self, message: Incoming) -> None:
        with self._lock:
            self.acked.append(message.mid)

    def publish(self, topic: str, payload: bytes, *, correlation_data: bytes | None = None,
                qos: int = 1, on_acked: Callable[[], None] | None = None) -> None:
        with self._lock:
            self.published.append((topic, payload))
            if on_acked is not None:
                self._confirm.append(on_acked)

    def confirm_all(self) -> None:  # the broker's PUBCOMPs arrive (on paho's network thread)
        with self._lock:
            callbacks, self._confirm = self._confirm, []
        for callback in callbacks:
            callback()


def request(mid: int, *, dup: bool = False) -> Incoming:
    return Incoming("p/dev/request", b"{}", mid=mid, qos=1, dup=dup)


def open_store(tmp_path: Path) -> Store:
    return Store(tmp_path / "state.db", outbox_max_items=100, outbox_max_age_s=3600, dedup_window_s=600)


def settle(delivery: Delivery) -> None:
    assert delivery.flush(10)


@contextmanager
def write_locked(path: Path, seconds: float) -> Iterator[threading.Event]:
    """Another process holds the database's write lock for `seconds`; the event is set just
    before it lets go."""
    other = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    released = threading.Event()

    def release() -> None:
        released.set()
        other.execute("COMMIT")
        other.close()

    timer = threading.Timer(seconds, release)
    timer.start()
    try:
        yield released
    finally:
        timer.join()


def timed(call: Callable[[], Any]) -> float:
    start = time.monotonic()
    call()
    return time.monotonic() - start


def rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(str(path))
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def test_a_locked_database_stalls_no_caller(tmp_path: Path) -> None:
    """Another process holds the write lock (a slow or full disk looks the same from here):
    every call paho's network thread makes returns at once, the error reply goes out at once,
    the final answer waits for its store write (then acknowledged, then published), and every
    write lands once the lock is let go."""
    store = open_store(tmp_path)
    link = Link()
    delivery = Delivery(store, lambda: link, lambda: 2)  # type: ignore[arg-type,return-value]
    assert delivery.admit("early", True, request(1)) == NEW
    delivery.answer("early", True, "p/dev/response", b"early answer", None, request(1))
    settle(delivery)
    assert link.acked == [1]  # its PUBCOMP comes while the database is locked
    with write_locked(tmp_path / "state.db", LOCK_HELD_S) as released:
        took = {
            "admit": timed(lambda: delivery.admit("r1", True, request(2))),
            "admit_running": timed(lambda: delivery.admit("r1", True, request(3, dup=True))),
            "admit_answered": timed(lambda: delivery.admit("early", True, request(4), ("p/dev/other", None))),
            "admit_released": timed(lambda: delivery.admit("f1", True, request(5))),
            "release": timed(lambda: delivery.release("f1", True)),
            "error_reply": timed(lambda: delivery.answer("busy-1", True, "p/dev/response", b"busy", None,
                                                         request(6), final=False)),
            "on_acked": timed(link.confirm_all),
            "replay": timed(delivery.replay),
            "answer": timed(lambda: delivery.answer("r1", True, "p/dev/response", b"answer", None, request(2))),
        }
        assert max(took.values()) < QUICK_S, took
        assert ("p/dev/response", b"busy") in link.published and 6 in link.acked  # published at once
        time.sleep(0.2)
        waiting = 2 not in link.acked and ("p/dev/response", b"answer") not in link.published
        assert waiting and not released.is_set()  # acknowledged only once stored
    settle(delivery)
    assert sorted(link.acked) == [1, 2, 3, 4, 6]
    assert link.published.count(("p/dev/response", b"answer")) == 1
    assert ("p/dev/other", b"early answer") in link.published  # the re-send's own reply topic
    db = tmp_path / "state.db"
    assert rows(db, "SELECT request_id, payload FROM seen ORDER BY request_id") == [
        ("early", b"early answer"), ("r1", b"answer")]
    link.confirm_all()
    settle(delivery)
    assert rows(db, "SELECT COUNT(*) FROM outbox") == [(0,)]
    assert delivery.stats() == {"outbox": 0, "outbox_dropped": 0, "store_failures": 0}
    delivery.close()


class Watched(dict):  # type: ignore[type-arg]
    """A dict that records which threads touch it."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: set[str] = set()

    def _seen(self) -> None:
        self.threads.add(threading.current_thread().name)

    def __getitem__(self, key: Any) -> Any:
        self._seen()
        return super().__getitem__(key)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._seen()
        super().__setitem__(key, value)

    def __delitem__(self, key: Any) -> None:
        self._seen()
        super().__delitem__(key)

    def __contains__(self, key: object) -> bool:
        self._seen()
        return super().__contains__(key)

    def get(self, *args: Any) -> Any:
        self._seen()
        return super().get(*args)

    def pop(self, *args: Any) -> Any:
        self._seen()
        return super().pop(*args)


def test_the_outbox_book_keeping_has_one_owner(tmp_path: Path) -> None:
    """Answers from several workers, confirmations and reconnections all at once: the record of
    what is on its way on which link (`_unacked`) is touched by the delivery-writer thread
    only, and each answer is acknowledged and published once."""
    store = open_store(tmp_path)
    link = Link()
    delivery = Delivery(store, lambda: link, lambda: 2)  # type: ignore[arg-type,return-value]
    watched = Watched()
    delivery._unacked = watched  # type: ignore[assignment]
    stop = threading.Event()

    def worker(n: int) -> None:
        for i in range(40):
            rid = f"w{n}-{i}"
            delivery.admit(rid, True, request(n * 100 + i))
            delivery.answer(rid, True, "p/dev/response", rid.encode(), None, request(n * 100 + i))

    def network() -> None:
        while not stop.is_set():
            link.confirm_all()
            delivery.replay()
            time.sleep(0.001)

    workers = [threading.Thread(target=worker, args=(n,), name=f"worker-{n}") for n in range(4)]
    paho = threading.Thread(target=network, name="paho")
    for thread in [paho, *workers]:
        thread.start()
    for thread in workers:
        thread.join()
    stop.set()
    paho.join()
    settle(delivery)
    link.confirm_all()
    settle(delivery)
    assert watched.threads == {"delivery-writer"}
    assert sorted(link.acked) == sorted(n * 100 + i for n in range(4) for i in range(40))
    payloads = [p for _, p in link.published]
    assert len(payloads) == len(set(payloads)) == 160
    assert delivery.stats()["outbox"] == 0
    delivery.close()


def test_a_full_queue_answers_from_memory_and_counts(tmp_path: Path) -> None:
    """The writer's queue is bounded: with the database locked and the queue full, a final
    answer is acknowledged and published at once without being stored, an error reply too, and
    each such write is counted as a store failure; nothing waits."""
    store = open_store(tmp_path)
    link = Link()
    delivery = Delivery(store, lambda: link, lambda: 2, queue_max=2)  # type: ignore[arg-type,return-value]
    with write_locked(tmp_path / "state.db", LOCK_HELD_S), capture_logs() as logs:
        delivery.admit("r0", True, request(0))
        time.sleep(0.1)  # the writer takes its write and waits for the lock
        for n in range(1, 4):  # two fill the queue, the third finds it full
            delivery.admit(f"r{n}", True, request(n))
        start = time.monotonic()
        delivery.answer("r3", True, "p/dev/response", b"unstored", None, request(3))
        delivery.answer("r2", True, "p/dev/response", b"busy", None, request(2), final=False)
        assert time.monotonic() - start < QUICK_S
        assert link.acked == [3, 2] and link.published == [("p/dev/response", b"unstored"),
                                                           ("p/dev/response", b"busy")]
    settle(delivery)
    failed = [(e["step"], e["error"]) for e in logs if e["event"] == "store.failed"]
    assert ("answer", "delivery queue full") in failed
    assert delivery.stats()["store_failures"] == len(failed) >= 2
    assert delivery.admit("r3", True, request(7)) == NEW  # not stored: a re-send runs again
    delivery.close()


def test_an_answer_the_store_refused_is_sent_again_from_memory(tmp_path: Path) -> None:
    """The disk is full when the answer is stored: it goes out from memory, and a re-send of
    the id gets that same answer (kept in memory), not a second run."""
    store = open_store(tmp_path)
    link = Link()
    delivery = Delivery(store, lambda: link, lambda: 2)  # type: ignore[arg-type,return-value]
    assert delivery.admit("r1", True, request(1)) == NEW
    settle(delivery)
    store._db.execute("PRAGMA max_page_count = 1")  # SQLite keeps it at the current page count
    big = b"x" * 65536
    delivery.answer("r1", True, "p/dev/response", big, None, request(1))
    settle(delivery)
    assert delivery.admit("r1", True, request(2)) == DUPLICATE
    settle(delivery)
    assert link.acked == [1, 2] and [p for _, p in link.published] == [big, big]
    assert delivery.stats()["store_failures"] >= 1
    delivery.close()


def test_close_finishes_every_queued_write(tmp_path: Path) -> None:
    """Stopping: what was queued is stored, acknowledged and published before the store
    closes; an answer after that still goes out, from memory."""
    store = open_store(tmp_path)
    link = Link()
    delivery = Delivery(store, lambda: link, lambda: 2)  # type: ignore[arg-type,return-value]
    for n in range(20):
        delivery.admit(f"r{n}", True, request(n))
        delivery.answer(f"r{n}", True, "p/dev/response", f"a{n}".encode(), None, request(n))
    delivery.close()
    assert sorted(link.acked) == list(range(20)) and len(link.published) == 20
    assert rows(tmp_path / "state.db", "SELECT COUNT(*) FROM seen WHERE payload IS NOT NULL") == [(20,)]
    delivery.answer("late", True, "p/dev/response", b"late", None, request(99))
    assert link.acked[-1] == 99 and link.published[-1] == ("p/dev/response", b"late")


def test_a_restart_remembers_answered_ids(tmp_path: Path) -> None:
    """The ids in memory are loaded from the store at start: an id answered by the previous
    process is a duplicate, one it only started is new."""
    store = open_store(tmp_path)
    link = Link()
    delivery = Delivery(store, lambda: link, lambda: 2)  # type: ignore[arg-type,return-value]
    delivery.admit("done", True, request(1))
    delivery.answer("done", True, "p/dev/response", b"answer", None, request(1))
    delivery.admit("started", True, request(2))
    delivery.close()
    again = Delivery(open_store(tmp_path), lambda: link, lambda: 2)  # type: ignore[arg-type,return-value]
    assert again.admit("started", True, request(3)) == NEW
    assert again.admit("done", True, request(4)) == DUPLICATE
    settle(again)
    assert link.acked[-1] == 4 and link.published[-1] == ("p/dev/response", b"answer")
    again.close()


def test_delivery_imports_neither_mqtt_nor_work_nor_daemon() -> None:
    """delivery/ sits below the broker link and the work: it gets a publisher, not the link."""
    forbidden = ("edge_agent.mqtt", "edge_agent.work", "edge_agent.daemon", "paho")
    for source in (REPO / "edge_agent" / "delivery").glob("*.py"):
        tree = ast.parse(source.read_text(), str(source))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert not name.startswith(forbidden), f"{source.name} imports {name}"
