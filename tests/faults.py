"""A user's pipeline that must not lose an answer, and the book-keeping the fault tests and
the soak (bench/soak.py) judge the daemon by: requests sent, accepted and answered, by id.

Words used in the counts:
- accepted: the broker PUBACKed the request to the pipeline (QoS 1).
- lost: accepted, never answered.
- duplicated: one request id with two *different* answers (the model ran twice, or an
  answer and an error). The daemon promises none.
- copies: the *same* stored answer delivered again, byte for byte. MQTT QoS 1 is
  at-least-once on every hop: a process that dies between sending a message and seeing its
  PUBACK cannot know whether the other side has it, so it sends it again. The pipeline drops
  copies by id; each test says whether its fault may cause them.
- busy: `busy` answers, which are not answers: the request was not run, and the pipeline sends
  it again after `retry_after_ms`, as a well-behaved client does. After an outage the broker
  hands the daemon its whole backlog at once, more than the daemon's queue holds (seen: 48
  busy with a queue of 64; mosquitto's max_inflight_messages, 20, did not hold it back for
  the MQTT 5 daemon, whose CONNECT names no Receive Maximum).
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

SESSION_EXPIRY_S = 3600
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Tally:
    sent: int
    accepted: int
    answered: int
    lost: int
    duplicated: int
    copies: int
    copies_redelivered: int  # of which the broker re-sent to the pipeline itself (DUP flag)
    republished: int
    busy: int  # `busy` answers, each followed by a re-send
    errors: int  # answers with ok = false, `busy` aside
    error_codes: str = ""  # e.g. "busy:3 internal:1"

    def line(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.__dict__.items())


class Pipeline:
    """Publishes requests with QoS 1 and collects answers on a persistent session
    (clean_start False + session expiry), so answers published while it was disconnected
    still reach it. paho reconnects by itself and re-sends publishes not yet PUBACKed."""

    def __init__(self, port: int, request_topic: str, response_topic: str) -> None:
        self.request_topic, self.response_topic = request_topic, response_topic
        self._lock = threading.Lock()
        self._payloads: dict[str, bytes] = {}  # id -> request payload, for re-publishing
        self._mids: dict[int, str] = {}  # packet id -> request id, until its PUBACK
        self._early_acks: set[int] = set()  # PUBACKs that beat publish() returning
        self._accepted: set[str] = set()
        self.answers: dict[str, list[bytes]] = {}  # id -> every answer delivery, in order
        self.chunks: dict[str, list[tuple[int, str]]] = {}  # id -> (seq, delta) of a streamed answer
        self.redelivered = 0  # copies the broker flagged DUP (its own re-send to us)
        self.busy = 0
        self.republished = 0
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"pipeline-{uuid.uuid4().hex[:10]}",
                                  protocol=MQTTProtocolVersion.MQTTv5)
        self._subscribed = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.reconnect_delay_set(0.2, 1.0)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        self.client.connect("127.0.0.1", port, keepalive=60, clean_start=False, properties=props)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise TimeoutError("the pipeline did not subscribe")

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        # Subscribe on every connect: a broker killed within its autosave interval of our
        # first SUBSCRIBE comes back without it. Re-subscribing a kept session is harmless.
        if not reason.is_failure:
            client.subscribe(self.response_topic, qos=2)

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        if message.topic != self.response_topic:
            return
        doc = json.loads(message.payload)
        rid = str(doc.get("id"))
        if "seq" in doc:  # a chunk of a streamed answer (QoS 0), not the answer
            with self._lock:
                self.chunks.setdefault(rid, []).append((doc["seq"], doc["delta"]))
            return
        error = doc.get("error") or {}
        if error.get("code") == "busy":  # not run: send it again when told
            with self._lock:
                self.busy += 1
            retry = threading.Timer(error.get("retry_after_ms", 1000) / 1000, self._publish, [rid])
            retry.daemon = True
            retry.start()
            return
        with self._lock:
            seen = self.answers.setdefault(rid, [])
            self.redelivered += int(message.dup and bytes(message.payload) in seen)
            seen.append(bytes(message.payload))

    def send(self, rid: str, prompt: str, max_tokens: int = 4, **fields: Any) -> None:
        payload = json.dumps({"id": rid, "prompt": prompt, "max_tokens": max_tokens, **fields})
        with self._lock:
            self._payloads[rid] = payload.encode()
        self._publish(rid)

    def _publish(self, rid: str) -> None:
        # Published while the broker is away, paho keeps it and sends it after reconnecting
        # (its MQTTMessageInfo then raises on is_published(): PUBACKs are counted here).
        mid = self.client.publish(self.request_topic, self._payloads[rid], qos=1).mid
        with self._lock:
            if mid in self._early_acks:
                self._early_acks.discard(mid)
                self._accepted.add(rid)
            else:
                self._mids[mid] = rid

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        with self._lock:
            rid = self._mids.pop(mid, None)
            if rid is None:
                self._early_acks.add(mid)
            else:
                self._accepted.add(rid)

    def accepted(self) -> set[str]:
        with self._lock:
            return set(self._accepted)

    def unanswered(self) -> set[str]:
        with self._lock:
            return set(self._payloads) - set(self.answers)

    def wait_answers(self, timeout: float, republish_after: float | None = None) -> None:
        """Until every request sent has an answer, or `timeout`. `republish_after`: when no
        new answer came for that long, publish every unanswered request again (same id):
        what a pipeline must do when the broker itself may forget a request it PUBACKed."""
        deadline = time.monotonic() + timeout
        last_count, last_change = -1, time.monotonic()
        while self.unanswered() and time.monotonic() < deadline:
            count = len(self.answers)
            if count != last_count:
                last_count, last_change = count, time.monotonic()
            elif republish_after is not None and time.monotonic() - last_change > republish_after:
                for rid in sorted(self.unanswered()):
                    self.republished += 1
                    self._publish(rid)
                last_change = time.monotonic()
            time.sleep(0.05)

    def settle(self, quiet_s: float = 1.5) -> None:
        """Wait for late copies: until nothing arrived for `quiet_s`."""
        last = -1
        while True:
            with self._lock:
                total = sum(len(v) for v in self.answers.values())
            if total == last:
                return
            last = total
            time.sleep(quiet_s)

    def tally(self) -> Tally:
        accepted = self.accepted()
        with self._lock:
            sent = set(self._payloads)
            answers = {rid: list(v) for rid, v in self.answers.items() if rid in sent}
        distinct = {rid: set(v) for rid, v in answers.items()}
        codes = Counter(json.loads(v[0]).get("error", {}).get("code") for v in answers.values())
        codes.pop(None, None)
        errors = sum(codes.values())
        return Tally(sent=len(sent), accepted=len(accepted), answered=len(answers),
                     lost=len(accepted - set(answers)),
                     duplicated=sum(1 for v in distinct.values() if len(v) > 1),
                     copies=sum(len(v) - len(distinct[rid]) for rid, v in answers.items()),
                     copies_redelivered=self.redelivered,
                     republished=self.republished, busy=self.busy, errors=errors,
                     error_codes=" ".join(f"{code}:{n}" for code, n in sorted(codes.items())))

    def first_answer(self, rid: str) -> dict[str, Any]:
        with self._lock:
            return json.loads(self.answers[rid][0])

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# Put on the agent's PYTHONPATH as sitecustomize.py: Python imports it at start-up, so faults
# are injected into the real daemon without a line of test code in the product.
FAULT_HOOKS = """\
import os
import time

import edge_agent.inference.child.engine as _engine
import paho.mqtt.client as _paho

_prepare = _engine.OrtGenaiEngine.prepare


def prepare(self, work):
    last = work.messages[-1]["content"] if work.messages else ""
    if "BOOM" in last:  # a bug in the inference path
        raise RuntimeError("injected fault")
    if "CRASH" in last:  # the runtime ends the process (it does, on some inputs)
        os._exit(3)
    if "SLOW" in last:  # a prompt that keeps the runtime busy for a second (a long prefill)
        time.sleep(1.0)
    return _prepare(self, work)


_engine.OrtGenaiEngine.prepare = prepare

_slow_load_s = float(os.environ.get("FAULT_SLOW_LOAD_S", "0"))
if _slow_load_s:  # a big model on a slow disk: the inference child takes this long to load
    _load = _engine.OrtGenaiEngine.load

    def load(self):
        time.sleep(_slow_load_s)
        return _load(self)

    _engine.OrtGenaiEngine.load = load

import sqlite3
import edge_agent.delivery.store as _store

# Raised below the store's translation (unwrapped, then wrapped again in store_errors), as
# SQLite's own failures are: what reaches delivery is the StoreError the store makes of them.
_answered, _first_sight = _store.Store.answered.__wrapped__, _store.Store.first_sight.__wrapped__


@_store.store_errors
def answered(self, request_id, *args):
    if request_id.startswith("diskfull"):  # the disk filled up
        raise sqlite3.OperationalError("database or disk is full")
    return _answered(self, request_id, *args)


@_store.store_errors
def first_sight(self, request_id):
    if request_id.startswith("unreadable"):  # the store cannot be read
        raise sqlite3.DatabaseError("database disk image is malformed")
    return _first_sight(self, request_id)


_store.Store.answered, _store.Store.first_sight = answered, first_sight

import edge_agent.protocol as _protocol  # before edge_agent.daemon.app imports parse_request from it

_parse_request = _protocol.parse_request


def parse_request(payload, *args):
    if b"PARSEBUG" in payload:  # a bug on the network thread's path
        raise KeyError("injected")
    return _parse_request(payload, *args)


_protocol.parse_request = parse_request

_connack_delay = float(os.environ.get("FAULT_LATE_CONNACK_S", "0"))
if _connack_delay:  # paho's private handler: touched only by the test that asks for it
    _handle_connack = _paho.Client._handle_connack

    def handle_connack(self):
        time.sleep(_connack_delay)  # the broker's CONNACK reaches us late (a slow link)
        return _handle_connack(self)

    _paho.Client._handle_connack = handle_connack
"""


def fault_hooks_env(folder: Path, late_connack_s: float = 0.0, slow_load_s: float = 0.0) -> dict[str, str]:
    """Environment for an agent process that loads FAULT_HOOKS (written into `folder`):
    prompts with BOOM raise in `generate`, with CRASH end the process that runs it (the
    inference child), with SLOW take a second more; ids starting with `diskfull` fail to be
    stored, with `unreadable` fail the de-duplication look-up; payloads with PARSEBUG make the
    request parser raise; `slow_load_s` makes loading the model take that much longer; `late_connack_s`
    delays paho's handling of every CONNACK (outside any callback, so the agent's other
    threads go on meanwhile)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(FAULT_HOOKS)
    # The repository next: sitecustomize runs before `-m edge_agent` puts the working
    # directory on sys.path, and must patch the code under test, not an installed copy.
    paths = [str(folder), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {"PYTHONPATH": os.pathsep.join(paths),
            "FAULT_LATE_CONNACK_S": str(late_connack_s), "FAULT_SLOW_LOAD_S": str(slow_load_s)}


def runs_per_id(log_lines: list[dict[str, Any]]) -> Counter[str]:
    """How often the model ran for each request id, from the agent's log (all its runs)."""
    return Counter(str(line.get("request_id")) for line in log_lines
                   if line.get("event") in ("request.done", "request.failed"))
