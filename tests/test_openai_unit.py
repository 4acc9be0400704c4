"""Pure logic of the OpenAI-compatible backend: the circuit breaker, what is sent, how answers
and failures are read, the API key. The server itself is tested in test_openai_backend.py."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import pytest

from edge_agent.errors import BadRequest, Unavailable, Unsupported
from edge_agent.inference.types import GenerationParams, Guidance, Work
from edge_agent.inference.openai_client import (Breaker, cached_tokens, chat_messages, read_api_key, request_body,
                                                shown_url, status_error)
from edge_agent.work.overflow import Overflow
from edge_agent.protocol import Request
from edge_agent.settings.remote import OverflowSettings, RemoteServerSettings
from edge_agent.protocol.structured import parse_response_format


def test_breaker_opens_after_failures_in_a_row_then_lets_one_request_try() -> None:
    now = [0.0]
    breaker = Breaker(3, 30.0, clock=lambda: now[0])
    for _ in range(2):
        breaker.admit()
        breaker.record(False)
    breaker.admit()
    breaker.record(True)  # a success in between: the count starts over
    for _ in range(3):
        breaker.admit()
        breaker.record(False)
    assert breaker.state() == "open" and breaker.opened == 1
    with pytest.raises(Unavailable, match="circuit open"):
        breaker.admit()
    now[0] = 31.0
    assert breaker.state() == "half_open"
    breaker.admit()  # one request tries...
    with pytest.raises(Unavailable):
        breaker.admit()  # ...the others still wait for it
    breaker.record(False)  # it failed: open again for another 30 s
    assert breaker.state() == "open" and breaker.opened == 2
    now[0] = 62.0
    breaker.admit()
    breaker.record(True)
    assert breaker.state() == "closed" and breaker.failures == 0


def _work(**params: object) -> Work:
    return Work(({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Door?"}),
                GenerationParams(max_new_tokens=16, **params))  # type: ignore[arg-type]


def test_request_body_is_greedy_streamed_and_carries_the_format() -> None:
    body = request_body("phi3.5", _work())
    assert body["model"] == "phi3.5" and body["stream"] is True and body["max_tokens"] == 16
    assert body["temperature"] == 0.0 and "top_p" not in body  # greedy, like the local model
    assert body["stream_options"] == {"include_usage": True}
    sampled = request_body("m", _work(temperature=0.7, top_p=0.9, seed=5))
    assert (sampled["temperature"], sampled["top_p"], sampled["seed"]) == (0.7, 0.9, 5)
    fmt = parse_response_format({"type": "json_schema", "json_schema": {"name": "door", "schema": {
        "type": "object", "properties": {"open": {"type": "boolean"}}, "required": ["open"]}}})
    assert fmt is not None
    body = request_body("m", _work(guidance=Guidance(fmt.kind, fmt.data, True)))
    sent = body["response_format"]
    assert sent["type"] == "json_schema" and sent["json_schema"]["schema"]["properties"] == {"open": {"type": "boolean"}}
    assert "x-guidance" not in sent["json_schema"]["schema"]
    llama = request_body("m", _work(guidance=Guidance(fmt.kind, fmt.data, True)), "json_object")["response_format"]
    assert llama == {"type": "json_object", "schema": sent["json_schema"]["schema"]}
    regex = parse_response_format({"type": "regex", "regex": "(yes|no)"})
    assert regex is not None
    with pytest.raises(Unsupported, match="not regex"):
        request_body("m", _work(guidance=Guidance(regex.kind, regex.data, False)))


def test_images_go_with_the_last_user_message_as_data_urls() -> None:
    work = Work(({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                 {"role": "user", "content": "What is this?"}), GenerationParams(8), images=(b"\xff\xd8jpeg",))
    messages = chat_messages(work)
    assert messages[0] == {"role": "user", "content": "Hi"}
    image, text = messages[2]["content"]
    assert text == {"type": "text", "text": "What is this?"}
    assert image["image_url"]["url"] == "data:image/jpeg;base64," + base64.b64encode(b"\xff\xd8jpeg").decode()


@pytest.mark.parametrize("status,body,error,words", [
    (400, {"error": {"message": "context too long"}}, BadRequest, "answered 400: context too long"),
    (401, {"error": "bad key"}, Unavailable, "answered 401: bad key"),
    (404, {"detail": "no model"}, Unavailable, "answered 404: {'detail': 'no model'}"),
    (503, "<html>down</html>", Unavailable, "answered 503: <html>down</html>"),
])
def test_status_errors_keep_the_servers_words(status: int, body: object, error: type, words: str) -> None:
    response = httpx.Response(status, **({"json": body} if not isinstance(body, str) else {"text": body}))
    exc = status_error(response, "http://gpu:8080/v1")
    assert type(exc) is error and words in exc.message


def test_api_key_from_file_then_systemd_credential_never_in_the_url(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("sk-secret\n")
    assert read_api_key(RemoteServerSettings(api_key_file=key_file), {}) == "sk-secret"
    (tmp_path / "openai-api-key").write_text("sk-cred")
    assert read_api_key(RemoteServerSettings(), {"CREDENTIALS_DIRECTORY": str(tmp_path)}) == "sk-cred"
    assert read_api_key(RemoteServerSettings(), {}) is None
    with pytest.raises(Unavailable, match="cannot read the API key file"):
        read_api_key(RemoteServerSettings(api_key_file=tmp_path / "missing"), {})
    assert shown_url("https://user:pw@gpu.lan/v1") == "https://***@gpu.lan/v1"


def test_overflow_keeps_images_and_templates_local_as_configured() -> None:
    overflow = Overflow.__new__(Overflow)
    overflow.settings = OverflowSettings(base_url="http://gpu:8080/v1", model="m", when=("busy",))
    plain = Request(id="a", messages=({"role": "user", "content": "x"},))
    camera = Request(id="b", messages=plain.messages, cameras=("front",))
    templated = Request(id="c", messages=plain.messages, template="door")
    assert overflow.refusal(plain, "busy") is None
    assert "overflow.when" in str(overflow.refusal(plain, "unloaded"))
    assert "allow_images" in str(overflow.refusal(camera, "busy"))
    assert overflow.refusal(templated, "busy") is None
    overflow.settings = OverflowSettings(base_url="http://gpu:8080/v1", model="m", allow_images=True,
                                         allow_templates=False)
    assert overflow.refusal(camera, "busy") is None
    assert "allow_templates" in str(overflow.refusal(templated, "busy"))


def test_cached_tokens_are_read_from_the_servers_usage_where_present() -> None:
    # OpenAI and llama.cpp: usage.prompt_tokens_details.cached_tokens
    assert cached_tokens({"prompt_tokens": 40, "prompt_tokens_details": {"cached_tokens": 32}}) == 32
    assert cached_tokens({"prompt_tokens": 40}) == 0
    for odd in (None, "32", -1, True, [32]):
        assert cached_tokens({"prompt_tokens_details": {"cached_tokens": odd}}) == 0, odd
    assert cached_tokens({"prompt_tokens_details": "32"}) == 0
