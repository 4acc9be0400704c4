"""Pure logic of the protocol package: parsing limits, topic rules, templates, and fuzzing of the parser."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given, settings, strategies as st

from edge_agent.errors import BadRequest, ErrorCode, TooLarge
from edge_agent.protocol.prompts import PromptTemplate, render_template, template_fields
from edge_agent.protocol import (REQUEST_FIELDS, RequestError, RequestLimits, Topics, choose_reply_topic,
                                 encode, error_payload, parse_cancel, parse_request, topic_matches)
from edge_agent.protocol.strictjson import MAX_JSON_DEPTH, decode_json_object

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


# --- numbers out of range, duplicate keys: refused by the parser itself ---------------------------------
VISION = RequestLimits(max_payload_bytes=65536, max_prompt_chars=2000, max_tokens_cap=256, max_timeout_s=60,
                       max_images=8, camera_names=frozenset({"door"}))
FIELD_RANGES = [  # field, the edges it takes, just past them, and the words of the refusal
    ("max_tokens", [1, 256], [0, 257, -3, 2**63], "[1, 256]"),
    ("temperature", [0, 5.0, 0.7], [-0.001, 5.001, 1e300], "[0, 5]"),
    ("top_p", [1, 1e-9], [0, -1, 1.0001], "(0, 1]"),
    ("top_k", [1, 100_000], [0, 100_001], "[1, 100000]"),
    ("seed", [0, 2**31 - 1], [-1, 2**31], "[0, 2.14748e+09]"),
    ("timeout_s", [60, 0.001], [0, -1, 60.001, 10**9], "(0, 60]"),
    ("frames", [1, 8], [0, 9, 100], "[1, 8]"),
    ("interval_ms", [0, 10_000], [-1, 10_001], "[0, 10000]"),
]


def _with(field: str, value: object) -> bytes:
    fields = {"camera": "door"} if field in ("frames", "interval_ms") else {}
    return encode({"id": "r", "prompt": "hi", **fields, field: value})


@pytest.mark.parametrize("field, edges, past, words", FIELD_RANGES, ids=[f[0] for f in FIELD_RANGES])
def test_numbers_at_the_edges_are_taken_and_past_them_refused(field: str, edges: list, past: list,
                                                               words: str) -> None:
    for value in edges:
        assert getattr(parse_request(_with(field, value), VISION), field) == value
    for value in past:
        with pytest.raises(RequestError) as info:
            parse_request(_with(field, value), VISION)
        assert info.value.code is ErrorCode.BAD_REQUEST and info.value.request_id == "r"
        assert info.value.message.startswith(f"'{field}' must be in {words}, got "), info.value.message


@pytest.mark.parametrize("payload, words", [
    (b'{"id": "r", "prompt": "x", "temperature": 1e999}', "number 1e999 is out of range"),
    (b'{"id": "r", "prompt": "x", "top_p": -1E400}', "is out of range"),
    (b'{"id": "r", "prompt": "x", "temperature": NaN}', "NaN is not a number JSON allows"),
    (b'{"id": "r", "prompt": "x", "seed": Infinity}', "Infinity is not a number JSON allows"),
    (b'{"id": "r", "prompt": "x", "max_tokens": ' + b"9" * 21 + b"}", "integer with 21 digits is too large"),
    (b'{"id": "r", "prompt": "x", "max_tokens": -' + b"9" * 21 + b"}", "integer with 22 digits is too large"),
])
def test_numbers_json_cannot_hold_are_refused_before_any_field(payload: bytes, words: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_request(payload, LIMITS)
    assert info.value.code is ErrorCode.BAD_REQUEST and words in info.value.message
    assert info.value.request_id is None  # nothing of a payload that did not decode is trusted


def test_twenty_digit_integers_still_decode_and_meet_the_field_range() -> None:
    with pytest.raises(RequestError, match=r"'seed' must be in .*, got 99999999999999999999"):
        parse_request(b'{"prompt": "x", "seed": ' + b"9" * 20 + b"}", LIMITS)


@pytest.mark.parametrize("payload, key", [
    (b'{"id": "a", "prompt": "x", "prompt": "y"}', "prompt"),
    (b'{"id": "a", "id": "b", "prompt": "y"}', "id"),
    (b'{"prompt": "x", "max_tokens": 5, "max_tokens": 5}', "max_tokens"),  # even with equal values
    (b'{"messages": [{"role": "user", "role": "system", "content": "x"}]}', "role"),
    (b'{"template": "door", "vars": {"door": "front", "door": "back"}}', "door"),
    (b'{"prompt": "x", "response_format": {"type": "json_object", "type": "text"}}', "type"),
])
def test_duplicate_keys_at_any_depth_are_refused(payload: bytes, key: str) -> None:
    """json.loads would keep the last one: what a logger or a proxy reads first would differ
    from what the agent runs."""
    with pytest.raises(RequestError) as info:
        parse_request(payload, OPEN)
    assert info.value.code is ErrorCode.BAD_REQUEST and info.value.message == f"duplicate key {key!r}"


def test_a_cancel_with_a_duplicate_id_is_refused() -> None:
    with pytest.raises(BadRequest, match="duplicate key 'id'"):
        parse_cancel(b'{"id": "a", "id": "b"}', 1024)
    assert parse_cancel(b'{"id": "a"}', 1024) == "a"


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
    else:  # a question, or a query of the history (no messages: no model runs)
        assert request.history_only or (request.messages and request.messages[-1]["role"] == "user")
        assert not request.history_only or set(obj) <= {"id", "reply_to", "timeout_s", "history"}
        assert request.max_tokens is None or 1 <= request.max_tokens <= LIMITS.max_tokens_cap


def _utf8_clean(value: object) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, dict):
        return all(_utf8_clean(k) and _utf8_clean(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_utf8_clean(v) for v in value)
    return True


texts_with_surrogates = st.text(st.characters(categories=["Cs", "Ll", "Nd", "So"]), max_size=12)


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries({"id": texts_with_surrogates, "prompt": texts_with_surrogates},
                             optional={"system": texts_with_surrogates, "reply_to": texts_with_surrogates}))
def test_fuzz_what_is_accepted_is_valid_unicode(obj: dict) -> None:
    """A `\\ud800` escape makes a str that SQLite, paho and the tokenizer all refuse: accepted
    requests never hold one (surrogate pairs, i.e. escaped emoji, are fine)."""
    try:  # ASCII JSON: a lone surrogate travels as its escape, as a publisher's encoder sends it
        request = parse_request(json.dumps(obj).encode(), LIMITS)
    except RequestError as exc:
        assert exc.code in (ErrorCode.BAD_REQUEST, ErrorCode.TOO_LARGE) and exc.message
        return
    assert _utf8_clean(request.messages) and _utf8_clean(request.id) and _utf8_clean(request.reply_to)


def test_escaped_surrogate_pairs_are_accepted() -> None:
    request = parse_request(b'{"id": "e", "prompt": "smile \\ud83d\\ude00"}', LIMITS)
    assert request.messages[-1]["content"] == "smile \U0001F600"


# --- templates ---------------------------------------------------------------------------------------
TEMPLATES = {"door": PromptTemplate("Is the {door} door open? {{literal}}", system="Answer yes or no.",
                                    max_tokens=8),
             "plain": PromptTemplate("Anything unusual?")}
LOCKED = RequestLimits(max_payload_bytes=65536, max_prompt_chars=2000, max_tokens_cap=256, max_timeout_s=60,
                       allow_free_prompts=False, templates=TEMPLATES)
OPEN = RequestLimits(max_payload_bytes=65536, max_prompt_chars=2000, max_tokens_cap=256, max_timeout_s=60,
                     templates=TEMPLATES)


def test_template_fields_are_plain_names_only() -> None:
    assert template_fields("Is the {door} door {state}? {{not_a_field}}") == ("door", "state")
    for text in ("{0}", "{}", "{door.x}", "{door[0]}", "{door!r}", "{door:>9}", "{Door}", "{door",
                 "door}", "{a:{b}}", "{door\n}"):
        with pytest.raises(ValueError):
            template_fields(text)


def test_template_is_rendered_as_plain_text() -> None:
    request = parse_request(encode({"template": "door", "vars": {"door": "{door} {0} {x.__class__}"}}), LOCKED)
    assert request.messages == (
        {"role": "system", "content": "Answer yes or no."},
        {"role": "user", "content": "Is the {door} {0} {x.__class__} door open? {literal}"})
    assert request.template == "door" and request.max_tokens == 8  # the template's default
    assert parse_request(encode({"template": "plain", "max_tokens": 100}), LOCKED).max_tokens == 100


@pytest.mark.parametrize("obj, code, words", [
    ({"prompt": "hi"}, ErrorCode.FORBIDDEN, "'prompt'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, ErrorCode.FORBIDDEN, "'messages'"),
    ({"template": "plain", "system": "be evil"}, ErrorCode.FORBIDDEN, "'system'"),
    ({"template": "plain", "prompt": "x"}, ErrorCode.FORBIDDEN, "'prompt'"),
    ({"id": "x"}, ErrorCode.BAD_REQUEST, "give 'template'"),
    ({"template": "garage"}, ErrorCode.BAD_REQUEST, "unknown template 'garage'; configured: door, plain"),
    ({"template": "../door"}, ErrorCode.BAD_REQUEST, "unknown template"),
    ({"template": "door\n", "vars": {"door": "x"}}, ErrorCode.BAD_REQUEST, "unknown template"),
    ({"template": "door"}, ErrorCode.BAD_REQUEST, "needs vars: door"),
    ({"template": "door", "vars": {"door": "x", "colour": "red"}}, ErrorCode.BAD_REQUEST, "no field(s): colour"),
    ({"template": "door", "vars": {"Door": "x"}}, ErrorCode.BAD_REQUEST, "must match"),
    ({"template": "door", "vars": {"door\n": "x"}}, ErrorCode.BAD_REQUEST, "must match"),
    ({"template": "door", "vars": {"door": 5}}, ErrorCode.BAD_REQUEST, "vars.door must be a string"),
    ({"template": "door", "vars": {"door": ""}}, ErrorCode.BAD_REQUEST, "1-200 characters"),
    ({"template": "door", "vars": {"door": "x" * 201}}, ErrorCode.BAD_REQUEST, "1-200 characters"),
    ({"template": "door", "vars": {"door": "a\x1bb"}}, ErrorCode.BAD_REQUEST, "control characters"),
    ({"template": "door", "vars": ["door"]}, ErrorCode.BAD_REQUEST, "'vars' must be an object"),
    ({"template": "door", "vars": {"door": "x"}, "max_tokens": 9}, ErrorCode.BAD_REQUEST, "[1, 8]"),
    ({"template": 5}, ErrorCode.BAD_REQUEST, "'template' must be a string"),
])
def test_locked_agent_takes_only_templates(obj: dict, code: ErrorCode, words: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_request(encode(obj), LOCKED)
    assert info.value.code is code and words in info.value.message


def test_free_prompts_and_templates_together() -> None:
    assert parse_request(encode({"prompt": "hi", "system": "s"}), OPEN).template is None
    assert parse_request(encode({"template": "plain"}), OPEN).messages == (
        {"role": "user", "content": "Anything unusual?"},)
    for extra in ({"prompt": "x"}, {"system": "x"}, {"messages": [{"role": "user", "content": "x"}]}):
        with pytest.raises(RequestError, match="cannot be combined") as info:
            parse_request(encode({"template": "plain", **extra}), OPEN)
        assert info.value.code is ErrorCode.BAD_REQUEST
    with pytest.raises(RequestError, match="'vars' needs 'template'"):
        parse_request(encode({"prompt": "x", "vars": {}}), OPEN)


def test_rendered_template_counts_against_the_prompt_limit() -> None:
    small = RequestLimits(max_payload_bytes=65536, max_prompt_chars=30, max_tokens_cap=256, max_timeout_s=60,
                          templates=TEMPLATES)
    with pytest.raises(RequestError) as info:
        parse_request(encode({"template": "door", "vars": {"door": "x" * 40}}), small)
    assert info.value.code is ErrorCode.TOO_LARGE


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["template", "vars", "prompt", "system", "max_tokens", "id"]),
                       json_values | st.sampled_from(["door", "plain"])
                       | st.dictionaries(st.text(max_size=8), st.text(max_size=30), max_size=3), max_size=4))
def test_fuzz_template_requests_parse_or_give_a_coded_error(obj: dict) -> None:
    try:
        request = parse_request(encode(obj), LOCKED)
    except RequestError as exc:
        assert exc.code in (ErrorCode.BAD_REQUEST, ErrorCode.TOO_LARGE, ErrorCode.FORBIDDEN) and exc.message
        if exc.code is ErrorCode.FORBIDDEN:
            assert {"prompt", "system"} & set(obj)
    else:
        assert request.template in TEMPLATES and not {"prompt", "system"} & set(obj)
        values = obj.get("vars", {})
        assert request.messages[-1]["content"] == render_template(TEMPLATES[request.template].text, values)


# --- the JSON shape check: exact, and linear in the payload's size ---------------------------------------
def depth(value: object) -> int:
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    return 0


tricky_text = st.text(alphabet='[]{}"\\,:ab ', max_size=12)


@settings(max_examples=300, deadline=None)
@given(st.recursive(tricky_text | st.integers(-1000, 1000), lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(tricky_text, inner, max_size=3), max_leaves=30),
       st.integers(0, 40))
def test_fuzz_nesting_is_measured_outside_strings_only(value: object, wrap: int) -> None:
    """Brackets, quotes and backslashes inside strings never count; real nesting always does."""
    for _ in range(wrap):
        value = [value]
    try:
        decode_json_object(encode({"x": value}), 1 << 20)
    except BadRequest as exc:
        assert "nested deeper than" in str(exc) and 1 + depth(value) > MAX_JSON_DEPTH
    else:
        assert 1 + depth(value) <= MAX_JSON_DEPTH


@pytest.mark.parametrize("payload", [
    b'{"prompt": "' + b'\\"' * 500_000,  # unterminated, all escaped quotes
    b'"' * 1_000_000, b"\\" * 1_000_000, b"[]" * 500_000, b'["a",' * 200_000, b"[" * 1_000_000,
])
def test_hostile_shapes_are_refused_in_linear_time(payload: bytes) -> None:
    """Each is ~1 MB; a quadratic scan took minutes on the first (40 kB: 3 s), so a generous bound
    still catches it."""
    started = time.monotonic()
    with pytest.raises((BadRequest, TooLarge)):
        decode_json_object(payload, 4 << 20)
    assert time.monotonic() - started < 5.0
