"""The event history in the protocol: the `history` filter of a request, the events it answers
with, and the context block a question over the history puts before its prompt. Pure."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import Any

from edge_agent.errors import BadRequest
from edge_agent.protocol.payloads import encode
from edge_agent.protocol.strictjson import json_type
from edge_agent.protocol.topics import NAME  # rule and camera names

HISTORY_FIELDS = frozenset({"rule", "camera", "since", "until", "limit"})
DEFAULT_LIMIT, MAX_LIMIT = 50, 500
# Snapshot ids become file names: only what is safe as one (a rule run's id always is).
SNAPSHOT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
CONTEXT_HEAD = "Events from the history, newest first ({given} of {matched}; time UTC, rule, camera, text):"
CONTEXT_TAIL = "\n\nQuestion: "


@dataclass(frozen=True)
class HistoryQuery:
    rule: str | None = None
    camera: str | None = None
    since: float | None = None  # epoch seconds, inclusive
    until: float | None = None  # epoch seconds, exclusive
    limit: int = DEFAULT_LIMIT


@dataclass(frozen=True)
class HistoryEvent:
    """One published rule state as the history keeps it (`at`: epoch seconds)."""

    id: str
    rule: str
    camera: str
    at: float
    trigger: str
    text: str | None
    json: Any = None
    has_json: bool = False
    changed: bool = False
    snapshot: bool = False  # a JPEG is kept beside the database under the event's id


def parse_history(value: Any) -> HistoryQuery:
    """The request's `history` object; BadRequest naming the field (`history.since`)."""
    if not isinstance(value, dict):
        raise BadRequest(f"'history' must be an object, got {json_type(value)}")
    unknown = sorted(set(value) - HISTORY_FIELDS)
    if unknown:
        raise BadRequest("history: unknown field(s): " + ", ".join(repr(k[:64]) for k in unknown[:5])
                         + f"; known: {', '.join(sorted(HISTORY_FIELDS))}")
    names = {key: _name(value, key) for key in ("rule", "camera") if key in value}
    since = _time(value, "since", end=False) if "since" in value else None
    until = _time(value, "until", end=True) if "until" in value else None
    if since is not None and until is not None and until <= since:
        raise BadRequest("history.until must be after history.since")
    limit = value.get("limit", DEFAULT_LIMIT)
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise BadRequest(f"history.limit must be an integer, got {json_type(limit)}")
    if not 1 <= limit <= MAX_LIMIT:
        raise BadRequest(f"history.limit must be in [1, {MAX_LIMIT}], got {limit}")
    return HistoryQuery(since=since, until=until, limit=limit, **names)


def _name(value: dict[str, Any], key: str) -> str:
    name = value[key]
    if not isinstance(name, str):
        raise BadRequest(f"history.{key} must be a string, got {json_type(name)}")
    if not NAME.fullmatch(name):
        raise BadRequest(f"history.{key} {name[:64]!r} is not a {key} name")
    return name


def _time(value: dict[str, Any], key: str, *, end: bool) -> float:
    """ISO 8601 with a zone (`Z` or an offset), or a date (UTC midnight; for `until`, the end
    of that day, so `"until": "2026-11-30"` takes the whole day)."""
    text = value[key]
    if not isinstance(text, str):
        raise BadRequest(f"history.{key} must be an ISO 8601 time or date string, got {json_type(text)}")
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            moment = datetime(day.year, day.month, day.day, tzinfo=timezone.utc).timestamp()
            return moment + 86400 if end else moment
        parsed = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
    except ValueError:
        raise BadRequest(f"history.{key} {text[:40]!r} is not an ISO 8601 time "
                         "(2026-11-30T19:36:02Z) or date (2026-11-30)") from None
    if parsed.tzinfo is None:
        raise BadRequest(f"history.{key} {text[:40]!r} has no time zone: add Z for UTC")
    return parsed.timestamp()


def event_document(event: HistoryEvent, at_iso: str, snapshot_topic: str | None) -> dict[str, Any]:
    """An event in an answer: no image bytes, only the snapshot's id and topic."""
    doc: dict[str, Any] = {"id": event.id, "at": at_iso, "rule": event.rule, "camera": event.camera,
                           "trigger": event.trigger, "text": event.text, "changed": event.changed}
    if event.has_json:
        doc["json"] = event.json
    doc["snapshot"] = {"id": event.id, "topic": snapshot_topic} if event.snapshot else None
    return doc


def context_prompt(lines: list[str], matched: int, prompt: str, budget: int) -> tuple[str, int]:
    """The prompt with the events' lines (newest first) before it, as many as fit in `budget`
    characters together with the prompt; returns (text, lines given). No event fits: the
    prompt alone, saying so."""
    given: list[str] = []
    used = len(CONTEXT_HEAD.format(given=matched, matched=matched)) + len(CONTEXT_TAIL) + len(prompt)
    for line in lines:
        if used + len(line) + 1 > budget:
            break
        given.append(line)
        used += len(line) + 1
    if not given:
        return prompt, 0
    head = CONTEXT_HEAD.format(given=len(given), matched=matched)
    return head + "\n" + "\n".join(given) + CONTEXT_TAIL + prompt, len(given)


def context_line(at_iso: str, event: HistoryEvent) -> str:
    """One event in a prompt: time, rule, camera, text (newlines flattened)."""
    text = " ".join((event.text or "").split())
    return f"- {at_iso} {event.rule} {event.camera}: {text}"


def history_answer(request_id: str, events: list[dict[str, Any]], matched: int) -> bytes:
    """The answer to a query of the history: `count` events given of `matched`."""
    return encode({"id": request_id, "ok": True, "events": events, "count": len(events), "matched": matched})
