"""Exactly one answer per request id, across broker restarts, crashes and network drops.

- A request is acknowledged to the broker (PUBACK) only once its answer is stored on disk, so a
  crash before that makes the broker deliver it again (persistent session). An error reply
  given instead of running it (busy, stopping) is not stored: published, then acknowledged.
- Every answer goes through the outbox: stored, then published (QoS 2 by default: the broker
  takes it once even if the link drops mid-handshake); the row goes when the broker confirms it
  (PUBACK, or PUBCOMP for QoS 2). At each connection, what no one else will send is published
  again, oldest first: what a previous process left, what went out on a link since replaced.
- A request id seen within the window is not run again: a redelivery of a request in progress
  waits for that answer; a re-send of an answered one gets the stored answer again (on the
  re-send's own reply topic), unless that answer is on its way to that same place already
  (published on the current link, not yet confirmed).
Requests without an `id` get a generated one, so a re-send of those cannot be recognised.
If the store fails (disk full, a damaged file), requests are still run and answered, without
those guarantees: each failure is logged (`store.failed`) and counted (`store_failures`).

Threads: paho's network thread (admit, error replies, release, replay, the on_acked callbacks)
and the workers (final answers) change memory only, under one lock never held across I/O: the
ids seen within the window (`seen.SeenIndex`, loaded from the store at start) and the
deliveries waiting for an answer. The disk work goes, in the order memory saw it, to the
delivery-writer thread (`writer.Writer`), which alone touches the store and owns the outbox
book-keeping (`_unacked`, `_unstored`): a final answer is stored there, then its request is
acknowledged, then the answer published. Error replies (`final=False`) are published and
acknowledged at once from the caller's thread, unstored. The writer's queue is bounded: when it
is full a final answer goes out from memory as if the store had failed, a re-send of an
answered id is left unacknowledged (the broker delivers it again after a reconnect), and a
skipped write of an id's sighting or release costs nothing (memory decides; ids in progress are
cleared at start anyway); each is logged as `store.failed` and counted. After `close` the same
happens, logged as `delivery.closed`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable, Generic

from edge_agent.delivery.ports import M, Link
from edge_agent.delivery.seen import IN_PROGRESS, SeenIndex
from edge_agent.delivery.store import SeenAnswer, Store
from edge_agent.delivery.writer import WRITER_QUEUE_MAX, Writer
from edge_agent.errors import StoreError
from edge_agent.log import get_logger

log = get_logger("delivery")
NEW, DUPLICATE = "new", "duplicate"
Reply = tuple[str, "bytes | None"]  # where an answer goes: topic, MQTT 5 correlation data
UNSTORED_MAX = 1000  # answers the store refused, kept in memory for a re-send; oldest dropped
CLOSE_TIMEOUT_S = 10.0  # stopping waits this long for the writes queued


class Delivery(Generic[M]):
    def __init__(self, store: Store, link: Callable[[], Link[M]],
                 answer_qos: Callable[[], int] = lambda: 2, *, queue_max: int = WRITER_QUEUE_MAX) -> None:
        self._store = store
        self._link = link  # getters: a reload may swap the link or change the QoS
        self._answer_qos = answer_qos
        self._lock = threading.Lock()  # guards the next three; memory only, never held across I/O
        self._seen = SeenIndex(store.dedup_window_s, store.now)
        # request id -> its deliveries to acknowledge, each with where it wants the answer
        self._waiting: dict[str, list[tuple[M, Reply | None]]] = {}
        self.store_failures = 0
        # The delivery-writer thread's own, no lock: outbox rows of this process -> the link each
        # was published on (None: not yet); answers the store refused, by request id.
        self._unacked: dict[int, Link[M] | None] = {}
        self._unstored: OrderedDict[str, SeenAnswer] = OrderedDict()
        store.reset_in_progress()  # requests a previous process took but never answered run again
        self._seen.load(store.answered_ids())
        self._outbox_size: int | None = None
        self._refresh_size()
        self._writer = Writer(maxsize=queue_max, on_idle=self._refresh_size)

    # --- called from paho's network thread and the workers: memory, then a queued step --------
    def admit(self, request_id: str, id_given: bool, message: M, reply: Reply | None = None) -> str:
        """NEW: run it. DUPLICATE: already handled here (answer re-sent or still to come).
        `reply`: where this delivery wants its answer (topic, correlation data); a re-send from
        another asker (its own reply topic) gets the stored answer there. Never waits for the disk."""
        if not id_given:
            return NEW
        with self._lock:
            state = self._seen.state(request_id)
            if state is None:
                self._seen.begin(request_id)
                self._waiting[request_id] = [(message, reply)]
                queued = self._writer.submit(lambda: self._record_sight(request_id))
            elif state == IN_PROGRESS:
                self._waiting.setdefault(request_id, []).append((message, reply))
                queued = True
            else:
                queued = self._writer.submit(lambda: self._resend(request_id, message, reply))
        if not queued:
            self._overflowed("first_sight" if state is None else "resend")
        if state is None:
            return NEW
        if state == IN_PROGRESS:
            log.info("request.duplicate", answered=False)
        return DUPLICATE

    def answer(self, request_id: str | None, id_given: bool, topic: str, payload: bytes,
               correlation: bytes | None, message: M | None, *, final: bool = True) -> None:
        """Store, acknowledge the request (every delivery of it), publish: on the writer thread,
        so this never waits. `final=False`: an answer that a re-send should not get again (busy,
        stopping): the id is released, and the answer published and acknowledged at once, unstored."""
        keyed = bool(request_id and id_given)
        with self._lock:
            waiters = self._waiting.pop(request_id, []) if keyed and request_id else []
            messages = [delivery for delivery, _ in waiters]
            if message is not None and message not in messages:
                messages.append(message)
            # a re-send that came while this ran, from an asker with its own reply topic
            elsewhere = list(dict.fromkeys(to for _, to in waiters if to is not None and to != (topic, correlation)))
            stored_id = request_id if keyed else None
            if not final:
                queued = True
                if stored_id is not None:
                    self._seen.forget(stored_id)
                    queued = self._writer.submit(lambda: self._forget(stored_id))
            else:
                if stored_id is not None:
                    self._seen.answered(stored_id)
                queued = self._writer.submit(lambda: self._store_and_send(
                    stored_id, topic, payload, correlation, messages, elsewhere))
                if not queued and stored_id is not None:
                    self._seen.forget(stored_id, answered_too=True)  # not stored: a re-send runs again
        if not queued:
            self._overflowed("answer" if final else "forget")
        if final and queued:
            return
        # Unstored: published first, then acknowledged (one connection carries both, in order).
        link = self._link()
        for to in [(topic, correlation), *elsewhere]:
            link.publish(to[0], payload, correlation_data=to[1], qos=self._answer_qos())
        for delivered in messages:
            link.ack(delivered)

    def release(self, request_id: str, id_given: bool) -> bool:
        """A request admitted here that leaves unanswered (a full fleet member passes it back to
        the pool): its id is forgotten, so that the broker handing it to this agent again is a
        new request, not a duplicate waiting for an answer no one will give. Its delivery is not
        acknowledged here. Always True: memory forgets at once, the store follows."""
        if not id_given:
            return True
        with self._lock:
            self._seen.forget(request_id)
            self._waiting.pop(request_id, None)
            queued = self._writer.submit(lambda: self._forget(request_id))
        if not queued:
            self._overflowed("forget")
        return True

    def replay(self) -> None:
        """At every connection: publish the stored answers no one will send otherwise: those a
        previous process left, and those published on a link since replaced (a reload moved us
        to another broker). paho itself sends again what is pending on the current link."""
        if not self._writer.submit(self._replay):
            self._overflowed("pending")  # the next connection replays them

    def stats(self) -> dict[str, Any]:
        """From memory: `outbox` as of the writer's last idle moment (None: unreadable)."""
        return {"outbox": self._outbox_size, "outbox_dropped": self._store.dropped,
                "store_failures": self.store_failures}

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every write queued so far is done (tests; not for paho's thread)."""
        return self._writer.flush(timeout)

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """At stop: finish the writes queued (answers stored, acknowledged, published: call it
        while the link is still up), end the writer thread, close the store. Answers after this
        go out from memory, unstored."""
        if not self._writer.close(timeout):
            log.error("delivery.close_timeout", waiting=self._writer.waiting())
        try:
            self._store.close()
        except StoreError as exc:
            self._store_failed("close", exc)

    def _acked(self, row: int) -> None:
        """The broker confirmed an answer (on the link's network thread)."""
        if not self._writer.submit(lambda: self._done(row)):
            self._overflowed("done")  # the row stays: published again at the next start, a copy

    def _store_failed(self, step: str, exc: StoreError) -> None:
        with self._lock:
            self.store_failures += 1
        log.error("store.failed", step=step, error=str(exc))

    def _overflowed(self, step: str) -> None:
        if self._writer.closed:  # stopping: not a failure of the store
            log.warning("delivery.closed", step=step)
            return
        self._store_failed(step, StoreError("delivery queue full"))

    # --- the delivery-writer thread's steps: the only code that touches the store ------------
    def _record_sight(self, request_id: str) -> None:
        try:
            self._store.first_sight(request_id)
        except StoreError as exc:  # memory decided: this costs the record across a crash only
            self._store_failed("first_sight", exc)

    def _forget(self, request_id: str) -> None:
        try:
            self._store.forget(request_id)
        except StoreError as exc:
            self._store_failed("forget", exc)

    def _store_and_send(self, request_id: str | None, topic: str, payload: bytes, correlation: bytes | None,
                        messages: list[M], elsewhere: list[Reply]) -> None:
        row: int | None
        try:
            if request_id is not None:
                row = self._store.answered(request_id, topic, payload, correlation)
            else:
                row = self._store.put(topic, payload, correlation)
            self._unacked[row] = None
        except StoreError as exc:
            self._store_failed("answer", exc)
            row = None  # published from memory only: a crash before its PUBACK loses it
            if request_id is not None:
                self._unstored[request_id] = SeenAnswer(topic, payload, correlation)
                while len(self._unstored) > UNSTORED_MAX:
                    self._unstored.popitem(last=False)
        extra_rows = [self._put(to[0], payload, to[1]) for to in elsewhere]
        self._send(topic, payload, correlation, messages, row)
        for (extra_topic, extra_correlation), extra_row in zip(elsewhere, extra_rows):
            self._publish(extra_topic, payload, extra_correlation, extra_row)

    def _resend(self, request_id: str, message: M, reply: Reply | None) -> None:
        """A re-send of an answered id: the stored answer again, unless on its way already."""
        seen, on_disk = self._answer_of(request_id)
        if seen is None:
            # Neither the store nor memory has it (the store fails): left unacknowledged, so the
            # broker delivers it again after a reconnect, and it runs then.
            with self._lock:
                self._seen.forget(request_id, answered_too=True)
            log.error("request.duplicate_unanswered")
            return
        on_its_way, in_outbox = False, True  # not knowing (sent from memory): publish it again
        if on_disk:
            try:
                rows = self._store.outbox_rows(seen.topic, seen.payload, seen.correlation)
                link = self._link()  # rows handed to a link since replaced are not coming
                on_its_way, in_outbox = any(self._unacked.get(row) is link for row in rows), bool(rows)
            except StoreError as exc:
                self._store_failed("outbox_rows", exc)
        stored: Reply = (seen.topic, seen.correlation)
        to = reply or stored
        if on_its_way and to == stored:
            # The broker redelivers a request whose PUBACK it lost (a restart, a dropped link)
            # while the answer waits for its own confirmation; paho sends that answer again after
            # reconnecting. Publishing it once more would reach the asker twice: acknowledge only.
            log.info("request.duplicate", answered=True, answer_on_its_way=True)
            self._link().ack(message)
            return
        if message.dup and not in_outbox and to == stored:
            # The broker's own re-send (DUP) of a request whose answer it confirmed: a broker that
            # came back from an older save. It got that answer after the request; if it lost it
            # too, the asker re-sends (a fresh publish) and gets it then. Publishing now would
            # mostly give the asker a second copy.
            log.info("request.duplicate", answered=True, answer_confirmed=True)
            self._link().ack(message)
            return
        log.info("request.duplicate", answered=True, dup_flag=message.dup, reply_elsewhere=to != stored)
        self._send(to[0], seen.payload, to[1], [message], self._put(to[0], seen.payload, to[1]))

    def _answer_of(self, request_id: str) -> tuple[SeenAnswer | None, bool]:
        """The answer of an id memory holds as answered, and whether it came from the disk."""
        try:
            found = self._store.first_sight(request_id)
        except StoreError as exc:
            self._store_failed("first_sight", exc)
            found = None
        if isinstance(found, SeenAnswer):
            return found, True
        if found is True:  # the store did not have it, and just recorded it as in progress
            self._forget(request_id)
        return self._unstored.get(request_id), False

    def _replay(self) -> None:
        link = self._link()
        try:
            pending = self._store.pending()
        except StoreError as exc:
            self._store_failed("pending", exc)
            return
        orphans = [item for item in pending
                   if item.row not in self._unacked or self._unacked[item.row] not in (None, link)]
        if orphans:
            log.info("outbox.replay", count=len(orphans))
        for item in orphans:
            self._publish(item.topic, item.payload, item.correlation, item.row)

    def _put(self, topic: str, payload: bytes, correlation: bytes | None) -> int | None:
        """An outbox row for an answer about to be published; None if the store fails."""
        try:
            row = self._store.put(topic, payload, correlation)
        except StoreError as exc:
            self._store_failed("put", exc)
            return None
        self._unacked[row] = None
        return row

    def _send(self, topic: str, payload: bytes, correlation: bytes | None, messages: list[M],
              row: int | None) -> None:
        link = self._link()
        for delivered in messages:
            link.ack(delivered)
        self._publish(topic, payload, correlation, row)

    def _publish(self, topic: str, payload: bytes, correlation: bytes | None, row: int | None) -> None:
        link = self._link()
        if row is None:
            link.publish(topic, payload, correlation_data=correlation, qos=self._answer_qos())
            return
        self._unacked[row] = link
        link.publish(topic, payload, correlation_data=correlation, qos=self._answer_qos(),
                     on_acked=lambda: self._acked(row))

    def _done(self, row: int) -> None:
        self._unacked.pop(row, None)
        try:
            self._store.done(row)
        except StoreError as exc:  # the row is published again at the next start: a copy
            self._store_failed("done", exc)

    def _refresh_size(self) -> None:
        try:
            self._outbox_size = self._store.outbox_size()
        except StoreError:
            self._outbox_size = None
