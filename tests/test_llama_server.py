"""The harness itself, against the real llama-cpp-python server: what an OpenAI-compatible
backend really answers (shapes, streaming, constrained JSON, auth), and that each FaultProxy
mode does what it says. Timings are printed at the end of the module."""

from __future__ import annotations

import http.client
import json
import socket
import statistics
import time
from contextlib import closing
from typing import Any, Iterator
from urllib.parse import urlsplit

import pytest

from llama_server import FaultProxy, LlamaServer, ensure_server_venv, server_stamp

pytestmark = pytest.mark.slow

HTTP_TIMEOUT_S = 120.0
COUNTING = [{"role": "user", "content": "Count from 1 to 100, separated by commas."}]
HELLO = [{"role": "user", "content": "Say hello."}]
PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
PERSON_PROMPT = [{"role": "user", "content": "Invent a person. Answer in JSON with a name and an age."}]


# ---- a small stdlib client, so the proof does not lean on what the product will use -----------

class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return json.loads(self.body)


def _connect(url: str, timeout: float = HTTP_TIMEOUT_S) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)


def call(url: str, body: dict | None = None, *, headers: dict[str, str] | None = None,
         timeout: float = HTTP_TIMEOUT_S, conn: http.client.HTTPConnection | None = None) -> Answer:
    """POST `body` as JSON to `url` (GET when None); a kept-alive `conn` may be passed."""
    own = conn is None
    conn = conn or _connect(url, timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        sent = {"Content-Type": "application/json", **(headers or {})}
        conn.request("GET" if body is None else "POST", urlsplit(url).path, body=data, headers=sent)
        response = conn.getresponse()
        return Answer(response.status, dict(response.getheaders()), response.read())
    finally:
        if own:
            conn.close()


def chat(base: str, messages: list[dict], **params: Any) -> dict:
    """A non-streaming chat completion (greedy unless told); asserts HTTP 200."""
    answer = call(f"{base}/chat/completions", {"messages": messages, "temperature": 0, **params})
    assert answer.status == 200, answer.body
    return answer.json()


class Stream:
    """A streaming answer as read: status, each non-empty line with the seconds since the
    request went out, and the error that ended the read early (None if it ended cleanly)."""

    def __init__(self) -> None:
        self.status = 0
        self.lines: list[tuple[float, str]] = []
        self.error: Exception | None = None

    @property
    def payloads(self) -> list[str]:
        return [line[len("data:"):].strip() for _, line in self.lines if line.startswith("data:")]

    def chunks(self) -> list[dict]:
        """The chunk objects of a stream that ended with `data: [DONE]`."""
        assert self.error is None, self.error
        assert self.payloads and self.payloads[-1] == "[DONE]", self.payloads[-3:]
        return [json.loads(p) for p in self.payloads[:-1]]


def stream(base: str, messages: list[dict], *, timeout: float = HTTP_TIMEOUT_S, **params: Any) -> Stream:
    """A streaming chat completion (greedy unless told), read line by line as it arrives."""
    found = Stream()
    conn = _connect(base, timeout)
    started = time.monotonic()
    try:
        body = {"messages": messages, "temperature": 0, "stream": True, **params}
        conn.request("POST", f"{urlsplit(base).path}/chat/completions", body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        found.status = response.status
        while line := response.readline():
            if text := line.decode().rstrip("\r\n"):
                found.lines.append((time.monotonic() - started, text))
    except (OSError, http.client.HTTPException) as exc:
        found.error = exc
    finally:
        conn.close()
    return found


# ---- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def timings(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """Name -> measured value; written to the terminal when the module is done."""
    found: dict[str, str] = {}
    yield found
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():  # what capsys.disabled() does, module-wide
        print("\n\nllama-cpp-python server timings:")
        for name, value in found.items():
            print(f"  {name:<40} {value}")


@pytest.fixture(scope="module")
def server(timings: dict[str, str]) -> Iterator[LlamaServer]:
    started = time.monotonic()
    ensure_server_venv()
    took = time.monotonic() - started
    stamp = server_stamp()
    timings["venv build"] = (f"{took:.1f} s (now)" if took > 5 else
                             f"cached ({stamp.get('build_s')} s when built, python {stamp.get('python')})")
    srv = LlamaServer()  # extracts the GGUF the first time
    try:
        timings["server start (to /v1/models 200)"] = f"{srv.start():.2f} s"
        yield srv
    finally:
        srv.close()


@pytest.fixture
def proxy(server: LlamaServer) -> Iterator[FaultProxy]:
    with FaultProxy(server.url) as p:
        yield p


@pytest.fixture(scope="module")
def keyed_server() -> Iterator[LlamaServer]:
    with LlamaServer(api_key="sk-edge-test") as srv:
        yield srv


# ---- the server: what an OpenAI-compatible backend answers -------------------------------------

def test_chat_completion_answers_with_usage(server: LlamaServer, timings: dict[str, str]) -> None:
    started = time.monotonic()
    answer = chat(server.url, COUNTING, model=server.model_id, max_tokens=32)
    timings["32-token completion"] = f"{time.monotonic() - started:.2f} s"
    assert answer["object"] == "chat.completion"
    assert answer["model"] == server.model_id  # the model asked for is echoed back
    choice = answer["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str) and choice["message"]["content"]
    assert choice["finish_reason"] == "length"
    usage = answer["usage"]
    assert usage["completion_tokens"] == 32
    assert usage["total_tokens"] == usage["prompt_tokens"] + 32


def test_without_model_the_answer_names_the_gguf_path(server: LlamaServer) -> None:
    # Surprising: the alias is what /v1/models lists, yet an answer to a request without
    # "model" names the file; any other name is accepted and echoed (one model served).
    assert chat(server.url, HELLO, max_tokens=2)["model"] == str(server.gguf)
    assert chat(server.url, HELLO, model="gpt-4o", max_tokens=2)["model"] == "gpt-4o"


def test_stream_gives_chunk_deltas_ending_with_done(server: LlamaServer) -> None:
    found = stream(server.url, COUNTING, max_tokens=8, stream_options={"include_usage": True})
    assert found.status == 200
    chunks = found.chunks()
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    # role alone first, then one content delta per token, then an empty delta with the reason
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    contents = [c["choices"][0]["delta"]["content"] for c in chunks[1:-1]]
    assert len(contents) == 8 and "".join(contents)
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    # No usage in a stream, even when asked for with stream_options.include_usage.
    assert not any("usage" in c for c in chunks)


def test_json_object_with_schema_is_constrained(server: LlamaServer) -> None:
    answer = chat(server.url, PERSON_PROMPT, max_tokens=100,
                  response_format={"type": "json_object", "schema": PERSON_SCHEMA})
    assert answer["choices"][0]["finish_reason"] == "stop"
    person = json.loads(answer["choices"][0]["message"]["content"])
    assert set(person) == {"name", "age"}
    assert isinstance(person["name"], str) and isinstance(person["age"], int)


def test_openai_json_schema_shape_is_refused_with_500(server: LlamaServer) -> None:
    body = {"messages": PERSON_PROMPT, "max_tokens": 100,
            "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA}}}
    answer = call(f"{server.url}/chat/completions", body)
    # A request validation error, yet 500 (not 400/422), in OpenAI's error shape.
    assert answer.status == 500
    error = answer.json()["error"]
    assert error["type"] == "internal_server_error"
    assert "Input should be 'text' or 'json_object'" in error["message"]


def test_models_lists_the_alias(server: LlamaServer) -> None:
    answer = call(f"{server.url}/models")
    assert answer.status == 200
    models = answer.json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [server.model_id]


def test_api_key_is_required_when_set(keyed_server: LlamaServer) -> None:
    url = f"{keyed_server.url}/chat/completions"
    body = {"messages": HELLO, "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": keyed_server.api_key or ""}):
        refused = call(url, body, headers=headers)
        assert refused.status == 401
        assert refused.json() == {"detail": "Invalid API key"}  # FastAPI's shape, not OpenAI's
    assert call(f"{keyed_server.url}/models").status == 401
    assert call(url, body, headers=keyed_server.headers()).status == 200


def test_error_shapes(server: LlamaServer) -> None:
    too_long = [{"role": "user", "content": "word " * 3000}]
    answer = call(f"{server.url}/chat/completions", {"messages": too_long, "max_tokens": 3})
    assert answer.status == 400
    assert answer.json()["error"]["code"] == "context_length_exceeded"
    assert answer.json()["error"]["type"] == "invalid_request_error"
    # The same in a stream: 200, an event-stream that ends cleanly with no event and no [DONE].
    found = stream(server.url, too_long, max_tokens=3)
    assert (found.status, found.lines, found.error) == (200, [], None)
    # Content parts (an image) break this model's chat template: 500.
    image = [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]
    answer = call(f"{server.url}/chat/completions", {"messages": image, "max_tokens": 3})
    assert answer.status == 500 and answer.json()["error"]["type"] == "internal_server_error"
    # An unknown path: FastAPI's shape.
    assert call(f"{server.url}/nothing", {}).json() == {"detail": "Not Found"}


def test_a_client_leaving_mid_stream_stops_the_generation(server: LlamaServer) -> None:
    story = [{"role": "user", "content": "Write a long story about a dragon."}]
    conn = _connect(server.url)
    conn.request("POST", "/v1/chat/completions", headers={"Content-Type": "application/json"},
                 body=json.dumps({"messages": story, "max_tokens": 400, "temperature": 0, "stream": True}))
    response = conn.getresponse()
    events = 0
    while events < 3:
        events += response.readline().startswith(b"data:")
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    # 400 tokens take several seconds; the server is free again at once.
    started = time.monotonic()
    chat(server.url, HELLO, max_tokens=1)
    assert time.monotonic() - started < 2.0
    assert "Disconnected from client" in server.log()


# ---- the proxy --------------------------------------------------------------------------------

def test_proxy_passes_through_and_records(server: LlamaServer, proxy: FaultProxy) -> None:
    response_format = {"type": "json_object", "schema": PERSON_SCHEMA}
    answer = chat(proxy.url, PERSON_PROMPT, max_tokens=100, response_format=response_format)
    assert set(json.loads(answer["choices"][0]["message"]["content"])) == {"name", "age"}
    image = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ"}}]}]
    assert call(f"{proxy.url}/chat/completions", {"messages": image}).status == 500
    assert call(f"{proxy.url}/models").json()["data"][0]["id"] == server.model_id
    assert proxy.count == 3
    first, second, third = proxy.requests
    assert (first.method, first.path) == ("POST", "/v1/chat/completions")
    assert first.json()["response_format"] == response_format
    assert second.json()["messages"][0]["content"][0]["image_url"]["url"] == "data:image/jpeg;base64,/9j/4AAQ"
    assert (third.method, third.path, third.body) == ("GET", "/v1/models", b"")
    proxy.reset()
    assert proxy.requests == []


def test_proxy_streams_event_by_event(server: LlamaServer, proxy: FaultProxy) -> None:
    direct = stream(server.url, COUNTING, max_tokens=32).chunks()
    proxied = stream(proxy.url, COUNTING, max_tokens=32)
    assert [c["choices"] for c in proxied.chunks()] == [c["choices"] for c in direct]
    # Not buffered: the first token arrives long before the last.
    times = [t for t, _ in proxied.lines]
    assert times[-1] - times[1] > 0.1, times


def test_proxy_delays_headers_and_chunks(proxy: FaultProxy) -> None:
    proxy.delay(0.5)
    started = time.monotonic()
    chat(proxy.url, HELLO, max_tokens=1)
    assert time.monotonic() - started >= 0.5
    proxy.delay(0.0, per_chunk=0.2)
    found = stream(proxy.url, HELLO, max_tokens=3)
    assert len(found.chunks()) == 5  # role, 3 tokens, finish
    gaps = [b - a for (a, _), (b, _) in zip(found.lines, found.lines[1:])]
    assert min(gaps) >= 0.15, gaps


def test_proxy_answers_a_status_without_forwarding(proxy: FaultProxy) -> None:
    proxy.status(429, headers={"Retry-After": "2"})
    answer = call(f"{proxy.url}/chat/completions", {"messages": HELLO})
    assert answer.status == 429 and answer.headers["Retry-After"] == "2"
    assert answer.json()["error"]["code"] == 429
    proxy.status(503, "overloaded")
    answer = call(f"{proxy.url}/chat/completions", {"messages": HELLO})
    assert (answer.status, answer.body) == (503, b"overloaded")
    assert proxy.count == 2


def test_proxy_garbage(proxy: FaultProxy) -> None:
    proxy.garbage()
    answer = call(f"{proxy.url}/chat/completions", {"messages": HELLO})
    assert answer.status == 200 and answer.headers["Content-Type"] == "application/json"
    with pytest.raises(ValueError):
        answer.json()
    found = stream(proxy.url, HELLO)
    assert found.status == 200 and found.error is None
    assert "[DONE]" not in found.payloads
    with pytest.raises(ValueError):
        json.loads(found.payloads[0])
    assert found.lines[-1][1] == "this is not server-sent events"


def test_proxy_truncates_after_chunks(server: LlamaServer, proxy: FaultProxy) -> None:
    proxy.truncate(3)
    found = stream(proxy.url, COUNTING, max_tokens=64)
    assert found.status == 200 and len(found.payloads) == 3
    assert isinstance(found.error, (ConnectionResetError, http.client.IncompleteRead)), found.error
    # a whole answer: headers, half the body, reset
    with pytest.raises((ConnectionResetError, http.client.IncompleteRead)):
        call(f"{proxy.url}/chat/completions", {"messages": HELLO, "max_tokens": 4})
    proxy.passthrough()
    assert chat(proxy.url, HELLO, max_tokens=1)["choices"]


def test_proxy_hangs(proxy: FaultProxy) -> None:
    proxy.hang()
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        call(f"{proxy.url}/chat/completions", {"messages": HELLO}, timeout=0.5)
    assert time.monotonic() - started < 2.0
    assert proxy.count == 1


def test_proxy_refuses_then_listens_again(proxy: FaultProxy) -> None:
    with closing(_connect(proxy.url)) as kept:  # a kept-alive connection is dropped too
        kept.request("GET", "/v1/models")
        assert kept.getresponse().read()
        proxy.refuse()
        with pytest.raises((ConnectionError, http.client.RemoteDisconnected)):
            kept.request("GET", "/v1/models")
            kept.getresponse()
    with pytest.raises(ConnectionRefusedError):
        call(f"{proxy.url}/models")
    proxy.passthrough()
    assert call(f"{proxy.url}/models").status == 200


def test_round_trip_direct_vs_proxy(server: LlamaServer, proxy: FaultProxy, timings: dict[str, str]) -> None:
    body = {"messages": HELLO, "max_tokens": 1, "temperature": 0}
    p50 = {}
    for name, base in (("direct", server.url), ("proxy", proxy.url)):
        with closing(_connect(base)) as conn:  # kept alive, as an OpenAI client does
            took = []
            for _ in range(50):
                started = time.monotonic()
                assert call(f"{base}/chat/completions", body, conn=conn).status == 200
                took.append(time.monotonic() - started)
        p50[name] = statistics.median(took)
        timings[f"max_tokens=1 round trip p50, {name}"] = f"{p50[name] * 1000:.1f} ms"
    # Same prompt each time: the server reuses its cached prefix, so this is mostly HTTP. The
    # proxy adds well under a millisecond; 40 ms more would be Nagle meeting delayed ACKs.
    assert p50["proxy"] < p50["direct"] + 0.02
