"""The one door for work. MQTT requests, watch rule runs and Home Assistant prompts become `Job`s
here: parsed, their reply routed, de-duplicated, and queued. Runs on the MQTT network thread
(and the watch thread): it parses, validates and enqueues, and never generates."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Protocol

import structlog

from edge_agent.delivery import DUPLICATE, Delivery
from edge_agent.errors import AgentError, Busy, Internal, Unavailable
from edge_agent.inflight import InFlight
from edge_agent.jobs import Job
from edge_agent.log import get_logger
from edge_agent.mqtt import Incoming
from edge_agent import protocol
from edge_agent.protocol import Request, RequestError, RequestLimits, Topics, choose_reply_topic, encode, error_payload
from edge_agent.overflow import Overflow
from edge_agent.scheduler import Scheduler
from edge_agent.settings import Settings
from edge_agent.stats import Stats

log = get_logger("intake")
BUSY_RETRY_AFTER_MS = 1000


class Host(Protocol):
    """What the intake reads from the agent: the current snapshot of each (a reload swaps them)."""

    settings: Settings
    limits: RequestLimits
    topics: Topics
    scheduler: Scheduler | None  # None while the local model loads
    overflow: Overflow | None

    def stopping(self) -> bool: ...

    def ack(self, incoming: Incoming) -> None: ...


class Intake:
    def __init__(self, host: Host, delivery: Delivery, in_flight: InFlight, stats: Stats) -> None:
        self._host = host
        self._delivery = delivery
        self._in_flight = in_flight
        self._stats = stats

    # --- MQTT requests -------------------------------------------------------------------
    def take_request(self, incoming: Incoming) -> None:
        """A request from a pipeline; every failure is an error answer, never an exception."""
        try:
            self._take(incoming)
        except Exception as exc:  # noqa: BLE001 - a bug must cost one request, answered
            log.exception("request.unexpected_error")
            try:
                self.reply_error(self._error_topic(incoming), None, Internal(
                    f"unexpected {type(exc).__name__} while taking the request"), incoming)
            except Exception:  # noqa: BLE001 - left unacknowledged: the broker delivers it again
                log.exception("request.unanswered")

    def _take(self, incoming: Incoming) -> None:
        host, received = self._host, time.monotonic()
        try:
            # through the module, so that the fault tests' injected parser is the one used
            request = protocol.parse_request(incoming.payload, host.limits)
        except RequestError as exc:
            with structlog.contextvars.bound_contextvars(request_id=exc.request_id):
                self.reply_error(self._error_topic(incoming), exc.request_id, exc, incoming)
            return
        with structlog.contextvars.bound_contextvars(request_id=request.id):
            default = self._default_reply_topic(incoming)
            try:
                topic = choose_reply_topic(incoming.response_topic, request.reply_to,
                                           default, host.settings.mqtt.reply_topic_allow)
            except AgentError as exc:
                self.reply_error(default, request, exc, incoming)
                return
            if host.stopping():
                self.reply_error(topic, request, Unavailable("the agent is stopping"), incoming)
                return
            if self._delivery.admit(request.id, request.id_given, incoming,
                                    (topic, incoming.correlation_data)) == DUPLICATE:
                return
            job = Job(request, topic, incoming.correlation_data, received,
                      deadline(received, request.timeout_s, incoming.expiry_s), incoming)
            if host.scheduler is None:  # only with overflow.when "unloaded": nothing is held meanwhile
                if not self._overflow(job, "unloaded"):
                    self.reply_error(topic, request, Unavailable(
                        "the model is loading and this request may not go to the overflow server"),
                        incoming, retry_after_ms=BUSY_RETRY_AFTER_MS)
                return
            if self._enqueue(job):
                log.info("request.accepted", queue_depth=host.scheduler.depth, reply_topic=topic)
                return
            if self._overflow(job, "busy"):
                return
            self.reply_error(topic, request, Busy(f"queue full ({host.settings.limits.queue_size} waiting)"),
                             incoming, retry_after_ms=BUSY_RETRY_AFTER_MS)

    def take_cancel(self, incoming: Incoming) -> None:
        """`{"id"}` on the cancel topic: that request ends, answered with the text it has.
        Unknown or finished ids change nothing; a malformed cancel gets an error answer."""
        self._host.ack(incoming)  # nothing to keep: a cancel lost in a crash has nothing to end
        try:
            request_id = protocol.parse_cancel(incoming.payload, self._host.limits.max_payload_bytes)
        except AgentError as exc:
            self.reply_error(self._error_topic(incoming), None, exc, None)
            return
        found = self._in_flight.cancel(request_id)
        log.info("request.cancel", request_id=request_id, found=found, topic=incoming.topic)

    # --- work that does not come as a request payload ------------------------------------------
    def submit_fields(self, fields: dict[str, Any], on_done: Callable[[bytes, str], None], *,
                      background: bool, trusted: bool, timeout_s: float | None = None) -> bool:
        """A request written here (a watch rule's run, a Home Assistant prompt), parsed like any
        other; its answer goes to `on_done(payload, outcome)`. `trusted`: from the settings file
        (free prompts allowed whatever `allow_free_prompts` says). False when the queue is full or
        the agent is stopping; a request that does not parse is answered through `on_done`."""
        host, received = self._host, time.monotonic()
        limits = dataclasses.replace(host.limits, allow_free_prompts=True) if trusted else host.limits
        try:
            request = protocol.parse_request(encode(fields), limits)
        except RequestError as exc:
            on_done(error_payload(exc.request_id, exc.code, exc.message), exc.code.value)
            return True
        if host.stopping() or host.scheduler is None:
            return False
        job = Job(request, "", None, received, deadline(received, timeout_s, None),
                  background=background, on_done=on_done)
        return self._enqueue(job)

    def _overflow(self, job: Job, reason: str) -> bool:
        overflow = self._host.overflow
        if overflow is None:
            return False
        self._in_flight.add(job)
        if overflow.submit(job, reason):
            return True
        self._in_flight.forget(job)
        return False

    def _enqueue(self, job: Job) -> bool:
        scheduler = self._host.scheduler
        assert scheduler is not None
        self._in_flight.add(job)
        if scheduler.submit(job):
            return True
        self._in_flight.forget(job)
        return False

    # --- replies ------------------------------------------------------------------------------
    def reply_error(self, topic: str, request: Request | str | None, exc: AgentError,
                    incoming: Incoming | None, **extra: object) -> None:
        """An error answer given instead of running the request: a re-send of its id may run."""
        self._stats.requests.count(exc.code.value)
        log.info("request.rejected", code=exc.code.value, reason=exc.message)
        request_id = request.id if isinstance(request, Request) else request
        id_given = request.id_given if isinstance(request, Request) else request is not None
        self._delivery.answer(request_id, id_given, topic,
                              error_payload(request_id, exc.code, exc.message, **extra),
                              incoming.correlation_data if incoming else None, incoming, final=False)

    def _default_reply_topic(self, incoming: Incoming) -> str:
        """A fleet request (shared subscription) is answered on the fleet's response topic."""
        topics = self._host.topics
        return topics.fleet_response if incoming.topic == topics.fleet_request else topics.response

    def _error_topic(self, incoming: Incoming) -> str:
        """Where the error for an unreadable request goes: its response topic if usable."""
        default = self._default_reply_topic(incoming)
        try:
            return choose_reply_topic(incoming.response_topic, None, default,
                                      self._host.settings.mqtt.reply_topic_allow)
        except AgentError:
            return default


def deadline(received: float, timeout_s: float | None, expiry_s: int | None) -> float | None:
    limits = [v for v in (timeout_s, expiry_s) if v is not None]
    return received + min(limits) if limits else None
