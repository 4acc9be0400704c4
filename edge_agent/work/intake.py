"""The one door for work. MQTT requests, watch rule runs and Home Assistant prompts become `Job`s
here: parsed, their reply routed, de-duplicated, and queued. Runs on the MQTT network thread
(and the watch thread): it parses, validates and enqueues, and never generates, waits for the
model, or touches the disk. Each message reads one settings snapshot (`current()`), and its job
keeps that snapshot's runner."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from typing import Any, Callable

import structlog

from edge_agent.delivery.outbox import DUPLICATE, Delivery
from edge_agent.errors import AgentError, Busy, Internal, Unavailable
from edge_agent.work.history import HistoryLookup, HistoryRequests
from edge_agent.work.inflight import InFlight
from edge_agent.work.jobs import CallbackEnd, Job
from edge_agent.log import get_logger
from edge_agent.mqtt import Incoming
from edge_agent import protocol
from edge_agent.protocol import Request, RequestError, choose_reply_topic, chunk_payload, encode, error_payload
from edge_agent.work.lanes import Scheduler
from edge_agent.work.snapshot import Current, Snapshot
from edge_agent.health.stats import Stats

log = get_logger("intake")
BUSY_RETRY_AFTER_MS = 1000
EARLY_MAX = 64  # requests held while the model loads; more are answered `busy` at once
# MQTT 5 User Property on a fleet request passed back to the pool: how many members did so
HOPS_PROPERTY = "edge-agent-hops"


class Intake:
    def __init__(self, current: Current, scheduler: Scheduler, delivery: Delivery, in_flight: InFlight,
                 stats: Stats, stopping: Callable[[], bool], *, history: HistoryLookup,
                 early_max: int = EARLY_MAX) -> None:
        self._current = current
        self._scheduler = scheduler
        self._delivery = delivery
        self._in_flight = in_flight
        self._stats = stats
        self._stopping = stopping
        self._replies = _Replies(current, delivery, stats)
        self._history = HistoryRequests(history, self._replies.queried, self._queue, self.reply_error)
        self.handed_back = 0  # fleet requests passed back to the pool (queue full)
        self.hop_limit_reached = 0  # ... that could not be: passed on too often already
        # Requests a resumed session delivers before the agent takes requests: held, at most
        # `early_max` (a flood of QoS 0 requests must not grow the daemon); past it, `busy`.
        self._early_lock = threading.Lock()
        self._early: deque[Incoming] | None = deque()
        self._early_max = early_max
        self._side_doors: list[Callable[[Incoming], bool]] = []

    # --- the door ----------------------------------------------------------------------------
    def take(self, incoming: Incoming) -> None:
        """Everything the broker link delivers (network thread): held until the door opens,
        then routed: a cancel, a side door's message (Home Assistant), else a request."""
        with self._early_lock:
            early = self._early
            if early is not None and len(early) < self._early_max:
                early.append(incoming)
                return
        if early is not None and self._is_request(incoming):
            self._refuse_early(incoming)  # counted as `busy` in the stats, like any refusal
            return
        self._route(incoming)

    def add_side_door(self, takes: Callable[[Incoming], bool]) -> None:
        """Messages for another part (Home Assistant): `takes` returns True for one it took."""
        self._side_doors.append(takes)

    def _is_request(self, incoming: Incoming) -> bool:
        topics = self._current().topics
        return incoming.topic in (topics.request, topics.fleet_request)

    def _route(self, incoming: Incoming) -> None:
        topics = self._current().topics
        if incoming.topic in (topics.cancel, topics.fleet_cancel):
            self.take_cancel(incoming)
        elif not any(takes(incoming) for takes in self._side_doors):
            self.take_request(incoming)

    def open_door(self) -> None:
        """Take requests from now on, first those held meanwhile, in the order they came."""
        while True:
            with self._early_lock:
                early = self._early
                if not early:
                    self._early = None
                    return
                incoming = early.popleft()
            self._route(incoming)

    def _refuse_early(self, incoming: Incoming) -> None:
        snapshot = self._current()
        try:
            request = protocol.parse_request(incoming.payload, snapshot.limits)
        except RequestError as exc:
            self.reply_error(self._error_topic(incoming, snapshot), exc.request_id, exc, incoming)
            return
        self.reply_error(self._error_topic(incoming, snapshot), request, Busy(
            f"the agent is starting and holds {self._early_max} requests already"), incoming,
            retry_after_ms=BUSY_RETRY_AFTER_MS)

    # --- MQTT requests -------------------------------------------------------------------
    def take_request(self, incoming: Incoming) -> None:
        """A request from a pipeline; every failure is an error answer, never an exception."""
        snapshot = self._current()
        try:
            self._take(incoming, snapshot)
        except Exception as exc:  # noqa: BLE001 - a bug must cost one request, answered
            log.exception("request.unexpected_error")
            try:
                self.reply_error(self._error_topic(incoming, snapshot), None, Internal(
                    f"unexpected {type(exc).__name__} while taking the request"), incoming)
            except Exception:  # noqa: BLE001 - left unacknowledged: the broker delivers it again
                log.exception("request.unanswered")

    def _take(self, incoming: Incoming, snapshot: Snapshot) -> None:
        received = time.monotonic()
        try:
            # through the module, so that the fault tests' injected parser is the one used
            request = protocol.parse_request(incoming.payload, snapshot.limits)
        except RequestError as exc:
            with structlog.contextvars.bound_contextvars(request_id=exc.request_id):
                self.reply_error(self._error_topic(incoming, snapshot), exc.request_id, exc, incoming)
            return
        with structlog.contextvars.bound_contextvars(request_id=request.id):
            default = self._default_reply_topic(incoming, snapshot)
            try:
                topic = choose_reply_topic(incoming.response_topic, request.reply_to,
                                           default, snapshot.settings.mqtt.reply_topic_allow)
            except AgentError as exc:
                self.reply_error(default, request, exc, incoming)
                return
            if self._stopping():
                self.reply_error(topic, request, Unavailable("the agent is stopping"), incoming)
                return
            if self._delivery.admit(request.id, request.id_given, incoming,
                                    (topic, incoming.correlation_data)) == DUPLICATE:
                return
            job = Job(request, topic, incoming.correlation_data, received,
                      deadline(received, request.timeout_s, incoming.expiry_s), incoming,
                      end=self._replies, runner=snapshot.handler)
            if request.history is not None:  # looked up on the history's thread, then on
                self._history.take(job, incoming, snapshot)
                return
            self._queue(job, incoming, snapshot)

    def _queue(self, job: Job, incoming: Incoming, snapshot: Snapshot) -> None:
        """An admitted request on to the queue, the fleet, the overflow server, or `busy`."""
        if not snapshot.loaded:  # only with overflow.when "unloaded": nothing is held meanwhile
            if not self._overflow(job, "unloaded", snapshot):
                self.reply_error(job.reply_topic, job.request, Unavailable(
                    "the model is loading and this request may not go to the overflow server"),
                    incoming, retry_after_ms=BUSY_RETRY_AFTER_MS)
            return
        if self._enqueue(job):
            log.info("request.accepted", queue_depth=self._scheduler.depth, reply_topic=job.reply_topic)
            return
        if not self._hand_back(job, incoming, snapshot):
            self._overflow_or_busy(job, incoming, snapshot)

    def _overflow_or_busy(self, job: Job, incoming: Incoming, snapshot: Snapshot) -> None:
        """A request the queue has no room for: the overflow server's, else answered `busy`."""
        if self._overflow(job, "busy", snapshot):
            return
        reason = f"queue full ({snapshot.settings.limits.queue_size} waiting)"
        hops = hops_of(incoming) if incoming.topic == snapshot.topics.fleet_request else 0
        if hops:
            reason += f"; passed on {hops} times in the fleet already"
        self.reply_error(job.reply_topic, job.request, Busy(reason), incoming, retry_after_ms=BUSY_RETRY_AFTER_MS)

    def _hand_back(self, job: Job, incoming: Incoming, snapshot: Snapshot) -> bool:
        """A fleet request that finds the queue full goes back to the pool (the broker hands it
        to a member again, maybe this one) rather than be refused while another member is idle:
        re-published with its properties, the remaining expiry and one hop more. MQTT 5 only
        (3.1.1 has no property to count hops in); at `mqtt.fleet_max_hops` it stays here."""
        mqtt, topics = snapshot.settings.mqtt, snapshot.topics
        if incoming.topic != topics.fleet_request or mqtt.protocol != "5" or mqtt.fleet_max_hops == 0:
            return False
        hops = hops_of(incoming)
        if hops >= mqtt.fleet_max_hops:
            self.hop_limit_reached += 1
            log.info("request.hop_limit", hops=hops, fleet_max_hops=mqtt.fleet_max_hops)
            return False
        expiry_s = remaining_expiry_s(incoming.expiry_s, job.received_at)
        if expiry_s == 0:  # would expire on the way (and 0 on the wire means "never")
            return False
        # Forgotten before the copy leaves: it may come back to this agent as a new request.
        self._delivery.release(job.request.id, job.request.id_given)
        self.handed_back += 1
        log.info("request.handed_back", hops=hops + 1, expiry_s=expiry_s,
                 queue_size=snapshot.settings.limits.queue_size)
        properties = tuple(p for p in incoming.user_properties if p[0] != HOPS_PROPERTY)
        link = snapshot.link
        # Acknowledged (on the link it came in on) only once the broker has the copy: a crash
        # in between means it comes again.
        link.publish(topics.fleet_request, incoming.payload, qos=1, correlation_data=incoming.correlation_data,
                     response_topic=incoming.response_topic, expiry_s=expiry_s,
                     user_properties=(*properties, (HOPS_PROPERTY, str(hops + 1))),
                     content_type=incoming.content_type, payload_format=incoming.payload_format,
                     on_acked=lambda: link.ack(incoming),
                     on_refused=lambda reason: self._hand_back_refused(job, incoming, reason, snapshot))
        return True

    def _hand_back_refused(self, job: Job, incoming: Incoming, reason: str, snapshot: Snapshot) -> None:
        """The broker refused the copy (an ACL that lets members subscribe, not publish, to
        the fleet topic): the request stays with this agent after all. Network thread."""
        with structlog.contextvars.bound_contextvars(request_id=job.request.id):
            log.warning("request.hand_back_refused", reason=reason)
            self._overflow_or_busy(job, incoming, snapshot)

    def take_cancel(self, incoming: Incoming) -> None:
        """`{"id"}` on the cancel topic: that request ends, answered with the text it has.
        Unknown or finished ids change nothing; a malformed cancel gets an error answer."""
        snapshot = self._current()
        snapshot.link.ack(incoming)  # nothing to keep: a cancel lost in a crash has nothing to end
        try:
            request_id = protocol.parse_cancel(incoming.payload, snapshot.limits.max_payload_bytes)
        except AgentError as exc:
            self.reply_error(self._error_topic(incoming, snapshot), None, exc, None)
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
        snapshot, received = self._current(), time.monotonic()
        limits = dataclasses.replace(snapshot.limits, allow_free_prompts=True, trusted=True) if trusted \
            else snapshot.limits
        try:
            request = protocol.parse_request(encode(fields), limits)
        except RequestError as exc:
            on_done(error_payload(exc.request_id, exc.code, exc.message), exc.code.value)
            return True
        if self._stopping() or not snapshot.loaded:
            return False
        job = Job(request, "", None, received, deadline(received, timeout_s, None),
                  background=background, end=CallbackEnd(on_done), runner=snapshot.handler)
        return self._enqueue(job)

    def fleet_info(self) -> dict[str, int]:
        return {"handed_back": self.handed_back, "hop_limit_reached": self.hop_limit_reached}

    def _overflow(self, job: Job, reason: str, snapshot: Snapshot) -> bool:
        overflow = snapshot.overflow
        return overflow is not None and self._tracked(job, lambda queued: overflow.submit(queued, reason))

    def _enqueue(self, job: Job) -> bool:
        return self._tracked(job, self._scheduler.submit)

    def _tracked(self, job: Job, submit: Callable[[Job], bool]) -> bool:
        """Queued by `submit`, and reachable by a cancel from the moment it is: registered
        before, forgotten again when it was not taken."""
        self._in_flight.add(job)
        job.tracked_by(self._in_flight.forget)
        if submit(job):
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

    @staticmethod
    def _default_reply_topic(incoming: Incoming, snapshot: Snapshot) -> str:
        """A fleet request (shared subscription) is answered on the fleet's response topic."""
        topics = snapshot.topics
        return topics.fleet_response if incoming.topic == topics.fleet_request else topics.response

    def _error_topic(self, incoming: Incoming, snapshot: Snapshot) -> str:
        """Where the error for an unreadable request goes: its response topic if usable."""
        default = self._default_reply_topic(incoming, snapshot)
        try:
            return choose_reply_topic(incoming.response_topic, None, default,
                                      snapshot.settings.mqtt.reply_topic_allow)
        except AgentError:
            return default


class _Replies:
    """The end of a pipeline's request: its answer, exactly once, through delivery; its stream
    chunks at QoS 0, never stored (the final answer carries the whole text, so a chunk lost to
    a dropped link costs nothing, and none pile up while the broker is away)."""

    def __init__(self, current: Current, delivery: Delivery, stats: Stats) -> None:
        self._current = current
        self._delivery = delivery
        self._stats = stats

    def answered(self, job: Job, payload: bytes, outcome: str, final: bool) -> None:
        request = job.request
        if not final:  # refused (the agent stops, the overflow server was replaced)
            log.info("request.rejected", code=outcome)
        latency_ms = (time.monotonic() - job.received_at) * 1000 if outcome == "ok" else None
        self._stats.requests.count(outcome, latency_ms)
        self._delivery.answer(request.id, request.id_given, job.reply_topic, payload,
                              job.correlation_data, job.message, final=final)

    def queried(self, job: Job, payload: bytes) -> None:
        """The answer to a query of the history: no model ran."""
        self.answered(job, payload, "ok", True)

    def chunk(self, job: Job, seq: int, delta: str) -> None:
        self._current().link.publish(job.reply_topic, chunk_payload(job.request.id, seq, delta),
                                     correlation_data=job.correlation_data, qos=0)


def hops_of(incoming: Incoming) -> int:
    """How many fleet members passed this request on before (0: none, or unreadable)."""
    for key, value in incoming.user_properties:
        if key == HOPS_PROPERTY:
            try:
                return max(0, int(value))
            except ValueError:
                return 0
    return 0


def remaining_expiry_s(expiry_s: int | None, received: float) -> int | None:
    """What is left of a Message Expiry Interval (the broker already took off its own wait),
    to the nearest second (MQTT counts whole seconds; rounding down would take up to a second
    off at every hop). None: it never expires."""
    if expiry_s is None:
        return None
    return max(0, round(expiry_s - (time.monotonic() - received)))


def deadline(received: float, timeout_s: float | None, expiry_s: int | None) -> float | None:
    limits = [v for v in (timeout_s, expiry_s) if v is not None]
    return received + min(limits) if limits else None
