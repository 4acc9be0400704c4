"""Pure logic of protocol.py: parsing limits, topic rules, and fuzzing of the parser."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st

from edge_agent.errors import ErrorCode
from edge_agent.protocol import (REQUEST_FIELDS, RequestError, RequestLimits, Topics, choose_reply_topic,
                                 encode, error_payload, parse_request, topic_matches)

LIMITS = RequestLimits(max_payload_bytes=65536, max_prompt_chars=2000, max_tokens_cap=256, max_timeout_s=60)


def parse(obj: object) -> object:
    return parse_request(json.dumps(obj).encode(), LIMITS)


def test_prompt_with_system_becomes_chat_messages() -> None:
    request = parse({"id": "a", "prompt": "hi", "system": "be kind", "max_tokens": 5, "timeout_s": 2})
    assert request.messages == ({"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"})
    assert request.max_tokens == 5 and request.timeout_s == 2


def test_unicode_prompt_is_kept() -> None:
    assert parse({"prompt": "Grüße, 世界 🌍"}).messages[0]["content"] == "Grüße, 世界 🌍"


def test_system_in_messages_and_field_is_refused() -> None:
    with pytest.raises(RequestError, match="system message may only come first"):
        parse({"system": "a", "messages": [{"role": "system", "content": "b"}, {"role": "user", "content": "c"}]})


def test_error_keeps_the_readable_id() -> None:
    with pytest.raises(RequestError) as info:
        parse({"id": "keep-me", "prompt": "x", "top_k": "many"})
    assert info.value.request_id == "keep-me" and info.value.code is ErrorCode.BAD_REQUEST


def test_topics() -> None:
    topics = Topics("edge-agent", "box1")
    assert (topics.request, topics.response, topics.status) == (
        "edge-agent/box1/request", "edge-agent/box1/response", "edge-agent/box1/status")


@pytest.mark.parametrize("pattern, topic, expected", [
    ("#", "a/b", True), ("a/+", "a/b", True), ("a/+", "a/b/c", False), ("a/#", "a", True),
    ("a/b", "a/b", True), ("a/b", "a/c", False), ("+/+", "a", False),
])
def test_topic_matches(pattern: str, topic: str, expected: bool) -> None:
    assert topic_matches(pattern, topic) is expected


def test_reply_topic_precedence_and_default() -> None:
    assert choose_reply_topic("p/1", "r/1", "d", ("#",)) == "p/1"
    assert choose_reply_topic(None, "r/1", "d", ("#",)) == "r/1"
    assert choose_reply_topic(None, None, "d", ()) == "d"


def test_error_payload_shape() -> None:
    doc = json.loads(error_payload("q", ErrorCode.BUSY, "full", retry_after_ms=1000))
    assert doc == {"id": "q", "ok": False, "error": {"code": "busy", "message": "full", "retry_after_ms": 1000}}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_any_bytes_parse_or_give_a_coded_error(payload: bytes) -> None:
    try:
        parse_request(payload, LIMITS)
    except RequestError as exc:
        assert exc.code in ErrorCode and exc.message


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(REQUEST_FIELDS) + ["extra"]), json_values, max_size=6))
def test_fuzz_request_objects_parse_or_give_a_coded_error(obj: dict) -> None:
    try:
        request = parse_request(encode(obj), LIMITS)
    except RequestError as exc:
        assert exc.code in (ErrorCode.BAD_REQUEST, ErrorCode.TOO_LARGE) and exc.message
        if isinstance(obj.get("id"), str) and 0 < len(obj["id"]) <= 128 and obj["id"].isprintable():
            assert exc.request_id == obj["id"]
    else:
        assert request.messages and request.messages[-1]["role"] == "user"
        assert request.max_tokens is None or 1 <= request.max_tokens <= LIMITS.max_tokens_cap
