"""Protocol v1 from the outside: a real mosquitto, the daemon as a process, a paho client."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from support import AgentProcess, Broker, Client, answers_client, running_agent

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the tomli backport (a test dependency there)
    import tomli as tomllib

ANSWER_KEYS = {"id", "ok", "text", "finish_reason", "model", "provider", "usage", "timings"}
ERROR_KEYS = {"id", "ok", "error"}


@pytest.fixture(scope="module")
def agent(module_broker: Broker, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    yield from running_agent(tmp_path_factory.mktemp("agent"), module_broker.port, tiny_model,
                             mqtt__reply_topic_allow=["edge-agent/#", "apps/#"],
                             limits__max_payload_bytes=4096, limits__max_prompt_chars=1000)


@pytest.fixture
def pipeline(module_broker: Broker, agent: AgentProcess) -> Iterator[Client]:
    yield from answers_client(module_broker.port, agent)


def send_raw(pipeline: Client, agent: AgentProcess, request: dict[str, Any] | bytes | str) -> dict[str, Any]:
    payload = request if isinstance(request, (bytes, str)) else json.dumps(request)
    pipeline.publish(agent.request_topic, payload)
    _, doc, _ = pipeline.next()
    return doc


def assert_answered(pipeline: Client, agent: AgentProcess) -> None:
    """The daemon still answers a good request."""
    rid = uuid.uuid4().hex
    doc = send_raw(pipeline, agent, {"id": rid, "prompt": "Are you still there?", "max_tokens": 4})
    assert doc["id"] == rid and doc["ok"] is True


def test_prompt_is_answered_with_every_documented_field(pipeline: Client, agent: AgentProcess) -> None:
    doc = send_raw(pipeline, agent, {"id": "q1", "prompt": "Summarise: the sky is blue.", "max_tokens": 8})
    assert set(doc) == ANSWER_KEYS
    assert doc["id"] == "q1" and doc["ok"] is True
    assert isinstance(doc["text"], str) and doc["text"]
    assert doc["finish_reason"] == "length"  # the tiny model never emits end-of-sequence
    assert doc["model"] == Path(agent_model_path(agent)).name and doc["provider"] == "cpu"
    assert doc["usage"]["completion_tokens"] == 8 and doc["usage"]["prompt_tokens"] > 5
    assert set(doc["timings"]) == {"queue_ms", "ttft_ms", "total_ms", "tokens_per_s"}
    assert doc["timings"]["total_ms"] >= doc["timings"]["ttft_ms"] > 0
    assert doc["timings"]["tokens_per_s"] > 0


def agent_model_path(agent: AgentProcess) -> str:
    return tomllib.loads(agent.config.read_text())["model"]["path"]


def test_missing_id_is_generated_and_echoed(pipeline: Client, agent: AgentProcess) -> None:
    doc = send_raw(pipeline, agent, {"prompt": "hello", "max_tokens": 2})
    assert doc["ok"] is True and len(doc["id"]) == 32


def test_messages_with_system_and_sampling(pipeline: Client, agent: AgentProcess) -> None:
    request = {"id": "chat", "system": "Be brief.", "max_tokens": 6, "temperature": 0.8,
               "top_p": 0.9, "top_k": 20, "seed": 42,
               "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                            {"role": "user", "content": "How are you?"}]}
    first, second = send_raw(pipeline, agent, request), send_raw(pipeline, agent, request)
    assert first["ok"] and second["ok"]
    assert first["text"] == second["text"]  # same seed, same sample
    other = send_raw(pipeline, agent, {**request, "seed": 7})
    assert other["usage"]["prompt_tokens"] == first["usage"]["prompt_tokens"]


def test_greedy_is_deterministic_and_max_tokens_is_honoured(pipeline: Client, agent: AgentProcess) -> None:
    a = send_raw(pipeline, agent, {"prompt": "Count", "max_tokens": 12})
    b = send_raw(pipeline, agent, {"prompt": "Count", "max_tokens": 12})
    assert a["text"] == b["text"] and a["usage"]["completion_tokens"] == 12


def test_default_max_tokens_is_the_configured_cap(pipeline: Client, agent: AgentProcess) -> None:
    doc = send_raw(pipeline, agent, {"prompt": "Go on"})
    assert doc["usage"]["completion_tokens"] == 64  # model.max_new_tokens in AgentProcess


def test_response_topic_and_correlation_data(module_broker: Broker, agent: AgentProcess) -> None:
    c = Client(module_broker.port)
    try:
        c.subscribe("apps/answers/#")
        c.publish(agent.request_topic, json.dumps({"id": "v5", "prompt": "hi", "max_tokens": 2}),
                  response_topic="apps/answers/1", correlation=b"\x00corr\xff")
        topic, doc, props = c.next()
        assert topic == "apps/answers/1" and doc["id"] == "v5" and doc["ok"]
        assert props.CorrelationData == b"\x00corr\xff"
    finally:
        c.close()


def test_reply_to_with_mqtt_311(module_broker: Broker, agent: AgentProcess) -> None:
    c = Client(module_broker.port, protocol="3.1.1")
    try:
        c.subscribe("apps/v311")
        c.publish(agent.request_topic, json.dumps({"id": "old", "prompt": "hi", "max_tokens": 2,
                                                   "reply_to": "apps/v311"}))
        topic, doc, _ = c.next()
        assert topic == "apps/v311" and doc["id"] == "old" and doc["ok"]
    finally:
        c.close()


def test_response_topic_wins_over_reply_to(module_broker: Broker, agent: AgentProcess) -> None:
    c = Client(module_broker.port)
    try:
        c.subscribe("apps/#")
        c.publish(agent.request_topic, json.dumps({"id": "both", "prompt": "hi", "max_tokens": 2,
                                                   "reply_to": "apps/b"}), response_topic="apps/a")
        topic, doc, _ = c.next()
        assert topic == "apps/a" and doc["id"] == "both"
    finally:
        c.close()


@pytest.mark.parametrize("reply_to, reason", [
    ("apps/+/x", "wildcard"), ("apps/#", "wildcard"), ("$SYS/broker/x", "'$' system topic"),
    ("apps//x", "empty level"), ("other/place", "allow-list"), ("", "1-512 characters"),
])
def test_bad_reply_topic_is_refused_on_the_default_topic(pipeline: Client, agent: AgentProcess,
                                                         reply_to: str, reason: str) -> None:
    doc = send_raw(pipeline, agent, {"id": "rt", "prompt": "hi", "reply_to": reply_to})
    assert doc == {"id": "rt", "ok": False, "error": doc["error"]}
    assert doc["error"]["code"] == "bad_request" and reason in doc["error"]["message"]
    assert_answered(pipeline, agent)


def test_bad_response_topic_property_is_refused(pipeline: Client, agent: AgentProcess) -> None:
    pipeline.publish(agent.request_topic, json.dumps({"id": "rtp", "prompt": "hi"}),
                     response_topic="$SYS/x")
    _, doc, _ = pipeline.next()
    assert doc["id"] == "rtp" and doc["error"]["code"] == "bad_request"
    assert_answered(pipeline, agent)


DEEP = "[" * 5000 + "]" * 5000
BAD_INPUTS = [
    # (payload, code, words in the message, echoed id)
    (b"not json", "bad_request", "not JSON", None),
    (b"\xff\xfe{}", "bad_request", "UTF-8", None),
    (b"\xef\xbb\xbf{\"prompt\": \"x\"}", "bad_request", "BOM", None),
    (b"", "bad_request", "empty", None),
    (b"   ", "bad_request", "empty", None),
    (b"42", "bad_request", "got integer", None),
    (b"[\"prompt\"]", "bad_request", "got array", None),
    (b"\"text\"", "bad_request", "got string", None),
    (b"null", "bad_request", "got null", None),
    (DEEP.encode()[:4000], "bad_request", "", None),  # truncated: still nested, not JSON
    (b"{\"a\":" * 1500 + b"1" + b"}" * 1500, "too_large", "limit is 4096", None),
    (b"[" * 2000 + b"]" * 2000, "bad_request", "nested deeper than 32", None),
    (b"{\"x\":" * 600 + b"1" + b"}" * 600, "bad_request", "nested deeper than 32", None),
    (b"{\"id\":\"s\",\"prompt\":\"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\"}", "ok", "", "s"),
    (b"{\"id\":\"n\",\"prompt\":\"x\",\"max_tokens\":" + b"9" * 3000 + b"}", "bad_request", "too large", None),
    (b"{\"id\":\"f\",\"prompt\":\"x\",\"temperature\":1e999}", "bad_request", "out of range", None),
    (b"{\"id\":\"nan\",\"prompt\":\"x\",\"temperature\":NaN}", "bad_request", "NaN", None),
    (b"{\"id\":\"inf\",\"prompt\":\"x\",\"temperature\":-Infinity}", "bad_request", "Infinity", None),
    (b"{\"id\":\"d\",\"prompt\":\"x\",\"prompt\":\"y\"}", "bad_request", "duplicate key", None),
    ({"id": "t1", "prompt": 5}, "bad_request", "'prompt' must be a string", "t1"),
    ({"id": "t2"}, "bad_request", "exactly one of 'prompt' or 'messages'", "t2"),
    ({"id": "t3", "prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "bad_request", "exactly one", "t3"),
    ({"id": "t4", "prompt": ""}, "bad_request", "'prompt' is empty", "t4"),
    ({"id": "t5", "prompt": "   \n"}, "bad_request", "'prompt' is empty", "t5"),
    ({"id": "t6", "prompt": "x" * 1001}, "too_large", "limit is 1000", "t6"),
    ({"id": "t7", "prompt": "a\x00b"}, "bad_request", "control characters", "t7"),
    ({"id": "t8", "prompt": "x", "colour": "red"}, "bad_request", "unknown field", "t8"),
    ({"id": "t9", "messages": []}, "bad_request", "non-empty array", "t9"),
    ({"id": "t10", "messages": "hi"}, "bad_request", "non-empty array", "t10"),
    ({"id": "t11", "messages": [{"role": "robot", "content": "x"}]}, "bad_request", "role must be", "t11"),
    ({"id": "t12", "messages": [{"role": "user"}]}, "bad_request", "exactly 'role' and 'content'", "t12"),
    ({"id": "t13", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
     "bad_request", "last message", "t13"),
    ({"id": "t14", "prompt": "x", "max_tokens": 0}, "bad_request", "'max_tokens' must be in [1, 64]", "t14"),
    ({"id": "t15", "prompt": "x", "max_tokens": 65}, "bad_request", "[1, 64]", "t15"),
    ({"id": "t16", "prompt": "x", "max_tokens": -3}, "bad_request", "max_tokens", "t16"),
    ({"id": "t17", "prompt": "x", "max_tokens": 2.5}, "bad_request", "an integer", "t17"),
    ({"id": "t18", "prompt": "x", "max_tokens": "8"}, "bad_request", "an integer, got string", "t18"),
    ({"id": "t19", "prompt": "x", "max_tokens": True}, "bad_request", "got boolean", "t19"),
    ({"id": "t20", "prompt": "x", "temperature": 9}, "bad_request", "'temperature' must be in", "t20"),
    ({"id": "t21", "prompt": "x", "top_p": 0}, "bad_request", "'top_p' must be in (0, 1]", "t21"),
    ({"id": "t22", "prompt": "x", "top_k": 0}, "bad_request", "top_k", "t22"),
    ({"id": "t23", "prompt": "x", "seed": -1}, "bad_request", "seed", "t23"),
    ({"id": "t24", "prompt": "x", "timeout_s": 0}, "bad_request", "timeout_s", "t24"),
    ({"id": "t25", "prompt": "x", "timeout_s": "soon"}, "bad_request", "timeout_s", "t25"),
    ({"id": "t26", "prompt": "x", "system": 3}, "bad_request", "'system' must be a string", "t26"),
    ({"id": "t27", "prompt": "x", "reply_to": 5}, "bad_request", "reply_to must be a string", "t27"),
    ({"id": "t28", "prompt": "x", "reply_to": None}, "bad_request", "reply_to must be a string, got null", "t28"),
    ({"id": 12, "prompt": "x"}, "bad_request", "'id' must be a string", None),
    ({"id": "x" * 129, "prompt": "x"}, "bad_request", "1-128 characters", None),
    ({"id": "", "prompt": "x"}, "bad_request", "1-128 characters", None),
]


@pytest.mark.parametrize("payload, code, words, echoed", BAD_INPUTS,
                         ids=[f"bad{i}" for i in range(len(BAD_INPUTS))])
def test_bad_input_gets_an_error_and_the_next_request_is_answered(
        pipeline: Client, agent: AgentProcess, payload: Any, code: str, words: str, echoed: str | None) -> None:
    doc = send_raw(pipeline, agent, payload)
    if code == "ok":  # a look-alike that must pass (brackets inside a string are not nesting)
        assert doc["ok"] is True and doc["id"] == echoed
        return
    assert set(doc) == ERROR_KEYS and doc["ok"] is False
    assert doc["error"]["code"] == code
    assert words in doc["error"]["message"]
    assert doc["id"] == echoed
    assert_answered(pipeline, agent)


def test_prompt_longer_than_the_context_is_too_large(pipeline: Client, agent: AgentProcess) -> None:
    # The tiny tokenizer has no merge for "~ ": one token per character, 998 > 512.
    doc = send_raw(pipeline, agent, {"id": "ctx", "prompt": "~ " * 499})
    assert doc["error"]["code"] == "too_large" and "context is 512" in doc["error"]["message"]
    assert_answered(pipeline, agent)


def test_generation_is_cut_at_the_context_end(pipeline: Client, agent: AgentProcess) -> None:
    doc = send_raw(pipeline, agent, {"id": "edge", "prompt": "~ " * 235, "max_tokens": 64})
    assert doc["ok"] and doc["finish_reason"] == "length"
    assert doc["usage"]["prompt_tokens"] > 470
    assert doc["usage"]["prompt_tokens"] + doc["usage"]["completion_tokens"] == 512


def test_timeout_during_generation(pipeline: Client, agent: AgentProcess) -> None:
    doc = send_raw(pipeline, agent, {"id": "slow", "prompt": "x", "max_tokens": 64, "timeout_s": 0.000001})
    assert doc == {"id": "slow", "ok": False, "error": doc["error"]}
    assert doc["error"]["code"] == "timeout"
    assert_answered(pipeline, agent)


def test_status_is_retained_and_ready(module_broker: Broker, agent: AgentProcess) -> None:
    c = Client(module_broker.port)
    try:
        c.subscribe(agent.status_topic)
        _, doc, _ = c.next(5)
        assert doc["state"] == "ready" and doc["device_id"] == agent.device_id
        assert set(doc) >= {"state", "device_id", "version", "model", "provider", "since"}
        assert doc["provider"] == "cpu" and doc["since"].endswith("Z")
    finally:
        c.close()


def test_request_id_is_bound_to_every_log_line(pipeline: Client, agent: AgentProcess) -> None:
    send_raw(pipeline, agent, {"id": "logged-1", "prompt": "hi", "max_tokens": 2})
    events = [line["event"] for line in agent.log_lines() if line.get("request_id") == "logged-1"]
    assert events[:2] == ["request.accepted", "request.done"]
