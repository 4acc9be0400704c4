"""Many requests at once, streaming, cancel and structured output, from the outside: a real
mosquitto, the daemon as a process with real ORT GenAI in its child, a paho pipeline."""

from __future__ import annotations

import base64
import json
import re
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import pytest

from faults import fault_hooks_env
from support import DOOR_SCHEMA, AgentProcess, Broker, Client, build_model

PROMPTS = [f"Tell me about topic number {n}" + " please" * n for n in range(8)]  # lengths differ


def collect(client: Client, want: Callable[[list[dict[str, Any]]], bool], timeout: float = 30) -> list[dict[str, Any]]:
    """Every message on the client's topics until `want(messages)` holds."""
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while not want(got):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"only {len(got)} messages: {got[-3:]}")
        try:
            _, doc, _ = client.next(remaining)
        except Exception:  # queue.Empty
            raise TimeoutError(f"only {len(got)} messages: {got[-3:]}") from None
        got.append(doc)
    return got


def finals(messages: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {m["id"]: m for m in messages if "ok" in m}  # answers, not chunks or status


def send(client: Client, agent: AgentProcess, **request: Any) -> None:
    client.publish(agent.request_topic, json.dumps(request))


def answers_for(client: Client, agent: AgentProcess, ids: list[str], timeout: float = 60) -> dict[str, dict[str, Any]]:
    got = collect(client, lambda ms: set(ids) <= set(finals(ms)), timeout)
    return finals(got)


def test_concurrent_requests_are_answered_as_alone(
        broker: Broker, client: Client, start_agent: Callable[..., AgentProcess]) -> None:
    """Eight requests at once, each its own generator (the tiny model keeps past and present KV
    apart, which og.Engine batches wrongly; an older runtime has no og.Engine): each gets the
    text it gets alone, with its own timings. The batch path: test_concurrency_real.py."""
    agent = start_agent(broker, client, limits__queue_size=16)
    client.subscribe(agent.status_topic)  # the retained status again
    status = client.wait_for(lambda d: d.get("state") == "ready")
    assert status["batching"] == "off" and status["max_batch"] == 8, status
    assert "past_present_share_buffer" in status["batching_reason"] or "0.16" in status["batching_reason"]
    client.subscribe(agent.response_topic)
    alone = {}
    for n, prompt in enumerate(PROMPTS):
        send(client, agent, id=f"alone-{n}", prompt=prompt, max_tokens=24)
        alone[n] = answers_for(client, agent, [f"alone-{n}"])[f"alone-{n}"]
    for n, prompt in enumerate(PROMPTS):
        send(client, agent, id=f"many-{n}", prompt=prompt, max_tokens=24)
    many = answers_for(client, agent, [f"many-{n}" for n in range(8)])
    for n in range(8):
        doc = many[f"many-{n}"]
        assert doc["ok"] and doc["text"] == alone[n]["text"], (doc, alone[n])
        # cached_tokens depends on which caches were kept then (prefix reuse): not compared
        assert doc["usage"]["prompt_tokens"] == alone[n]["usage"]["prompt_tokens"]
        assert doc["usage"]["completion_tokens"] == alone[n]["usage"]["completion_tokens"]
        assert doc["timings"]["ttft_ms"] > 0 and doc["timings"]["total_ms"] >= doc["timings"]["ttft_ms"]
    assert len({doc["timings"]["total_ms"] for doc in many.values()}) > 1  # each its own
    paths = [line["path"] for line in agent.log_lines() if line.get("event") == "request.done"]
    assert paths == ["single"] * 16, paths


def test_streamed_chunks_have_no_gaps_and_add_up_to_the_answer(
        broker: Broker, client: Client, start_agent: Callable[..., AgentProcess]) -> None:
    agent = start_agent(broker, client, stream__interval_ms=0)
    client.subscribe(agent.response_topic)
    send(client, agent, id="s1", prompt="Stream this please", max_tokens=40, stream=True)
    got = collect(client, lambda ms: "s1" in finals(ms))
    chunks = [m for m in got if m.get("seq") is not None]
    final = finals(got)["s1"]
    assert final["ok"] and final["done"] is True and final["finish_reason"] == "length"
    assert [c["seq"] for c in chunks] == list(range(1, len(chunks) + 1)) and len(chunks) > 5
    assert all(set(c) == {"id", "seq", "delta", "done"} and c["done"] is False and c["id"] == "s1" for c in chunks)
    assert "".join(c["delta"] for c in chunks) == final["text"]
    # Asked again with the same id: the stored answer only, no chunks.
    send(client, agent, id="s1", prompt="Stream this please", max_tokens=40, stream=True)
    again = collect(client, lambda ms: any("seq" not in m for m in ms))
    time.sleep(0.3)
    again += client.drain()
    assert [m for m in again if "seq" in m] == [] and again[0] == final


def test_stream_chunks_are_coalesced(broker: Broker, client: Client,
                                     start_agent: Callable[..., AgentProcess]) -> None:
    agent = start_agent(broker, client, stream__interval_ms=60000)  # nothing goes out before the end
    client.subscribe(agent.response_topic)
    send(client, agent, id="s2", prompt="Stream this please", max_tokens=40, stream=True)
    got = collect(client, lambda ms: "s2" in finals(ms))
    chunks = [m for m in got if "seq" in m]
    # the first token goes out at once (nothing sent yet), the rest in one chunk at the end
    assert [c["seq"] for c in chunks] == [1, 2]
    assert "".join(c["delta"] for c in chunks) == finals(got)["s2"]["text"]


def test_cancel_of_a_queued_and_of_a_running_request(
        broker: Broker, client: Client, start_agent: Callable[..., AgentProcess], tmp_path: Path) -> None:
    """One worker (max_batch 1). A SLOW prompt holds the child for a second (a fault hook in the
    child's prompt step): it is running when its cancel comes; the one behind it is queued."""
    agent = start_agent(broker, client, env=fault_hooks_env(tmp_path / "hooks"), inference__max_batch=1)
    client.subscribe(agent.response_topic)
    send(client, agent, id="running", prompt="SLOW one", max_tokens=32)
    send(client, agent, id="queued", prompt="two", max_tokens=32)
    time.sleep(0.3)
    cancel_topic = f"{agent.prefix}/{agent.device_id}/cancel"
    for rid in ("running", "queued", "never-seen"):
        client.publish(cancel_topic, json.dumps({"id": rid}))
    got = answers_for(client, agent, ["running", "queued"])
    for rid in ("running", "queued"):
        doc = got[rid]
        assert doc["ok"] is True and doc["finish_reason"] == "cancelled" and doc["text"] == "", doc
        assert doc["usage"]["completion_tokens"] == 0
    send(client, agent, id="after", prompt="three", max_tokens=8)
    assert answers_for(client, agent, ["after"])["after"]["finish_reason"] == "length"
    cancels = [line for line in agent.log_lines() if line.get("event") == "request.cancel"]
    assert [(c["request_id"], c["found"]) for c in cancels] == [("running", True), ("queued", True),
                                                               ("never-seen", False)]


def test_a_malformed_cancel_is_answered_and_changes_nothing(
        broker: Broker, client: Client, start_agent: Callable[..., AgentProcess]) -> None:
    agent = start_agent(broker, client)
    client.subscribe(agent.response_topic)
    cancel_topic = f"{agent.prefix}/{agent.device_id}/cancel"
    for payload, words in ((b"not json", "JSON"), (b'{"id": 5}', "'id' must be a string"),
                           (b'{"id": "x", "why": 1}', "unknown field")):
        client.publish(cancel_topic, payload)
        _, doc, _ = client.next()
        assert doc["ok"] is False and doc["error"]["code"] == "bad_request" and words in doc["error"]["message"], doc
    send(client, agent, id="fine", prompt="hello", max_tokens=4)
    assert answers_for(client, agent, ["fine"])["fine"]["ok"]


@pytest.mark.parametrize("response_format,check", [
    (DOOR_SCHEMA, lambda doc: set(doc["json"]) == {"open"} and isinstance(doc["json"]["open"], bool)),
    ({"type": "json_schema", "json_schema": {"name": "n", "schema": {
        "type": "object", "properties": {"count": {"type": "integer", "minimum": 0, "maximum": 9},
                                         "color": {"enum": ["red", "blue"]}},
        "required": ["count", "color"]}}},
     lambda doc: 0 <= doc["json"]["count"] <= 9 and doc["json"]["color"] in ("red", "blue")),
    ({"type": "regex", "regex": "(yes|no)"}, lambda doc: doc["text"] in ("yes", "no") and "json" not in doc),
    ({"type": "lark", "grammar": 'start: "Paris" | "London"'}, lambda doc: doc["text"] in ("Paris", "London")),
])


def test_every_response_format_holds_on_the_text_model(
        broker: Broker, client: Client, start_agent: Callable[..., AgentProcess],
        response_format: dict[str, Any], check: Callable[[dict[str, Any]], bool]) -> None:
    agent = start_agent(broker, client)
    client.subscribe(agent.response_topic)
    ids = [f"rf-{uuid.uuid4().hex[:6]}" for _ in range(3)]
    for rid in ids:  # three at once: they share the batch, each with its own constraint
        send(client, agent, id=rid, prompt="Is the door open?", max_tokens=48, response_format=response_format)
    got = answers_for(client, agent, ids)
    for rid in ids:
        doc = got[rid]
        assert doc["ok"] and doc["finish_reason"] == "stop" and check(doc), doc
        if "json" in doc:
            assert json.loads(doc["text"]) == doc["json"]


@pytest.mark.parametrize("response_format,words", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}}, "response_format refused"),
    ({"type": "regex", "regex": "("}, "response_format refused"),
    ({"type": "lark", "grammar": "start: ??"}, "response_format refused"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "json_schema.schema"),
    ({"type": "xml"}, "response_format.type must be one of"),
    ({"type": "regex"}, "needs 'regex'"),
    ("json", "'response_format' must be an object"),
])


def test_bad_response_formats_are_bad_requests(
        broker: Broker, client: Client, start_agent: Callable[..., AgentProcess],
        response_format: Any, words: str) -> None:
    agent = start_agent(broker, client)
    client.subscribe(agent.response_topic)
    send(client, agent, id="bad", prompt="hi", response_format=response_format)
    send(client, agent, id="next", prompt="hi", max_tokens=4)
    got = answers_for(client, agent, ["bad", "next"])
    assert got["bad"]["error"]["code"] == "bad_request" and words in got["bad"]["error"]["message"], got["bad"]
    assert got["next"]["ok"]


def test_a_template_carries_its_response_format(broker: Broker, client: Client,
                                                start_agent: Callable[..., AgentProcess]) -> None:
    agent = start_agent(broker, client, prompts={"templates": {"door": {
        "text": "Is the {name} door open?", "response_format": DOOR_SCHEMA}}})
    client.subscribe(agent.response_topic)
    send(client, agent, id="t1", template="door", vars={"name": "garage"}, max_tokens=32)
    doc = answers_for(client, agent, ["t1"])["t1"]
    assert doc["ok"] and isinstance(doc["json"]["open"], bool), doc


@pytest.mark.parametrize("response_format,check", [
    (DOOR_SCHEMA, lambda doc: set(doc["json"]) == {"open"} and isinstance(doc["json"]["open"], bool)),
    ({"type": "regex", "regex": "(yes|no)"}, lambda doc: doc["text"] in ("yes", "no")),
    ({"type": "lark", "grammar": 'start: "Paris" | "London"'}, lambda doc: doc["text"] in ("Paris", "London")),
])


def test_formats_hold_on_the_vision_model_with_an_image(
        broker: Broker, client: Client, start_agent: Callable[..., AgentProcess],
        response_format: dict[str, Any], check: Callable[[dict[str, Any]], bool]) -> None:
    agent = start_agent(broker, client, model=build_model("tiny-vision"), images__longest_side=336)
    client.subscribe(agent.response_topic)
    image = np.full((120, 160, 3), 90, np.uint8)
    ok, data = cv2.imencode(".jpg", image)
    assert ok
    send(client, agent, id="v1", prompt="Is the door open?", max_tokens=32, response_format=response_format,
         images=[base64.b64encode(data.tobytes()).decode()])
    doc = answers_for(client, agent, ["v1"])["v1"]
    assert doc["ok"] and doc["finish_reason"] == "stop" and check(doc), doc


def test_json_object_parses_and_an_answer_cut_short_has_no_json(
        broker: Broker, client: Client, start_agent: Callable[..., AgentProcess]) -> None:
    """Random weights: one prompt closes the object at once, another writes keys until
    max_tokens (no "json" then: the text is not valid JSON)."""
    agent = start_agent(broker, client)
    client.subscribe(agent.response_topic)
    send(client, agent, id="closed", prompt="What is the capital of France?", max_tokens=64,
         response_format={"type": "json_object"})
    send(client, agent, id="cut", prompt="Is the door open?", max_tokens=64, response_format={"type": "json_object"})
    got = answers_for(client, agent, ["closed", "cut"])
    assert got["closed"]["finish_reason"] == "stop" and got["closed"]["json"] == {}, got["closed"]
    assert got["cut"]["finish_reason"] == "length" and "json" not in got["cut"], got["cut"]
    assert got["cut"]["text"].startswith('{"')


def test_a_child_crash_fails_every_request_in_flight_and_the_next_succeed(
        broker: Broker, client: Client, start_agent: Callable[..., AgentProcess], tmp_path: Path) -> None:
    """A SLOW prompt holds the child a second (a fault hook in its prompt step); two more
    requests and a CRASH prompt reach it meanwhile. The crash ends the child with all four in
    it: all four are answered `internal`, the ones after are answered."""
    agent = start_agent(broker, client, env=fault_hooks_env(tmp_path / "hooks"))
    client.subscribe(agent.response_topic)
    send(client, agent, id="slow", prompt="SLOW one", max_tokens=8)
    for n in range(2):
        send(client, agent, id=f"w{n}", prompt=f"wait {n}", max_tokens=8)
    send(client, agent, id="crash", prompt="CRASH now", max_tokens=8)
    got = answers_for(client, agent, ["slow", "w0", "w1", "crash"])
    for doc in got.values():
        assert doc["ok"] is False and doc["error"]["code"] == "internal", doc
        assert re.search(r"inference process died \(exit status 3\)", doc["error"]["message"]), doc
    for n in range(3):
        send(client, agent, id=f"after{n}", prompt=f"after {n}", max_tokens=8)
    after = answers_for(client, agent, [f"after{n}" for n in range(3)])
    assert all(doc["ok"] for doc in after.values()), after
