"""An OpenAI-compatible chat-completions server (Ollama, llama.cpp, NIM, Azure AI, GitHub
Models) behind the same `Inference` boundary (work.handler) as the local model. The only module that imports
httpx: its errors become the agent's (`unavailable`, `timeout`, `internal`, `bad_request`) here.

Every request streams from the server (SSE), whatever the client asked: the text arrives as
it is made (our `stream` chunks), a cancel closes the connection (the server stops), and the
request's deadline is checked between chunks. A breaker opens after `circuit_failures` failures
in a row: requests are answered `unavailable` at once for `circuit_open_s`, then one tries.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

import httpx

from edge_agent.errors import AgentError, BadRequest, Internal, Timeout, Unavailable, Unsupported
from edge_agent.inference.types import FINISH_CANCELLED, FINISH_LENGTH, FINISH_STOP, Generation, Work
from edge_agent.log import get_logger
from edge_agent.settings.base import redact as shown_url  # the API key is never in a URL: it goes in a header
from edge_agent.settings.remote import CREDENTIAL_NAME, RemoteServerSettings

log = get_logger("openai")
PROVIDER = "openai"
PROBE_TIMEOUT_S = 5.0


def read_api_key(settings: RemoteServerSettings, environ: dict[str, str] | None = None) -> str | None:
    """From api_key_file, else the systemd credential `openai-api-key`, else none."""
    env = os.environ if environ is None else environ
    path = settings.api_key_file
    if path is None and env.get("CREDENTIALS_DIRECTORY"):
        candidate = Path(env["CREDENTIALS_DIRECTORY"]) / CREDENTIAL_NAME
        path = candidate if candidate.is_file() else None
    if path is None:
        return None
    try:
        key = path.read_text().strip()
    except OSError as exc:
        raise Unavailable(f"cannot read the API key file {path}: {exc.strerror or exc}") from None
    return key or None


class Breaker:
    """Failures in a row open it for `open_s`; then one request may try (half open)."""

    def __init__(self, failures: int, open_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._limit, self._open_s, self._clock = failures, open_s, clock
        self._lock = threading.Lock()
        self.failures = 0
        self.opened_at: float | None = None
        self.trial = False  # a request is trying the server while half open
        self.opened = 0  # times it opened, for the stats

    def state(self) -> str:
        with self._lock:
            if self.opened_at is None:
                return "closed"
            return "open" if self._clock() - self.opened_at < self._open_s else "half_open"

    def admit(self) -> None:
        """Raises Unavailable while open (and while another request tries the server)."""
        with self._lock:
            if self.opened_at is None:
                return
            left = self._open_s - (self._clock() - self.opened_at)
            if left > 0 or self.trial:
                raise Unavailable(f"the server failed {self.failures} times in a row; not trying it for "
                                  f"{max(left, 0):.0f} s more (circuit open)")
            self.trial = True

    def record(self, ok: bool) -> None:
        with self._lock:
            self.trial = False
            if ok:
                self.failures, self.opened_at = 0, None
                return
            self.failures += 1
            if self.failures >= self._limit and (self.opened_at is None or self._clock() - self.opened_at >= self._open_s):
                self.opened_at = self._clock()
                self.opened += 1
                log.warning("openai.circuit_open", failures=self.failures, open_s=self._open_s)


class OpenAIServer:
    """The `Inference` for a remote server; `load()` only looks at it (a server that is down now
    may be up by the first request: requests then say `unavailable`, the agent runs on)."""

    batching, batching_reason, batch_group = "remote", "the server schedules its own batches", 1

    def __init__(self, settings: RemoteServerSettings, role: str = "backend") -> None:
        self.settings = settings
        self.role = role  # "backend" or "overflow": in logs and errors
        self.url = shown_url(settings.base_url)
        self.name = settings.model
        self.provider = PROVIDER
        self.provider_reason = f"{role}: OpenAI-compatible server at {self.url}"
        self.supports_images = settings.images
        self.crashes = 0
        self.longest_s = settings.timeout_s
        self.breaker = Breaker(settings.circuit_failures, settings.circuit_open_s)
        self.reachable: bool | None = None
        self.last_error: str | None = None
        self._outcomes: dict[str, int] = {}  # requests to it by outcome ("ok" or an error code)
        self._outcomes_lock = threading.Lock()
        headers = {"Accept": "text/event-stream"}
        key = read_api_key(settings)
        if key:
            bearer = settings.api_key_header.lower() == "authorization"
            headers[settings.api_key_header] = f"Bearer {key}" if bearer else key
        verify: Any = str(settings.ca_file) if settings.ca_file else settings.verify_tls
        self._client = httpx.Client(base_url=settings.base_url, headers=headers, verify=verify,
                                    limits=httpx.Limits(max_connections=settings.max_in_flight,
                                                        max_keepalive_connections=settings.max_in_flight),
                                    timeout=httpx.Timeout(settings.timeout_s, connect=settings.connect_timeout_s))

    # --- the Inference boundary ------------------------------------------------------------
    def load(self) -> None:
        self.probe()
        log.info("openai.server", role=self.role, url=self.url, model=self.name, reachable=self.reachable,
                 error=self.last_error)

    def warm_up(self) -> Generation:
        return Generation("", FINISH_STOP, 0, 0, None, 0.0)

    def close(self) -> None:
        self._client.close()

    def submit(self, work: Work, on_token: Callable[[str], None] | None = None) -> RemoteRequest:
        return RemoteRequest(self, work, on_token)

    # --- health ------------------------------------------------------------------------
    def probe(self) -> dict[str, Any]:
        """GET /models: whether the server answers, and the model ids it lists."""
        try:
            response = self._client.get("/models", timeout=PROBE_TIMEOUT_S)
            response.raise_for_status()
            ids = [m.get("id") for m in response.json().get("data", []) if isinstance(m, dict)]
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            self.reachable, self.last_error = False, describe(exc)
            return {"reachable": False, "error": self.last_error}
        self.reachable, self.last_error = True, None
        return {"reachable": True, "models": ids}

    def outcomes(self) -> dict[str, int]:
        with self._outcomes_lock:
            return dict(self._outcomes)

    def count(self, outcome: str) -> None:
        with self._outcomes_lock:
            self._outcomes[outcome] = self._outcomes.get(outcome, 0) + 1

    def info(self) -> dict[str, Any]:
        return {"backend": PROVIDER, "role": self.role, "url": self.url, "model": self.name,
                "reachable": self.reachable, "circuit": self.breaker.state(),
                "circuit_opened": self.breaker.opened, "last_error": self.last_error}


class RemoteRequest:
    """One request to the server: `result()` runs it on the caller's thread; `cancel()` from
    any other thread closes the connection, and result() returns the text so far."""

    def __init__(self, server: OpenAIServer, work: Work, on_token: Callable[[str], None] | None) -> None:
        self._server, self._work, self._on_token = server, work, on_token
        self._lock = threading.Lock()
        self._response: httpx.Response | None = None
        self._cancelled = False

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            response = self._response
        if response is not None:
            response.close()  # the read in result() ends; the server sees the client leave

    def result(self) -> Generation:
        server = self._server
        try:
            server.breaker.admit()
        except AgentError as exc:
            server.count(exc.code.value)
            raise
        try:
            generation = self._run()
        except AgentError as exc:
            server_fault = not isinstance(exc, (BadRequest, Unsupported)) and not self._cancelled
            server.breaker.record(not server_fault)
            if server_fault:
                server.last_error = exc.message
            server.count(exc.code.value)
            raise
        server.breaker.record(True)
        server.reachable = True
        server.count("ok")
        return generation

    def _run(self) -> Generation:
        server = self._server
        self._started = time.monotonic()
        self._text: list[str] = []
        self._usage: dict[str, Any] = {}
        self._finish, self._ttft = "", None
        self._model: str | None = None
        try:
            with server._client.stream("POST", "/chat/completions", json=request_body(server.name, self._work, server.settings.schema_format),
                                       timeout=self._timeout(self._started)) as response:
                with self._lock:
                    if self._cancelled:
                        return self._generation()
                    self._response = response
                if response.status_code >= 400:
                    response.read()
                    raise status_error(response, server.url)
                if response.headers.get("content-type", "").startswith("application/json"):
                    self._whole(response)  # a server that does not stream: one JSON answer
                elif not self._stream(response) and not self._cancelled:
                    raise Unavailable(f"the server at {server.url} closed the stream before it ended "
                                      f"({len(self._text)} pieces received)")
        except httpx.TimeoutException as exc:
            raise Timeout(f"the server at {server.url} did not answer in time ({describe(exc)})") from None
        except (httpx.StreamClosed, httpx.ReadError, httpx.RemoteProtocolError) as exc:
            if not self._cancelled:
                raise Unavailable(f"the connection to the server at {server.url} broke: {describe(exc)}") from None
        except httpx.HTTPError as exc:
            raise Unavailable(f"the server at {server.url} is not reachable: {describe(exc)}") from None
        return self._generation()

    def _stream(self, response: httpx.Response) -> bool:
        """Reads the SSE chunks; True when the stream ended as it should (`[DONE]`, or a
        finish_reason: some servers end there)."""
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue  # comments (": ping"), event names, blank separators
            data = line[5:].strip()
            if data == "[DONE]":
                return True
            chunk = _json_object(data, "chunk")
            self._usage = chunk.get("usage") or self._usage
            self._model = chunk.get("model") or self._model
            for choice in chunk.get("choices") or []:
                self._add((choice.get("delta") or {}).get("content"), choice.get("finish_reason"))
            deadline = self._work.deadline
            if deadline is not None and time.monotonic() > deadline:
                raise Timeout("deadline passed while the server was answering")
        return bool(self._finish)

    def _whole(self, response: httpx.Response) -> None:
        answer = _json_object(response.read().decode("utf-8", "replace"), "answer")
        self._usage = answer.get("usage") or {}
        self._model = answer.get("model") or self._model
        choices = answer.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise Internal(f"the server's answer has no choices: {json.dumps(answer)[:120]}")
        self._add((choices[0].get("message") or {}).get("content"), choices[0].get("finish_reason") or "stop")

    def _add(self, delta: Any, finish_reason: Any) -> None:
        if isinstance(delta, str) and delta:
            if self._ttft is None:
                self._ttft = (time.monotonic() - self._started) * 1000
            self._text.append(delta)
            if self._on_token is not None:
                self._on_token(delta)
        if finish_reason:
            self._finish = FINISH_LENGTH if finish_reason == "length" else FINISH_STOP

    def _generation(self) -> Generation:
        finish = FINISH_CANCELLED if self._cancelled else (self._finish or FINISH_STOP)
        return Generation(text="".join(self._text), finish_reason=finish,
                          prompt_tokens=int(self._usage.get("prompt_tokens") or 0),
                          completion_tokens=int(self._usage.get("completion_tokens") or len(self._text)),
                          cached_tokens=cached_tokens(self._usage), ttft_ms=self._ttft,
                          generate_ms=(time.monotonic() - self._started) * 1000,
                          path="remote", model=self._model if isinstance(self._model, str) else None)

    def _timeout(self, started: float) -> httpx.Timeout:
        limit = self._server.settings.timeout_s
        if self._work.deadline is not None:
            limit = max(0.001, min(limit, self._work.deadline - started))
        return httpx.Timeout(limit, connect=min(limit, self._server.settings.connect_timeout_s))


def cached_tokens(usage: dict[str, Any]) -> int:
    """OpenAI's (and llama.cpp's) usage.prompt_tokens_details.cached_tokens; 0 where absent or odd."""
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return cached if isinstance(cached, int) and not isinstance(cached, bool) and cached >= 0 else 0


def _json_object(data: str, what: str) -> dict[str, Any]:
    """A chunk or answer as a JSON object; `Internal` for anything else."""
    try:
        value = json.loads(data)
    except ValueError:
        raise Internal(f"the server sent a {what} that is not JSON: {data[:80]!r}") from None
    if not isinstance(value, dict):
        raise Internal(f"the server sent a {what} that is not a JSON object: {data[:80]!r}")
    if "error" in value:
        message = value["error"].get("message") if isinstance(value["error"], dict) else value["error"]
        raise Unavailable(f"the server reported an error: {str(message)[:200]}")
    return value


def request_body(model: str, work: Work, schema_format: str = "json_schema") -> dict[str, Any]:
    params = work.params
    body: dict[str, Any] = {"model": model, "messages": chat_messages(work), "stream": True,
                            "stream_options": {"include_usage": True}, "max_tokens": params.max_new_tokens}
    if params.sampling:
        for key in ("temperature", "top_p"):
            if getattr(params, key) is not None:
                body[key] = getattr(params, key)
    else:
        body["temperature"] = 0.0  # greedy, like the local model without sampling fields
    if params.seed is not None:
        body["seed"] = params.seed
    if params.guidance is not None:
        body["response_format"] = openai_response_format(params.guidance.kind, params.guidance.data, schema_format)
    return body


def openai_response_format(kind: str, data: str, schema_format: str = "json_schema") -> dict[str, Any]:
    if kind != "json_schema":
        raise Unsupported(f"an OpenAI-compatible server takes response_format json_object and json_schema, "
                          f"not {'regex' if kind == 'regex' else 'lark'}")
    schema = json.loads(data)
    schema.pop("x-guidance", None)  # ORT GenAI's whitespace option, not JSON Schema
    if schema_format == "json_object":
        return {"type": "json_object", "schema": schema}
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


def chat_messages(work: Work) -> list[dict[str, Any]]:
    """Our messages; images go with the last user message as data URLs, before its text."""
    messages: list[dict[str, Any]] = [dict(m) for m in work.messages]
    if work.images:
        last = max(i for i, m in enumerate(messages) if m["role"] == "user")
        parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {
            "url": "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")}} for jpeg in work.images]
        messages[last] = {"role": "user", "content": [*parts, {"type": "text", "text": messages[last]["content"]}]}
    return messages


def status_error(response: httpx.Response, url: str) -> AgentError:
    """A 4xx/5xx answer, with the server's own words when it gave some."""
    try:
        detail = response.json()
        detail = detail.get("error", detail) if isinstance(detail, dict) else detail
        detail = detail.get("message", detail) if isinstance(detail, dict) else detail
    except ValueError:
        detail = response.text
    words = f"the server at {url} answered {response.status_code}: {str(detail)[:200]}"
    if response.status_code in (400, 413, 422):
        return BadRequest(words)  # the request itself (too long, bad format): another will do
    return Unavailable(words)  # 401/403 (the key), 404 (the model), 429, 5xx


def describe(exc: BaseException) -> str:
    return shown_url(f"{type(exc).__name__}: {exc}")[:200]
