"""OpenAI-compatible servers from the outside: a pipeline over real MQTT -> edge-agent -> a real
llama.cpp server (llama-cpp-python, SmolLM2), through a proxy the tests make slow or broken."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from faults import fault_hooks_env
from llama_server import FaultProxy, LlamaServer
from support import DOOR_SCHEMA, REPO, AgentProcess, Broker, Client, ask, next_stats, retained_status

pytestmark = pytest.mark.slow
API_KEY = "sk-edge-test-9f3c2a"


@pytest.fixture(scope="module")
def llama() -> Iterator[LlamaServer]:
    with LlamaServer(api_key=API_KEY) as server:
        yield server


@pytest.fixture
def proxy(llama: LlamaServer) -> Iterator[FaultProxy]:
    with FaultProxy(llama.url) as fronted:
        yield fronted


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "openai-api-key"
    path.write_text(API_KEY + "\n")
    return path


def remote(proxy: FaultProxy, key_file: Path, **extra: Any) -> dict[str, Any]:
    return {"base_url": proxy.url, "model": "smollm2", "api_key_file": str(key_file), "timeout_s": 30,
            "schema_format": "json_object",  # llama-cpp-python refuses OpenAI's json_schema shape (500)
            "circuit_failures": 3, "circuit_open_s": 30, **extra}


@pytest.fixture
def backend(start_agent: Callable[..., AgentProcess], broker: Broker, client: Client, proxy: FaultProxy,
            key_file: Path) -> AgentProcess:
    agent = start_agent(broker, client, model__backend="openai", openai=remote(proxy, key_file),
                        stats_interval_s=1)
    client.subscribe(agent.response_topic)
    return agent


def test_answers_streams_and_holds_a_schema_through_the_server(backend: AgentProcess, client: Client,
                                                                proxy: FaultProxy) -> None:
    answer = ask(client, backend, {"prompt": "Say hello.", "max_tokens": 16})
    assert answer["ok"] and answer["provider"] == "openai" and answer["model"] == "smollm2", answer
    assert answer["text"] and answer["usage"]["completion_tokens"] >= 1
    sent = proxy.requests[-1]
    assert {k.lower(): v for k, v in sent.headers.items()}["authorization"] == f"Bearer {API_KEY}"
    body = sent.json()
    assert body["model"] == "smollm2" and body["stream"] is True and body["max_tokens"] == 16
    assert body["messages"] == [{"role": "user", "content": "Say hello."}]

    client.publish(backend.request_topic, json.dumps({"id": "s1", "prompt": "Count to ten.",
                                                      "max_tokens": 32, "stream": True}))
    chunks, final = [], None
    while final is None:
        doc = client.wait_for(lambda d: d.get("id") == "s1", 60)
        if doc.get("done"):
            final = doc
        else:
            chunks.append(doc)
    assert [c["seq"] for c in chunks] == list(range(1, len(chunks) + 1)) and chunks
    assert "".join(c["delta"] for c in chunks) == final["text"]

    shaped = ask(client, backend, {"prompt": "Is the door open?", "max_tokens": 24, "response_format": DOOR_SCHEMA})
    assert shaped["ok"] and set(shaped["json"]) == {"open"} and isinstance(shaped["json"]["open"], bool), shaped
    assert proxy.requests[-1].json()["response_format"]["schema"]["required"] == ["open"]
    refused = ask(client, backend, {"prompt": "x", "response_format": {"type": "regex", "regex": "a+"}})
    assert refused["error"]["code"] == "unsupported"


def test_cancel_closes_the_upstream_stream(backend: AgentProcess, client: Client, proxy: FaultProxy) -> None:
    proxy.delay(0.0, per_chunk=0.1)  # a slow server: the cancel comes mid-answer
    client.publish(backend.request_topic, json.dumps({"id": "c1", "prompt": "Write a long story.",
                                                      "max_tokens": 64, "stream": True}))
    client.wait_for(lambda d: d.get("id") == "c1" and "seq" in d, 60)
    client.publish(f"{backend.prefix}/{backend.device_id}/cancel", json.dumps({"id": "c1"}))
    answer = client.wait_for(lambda d: d.get("id") == "c1" and d.get("done"), 30)
    assert answer["ok"] and answer["finish_reason"] == "cancelled"
    assert answer["usage"]["completion_tokens"] < 64
    before = proxy.count
    assert ask(client, backend, {"prompt": "Say hi.", "max_tokens": 4})["ok"]  # the server was freed at once
    assert proxy.count == before + 1


def test_images_go_as_data_urls_when_the_server_takes_them(
        start_agent: Callable[..., AgentProcess], broker: Broker, client: Client, proxy: FaultProxy,
        key_file: Path) -> None:
    agent = start_agent(broker, client, model__backend="openai", openai=remote(proxy, key_file, images=True),
                        limits__max_payload_bytes=1_000_000)
    client.subscribe(agent.response_topic)
    answer = ask(client, agent, {"prompt": "What is this?", "images": [base64.b64encode(_tiny_jpeg()).decode()],
                                 "max_tokens": 4}, timeout=60)
    parts = proxy.requests[-1].json()["messages"][-1]["content"]
    assert parts[0]["type"] == "image_url" and parts[0]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert parts[1] == {"type": "text", "text": "What is this?"}
    # SmolLM2 has no vision: the server says so, and that is an answer, not a hang
    assert answer["ok"] or answer["error"]["code"] in ("bad_request", "unavailable"), answer


def _tiny_jpeg() -> bytes:
    import cv2
    import numpy as np

    ok, data = cv2.imencode(".jpg", np.full((32, 32, 3), 120, np.uint8))
    assert ok
    return data.tobytes()


@pytest.mark.parametrize("fault,code,words", [
    (lambda p: p.refuse(), "unavailable", "not reachable"),
    (lambda p: p.status(503, {"error": {"message": "overloaded"}}), "unavailable", "answered 503: overloaded"),
    (lambda p: p.status(400, {"error": {"message": "too long"}}), "bad_request", "answered 400: too long"),
    (lambda p: p.garbage(), "internal", "not JSON"),
    # a stream cut short: by a clean close (closed the stream) or a reset (the connection broke)
    (lambda p: p.truncate(2), "unavailable", "closed the stream before it ended|connection to the server .* broke"),
    (lambda p: p.hang(), "timeout", "did not answer in time"),
    (lambda p: p.delay(10.0), "timeout", "did not answer in time"),
])
def test_a_failing_server_is_an_answer_within_the_deadline(backend: AgentProcess, client: Client, proxy: FaultProxy,
                                                          fault: Callable[[FaultProxy], None], code: str,
                                                          words: str) -> None:
    fault(proxy)
    started = time.monotonic()
    answer = ask(client, backend, {"prompt": "Say hello.", "max_tokens": 8, "timeout_s": 3}, timeout=30)
    assert not answer["ok"] and answer["error"]["code"] == code and re.search(words, answer["error"]["message"]), answer
    assert time.monotonic() - started < 3 + 2
    assert API_KEY not in json.dumps(answer)


def test_repeated_failures_open_the_circuit_and_a_good_server_closes_it(
        start_agent: Callable[..., AgentProcess], broker: Broker, client: Client, proxy: FaultProxy,
        key_file: Path) -> None:
    agent = start_agent(broker, client, model__backend="openai", stats_interval_s=1,
                        openai=remote(proxy, key_file, circuit_open_s=2))
    client.subscribe(agent.response_topic)
    proxy.status(502, {"error": "bad gateway"})
    for _ in range(3):
        assert ask(client, agent, {"prompt": "hi", "max_tokens": 2})["error"]["code"] == "unavailable"
    seen = proxy.count
    fast = ask(client, agent, {"prompt": "hi", "max_tokens": 2})
    assert fast["error"]["code"] == "unavailable" and "circuit open" in fast["error"]["message"]
    assert proxy.count == seen  # not even tried
    stats = next_stats(client.port, agent)
    assert stats["remote"]["circuit"] == "open" and stats["remote"]["circuit_opened"] == 1
    proxy.passthrough()
    time.sleep(2.2)
    assert ask(client, agent, {"prompt": "hi", "max_tokens": 2})["ok"]
    assert next_stats(client.port, agent)["remote"]["circuit"] == "closed"
    lines = [line for line in agent.log_lines() if line.get("event") == "openai.circuit_open"]
    assert len(lines) == 1


def test_status_and_providers_show_the_server_never_the_key(backend: AgentProcess, client: Client,
                                                            llama: LlamaServer) -> None:
    assert ask(client, backend, {"prompt": "hi", "max_tokens": 2})["ok"]
    status = retained_status(client.port, backend)
    assert status["backend"] == "openai" and status["provider"] == "openai" and status["model"] == "smollm2"
    assert status["remote"]["url"].startswith("http://127.0.0.1:") and status["remote"]["reachable"] is True
    report = subprocess.run([sys.executable, "-m", "edge_agent", "providers", "--json", "--config",
                             str(backend.config)], capture_output=True, text=True, cwd=REPO, timeout=120)
    servers = json.loads(report.stdout)["servers"]
    assert servers == [{"role": "backend", "url": servers[0]["url"], "model": "smollm2", "reachable": True,
                        "models": ["smollm2"]}]
    check = subprocess.run([sys.executable, "-m", "edge_agent", "check-config", "--config", str(backend.config)],
                           capture_output=True, text=True, cwd=REPO, timeout=60)
    everything = backend.log_path.read_text() + json.dumps(status) + report.stdout + check.stdout + check.stderr
    assert API_KEY not in everything


def test_overflow_takes_what_finds_the_queue_full_and_keeps_images_local(
        start_agent: Callable[..., AgentProcess], broker: Broker, client: Client, proxy: FaultProxy,
        key_file: Path, tmp_path: Path) -> None:
    agent = start_agent(broker, client, inference__max_batch=1, limits__queue_size=1, stats_interval_s=1,
                        env=fault_hooks_env(tmp_path / "hooks"),
                        overflow={**remote(proxy, key_file), "when": ["busy"]})
    client.subscribe(agent.response_topic)
    # o0 holds the one slot for a second; o1 takes the one queue place, o2..o4 overflow. o0 goes
    # alone first: sent in the same burst, all five sometimes came before the worker had taken o0
    # from the queue (o0 then held the queue place and o1..o4 overflowed).
    requests = [{"id": f"o{n}", "prompt": "SLOW hello" if n == 0 else "Say hi.", "max_tokens": 4} for n in range(5)]
    requests.append({"id": "img", "prompt": "What?", "max_tokens": 2,
                     "images": [base64.b64encode(_tiny_jpeg()).decode()]})
    client.publish(agent.request_topic, json.dumps(requests[0]))
    time.sleep(0.3)
    for request in requests[1:]:
        client.publish(agent.request_topic, json.dumps(request))
    answers: dict[str, dict[str, Any]] = {}
    while len(answers) < len(requests):
        doc = client.wait_for(lambda d: d.get("id") in {r["id"] for r in requests}, 90)
        answers[doc["id"]] = doc
    local = {rid for rid, a in answers.items() if a.get("provider") not in (None, "openai")}
    remote_ids = {rid for rid, a in answers.items() if a.get("provider") == "openai"}
    assert local == {"o0", "o1"}, answers  # the one running and the one waiting
    assert len(remote_ids) == 3 and all(answers[r]["ok"] for r in remote_ids), answers
    assert answers["img"]["error"]["code"] == "busy"  # frames and images stay local by default
    chats = [seen for seen in proxy.requests if seen.path.endswith("/chat/completions")]
    assert len(chats) == 3 and all(b"image_url" not in seen.body for seen in chats)
    assert next_stats(client.port, agent)["overflow"]["sent"]["busy"] == 3


def test_overflow_answers_while_the_local_model_loads(
        start_agent: Callable[..., AgentProcess], broker: Broker, client: Client, proxy: FaultProxy,
        key_file: Path, tmp_path: Path) -> None:
    agent = start_agent(broker, client, wait_ready=False, env=fault_hooks_env(tmp_path / "hooks", slow_load_s=8),
                        overflow={**remote(proxy, key_file), "when": ["unloaded"]})
    client.subscribe(agent.response_topic)
    client.wait_for(lambda d: d.get("device_id") == agent.device_id and d.get("state") == "starting", 30)
    early = ask(client, agent, {"prompt": "Say hi.", "max_tokens": 4}, timeout=30)
    assert early["ok"] and early["provider"] == "openai", early
    held = ask(client, agent, {"prompt": "What?", "max_tokens": 2,
                               "images": [base64.b64encode(_tiny_jpeg()).decode()]}, timeout=30)
    assert held["error"]["code"] == "unavailable" and "model is loading" in held["error"]["message"]
    client.wait_for(lambda d: d.get("device_id") == agent.device_id and d.get("state") == "ready", 60)
    later = ask(client, agent, {"prompt": "Say hi.", "max_tokens": 4})
    assert later["ok"] and later["provider"] == "cpu"
