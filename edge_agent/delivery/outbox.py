"""Exactly one answer per request id, across broker restarts, crashes and network drops.

- A request is acknowledged to the broker (PUBACK) only once its answer is stored on disk, so a
  crash before that makes the broker deliver it again (persistent session).
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
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from edge_agent.errors import StoreError
from edge_agent.log import get_logger
from edge_agent.mqtt import BrokerLink, Incoming
from edge_agent.delivery.store import SeenAnswer, Store

log = get_logger("delivery")
NEW, DUPLICATE = "new", "duplicate"
Reply = tuple[str, "bytes | None"]  # where an answer goes: topic, MQTT 5 correlation data


class Delivery:
    def __init__(self, store: Store, link: Callable[[], BrokerLink],
                 answer_qos: Callable[[], int] = lambda: 2) -> None:
        self._store = store
        self._link = link  # getters: a reload may swap the link or change the QoS
        self._answer_qos = answer_qos
        self._lock = threading.Lock()
        # request id -> its deliveries to acknowledge, each with where it wants the answer
        self._waiting: dict[str, list[tuple[Incoming, Reply | None]]] = {}
        # outbox rows of this process -> the link each was published on (None: not yet)
        self._unacked: dict[int, BrokerLink | None] = {}
        self.store_failures = 0
        store.reset_in_progress()  # requests a previous process took but never answered run again

    def admit(self, request_id: str, id_given: bool, message: Incoming, reply: Reply | None = None) -> str:
        """NEW: run it. DUPLICATE: already handled here (answer re-sent or still to come).
        `reply`: where this delivery wants its answer (topic, correlation data); a re-send from
        another asker (its own reply topic) gets the stored answer there."""
        if not id_given:
            return NEW
        with self._lock:
            try:
                seen = self._store.first_sight(request_id)
            except StoreError as exc:
                self._store_failed("first_sight", exc)
                return NEW  # better run twice than not at all
            if seen is True:
                self._waiting[request_id] = [(message, reply)]
                return NEW
            if isinstance(seen, SeenAnswer):
                try:
                    on_its_way, in_outbox = self._on_its_way(seen), self._in_outbox(seen)
                except StoreError as exc:
                    self._store_failed("outbox_rows", exc)
                    on_its_way, in_outbox = False, True  # not knowing: publish it again
                stored: Reply = (seen.topic, seen.correlation)
                to = reply or stored
                if on_its_way and to == stored:
                    # The broker redelivers a request whose PUBACK it lost (a restart, a dropped
                    # link) while the answer waits for its own confirmation; paho sends that
                    # answer again after reconnecting. Publishing it once more would reach the
                    # asker twice: acknowledge only.
                    log.info("request.duplicate", answered=True, answer_on_its_way=True)
                    self._link().ack(message)
                    return DUPLICATE
                if message.dup and not in_outbox and to == stored:
                    # The broker's own re-send (DUP) of a request whose answer it confirmed: a
                    # broker that came back from an older save. It got that answer after the
                    # request; if it lost it too, the asker re-sends (a fresh publish) and gets
                    # it then. Publishing now would mostly give the asker a second copy.
                    log.info("request.duplicate", answered=True, answer_confirmed=True)
                    self._link().ack(message)
                    return DUPLICATE
                log.info("request.duplicate", answered=True, dup_flag=message.dup, reply_elsewhere=to != stored)
                self._send(to[0], seen.payload, to[1], [message], self._put(to[0], seen.payload, to[1]))
                return DUPLICATE
            self._waiting.setdefault(request_id, []).append((message, reply))
            log.info("request.duplicate", answered=False)
            return DUPLICATE

    def answer(self, request_id: str | None, id_given: bool, topic: str, payload: bytes,
               correlation: bytes | None, message: Incoming | None, *, final: bool = True) -> None:
        """Store, acknowledge the request (every delivery of it), publish. `final=False`: an
        answer that a re-send should not get again (busy, stopping): the id is released."""
        row: int | None
        with self._lock:
            waiters = self._waiting.pop(request_id, []) if request_id and id_given else []
            messages = [delivery for delivery, _ in waiters]
            if message is not None and message not in messages:
                messages.append(message)
            # a re-send that came while this ran, from an asker with its own reply topic
            elsewhere = list(dict.fromkeys(to for _, to in waiters if to is not None and to != (topic, correlation)))
            try:
                if final and request_id and id_given:
                    row = self._store.answered(request_id, topic, payload, correlation)
                else:
                    if request_id and id_given:
                        self._store.forget(request_id)
                    row = self._store.put(topic, payload, correlation)
                self._unacked[row] = None
            except StoreError as exc:
                self._store_failed("answer", exc)
                row = None  # published from memory only: a crash before its PUBACK loses it
            extra_rows = [self._put(to[0], payload, to[1]) for to in elsewhere]
        self._send(topic, payload, correlation, messages, row)
        for (extra_topic, extra_correlation), extra_row in zip(elsewhere, extra_rows):
            self._publish(extra_topic, payload, extra_correlation, extra_row)

    def release(self, request_id: str, id_given: bool) -> bool:
        """A request admitted here that leaves unanswered (a full fleet member passes it back to
        the pool): its id is forgotten, so that the broker handing it to this agent again is a
        new request, not a duplicate waiting for an answer no one will give. Its delivery is not
        acknowledged here. False if the store could not forget it: then it must stay here."""
        if not id_given:
            return True
        with self._lock:
            try:
                self._store.forget(request_id)
            except StoreError as exc:
                self._store_failed("forget", exc)
                return False
            self._waiting.pop(request_id, None)
        return True

    def _put(self, topic: str, payload: bytes, correlation: bytes | None) -> int | None:
        """An outbox row for an answer about to be published; None if the store fails."""
        try:
            row = self._store.put(topic, payload, correlation)
        except StoreError as exc:
            self._store_failed("put", exc)
            return None
        self._unacked[row] = None
        return row

    def replay(self) -> None:
        """At every connection: publish the stored answers no one will send otherwise: those a
        previous process left, and those published on a link since replaced (a reload moved us
        to another broker). paho itself sends again what is pending on the current link."""
        link = self._link()
        with self._lock:
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

    def stats(self) -> dict[str, Any]:
        try:
            outbox: int | None = self._store.outbox_size()
        except StoreError:
            outbox = None
        return {"outbox": outbox, "outbox_dropped": self._store.dropped,
                "store_failures": self.store_failures}

    def _store_failed(self, step: str, exc: StoreError) -> None:
        self.store_failures += 1
        log.error("store.failed", step=step, error=str(exc))

    def _send(self, topic: str, payload: bytes, correlation: bytes | None, messages: list[Incoming],
              row: int | None) -> None:
        link = self._link()
        for delivered in messages:
            link.ack(delivered)
        self._publish(topic, payload, correlation, row)

    def _on_its_way(self, seen: SeenAnswer) -> bool:
        link = self._link()  # rows handed to a link since replaced are not coming
        return any(self._unacked.get(row) is link
                   for row in self._store.outbox_rows(seen.topic, seen.payload, seen.correlation))

    def _in_outbox(self, seen: SeenAnswer) -> bool:
        return bool(self._store.outbox_rows(seen.topic, seen.payload, seen.correlation))

    def _publish(self, topic: str, payload: bytes, correlation: bytes | None, row: int | None) -> None:
        link = self._link()
        if row is None:
            link.publish(topic, payload, correlation_data=correlation, qos=self._answer_qos())
            return
        self._unacked[row] = link
        link.publish(topic, payload, correlation_data=correlation, qos=self._answer_qos(),
                     on_acked=lambda: self._acked(row))

    def _acked(self, row: int) -> None:
        self._unacked.pop(row, None)
        try:
            self._store.done(row)
        except StoreError as exc:  # the row is published again at the next start: a copy
            self._store_failed("done", exc)
