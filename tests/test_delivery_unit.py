"""Delivery's decisions for a request id seen again, with a recording stand-in for the broker
link (what it acknowledges and publishes) and a real SQLite store. Delivery does its disk work
on its own thread: `settle` waits for it before looking."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from structlog.testing import capture_logs

from edge_agent.delivery.outbox import DUPLICATE, NEW, Delivery
from edge_agent.mqtt import Incoming
from edge_agent.delivery.store import Store


class RecordingLink:
    def __init__(self) -> None:
        self.acked: list[int] = []
        self.published: list[tuple[str, bytes, int]] = []
        self._confirm: list[Callable[[], None]] = []

    def ack(self, message: Incoming) -> None:
        self.acked.append(message.mid)

    def publish(self, topic: str, payload: bytes, *, correlation_data: bytes | None = None,
                qos: int = 1, on_acked: Callable[[], None] | None = None) -> None:
        self.published.append((topic, payload, qos))
        if on_acked is not None:
            self._confirm.append(on_acked)

    def confirm_all(self) -> None:  # the broker's PUBCOMPs arrive
        for callback in self._confirm:
            callback()
        self._confirm.clear()


def request(mid: int, *, dup: bool = False) -> Incoming:
    return Incoming("p/dev/request", b"{}", mid=mid, qos=1, dup=dup)


def settle(delivery: Delivery) -> None:
    assert delivery.flush(10)


def answered_once(tmp_path: Path) -> tuple[Delivery, RecordingLink, Store]:
    store = Store(tmp_path / "state.db", outbox_max_items=100, outbox_max_age_s=3600, dedup_window_s=600)
    link = RecordingLink()
    delivery = Delivery(store, lambda: link, lambda: 2)  # type: ignore[arg-type,return-value]
    assert delivery.admit("r1", True, request(1)) == NEW
    delivery.answer("r1", True, "p/dev/response", b"answer", None, request(1))
    settle(delivery)
    assert link.acked == [1] and link.published == [("p/dev/response", b"answer", 2)]
    return delivery, link, store


def test_a_resent_request_gets_the_stored_answer_again(tmp_path: Path) -> None:
    delivery, link, _ = answered_once(tmp_path)
    link.confirm_all()
    assert delivery.admit("r1", True, request(2)) == DUPLICATE  # a fresh publish: no DUP flag
    settle(delivery)
    assert link.acked == [1, 2] and [p for _, p, _ in link.published] == [b"answer", b"answer"]


def test_broker_resend_of_a_confirmed_answer_is_only_acknowledged(tmp_path: Path) -> None:
    """A broker back from an older save hands the request again (DUP): the answer it confirmed
    is not published a second time."""
    delivery, link, store = answered_once(tmp_path)
    link.confirm_all()
    settle(delivery)
    assert store.outbox_size() == 0
    assert delivery.admit("r1", True, request(7, dup=True)) == DUPLICATE
    settle(delivery)
    assert link.acked == [1, 7] and len(link.published) == 1


def test_broker_resend_while_the_answer_is_unconfirmed_waits_for_it(tmp_path: Path) -> None:
    delivery, link, _ = answered_once(tmp_path)  # no PUBCOMP yet: paho sends it again
    assert delivery.admit("r1", True, request(8, dup=True)) == DUPLICATE
    settle(delivery)
    assert link.acked == [1, 8] and len(link.published) == 1


def test_broker_resend_after_a_restart_publishes_an_answer_left_in_the_outbox(tmp_path: Path) -> None:
    """The previous process stored the answer but never saw it confirmed, and this process has
    not published it yet: publish it (the broker may never have had it)."""
    first, _, store = answered_once(tmp_path)
    first.close()
    store = Store(tmp_path / "state.db", outbox_max_items=100, outbox_max_age_s=3600, dedup_window_s=600)
    fresh_link = RecordingLink()
    restarted = Delivery(store, lambda: fresh_link, lambda: 1)  # type: ignore[arg-type,return-value]
    assert restarted.admit("r1", True, request(3, dup=True)) == DUPLICATE
    settle(restarted)
    assert fresh_link.acked == [3] and fresh_link.published == [("p/dev/response", b"answer", 1)]


def test_answer_qos_follows_the_setting(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db", outbox_max_items=100, outbox_max_age_s=3600, dedup_window_s=600)
    link, qos = RecordingLink(), [1]
    delivery = Delivery(store, lambda: link, lambda: qos[0])  # type: ignore[arg-type,return-value]
    delivery.answer("a", True, "t", b"x", None, request(1))
    settle(delivery)
    qos[0] = 2
    delivery.answer("b", True, "t", b"y", None, request(2))
    settle(delivery)
    assert [q for _, _, q in link.published] == [1, 2]


def test_replay_sends_what_only_a_replaced_link_had(tmp_path: Path) -> None:
    """At each connection: answers left by a previous process and answers published on a link
    since replaced (a reload moved us to another broker) go out on the current one; what the
    current link has pending is its own to send again (paho does, after reconnecting)."""
    store = Store(tmp_path / "state.db", outbox_max_items=100, outbox_max_age_s=3600, dedup_window_s=600)
    store.put("t", b"from a previous process", None)
    first, links = RecordingLink(), []
    links.append(first)
    delivery = Delivery(store, lambda: links[-1], lambda: 2)  # type: ignore[arg-type,return-value]
    delivery.replay()  # first connection
    settle(delivery)
    assert [p for _, p, _ in first.published] == [b"from a previous process"]
    delivery.answer("a", True, "t", b"unconfirmed", None, request(1))
    delivery.replay()  # the same link reconnects: paho sends both again itself
    settle(delivery)
    assert [p for _, p, _ in first.published] == [b"from a previous process", b"unconfirmed"]
    second = RecordingLink()
    links.append(second)  # a reload swapped the link
    delivery.replay()
    settle(delivery)
    assert [p for _, p, _ in second.published] == [b"from a previous process", b"unconfirmed"]
    second.confirm_all()
    settle(delivery)
    assert store.outbox_size() == 0
    delivery.replay()
    settle(delivery)
    assert len(second.published) == 2


def test_a_resend_with_its_own_reply_topic_gets_the_answer_there(tmp_path: Path) -> None:
    """Another asker (or `edge-agent ask` run again with the same --id) listens on its own
    reply topic: the stored answer goes there, even while the first copy is still on its way."""
    delivery, link, _ = answered_once(tmp_path)  # answer to p/dev/response, unconfirmed
    elsewhere = ("p/dev/ask/other", b"corr-2")
    assert delivery.admit("r1", True, request(2), elsewhere) == DUPLICATE
    settle(delivery)
    assert link.published[-1] == ("p/dev/ask/other", b"answer", 2) and link.acked == [1, 2]
    assert delivery.admit("r1", True, request(3, dup=True), ("p/dev/response", None)) == DUPLICATE
    settle(delivery)
    assert len(link.published) == 2  # the same place, on its way: acknowledged only


def test_a_resend_while_running_from_elsewhere_gets_the_answer_too(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db", outbox_max_items=100, outbox_max_age_s=3600, dedup_window_s=600)
    link = RecordingLink()
    delivery = Delivery(store, lambda: link, lambda: 2)  # type: ignore[arg-type,return-value]
    assert delivery.admit("r1", True, request(1), ("p/dev/response", None)) == NEW
    assert delivery.admit("r1", True, request(2), ("p/dev/ask/x", b"c")) == DUPLICATE
    assert delivery.admit("r1", True, request(3, dup=True), ("p/dev/response", None)) == DUPLICATE
    delivery.answer("r1", True, "p/dev/response", b"answer", None, request(1))
    settle(delivery)
    assert sorted(link.acked) == [1, 2, 3]
    assert sorted(t for t, _, _ in link.published) == ["p/dev/ask/x", "p/dev/response"]
    link.confirm_all()
    settle(delivery)
    assert store.outbox_size() == 0


def test_a_full_store_costs_the_guarantees_not_the_answer(tmp_path: Path) -> None:
    """The disk fills up (a real SQLite file that may not grow): the store's StoreError is
    caught, logged and counted; the answer is still acknowledged and published, from memory."""
    store = Store(tmp_path / "state.db", outbox_max_items=100, outbox_max_age_s=3600, dedup_window_s=600)
    link = RecordingLink()
    delivery = Delivery(store, lambda: link, lambda: 2)  # type: ignore[arg-type,return-value]
    assert delivery.admit("r1", True, request(1)) == NEW
    settle(delivery)  # its sighting is written before the disk fills up
    store._db.execute("PRAGMA max_page_count = 1")  # SQLite keeps it at the current page count
    big = b"x" * 65536  # needs new pages
    with capture_logs() as logs:
        delivery.answer("r1", True, "p/dev/response", big, None, request(1))
        settle(delivery)
    assert link.acked == [1] and link.published == [("p/dev/response", big, 2)]
    assert [(e["step"], e["error"]) for e in logs if e["event"] == "store.failed"] == [
        ("answer", "database or disk is full")]
    assert delivery.stats() == {"outbox": 0, "outbox_dropped": 0, "store_failures": 1}


def test_a_released_request_is_new_when_the_broker_hands_it_back(tmp_path: Path) -> None:
    """A full fleet member passes a request back to the pool (intake._hand_back): when the broker
    hands it to this agent again it is a new request, not a duplicate waiting for an answer that
    no one here will give. Releasing acknowledges nothing: the original is acknowledged once the
    broker has the copy."""
    store = Store(tmp_path / "state.db", outbox_max_items=100, outbox_max_age_s=3600, dedup_window_s=600)
    link = RecordingLink()
    delivery = Delivery(store, lambda: link, lambda: 2)  # type: ignore[arg-type,return-value]
    assert delivery.admit("f1", True, request(1)) == NEW
    assert delivery.release("f1", True) and link.acked == []
    assert delivery.admit("f1", True, request(2)) == NEW
    delivery.answer("f1", True, "p/fleet/response", b"answer", None, request(2))
    settle(delivery)
    assert link.acked == [2] and [p for _, p, _ in link.published] == [b"answer"]
    assert delivery.release("f1", True)  # an answered id stays answered
    assert delivery.admit("f1", True, request(3)) == DUPLICATE
