"""Faults during a stream of requests, judged by id: every request answered, none answered with
two different answers, the model run once per id. Real mosquitto (persistence on, autosave
every second), the real daemon as a process, a pipeline on a persistent session (faults.py).

What is promised, across broker restarts, daemon crashes and a hung broker:
- lost = 0: every request the broker PUBACKed to the pipeline gets an answer;
- duplicated = 0: no request id gets two different answers (the model never runs twice for an
  id whose answer got out; a re-send gets the stored answer, byte for byte).
- copies = 0 where no process is killed: answers go at QoS 2 to a pipeline subscribed at QoS 2
  on a persistent session, so a stopped (SIGTERM) or frozen broker or a dropped link hands
  each answer over once.
What is not: after a SIGKILL an identical *copy* may arrive. A process killed between handing
a message over and seeing it confirmed cannot know whether the other side has it: the daemon
publishes that answer again from its outbox, a broker back from an older save re-sends what it
had already delivered. The pipeline drops copies by id; the tests bound them per kill (a guard
against re-publishing sprees, not a promise).
"""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from faults import Pipeline, Tally, fault_hooks_env, runs_per_id
from support import AgentProcess, Broker, Client

STREAM = 150  # requests per stream
GAP_S = 0.02  # between two requests of a stream
ANSWER_WAIT_S = 90.0
KEEPALIVE_S = 5  # the agent's; the smallest the settings allow
# At most this many copies per fault. None where no process dies (QoS 2 both ways, sessions
# kept). A SIGKILLed broker comes back with its last autosave (up to ~2 s old) and re-sends to
# the pipeline answers it had delivered after that save; a SIGKILLed daemon publishes again
# the answers whose confirmation it had not seen (0-3 seen).
COPIES_PER_FAULT = {"broker_term": 0, "broker_freeze": 0, "broker_kill": 10, "agent_kill": 10}


@pytest.fixture
def own_broker() -> Iterator[Broker]:
    server = Broker(persistence=True)
    server.start()
    yield server
    server.close()


@pytest.fixture
def pipelines() -> Iterator[Callable[[Broker, AgentProcess], Pipeline]]:
    made: list[Pipeline] = []

    def make(broker: Broker, agent: AgentProcess) -> Pipeline:
        pipeline = Pipeline(broker.port, agent.request_topic, agent.response_topic)
        made.append(pipeline)
        return pipeline

    yield make
    for pipeline in made:
        pipeline.close()


def start_streaming_agent(broker: Broker, start_agent: Callable[..., AgentProcess],
                          **overrides: Any) -> AgentProcess:
    """The daemon with a queue that holds the backlog of a short outage; a longer one is
    answered `busy` and sent again by the pipeline."""
    watcher = Client(broker.port)
    try:
        return start_agent(broker, watcher, limits__queue_size=64, mqtt__keepalive=KEEPALIVE_S, **overrides)
    finally:
        watcher.close()


def stream(pipeline: Pipeline, faults: dict[int, Callable[[], None]], prefix: str,
           count: int = STREAM, gap_s: float = GAP_S, **fields: Any) -> None:
    """Publish `count` requests, running each fault just before the request of its index."""
    for i in range(count):
        if i in faults:
            faults[i]()
        pipeline.send(f"{prefix}-{i}", f"question {i}", **fields)
        time.sleep(gap_s)


def judge(pipeline: Pipeline, agent: AgentProcess, *, faults: int, kind: str,
          republish_after: float | None = None, runs_at_most: int = 1) -> Tally:
    pipeline.wait_answers(ANSWER_WAIT_S, republish_after=republish_after)
    pipeline.settle()
    tally = pipeline.tally()
    print(f"{kind}: {tally.line()}")
    runs = runs_per_id(agent.log_lines())
    ran_too_often = {rid: n for rid, n in runs.items() if n > runs_at_most and rid in pipeline.answers}
    assert tally.accepted == tally.sent, tally.line()
    assert tally.lost == 0 and tally.answered == tally.sent, f"{tally.line()} unanswered: {sorted(pipeline.unanswered())}"
    assert tally.duplicated == 0, tally.line()
    assert tally.errors == 0, tally.line()  # `busy` aside: sent again, see faults.py
    assert not ran_too_often, f"the model ran too often for {ran_too_often}"
    assert tally.copies <= COPIES_PER_FAULT[kind] * faults, tally.line()
    return tally


def events(agent: AgentProcess, *names: str) -> list[dict[str, Any]]:
    return [line for line in agent.log_lines() if line.get("event") in names]


# --- the broker goes away ---------------------------------------------------------------------

def test_broker_restarted_with_sigterm_mid_stream(
        own_broker: Broker, start_agent: Callable[..., AgentProcess],
        pipelines: Callable[[Broker, AgentProcess], Pipeline]) -> None:
    """mosquitto saves its whole state when it stops: nothing is lost, and the pipeline never
    has to publish anything again (republished = 0)."""
    agent = start_streaming_agent(own_broker, start_agent)
    pipeline = pipelines(own_broker, agent)
    def restart() -> None:
        own_broker.restart(signal.SIGTERM)

    stream(pipeline, {50: restart, 100: restart}, "term")
    tally = judge(pipeline, agent, faults=2, kind="broker_term")
    assert tally.republished == 0
    assert len(events(agent, "mqtt.connected")) == 3  # it did lose the broker twice


def test_streamed_answers_through_broker_restarts(
        own_broker: Broker, start_agent: Callable[..., AgentProcess],
        pipelines: Callable[[Broker, AgentProcess], Pipeline]) -> None:
    """Token streaming ("stream": true) through two broker restarts: chunks are QoS 0 and may
    be lost with the link, the answers are not: every id answered once, none lost. Chunks only
    go forward (seqs rise), and what arrived from seq 1 on without a gap is the start of the
    answer's text; most streams come whole."""
    agent = start_streaming_agent(own_broker, start_agent, stream__interval_ms=0)
    pipeline = pipelines(own_broker, agent)

    def restart() -> None:
        own_broker.restart(signal.SIGTERM)

    stream(pipeline, {20: restart, 40: restart}, "chunked", count=60, max_tokens=12, stream=True)
    tally = judge(pipeline, agent, faults=2, kind="broker_term")
    whole = 0
    for rid, answers in pipeline.answers.items():
        doc = json.loads(answers[0])
        chunks = dict(pipeline.chunks.get(rid, []))
        seqs = [seq for seq, _ in pipeline.chunks.get(rid, [])]
        assert doc["done"] is True and seqs == sorted(set(seqs)), (rid, seqs)
        gapless = "".join(chunks[n] for n in range(1, len(seqs) + 1) if n in chunks and all(
            k in chunks for k in range(1, n + 1)))
        assert doc["text"].startswith(gapless), (rid, gapless, doc["text"])
        whole += gapless == doc["text"]
    print(f"whole streams: {whole} of {tally.sent}")
    assert whole >= 30, f"only {whole} whole streams of {tally.sent}"


def test_broker_killed_with_sigkill_mid_stream(
        own_broker: Broker, start_agent: Callable[..., AgentProcess],
        pipelines: Callable[[Broker, AgentProcess], Pipeline]) -> None:
    """A SIGKILLed mosquitto comes back with its last autosave (`autosave_interval 1`; up to
    ~2 s old, as it saves when more than a second has passed and not again soon after a
    start). What it PUBACKed after that save is gone: a request it acknowledged to the
    pipeline but had not handed to the daemon, an answer it acknowledged to the daemon but had
    not handed to the pipeline, a subscription. No daemon can answer a request it never saw.

    The fair contract, then: a request counts once the broker PUBACKed it, and the pipeline
    publishes again (same id) every request still unanswered after a quiet spell, as any
    QoS 1 publisher facing a broker without durable acknowledgements must. The daemon's side:
    a re-sent id is never run again, it gets the stored answer. Promised: 0 lost, 0 different
    answers for one id, the model run once per id. The broker's re-sends (DUP) of requests
    whose answers it had confirmed are acknowledged, not answered again. Not promised:
    identical copies (the broker re-sends to the pipeline answers it delivered after its save).

    The second fault kills the broker twice in a row, the second time before it has saved
    anything, so it comes back from the save made before the first kill."""
    agent = start_streaming_agent(own_broker, start_agent)
    pipeline = pipelines(own_broker, agent)

    def kill_twice() -> None:
        own_broker.restart(signal.SIGKILL)
        time.sleep(0.5)
        own_broker.restart(signal.SIGKILL)

    stream(pipeline, {50: lambda: own_broker.restart(signal.SIGKILL), 100: kill_twice}, "kill")
    judge(pipeline, agent, faults=3, kind="broker_kill", republish_after=3.0)


def test_broker_frozen_longer_than_the_keepalive(
        own_broker: Broker, start_agent: Callable[..., AgentProcess],
        pipelines: Callable[[Broker, AgentProcess], Pipeline]) -> None:
    """SIGSTOP: the broker's sockets stay open but nothing answers (a hung broker, a network
    silently dropping packets). The agent notices by its keepalive (5 s, then 5 s more for the
    PINGRESP), drops the link and reconnects once the broker is back; requests published
    meanwhile wait in the pipeline's socket."""
    agent = start_streaming_agent(own_broker, start_agent)
    pipeline = pipelines(own_broker, agent)
    frozen_s = 3 * KEEPALIVE_S

    def freeze() -> None:
        own_broker.freeze()
        threading.Timer(frozen_s, own_broker.thaw).start()

    started = time.monotonic()
    stream(pipeline, {30: freeze}, "freeze", gap_s=0.04)
    judge(pipeline, agent, faults=1, kind="broker_freeze")
    assert time.monotonic() - started > frozen_s
    assert events(agent, "mqtt.connection_lost"), "the agent never noticed the frozen broker"


# --- the daemon goes away ---------------------------------------------------------------------

def test_agent_killed_mid_stream_and_restarted(
        own_broker: Broker, start_agent: Callable[..., AgentProcess],
        pipelines: Callable[[Broker, AgentProcess], Pipeline]) -> None:
    """SIGKILL, then the same device again (same settings, same state_dir): the broker session
    kept what came meanwhile, the outbox is replayed, redelivered requests already answered
    get the stored answer. The first restart waits for readiness; the second one lets the
    stream run on while the agent starts (requests held by the broker, then by the agent
    until it is ready).

    A kill after the model ran but before the answer was stored runs that request again at
    the next start: its first answer never got out, so this is no duplicate (at most 2 runs)."""
    agent = start_streaming_agent(own_broker, start_agent)
    pipeline = pipelines(own_broker, agent)
    stream(pipeline, {50: agent.restart, 100: lambda: agent.restart(wait_ready=False)}, "crash")
    judge(pipeline, agent, faults=2, kind="agent_kill", runs_at_most=2)
    assert len(events(agent, "agent.ready")) == 3
    assert agent.proc is not None and agent.proc.poll() is None


def test_a_request_sent_on_seeing_ready_is_answered(
        broker: Broker, start_agent: Callable[..., AgentProcess], tmp_path: Path) -> None:
    """The broker's CONNACK reaches the agent late (3 s, injected: a slow link): the agent is
    loaded and warm while its connection is still being set up. A pipeline that sends a
    request the instant it sees `ready` must be answered, so `ready` may only reach the broker
    after the request subscription. (It once went out behind CONNECT while connecting, and the
    broker dropped such a request: no subscriber yet.) The retained status then says `ready`
    (the `starting` queued while connecting once went out after it and stayed)."""
    device_id = f"dev-{uuid.uuid4().hex[:8]}"
    watcher = Client(broker.port)
    try:
        seen_ready = threading.Event()
        request = json.dumps({"id": "first", "prompt": "hi", "max_tokens": 2})

        def on_message(client: Any, userdata: Any, message: Any) -> None:
            doc = json.loads(message.payload)
            if doc.get("state") == "ready" and not seen_ready.is_set():
                seen_ready.set()  # sent from paho's thread: as fast as a pipeline can react
                client.publish(f"edge-agent/{device_id}/request", request, qos=1)
            watcher.messages.put((message.topic, bytes(message.payload), message.properties))

        watcher.client.on_message = on_message
        watcher.subscribe(f"edge-agent/{device_id}/response")
        agent = start_agent(broker, watcher, wait_ready=False, device_id=device_id,
                            env=fault_hooks_env(tmp_path / "hooks", late_connack_s=3.0))
        answer = watcher.wait_for(lambda d: d.get("id") == "first", 30)
        assert answer["ok"] is True
        late = Client(broker.port)
        try:
            late.subscribe(agent.status_topic)
            assert late.wait_for(lambda d: "state" in d, 5)["state"] == "ready"
        finally:
            late.close()
    finally:
        watcher.close()


# --- long work, failing work ------------------------------------------------------------------

@pytest.mark.slow
def test_inference_longer_than_the_keepalive_keeps_the_link(
        broker: Broker, start_agent: Callable[..., AgentProcess], smollm2_model: Path,
        pipelines: Callable[[Broker, AgentProcess], Pipeline]) -> None:
    """Generation runs on the worker thread; the MQTT network thread keeps pinging. A request
    that takes more than two keepalives (1500 tokens of SmolLM2, 12-17 s here) is answered on
    the same link, and the network thread answers a bad request at once meanwhile."""
    agent = start_streaming_agent(broker, start_agent, model=smollm2_model, model__max_new_tokens=1500)
    pipeline = pipelines(broker, agent)
    pipeline.send("long", "Write a long story about a lighthouse keeper.", max_tokens=1500)
    time.sleep(KEEPALIVE_S)  # into the generation
    pipeline.client.publish(agent.request_topic, b'{"id": "bad", "prompt": 1}', qos=1)
    pipeline.wait_answers(180)
    bad, long = pipeline.first_answer("bad"), pipeline.first_answer("long")
    assert bad["ok"] is False and bad["error"]["code"] == "bad_request"
    assert long["ok"] is True, long
    total_s = long["timings"]["total_ms"] / 1000
    assert total_s > 2 * KEEPALIVE_S, f"generation took {total_s:.1f} s: too short to test the keepalive"
    assert next(iter(pipeline.answers)) == "bad", "the bad request waited for the long one"
    assert not events(agent, "mqtt.connection_lost", "mqtt.disconnected", "mqtt.connect_failed")
    assert pipeline.tally().copies == 0


def test_exception_in_the_handler_is_answered_internal_and_the_agent_goes_on(
        broker: Broker, start_agent: Callable[..., AgentProcess], tmp_path: Path,
        pipelines: Callable[[Broker, AgentProcess], Pipeline]) -> None:
    """A bug in the inference path (injected from outside the product: a sitecustomize.py on
    the agent's PYTHONPATH makes `generate` raise for prompts containing BOOM). Those requests
    are answered `internal`, every other is answered, and requests after them still are."""
    agent = start_streaming_agent(broker, start_agent, env=fault_hooks_env(tmp_path / "hooks"))
    pipeline = pipelines(broker, agent)
    ids = [f"boom-{i}" for i in range(40)]
    booms = {rid for n, rid in enumerate(ids) if n % 4 == 1}
    for rid in ids:
        pipeline.send(rid, f"BOOM {rid}" if rid in booms else f"fine {rid}")
        time.sleep(0.01)
    pipeline.wait_answers(ANSWER_WAIT_S)
    pipeline.send("after", "still there?")  # the loop and the worker are alive
    pipeline.wait_answers(ANSWER_WAIT_S)
    pipeline.settle(0.5)
    tally = pipeline.tally()
    assert tally.answered == tally.sent == len(ids) + 1 and tally.copies == 0, tally.line()
    for rid in ids:
        doc = pipeline.first_answer(rid)
        if rid in booms:
            assert doc["ok"] is False and doc["error"]["code"] == "internal", doc
            assert "RuntimeError" in doc["error"]["message"] and "injected" not in doc["error"]["message"]
        else:
            assert doc["ok"] is True, doc
    assert pipeline.first_answer("after")["ok"] is True
    assert len(events(agent, "request.failed")) == len(booms)
    assert not events(agent, "mqtt.on_message_failed", "worker.process_failed")
    assert agent.proc is not None and agent.proc.poll() is None


def test_a_failing_store_still_answers_every_request(
        broker: Broker, start_agent: Callable[..., AgentProcess], tmp_path: Path,
        pipelines: Callable[[Broker, AgentProcess], Pipeline]) -> None:
    """The state database fails at run time (disk full, a damaged page; injected): requests are
    still run and answered, each failure is logged and counted in stats, nothing waits for a
    reconnect."""
    agent = start_streaming_agent(broker, start_agent, env=fault_hooks_env(tmp_path / "hooks"),
                                  stats_interval_s=1.0)
    watcher = Client(broker.port)
    watcher.subscribe(f"{agent.prefix}/{agent.device_id}/stats")
    pipeline = pipelines(broker, agent)
    ids = ["fine-1", "diskfull-1", "unreadable-1", "fine-2", "diskfull-2", "fine-3"]
    for rid in ids:
        pipeline.send(rid, f"question {rid}")
    pipeline.wait_answers(ANSWER_WAIT_S)
    pipeline.settle(0.5)
    tally = pipeline.tally()
    assert tally.answered == tally.sent == len(ids) and tally.copies == 0, tally.line()
    assert all(pipeline.first_answer(rid)["ok"] is True for rid in ids)
    failed = events(agent, "store.failed")
    assert sorted(line["step"] for line in failed) == ["answer", "answer", "first_sight"]
    stats = watcher.wait_for(lambda d: "delivery" in d, timeout=15)
    watcher.close()
    assert stats["delivery"]["store_failures"] == 3
    assert not events(agent, "mqtt.on_message_failed", "worker.process_failed")


def test_a_bug_on_the_network_thread_is_answered_internal(
        broker: Broker, client: Client, start_agent: Callable[..., AgentProcess], tmp_path: Path) -> None:
    """The request parser raises (injected): that request is answered `internal` and
    acknowledged at once (not left for a redelivery after the next reconnect); the next
    request is answered."""
    agent = start_streaming_agent(broker, start_agent, env=fault_hooks_env(tmp_path / "hooks"))
    client.subscribe(agent.response_topic)
    tag = uuid.uuid4().bytes
    client.publish(agent.request_topic, json.dumps({"id": "bug", "prompt": "PARSEBUG"}),
                   response_topic=agent.response_topic, correlation=tag)
    doc = client.wait_for(lambda d: d.get("ok") is False)
    assert doc["error"]["code"] == "internal" and "KeyError" in doc["error"]["message"], doc
    assert "injected" not in doc["error"]["message"]
    client.publish(agent.request_topic, json.dumps({"id": "next", "prompt": "fine"}))
    assert client.wait_for(lambda d: d.get("id") == "next")["ok"] is True
    assert len(events(agent, "request.unexpected_error")) == 1
    assert not events(agent, "mqtt.on_message_failed", "request.unanswered")


# --- the same request twice ---------------------------------------------------------------------

def test_same_id_twice_gets_the_stored_answer_and_runs_once(
        broker: Broker, start_agent: Callable[..., AgentProcess], tmp_path: Path,
        pipelines: Callable[[Broker, AgentProcess], Pipeline]) -> None:
    """A re-send of an answered id (a pipeline retrying after a timeout of its own) gets the
    stored answer again, byte for byte, and the model does not run again. A re-send while the
    first is still running (it waits behind a SLOW request) gets that one answer only."""
    agent = start_streaming_agent(broker, start_agent, env=fault_hooks_env(tmp_path / "hooks"))
    pipeline = pipelines(broker, agent)
    pipeline.send("twice", "the same question", max_tokens=8)
    pipeline.wait_answers(ANSWER_WAIT_S)
    pipeline.send("twice", "the same question", max_tokens=8)
    deadline = time.monotonic() + 10
    while len(pipeline.answers["twice"]) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    first, second = pipeline.answers["twice"]
    assert first == second

    pipeline.send("blocker", "SLOW down")
    pipeline.send("queued", "asked twice while waiting")
    pipeline.send("queued", "asked twice while waiting")
    pipeline.wait_answers(ANSWER_WAIT_S)
    pipeline.settle(1.0)
    assert len(pipeline.answers["queued"]) == 1
    runs = runs_per_id(agent.log_lines())
    assert runs["twice"] == 1 and runs["queued"] == 1
    assert len(events(agent, "request.duplicate")) == 2


def test_request_without_id_sent_twice_runs_twice(
        broker: Broker, client: Client, start_agent: Callable[..., AgentProcess]) -> None:
    """Documented limitation: without an `id` the agent makes one up per message, so it cannot
    tell a re-send from a new request. Pipelines that retry must set ids."""
    agent = start_streaming_agent(broker, start_agent)
    client.subscribe(agent.response_topic)
    payload = json.dumps({"prompt": "no id here", "max_tokens": 4})
    tags = [uuid.uuid4().hex.encode() for _ in range(2)]
    for tag in tags:
        client.publish(agent.request_topic, payload, response_topic=agent.response_topic, correlation=tag)
    ids: dict[bytes, str] = {}
    while len(ids) < 2:
        _, doc, props = client.next()
        tag = getattr(props, "CorrelationData", None)
        if tag in tags:
            ids[tag] = doc["id"]
    assert ids[tags[0]] != ids[tags[1]]
    runs = runs_per_id(agent.log_lines())
    assert runs[ids[tags[0]]] == 1 and runs[ids[tags[1]]] == 1
