"""Requests that name the event history: a query (answered with events, no model) or a
question over it (the events become context before the prompt, then the request runs like any
other). The lookup runs on the history's own thread (delivery/history.py), never on paho's
network thread and never behind inference; its result continues from there."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Protocol

from edge_agent.errors import AgentError, Unavailable, Unsupported
from edge_agent.health.status import utc_iso
from edge_agent.log import get_logger
from edge_agent.mqtt import Incoming
from edge_agent.protocol.history import (HistoryEvent, HistoryQuery, context_line, context_prompt, event_document,
                                         history_answer)
from edge_agent.work.jobs import Job
from edge_agent.work.snapshot import Snapshot

log = get_logger("history")


class HistoryLookup(Protocol):
    def query(self, query: HistoryQuery, found: Callable[[list[HistoryEvent], int], None],
              failed: Callable[[str], None]) -> None: ...


# (topic, request, error, incoming): an error answer, as the intake gives one
ReplyError = Callable[[str, object, AgentError, Incoming], None]
Answer = Callable[[Job, bytes], None]  # a query's answer, through delivery
Queue = Callable[[Job, Incoming, Snapshot], None]  # a question, on to the queue


class HistoryRequests:
    def __init__(self, lookup: HistoryLookup, answer: Answer, queue: Queue, reply_error: ReplyError) -> None:
        self._lookup = lookup
        self._answer = answer
        self._queue = queue
        self._reply_error = reply_error

    def take(self, job: Job, incoming: Incoming, snapshot: Snapshot) -> None:
        request = job.request
        assert request.history is not None
        if not snapshot.settings.history.enabled:
            self._reply_error(job.reply_topic, request, Unsupported(
                "this agent keeps no event history ([history] enabled = false)"), incoming)
            return

        def failed(reason: str) -> None:
            self._reply_error(job.reply_topic, request, Unavailable(reason), incoming)

        def found(events: list[HistoryEvent], matched: int) -> None:
            if request.history_only:
                self._answer_query(job, snapshot, events, matched)
            else:
                self._ask(job, incoming, snapshot, events, matched)

        self._lookup.query(request.history, found, failed)

    def _answer_query(self, job: Job, snapshot: Snapshot, events: list[HistoryEvent], matched: int) -> None:
        topics = snapshot.topics
        documents = [event_document(e, utc_iso(e.at), topics.watch_snapshot(e.rule)) for e in events]
        log.info("history.answered", count=len(documents), matched=matched,
                 ms=round((time.monotonic() - job.received_at) * 1000, 1))
        self._answer(job, history_answer(job.request.id, documents, matched))

    def _ask(self, job: Job, incoming: Incoming, snapshot: Snapshot, events: list[HistoryEvent],
             matched: int) -> None:
        """The events (newest first) before the question, in its user message, as many as fit
        in `limits.max_prompt_chars` with every message of the request."""
        request = job.request
        *earlier, question = request.messages
        budget = snapshot.limits.max_prompt_chars - sum(len(m["content"]) for m in earlier)
        text, given = context_prompt([context_line(utc_iso(e.at, "seconds"), e) for e in events],
                                     matched, question["content"], budget)
        log.info("history.context", given=given, matched=matched, chars=len(text))
        job.request = dataclasses.replace(request, messages=(*earlier, {**question, "content": text}),
                                          history_counts=(given, matched))
        self._queue(job, incoming, snapshot)
