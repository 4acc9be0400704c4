"""Protocol v1: topic names, request parsing and validation, answer and error payloads.

Pure: no I/O, no MQTT, no model. docs/protocol.md documents every field here; keep both in step.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from dataclasses import dataclass
from typing import Any

from edge_agent.errors import AgentError, BadRequest, ErrorCode, TooLarge

PROTOCOL_VERSION = 1
MAX_ID_CHARS = 128
MAX_TOPIC_CHARS = 512
MAX_INT_DIGITS = 20
MAX_JSON_DEPTH = 32
ROLES = ("system", "user", "assistant")
REQUEST_FIELDS = frozenset({"id", "prompt", "messages", "system", "max_tokens", "temperature",
                            "top_p", "top_k", "seed", "reply_to", "timeout_s"})
MAX_TEMPERATURE = 5.0
MAX_TOP_K = 100_000
MAX_SEED = 2**31 - 1
# C0 controls other than tab, newline and carriage return, and DEL: never legitimate in text.
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
JSON_BRACKET = re.compile(r"[\[\]{}]")


@dataclass(frozen=True)
class Topics:
    prefix: str
    device_id: str

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.device_id}"

    @property
    def request(self) -> str:
        return f"{self.base}/request"

    @property
    def response(self) -> str:
        return f"{self.base}/response"

    @property
    def status(self) -> str:
        return f"{self.base}/status"


@dataclass(frozen=True)
class RequestLimits:
    max_payload_bytes: int
    max_prompt_chars: int
    max_tokens_cap: int
    max_timeout_s: float


@dataclass(frozen=True)
class Request:
    id: str
    messages: tuple[dict[str, str], ...]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    reply_to: str | None = None
    timeout_s: float | None = None


class RequestError(AgentError):
    """A request that cannot be taken; carries the id when it could be read."""

    def __init__(self, error: AgentError, request_id: str | None) -> None:
        super().__init__(error.message, error.code)
        self.request_id = request_id


def _reject_constant(name: str) -> Any:
    raise BadRequest(f"{name} is not a number JSON allows")


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise BadRequest(f"integer with {len(text)} digits is too large")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadRequest(f"number {text[:40]} is out of range")
    return value


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise BadRequest(f"duplicate key {key[:64]!r}")
        obj[key] = value
    return obj


def _check_depth(text: str) -> None:
    """Refuse deep nesting before json.loads sees it: its recursion limit differs between
    Python versions, and a request needs only two levels."""
    depth = 0
    for match in JSON_BRACKET.finditer(JSON_STRING.sub("", text)):
        depth += 1 if match.group() in "[{" else -1
        if depth > MAX_JSON_DEPTH:
            raise BadRequest(f"JSON is nested deeper than {MAX_JSON_DEPTH} levels")


def decode_json_object(payload: bytes, max_bytes: int) -> dict[str, Any]:
    if len(payload) > max_bytes:
        raise TooLarge(f"payload is {len(payload)} bytes; the limit is {max_bytes}")
    if not payload.strip():
        raise BadRequest("payload is empty")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"payload is not valid UTF-8 (byte {exc.start})") from None
    _check_depth(text)
    try:
        obj = json.loads(text, parse_constant=_reject_constant, parse_int=_parse_int,
                         parse_float=_parse_float, object_pairs_hook=_object_without_duplicates)
    except RecursionError:
        raise BadRequest(f"JSON is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except json.JSONDecodeError as exc:
        raise BadRequest(f"payload is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except ValueError as exc:  # int() digit limits and friends
        raise BadRequest(f"payload has an invalid number: {str(exc)[:80]}") from None
    if not isinstance(obj, dict):
        raise BadRequest(f"request must be a JSON object, got {_json_type(obj)}")
    return obj


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return {dict: "object", list: "array", str: "string", int: "integer", float: "number"}[type(value)]


def _read_id(obj: dict[str, Any]) -> str | None:
    """The request id if it is usable, else None (the error then carries no id)."""
    value = obj.get("id")
    if isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS and not CONTROL_CHARS.search(value):
        return value
    return None


def _check_id(obj: dict[str, Any]) -> str:
    if "id" not in obj:
        return uuid.uuid4().hex
    value = obj["id"]
    if not isinstance(value, str):
        raise BadRequest(f"'id' must be a string, got {_json_type(value)}")
    if not 0 < len(value) <= MAX_ID_CHARS:
        raise BadRequest(f"'id' must be 1-{MAX_ID_CHARS} characters, got {len(value)}")
    if CONTROL_CHARS.search(value):
        raise BadRequest("'id' contains control characters")
    return value


def _text(obj: dict[str, Any], field: str) -> str:
    value = obj[field]
    if not isinstance(value, str):
        raise BadRequest(f"'{field}' must be a string, got {_json_type(value)}")
    if not value.strip():
        raise BadRequest(f"'{field}' is empty")
    if CONTROL_CHARS.search(value):
        raise BadRequest(f"'{field}' contains control characters")
    return value


def _number(obj: dict[str, Any], field: str, low: float, high: float, *, integer: bool,
            low_open: bool = False) -> Any:
    if field not in obj:
        return None
    value = obj[field]
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise BadRequest(f"'{field}' must be {'an integer' if integer else 'a number'}, "
                         f"got {_json_type(value)}")
    if value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise BadRequest(f"'{field}' must be in {bracket}{low:g}, {high:g}], got {value!r:.40}")
    return value


def _messages(obj: dict[str, Any]) -> tuple[dict[str, str], ...]:
    has_prompt, has_messages = "prompt" in obj, "messages" in obj
    if has_prompt == has_messages:
        raise BadRequest("give exactly one of 'prompt' or 'messages'")
    history: list[dict[str, str]] = []
    if "system" in obj:
        history.append({"role": "system", "content": _text(obj, "system")})
    if has_prompt:
        history.append({"role": "user", "content": _text(obj, "prompt")})
        return tuple(history)
    raw = obj["messages"]
    if not isinstance(raw, list) or not raw:
        raise BadRequest("'messages' must be a non-empty array of {role, content}")
    for index, item in enumerate(raw):
        if not isinstance(item, dict) or set(item) != {"role", "content"}:
            raise BadRequest(f"messages[{index}] must be an object with exactly 'role' and 'content'")
        if item["role"] not in ROLES:
            raise BadRequest(f"messages[{index}].role must be one of {', '.join(ROLES)}")
        if item["role"] == "system" and history:
            raise BadRequest(f"messages[{index}]: a system message may only come first")
        history.append({"role": item["role"], "content": _text(item, "content")})
    if history[-1]["role"] != "user":
        raise BadRequest("the last message must have role 'user'")
    return tuple(history)


def parse_request(payload: bytes, limits: RequestLimits) -> Request:
    """Validate one request payload; raises RequestError (with the id when readable)."""
    request_id: str | None = None
    try:
        obj = decode_json_object(payload, limits.max_payload_bytes)
        request_id = _read_id(obj)
        unknown = sorted(set(obj) - REQUEST_FIELDS)
        if unknown:
            raise BadRequest("unknown field(s): " + ", ".join(repr(k[:64]) for k in unknown[:5]))
        checked_id = _check_id(obj)
        messages = _messages(obj)
        chars = sum(len(m["content"]) for m in messages)
        if chars > limits.max_prompt_chars:
            raise TooLarge(f"prompt is {chars} characters; the limit is {limits.max_prompt_chars}")
        reply_to = check_topic_name(obj["reply_to"], "reply_to") if "reply_to" in obj else None
        return Request(
            id=checked_id,
            messages=messages,
            max_tokens=_number(obj, "max_tokens", 1, limits.max_tokens_cap, integer=True),
            temperature=_number(obj, "temperature", 0, MAX_TEMPERATURE, integer=False),
            top_p=_number(obj, "top_p", 0, 1, integer=False, low_open=True),
            top_k=_number(obj, "top_k", 1, MAX_TOP_K, integer=True),
            seed=_number(obj, "seed", 0, MAX_SEED, integer=True),
            reply_to=reply_to,
            timeout_s=_number(obj, "timeout_s", 0, limits.max_timeout_s, integer=False, low_open=True),
        )
    except AgentError as exc:
        raise RequestError(exc, request_id) from None


def check_topic_name(topic: Any, what: str = "reply topic") -> str:
    """A topic we may publish to: no wildcards, no `$` topics, no empty levels."""
    if not isinstance(topic, str):
        raise BadRequest(f"{what} must be a string, got {_json_type(topic)}")
    if not topic or len(topic) > MAX_TOPIC_CHARS:
        raise BadRequest(f"{what} must be 1-{MAX_TOPIC_CHARS} characters")
    if "+" in topic or "#" in topic:
        raise BadRequest(f"{what} {topic[:80]!r} contains a wildcard")
    if topic.startswith("$"):
        raise BadRequest(f"{what} {topic[:80]!r} is a '$' system topic")
    if "" in topic.split("/"):
        raise BadRequest(f"{what} {topic[:80]!r} has an empty level")
    if "\x00" in topic or CONTROL_CHARS.search(topic):
        raise BadRequest(f"{what} contains control characters")
    return topic


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching (`+` one level, `#` the rest)."""
    parts, levels = topic_filter.split("/"), topic.split("/")
    for index, part in enumerate(parts):
        if part == "#":
            return True
        if index >= len(levels) or (part != "+" and part != levels[index]):
            return False
    return len(parts) == len(levels)


def choose_reply_topic(response_topic: str | None, reply_to: str | None, default: str,
                       allow: tuple[str, ...]) -> str:
    """MQTT 5 Response Topic, else `reply_to`, else the default; refuses what is not allowed."""
    topic = response_topic if response_topic is not None else reply_to
    if topic is None:
        return default
    check_topic_name(topic)
    if not any(topic_matches(pattern, topic) for pattern in allow):
        raise BadRequest(f"reply topic {topic[:80]!r} is not in the allow-list")
    return topic


def encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def answer_payload(request_id: str, *, text: str, finish_reason: str, model: str, provider: str,
                   prompt_tokens: int, completion_tokens: int, queue_ms: float, ttft_ms: float | None,
                   total_ms: float, tokens_per_s: float) -> bytes:
    return encode({
        "id": request_id, "ok": True, "text": text, "finish_reason": finish_reason,
        "model": model, "provider": provider,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
        "timings": {"queue_ms": round(queue_ms, 1),
                    "ttft_ms": None if ttft_ms is None else round(ttft_ms, 1),
                    "total_ms": round(total_ms, 1), "tokens_per_s": round(tokens_per_s, 1)},
    })


def error_payload(request_id: str | None, code: ErrorCode, message: str,
                  **extra: Any) -> bytes:
    return encode({"id": request_id, "ok": False,
                   "error": {"code": code.value, "message": message, **extra}})
