"""Requests: parsing and validation of what pipelines send (requests and cancels). Pure."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping

from edge_agent.errors import AgentError, BadRequest, Forbidden, TooLarge
from edge_agent.protocol.history import HistoryQuery, parse_history
from edge_agent.protocol.prompts import VAR_NAME, PromptTemplate, render_template, template_fields
from edge_agent.protocol.topics import CONTROL_CHARS, NAME, check_topic_name
from edge_agent.protocol.strictjson import decode_json_object, json_type
from edge_agent.protocol.structured import ResponseFormat, parse_response_format

PROTOCOL_VERSION = 1
MAX_ID_CHARS = 128
ROLES = ("system", "user", "assistant")
REQUEST_FIELDS = frozenset({"id", "prompt", "messages", "system", "max_tokens", "temperature",
                            "top_p", "top_k", "seed", "reply_to", "timeout_s",
                            "camera", "frames", "interval_ms", "images", "include_frame",
                            "template", "vars", "stream", "response_format", "history"})
# A `history` request without a question is a query of the event history: no model runs.
QUERY_FIELDS = frozenset({"id", "reply_to", "timeout_s", "history"})
# Written only by the agent itself (a watch rule's run, `trusted`); from outside they are unknown.
TRUSTED_FIELDS = frozenset({"crop"})
FREE_TEXT_FIELDS = ("prompt", "messages", "system")  # refused when free prompts are not allowed
MAX_FRAMES = 8
MAX_INTERVAL_MS = 10_000
CAMERA_NAME = NAME
TEMPLATE_NAME = CAMERA_NAME
MAX_VAR_CHARS = 200
MAX_TEMPERATURE = 5.0
MAX_TOP_K = 100_000
MAX_SEED = 2**31 - 1
# C0 controls other than tab, newline and carriage return, and DEL: never legitimate in text.


@dataclass(frozen=True, kw_only=True)  # by name: a field added in the middle once shifted the rest
class RequestLimits:
    max_payload_bytes: int
    max_prompt_chars: int
    max_tokens_cap: int
    max_timeout_s: float
    max_images: int = 4
    camera_names: frozenset[str] = frozenset()
    allow_free_prompts: bool = True
    trusted: bool = False  # the request comes from the settings file: TRUSTED_FIELDS are taken
    templates: Mapping[str, PromptTemplate] = field(default_factory=dict)


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
    cameras: tuple[str, ...] = ()  # each a configured camera name
    frames: int = 1  # frames per camera, `interval_ms` apart
    interval_ms: int = 0
    images: tuple[str, ...] = ()  # base64 text, decoded and sanitized by the worker
    include_frame: bool = False
    crop: tuple[float, float, float, float] | None = None  # x0, y0, x1, y1 relative: cut before encoding
    template: str | None = None  # the name of the template the messages were made from
    stream: bool = False  # publish the text in chunks as it is generated
    response_format: ResponseFormat | None = None  # constrained decoding; None: free text
    id_given: bool = True  # False: the id was generated here, so a re-send cannot be recognised
    history: HistoryQuery | None = None  # events to answer with (no messages) or to ask about
    history_counts: tuple[int, int] | None = None  # (given, matched): set once the context is in

    @property
    def history_only(self) -> bool:
        """A query of the event history: answered with events, no model runs."""
        return self.history is not None and not self.messages

    @property
    def image_count(self) -> int:
        return len(self.cameras) * self.frames + len(self.images)


class RequestError(AgentError):
    """A request that cannot be taken; carries the id when it could be read."""

    def __init__(self, error: AgentError, request_id: str | None) -> None:
        super().__init__(error.message, error.code)
        self.request_id = request_id


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
        raise BadRequest(f"'id' must be a string, got {json_type(value)}")
    if not 0 < len(value) <= MAX_ID_CHARS:
        raise BadRequest(f"'id' must be 1-{MAX_ID_CHARS} characters, got {len(value)}")
    if CONTROL_CHARS.search(value):
        raise BadRequest("'id' contains control characters")
    return value


def _text(obj: dict[str, Any], field: str) -> str:
    value = obj[field]
    if not isinstance(value, str):
        raise BadRequest(f"'{field}' must be a string, got {json_type(value)}")
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
                         f"got {json_type(value)}")
    if value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise BadRequest(f"'{field}' must be in {bracket}{low:g}, {high:g}], got {value!r:.40}")
    return value


def _flag(obj: dict[str, Any], field: str) -> bool:
    value = obj.get(field, False)
    if not isinstance(value, bool):
        raise BadRequest(f"'{field}' must be true or false, got {json_type(value)}")
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


def _template_vars(obj: dict[str, Any]) -> dict[str, str]:
    values = obj.get("vars", {})
    if not isinstance(values, dict):
        raise BadRequest(f"'vars' must be an object of strings, got {json_type(values)}")
    for key, value in values.items():
        if not VAR_NAME.fullmatch(key):
            raise BadRequest(f"vars name {key[:64]!r} must match [a-z_][a-z0-9_]*")
        if not isinstance(value, str):
            raise BadRequest(f"vars.{key} must be a string, got {json_type(value)}")
        if not 0 < len(value) <= MAX_VAR_CHARS:
            raise BadRequest(f"vars.{key} must be 1-{MAX_VAR_CHARS} characters, got {len(value)}")
        if CONTROL_CHARS.search(value):
            raise BadRequest(f"vars.{key} contains control characters")
    return values


def _from_template(obj: dict[str, Any], templates: Mapping[str, PromptTemplate]
                   ) -> tuple[tuple[dict[str, str], ...], PromptTemplate]:
    name = obj["template"]
    if not isinstance(name, str):
        raise BadRequest(f"'template' must be a string, got {json_type(name)}")
    # Names come only from settings, like cameras.
    template = templates.get(name) if TEMPLATE_NAME.fullmatch(name) else None
    if template is None:
        raise BadRequest(f"unknown template {name[:64]!r}"
                         + (f"; configured: {', '.join(sorted(templates))}" if templates else "; none configured"))
    values = _template_vars(obj)
    fields = set(template_fields(template.text))
    missing, unknown = sorted(fields - set(values)), sorted(set(values) - fields)
    if missing:
        raise BadRequest(f"template {name!r} needs vars: {', '.join(missing)}")
    if unknown:
        raise BadRequest(f"template {name!r} has no field(s): {', '.join(unknown[:5])}")
    system = ({"role": "system", "content": template.system},) if template.system else ()
    return (*system, {"role": "user", "content": render_template(template.text, values)}), template


def _prompt(obj: dict[str, Any], limits: RequestLimits
            ) -> tuple[tuple[dict[str, str], ...], PromptTemplate | None]:
    """The chat messages: free text (`prompt`/`messages`/`system`) or a named template."""
    free = [name for name in FREE_TEXT_FIELDS if name in obj]
    if free and not limits.allow_free_prompts:
        raise Forbidden(f"{', '.join(repr(f) for f in free)}: this agent takes only named "
                        "templates ('template' and 'vars')")
    if "template" in obj:
        if free:
            raise BadRequest(f"'template' cannot be combined with {', '.join(repr(f) for f in free)}")
        return _from_template(obj, limits.templates)
    if "vars" in obj:
        raise BadRequest("'vars' needs 'template'")
    if not limits.allow_free_prompts:
        raise BadRequest("give 'template': this agent takes only named templates"
                         + (f" ({', '.join(sorted(limits.templates))})" if limits.templates else ""))
    return _messages(obj), None


def parse_request(payload: bytes, limits: RequestLimits) -> Request:
    """Validate one request payload; raises RequestError (with the id when readable)."""
    request_id: str | None = None
    try:
        obj = decode_json_object(payload, limits.max_payload_bytes)
        request_id = _read_id(obj)
        unknown = sorted(set(obj) - REQUEST_FIELDS - (TRUSTED_FIELDS if limits.trusted else frozenset()))
        if unknown:
            raise BadRequest("unknown field(s): " + ", ".join(repr(k[:64]) for k in unknown[:5]))
        checked_id = _check_id(obj)
        history = parse_history(obj["history"]) if "history" in obj else None
        if history is not None and not any(k in obj for k in ("prompt", "messages", "template")):
            return _history_query(obj, checked_id, history, limits)
        messages, template = _prompt(obj, limits)
        chars = sum(len(m["content"]) for m in messages)
        if chars > limits.max_prompt_chars:
            raise TooLarge(f"prompt is {chars} characters; the limit is {limits.max_prompt_chars}")
        reply_to = check_topic_name(obj["reply_to"], "reply_to") if "reply_to" in obj else None
        vision = _vision_fields(obj, limits)
        token_cap = limits.max_tokens_cap
        if template is not None and template.max_tokens:
            token_cap = min(template.max_tokens, token_cap)
        max_tokens = _number(obj, "max_tokens", 1, token_cap, integer=True)
        stream = _flag(obj, "stream")
        response_format = (parse_response_format(obj["response_format"]) if "response_format" in obj
                           else template.response_format if template is not None else None)
        return Request(
            id=checked_id,
            id_given="id" in obj,
            messages=messages,
            template=obj["template"] if template else None,
            max_tokens=max_tokens if max_tokens is not None or template is None else template.max_tokens,
            temperature=_number(obj, "temperature", 0, MAX_TEMPERATURE, integer=False),
            top_p=_number(obj, "top_p", 0, 1, integer=False, low_open=True),
            top_k=_number(obj, "top_k", 1, MAX_TOP_K, integer=True),
            seed=_number(obj, "seed", 0, MAX_SEED, integer=True),
            reply_to=reply_to,
            stream=stream,
            response_format=response_format,
            timeout_s=_number(obj, "timeout_s", 0, limits.max_timeout_s, integer=False, low_open=True),
            history=history,
            **vision,
        )
    except AgentError as exc:
        raise RequestError(exc, request_id) from None


def _history_query(obj: dict[str, Any], request_id: str, history: HistoryQuery, limits: RequestLimits) -> Request:
    other = sorted(set(obj) - QUERY_FIELDS)
    if other:
        raise BadRequest("'history' without 'prompt', 'messages' or 'template' is a query of the event "
                         f"history; it takes only {', '.join(sorted(QUERY_FIELDS))}, not "
                         + ", ".join(repr(k) for k in other[:5]))
    reply_to = check_topic_name(obj["reply_to"], "reply_to") if "reply_to" in obj else None
    return Request(id=request_id, id_given="id" in obj, messages=(), reply_to=reply_to, history=history,
                   timeout_s=_number(obj, "timeout_s", 0, limits.max_timeout_s, integer=False, low_open=True))


def _camera_list(obj: dict[str, Any], names: frozenset[str]) -> tuple[str, ...]:
    raw = obj["camera"]
    cameras = [raw] if isinstance(raw, str) else raw
    if not isinstance(cameras, list) or not cameras or not all(isinstance(c, str) for c in cameras):
        raise BadRequest("'camera' must be a camera name or a non-empty array of names")
    for name in cameras:
        # Names come only from settings; anything path-like is refused before any lookup.
        if not CAMERA_NAME.fullmatch(name) or name not in names:
            raise BadRequest(f"unknown camera {name[:64]!r}"
                             + (f"; configured: {', '.join(sorted(names))}" if names else "; none configured"))
    if len(set(cameras)) != len(cameras):
        raise BadRequest("'camera' names a camera twice; use 'frames' for several frames")
    return tuple(cameras)


def _vision_fields(obj: dict[str, Any], limits: RequestLimits) -> dict[str, Any]:
    cameras = _camera_list(obj, limits.camera_names) if "camera" in obj else ()
    frames = _number(obj, "frames", 1, MAX_FRAMES, integer=True)
    interval_ms = _number(obj, "interval_ms", 0, MAX_INTERVAL_MS, integer=True)
    if (frames is not None or interval_ms is not None) and len(cameras) != 1:
        raise BadRequest("'frames' and 'interval_ms' need exactly one 'camera'")
    images: tuple[str, ...] = ()
    if "images" in obj:
        raw = obj["images"]
        if not isinstance(raw, list) or not raw or not all(isinstance(i, str) and i for i in raw):
            raise BadRequest("'images' must be a non-empty array of base64 strings")
        images = tuple(raw)
    include = _flag(obj, "include_frame")
    count = len(cameras) * (frames or 1) + len(images)
    if count > limits.max_images:
        raise TooLarge(f"request asks for {count} images; the limit is {limits.max_images}")
    crop = _crop(obj["crop"]) if "crop" in obj else None
    if crop is not None and len(cameras) != 1:
        raise BadRequest("'crop' needs exactly one 'camera'")
    return {"cameras": cameras, "frames": frames or 1, "interval_ms": interval_ms or 0,
            "images": images, "include_frame": include, "crop": crop}


def _crop(value: Any) -> tuple[float, float, float, float]:
    """[x0, y0, x1, y1], relative to the frame (0-1), x0 < x1 and y0 < y1."""
    if not isinstance(value, list) or len(value) != 4 \
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise BadRequest("'crop' must be [x0, y0, x1, y1] numbers")
    x0, y0, x1, y1 = (float(v) for v in value)
    if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
        raise BadRequest("'crop' must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
    return x0, y0, x1, y1


def parse_cancel(payload: bytes, max_bytes: int) -> str:
    """The id of a cancel message `{"id": "..."}`; BadRequest naming the problem."""
    obj = decode_json_object(payload, max_bytes)
    unknown = sorted(set(obj) - {"id"})
    if unknown:
        raise BadRequest("a cancel takes only 'id'; unknown field(s): " + ", ".join(repr(k[:64]) for k in unknown[:5]))
    if "id" not in obj:
        raise BadRequest("a cancel needs the 'id' of the request to end")
    return _check_id(obj)
