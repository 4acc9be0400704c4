"""The event history's pure parts (the request's filter, the context block) and its store on
real SQLite files and a real folder, with a fake clock."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from edge_agent.delivery.history import Bounds, History, HistoryStore
from edge_agent.errors import StoreError
from edge_agent.protocol import RequestError, RequestLimits, parse_request
from edge_agent.protocol.history import (HistoryEvent, HistoryQuery, context_line, context_prompt, parse_history)

LIMITS = RequestLimits(max_payload_bytes=65536, max_prompt_chars=2000, max_tokens_cap=64, max_timeout_s=60)
WIDE = Bounds(max_events=1000, max_age_s=10 * 86400, max_bytes=10**9)
DAY = 86400.0
T0 = 1_796_000_000.0  # 2026-11-30 or so


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def event(n: int, at: float, rule: str = "door", camera: str = "yard", **extra: Any) -> HistoryEvent:
    return HistoryEvent(f"watch-{rule}-{n:04d}", rule, camera, at, "schedule", f"text {n}", **extra)


# --- the filter ----------------------------------------------------------------------------
def test_a_full_filter_parses_and_a_date_until_takes_the_whole_day() -> None:
    query = parse_history({"rule": "door", "camera": "yard", "since": "2026-11-30T19:00:00Z",
                           "until": "2026-12-01", "limit": 5})
    assert query == HistoryQuery("door", "yard", 1796065200.0, 1796169600.0, 5)
    assert parse_history({}) == HistoryQuery()
    assert parse_history({"since": "2026-11-30T20:00:00.250+01:00"}).since == 1796065200.25


# Each bad filter and the words its bad_request names it by (test_history.py sends them over MQTT).
BAD_FILTERS = [
    ([], "'history' must be an object, got array"),
    ({"rules": "x"}, "history: unknown field(s): 'rules'"),
    ({"rule": 3}, "history.rule must be a string, got integer"),
    ({"camera": "../etc"}, "history.camera '../etc' is not a camera name"),
    ({"since": "yesterday"}, "history.since 'yesterday' is not an ISO 8601 time"),
    ({"since": "2026-11-30T19:00:00"}, "history.since '2026-11-30T19:00:00' has no time zone"),
    ({"until": 5}, "history.until must be an ISO 8601 time or date string, got integer"),
    ({"since": "2026-12-01", "until": "2026-11-30"}, "history.until must be after history.since"),
    ({"limit": 0}, "history.limit must be in [1, 500], got 0"),
    ({"limit": True}, "history.limit must be an integer, got boolean"),
]


@pytest.mark.parametrize("value,words", BAD_FILTERS)
def test_a_bad_filter_is_a_bad_request_naming_the_field(value: Any, words: str) -> None:
    with pytest.raises(RequestError) as caught:
        parse_request(json.dumps({"id": "h1", "history": value}).encode(), LIMITS)
    assert caught.value.code.value == "bad_request" and caught.value.request_id == "h1"
    assert words in caught.value.message, caught.value.message


def test_a_query_takes_no_model_fields_and_a_question_keeps_its_prompt() -> None:
    query = parse_request(b'{"id": "q", "history": {"rule": "door"}}', LIMITS)
    assert query.history_only and query.messages == () and query.history == HistoryQuery(rule="door")
    with pytest.raises(RequestError) as caught:
        parse_request(b'{"history": {}, "max_tokens": 5}', LIMITS)
    assert "takes only history, id, reply_to, timeout_s, not 'max_tokens'" in caught.value.message
    question = parse_request(b'{"history": {"limit": 3}, "prompt": "Was it open?"}', LIMITS)
    assert not question.history_only and question.messages[-1]["content"] == "Was it open?"


def test_the_context_holds_the_newest_events_that_fit_and_says_how_many() -> None:
    lines = [context_line("2026-11-30T19:0%d:00Z" % n, event(n, T0)) for n in (3, 2, 1)]
    text, given = context_prompt(lines, 7, "Was it open?", budget=10_000)
    assert given == 3 and text.endswith("\n\nQuestion: Was it open?")
    assert text.splitlines()[0] == ("Events from the history, newest first (3 of 7; time UTC, rule, camera, "
                                    "text):")
    assert text.splitlines()[1] == "- 2026-11-30T19:03:00Z door yard: text 3"
    short, given = context_prompt(lines, 7, "Was it open?", budget=len(text) - 5)
    assert given == 2 and len(short) <= len(text) - 5 and "text 1" not in short and "(2 of 7" in short
    alone, given = context_prompt(lines, 7, "Was it open?", budget=20)
    assert (alone, given) == ("Was it open?", 0)


# --- the store -----------------------------------------------------------------------------
def test_bounds_by_count_age_and_bytes_oldest_first_files_too(tmp_path: Path) -> None:
    clock = Clock()
    store = HistoryStore(tmp_path / "history.db", tmp_path / "history", clock)
    for n in range(6):
        store.add(event(n, T0 - (5 - n) * DAY), b"\xff\xd8" + bytes(1000), WIDE)
    assert store.totals()[0] == 6 and len(list((tmp_path / "history").iterdir())) == 6
    store.enforce(Bounds(4, 10 * DAY, 10**9))  # count: the two oldest go
    assert [e.id for e in store.query(HistoryQuery())[0]] == [f"watch-door-{n:04d}" for n in (5, 4, 3, 2)]
    store.enforce(Bounds(4, 2.5 * DAY, 10**9))  # age: older than 2.5 days go
    assert [e.id for e in store.query(HistoryQuery())[0]] == ["watch-door-0005", "watch-door-0004",
                                                             "watch-door-0003"]
    one = store.totals()[1] // 3
    store.enforce(Bounds(4, 10 * DAY, 2 * one))  # bytes: what fits, newest first
    assert [e.id for e in store.query(HistoryQuery())[0]] == ["watch-door-0005", "watch-door-0004"]
    assert sorted(p.name for p in (tmp_path / "history").iterdir()) == ["watch-door-0004.jpg",
                                                                         "watch-door-0005.jpg"]
    assert 1000 < one < 1200  # the image counts with its row


def test_events_the_bounds_remove_give_their_pages_back_to_the_disk(tmp_path: Path) -> None:
    """Lowering `max_mb` shrinks the database file too: without auto-vacuum, SQLite keeps
    freed pages in the file for later rows."""
    clock = Clock()
    db = tmp_path / "history.db"
    store = HistoryStore(db, tmp_path / "history", clock)
    for n in range(600):
        store.add(HistoryEvent(f"watch-door-{n:04d}", "door", "yard", T0 - 600 + n, "schedule", "x" * 2000),
                  None, WIDE)
    store.close()  # the last connection's close checkpoints the write-ahead log into the file
    full = db.stat().st_size
    store = HistoryStore(db, tmp_path / "history", clock)
    assert store.enforce(Bounds(10, 10 * DAY, 10**9)) == 590
    store.close()
    assert full > 1_000_000 and db.stat().st_size < full // 10, (full, db.stat().st_size)


def test_a_query_filters_and_counts_and_the_history_survives_a_reopen(tmp_path: Path) -> None:
    clock = Clock()
    store = HistoryStore(tmp_path / "h.db", tmp_path / "img", clock)
    store.add(event(1, T0 - 30, json={"open": True}, has_json=True, changed=True), None, WIDE)
    store.add(event(2, T0 - 20, rule="gate", camera="drive"), b"\xff\xd8jpeg", WIDE)
    store.add(event(3, T0 - 10), None, WIDE)
    store.close()
    again = HistoryStore(tmp_path / "h.db", tmp_path / "img", clock)
    events, matched = again.query(HistoryQuery(rule="door", limit=1))
    assert matched == 2 and [e.id for e in events] == ["watch-door-0003"]
    first = again.query(HistoryQuery(since=T0 - 35, until=T0 - 25))[0]
    assert first == [event(1, T0 - 30, json={"open": True}, has_json=True, changed=True)]
    assert [e.snapshot for e in again.query(HistoryQuery(camera="drive"))[0]] == [True]
    assert again.sweep() == 0
    (tmp_path / "img" / "watch-gone-1.jpg").write_bytes(b"stray")  # a crash between file and row
    assert again.sweep() == 1 and sorted(p.name for p in (tmp_path / "img").iterdir()) == ["watch-gate-0002.jpg"]


def test_a_file_where_the_image_folder_should_be_fails_the_write_not_the_caller(tmp_path: Path) -> None:
    (tmp_path / "history").write_text("not a folder")
    store = HistoryStore(tmp_path / "history.db", tmp_path / "history", Clock())
    with pytest.raises(StoreError):
        store.add(event(1, T0), b"\xff\xd8jpeg", WIDE)
    assert store.totals() == (0, 0)  # no row without its file
    store.add(event(2, T0), None, WIDE)  # without an image it still goes in
    assert store.totals()[0] == 1


def test_the_history_thread_degrades_once_and_recovers(tmp_path: Path) -> None:
    (tmp_path / "history").write_text("not a folder")
    history = History(tmp_path, lambda: WIDE, Clock())
    for n in range(3):
        history.record(event(n, T0), b"\xff\xd8jpeg")
    assert history.flush(10)
    assert history.info() == {"events": 0, "bytes": 0, "degraded": True, "write_failures": 3, "dropped": 0}
    (tmp_path / "history").unlink()
    history.record(event(9, T0), b"\xff\xd8jpeg")
    found: list[Any] = []
    history.query(HistoryQuery(), lambda events, matched: found.append((events, matched)), found.append)
    assert history.flush(10)
    assert history.info()["degraded"] is False and history.info()["events"] == 1
    assert found == [([event(9, T0, snapshot=True)], 1)]
    history.close(5)
