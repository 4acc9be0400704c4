"""The hostile inputs the agent must survive, one place for tests/test_hostile.py and
bench/hostile.py. Each is sent over MQTT as it is; each must get an error with the expected code.

The agent they are meant for (`AGENT_SETTINGS`): the tiny vision model (so image checks are
reached), one configured camera `front`, default limits (4 MiB payloads), replies allowed only
under `edge-agent/#` and `apps/#`, free prompts allowed.
"""

from __future__ import annotations

import base64
import gzip
import json
import struct
import uuid
import zlib
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

MAX_PAYLOAD_BYTES = 4 * 1024 * 1024  # the default limits.max_payload_bytes
MAX_PROMPT_CHARS = 16000  # the default limits.max_prompt_chars
MAX_NEW_TOKENS = 64  # model.max_new_tokens of tests/support.py AgentProcess
CAMERA = "front"
AGENT_SETTINGS: dict[str, Any] = {
    "mqtt__reply_topic_allow": ["edge-agent/#", "apps/#"],
    "images__longest_side": 336,
}


@dataclass(frozen=True)
class Hostile:
    kind: str  # the name for it
    name: str  # this case, unique
    payload: bytes
    code: str  # the error code it must get
    words: str = ""  # in the error message
    response_topic: str | None = None  # MQTT 5 Response Topic property
    id_echoed: bool = True  # whether the error carries the id the payload sent


def jpeg(size: tuple[int, int] = (120, 160)) -> bytes:
    image = np.full((*size, 3), 90, np.uint8)
    cv2.rectangle(image, (10, 10), (60, 50), (0, 200, 255), -1)
    ok, data = cv2.imencode(".jpg", image)
    assert ok
    return data.tobytes()


def png_header(width: int, height: int) -> bytes:
    """The first 33 bytes of a PNG: signature and IHDR, declaring any size; no pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# Wrong values for every request field: another JSON type, or null (never a valid value).
WRONG_TYPES: dict[str, list[Any]] = {
    "id": [12, None, True, [], {}],
    "prompt": [5, None, False, ["x"], {"text": "x"}],
    "messages": ["hi", None, 5, {}, [5], [{"role": 5, "content": "x"}], [{"role": "user", "content": 5}]],
    "system": [3, None, True, ["x"]],
    "max_tokens": ["8", 2.5, True, None, [8], {}],
    "temperature": ["hot", True, None, [0.5]],
    "top_p": ["0.5", False, None, {}],
    "top_k": [2.5, "5", True, None],
    "seed": [1.5, "1", True, None],
    "reply_to": [5, None, ["apps/x"], {}],
    "timeout_s": ["soon", True, None, [1]],
    "camera": [5, None, True, [], [5], {"name": CAMERA}],
    "frames": [2.5, "2", True, None],
    "interval_ms": [1.5, "100", True, None],
    "images": ["abc", None, [], [5], [""], {}],
    "include_frame": ["yes", 1, None],
    "template": [5, None, ["door"]],
    "vars": [5, None, ["door"]],
    "stream": ["yes", 1, None, []],
    "response_format": ["json", 5, None, [], {}, {"type": 5}, {"type": "json_schema", "json_schema": "x"},
                        {"type": "regex", "regex": 5}, {"type": "lark", "grammar": ""}],
    "history": ["week", 5, None, [], True, {"since": 5}, {"rule": ["door"]}, {"limit": "5"}],
}

# Numbers in range for their type, out of range for the field.
OUT_OF_RANGE: dict[str, list[Any]] = {
    "max_tokens": [0, -3, MAX_NEW_TOKENS + 1, 10**15, 2**63],
    "temperature": [-0.5, 9, 1e300],
    "top_p": [0, -1, 1.5],
    "top_k": [0, 10**6],
    "seed": [-1, 2**31],
    "timeout_s": [0, -1, 10**9],
    "frames": [0, 100],
    "interval_ms": [-1, 10**6],
}


def hostile_inputs(run: str = "") -> list[Hostile]:
    """Every case; `run` makes the ids unique, so a second pass is not taken for a re-send."""
    cases: list[Hostile] = []

    def add(kind: str, name: str, payload: bytes | str | dict[str, Any], code: str, words: str = "",
            **extra: Any) -> None:
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        if isinstance(payload, str):
            payload = payload.encode()
        cases.append(Hostile(kind, name, payload, code, words, **extra))

    def rid(name: str) -> str:
        return f"h-{name}{run}"

    def request(name: str, **fields: Any) -> dict[str, Any]:
        return {"id": rid(name), "prompt": "Hello", **fields}

    # --- not a request at all ---------------------------------------------------------------
    add("not JSON", "not-json", b"not json", "bad_request", "not JSON", id_echoed=False)
    add("not JSON", "truncated-object", b'{"id": "h", "prompt": "x"', "bad_request", "not JSON",
        id_echoed=False)
    add("invalid UTF-8", "invalid-utf8", b'{"prompt": "\xff\xfe"}', "bad_request", "UTF-8", id_echoed=False)
    add("invalid UTF-8", "utf16", '{"prompt": "x"}'.encode("utf-16"), "bad_request", "UTF-8", id_echoed=False)
    add("invalid UTF-8", "overlong-utf8", b'{"prompt": "\xc0\xaf"}', "bad_request", "UTF-8", id_echoed=False)
    add("invalid UTF-8", "utf8-encoded-surrogate", b'{"prompt": "\xed\xa0\x80"}', "bad_request", "UTF-8",
        id_echoed=False)
    add("compressed or binary payload", "gzip", gzip.compress(json.dumps(request("gzip")).encode()),
        "bad_request", "UTF-8", id_echoed=False)
    add("compressed or binary payload", "binary", bytes(range(256)) * 4, "bad_request", "UTF-8",
        id_echoed=False)
    for name, body in (("single-quotes", b"{'prompt': 'x'}"), ("comment", b'{"prompt": "x" /* hi */}'),
                       ("trailing-comma", b'{"prompt": "x",}'), ("trailing-data", b'{"prompt": "x"} and more'),
                       ("two-documents", b'{"prompt": "x"}{"prompt": "y"}')):
        add("relaxed JSON syntax", f"relaxed-{name}", body, "bad_request", "not JSON", id_echoed=False)
    # \ud800-\udfff escapes decode to a str no UTF-8 encoder takes (SQLite, paho, the tokenizer)
    for name, body in (("prompt", b'{"id": "s", "prompt": "x\\ud800y"}'),
                       ("id", b'{"id": "s\\udfff", "prompt": "x"}'),
                       ("reply-to", b'{"prompt": "x", "reply_to": "apps/\\ud800"}'),
                       ("message", b'{"messages": [{"role": "user", "content": "\\udc00"}]}'),
                       ("key", b'{"prompt": "x", "\\ud800": 1}')):
        add("lone surrogates", f"surrogate-{name}", body, "bad_request", "unpaired surrogate", id_echoed=False)
    for name, key in (("nul", "pro\x00mpt"), ("empty", ""), ("spaced", "prompt "), ("upper", "PROMPT")):
        add("odd keys", f"key-{name}", {"id": rid(f"key-{name}"), "prompt": "x", key: "y"}, "bad_request",
            "unknown field")
    add("BOM", "utf8-bom", b'\xef\xbb\xbf{"prompt": "x"}', "bad_request", "BOM", id_echoed=False)
    add("empty payload", "empty", b"", "bad_request", "empty", id_echoed=False)
    add("empty payload", "whitespace", b" \n\t ", "bad_request", "empty", id_echoed=False)
    add("JSON scalar", "scalar-int", b"42", "bad_request", "got integer", id_echoed=False)
    add("JSON scalar", "scalar-string", b'"prompt"', "bad_request", "got string", id_echoed=False)
    add("JSON scalar", "scalar-null", b"null", "bad_request", "got null", id_echoed=False)
    add("JSON array", "array", b'[{"prompt": "x"}]', "bad_request", "got array", id_echoed=False)
    # --- JSON that strains the parser -----------------------------------------------------------
    add("nesting 10^5 deep", "nest-1e5-open", b"[" * 100_000, "bad_request", "nested deeper than 32",
        id_echoed=False)
    add("nesting 10^5 deep", "nest-1e5-closed", b"[" * 100_000 + b"]" * 100_000, "bad_request",
        "nested deeper than 32", id_echoed=False)
    add("nesting 10^5 deep", "nest-1e5-objects", b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "bad_request",
        "nested deeper than 32", id_echoed=False)
    add("10^4-digit integer", "int-1e4-digits",
        b'{"id": "' + rid("int").encode() + b'", "prompt": "x", "max_tokens": ' + b"9" * 10_000 + b"}",
        "bad_request", "too large", id_echoed=False)
    add("10^4-digit integer", "negative-int-1e4-digits", b'{"prompt": "x", "seed": -' + b"1" * 10_000 + b"}",
        "bad_request", "too large", id_echoed=False)
    add("NaN/Infinity", "nan", b'{"prompt": "x", "temperature": NaN}', "bad_request", "NaN", id_echoed=False)
    add("NaN/Infinity", "infinity", b'{"prompt": "x", "temperature": Infinity}', "bad_request", "Infinity",
        id_echoed=False)
    add("NaN/Infinity", "minus-infinity", b'{"prompt": "x", "top_p": -Infinity}', "bad_request", "Infinity",
        id_echoed=False)
    add("NaN/Infinity", "1e999", b'{"prompt": "x", "temperature": 1e999}', "bad_request", "out of range",
        id_echoed=False)
    add("duplicate keys", "dup-prompt", b'{"prompt": "x", "prompt": "y"}', "bad_request", "duplicate key",
        id_echoed=False)
    add("duplicate keys", "dup-id", b'{"id": "a", "id": "b", "prompt": "y"}', "bad_request", "duplicate key",
        id_echoed=False)
    add("duplicate keys", "dup-nested", b'{"messages": [{"role": "user", "role": "system", "content": "x"}]}',
        "bad_request", "duplicate key", id_echoed=False)
    add("10^5 values", "wide-array", b'{"prompt": "x", "images": [' + b"1," * 100_000 + b"1]}", "too_large",
        "10000", id_echoed=False)
    add("10^5 values", "wide-object", ("{" + ",".join(f'"k{i}":0' for i in range(100_000)) + "}").encode(),
        "too_large", "10000", id_echoed=False)
    # An unterminated string of escaped quotes: quadratic for a backtracking string pattern.
    add("unterminated string", "escaped-quotes-1mb", b'{"prompt": "' + b'\\"' * 500_000, "bad_request",
        "not JSON", id_echoed=False)
    # --- sizes ----------------------------------------------------------------------------------
    add("10 MB prompt", "prompt-10mb", request("prompt-10mb", prompt="x" * 10_000_000), "too_large",
        f"the limit is {MAX_PAYLOAD_BYTES}", id_echoed=False)
    add("10 MB prompt", "prompt-3mb", request("prompt-3mb", prompt="x" * 3_000_000), "too_large",
        f"the limit is {MAX_PROMPT_CHARS}")
    add("10 MB prompt", "messages-many", {"id": rid("messages-many"), "messages": [
        {"role": "user", "content": "y" * 40}] * 2000}, "too_large", f"the limit is {MAX_PROMPT_CHARS}")
    add("id of 10 kB", "id-10kb", {"id": "i" * 10_000, "prompt": "x"}, "bad_request", "1-128 characters",
        id_echoed=False)
    add("id of 10 kB", "id-empty", {"id": "", "prompt": "x"}, "bad_request", "1-128 characters", id_echoed=False)
    # --- text ---------------------------------------------------------------------------------
    for name, text in (("nul", "a\x00b"), ("escape-seq", "\x1b[31mred"), ("del", "a\x7f"),
                       ("bell", "\x07")):
        add("control characters", f"ctrl-prompt-{name}", request(f"ctrl-{name}", prompt=text), "bad_request",
            "control characters")
    add("control characters", "ctrl-system", request("ctrl-system", system="be\x00nice"), "bad_request",
        "control characters")
    add("control characters", "ctrl-id", {"id": "a\x00b", "prompt": "x"}, "bad_request", "control characters",
        id_echoed=False)
    add("control characters", "ctrl-message", {"id": rid("ctrl-message"), "messages": [
        {"role": "user", "content": "\x1b]0;title\x07"}]}, "bad_request", "control characters")
    add("blank text", "blank-prompt", request("blank", prompt="  \n "), "bad_request", "is empty")
    # --- reply topics ---------------------------------------------------------------------------
    for name, topic, words in (
            ("plus", "apps/+/x", "wildcard"), ("hash", "apps/#", "wildcard"),
            ("sys", "$SYS/broker/load", "'$' system topic"), ("dollar", "$share/g/apps/x", "'$' system topic"),
            ("empty-level", "apps//x", "empty level"), ("leading-slash", "/apps/x", "empty level"),
            ("trailing-slash", "apps/x/", "empty level"), ("empty", "", "1-512 characters"),
            ("long", "apps/" + "x" * 600, "1-512 characters"), ("nul", "apps/\x00", "control characters"),
            ("outside-allow-list", "other/place", "allow-list"),
            ("other-device", "edge-agent-other/x", "allow-list")):
        add("reply topics", f"reply-to-{name}", request(f"reply-{name}", reply_to=topic), "bad_request", words)
    for name, topic, words in (("sys", "$SYS/x", "'$' system topic"), ("outside", "other/place", "allow-list"),
                               ("plus", "apps/+", "wildcard")):
        add("reply topics", f"response-topic-{name}", request(f"rt-{name}"), "bad_request", words,
            response_topic=topic)
    # --- wrong types, out of range, unknown fields ------------------------------------------------
    for field, values in WRONG_TYPES.items():
        for index, value in enumerate(values):
            name = f"type-{field}-{index}"
            fields = {"camera": CAMERA} if field in ("frames", "interval_ms") else {}
            body = {**request(name, **fields), field: value}
            if field == "id":
                body["id"] = value
            elif field in ("messages", "template"):
                body.pop("prompt")
            words = "" if field in ("messages", "vars") else field  # e.g. "'content' must be …"
            add("wrong types for every field", name, body, "bad_request", words, id_echoed=field != "id")
    for field, values in OUT_OF_RANGE.items():
        for index, value in enumerate(values):
            name = f"range-{field}-{index}"
            fields = {"camera": CAMERA} if field in ("frames", "interval_ms") else {}
            kind = {"max_tokens": "negative/huge max_tokens",
                    "temperature": "temperature out of range"}.get(field, "out of range")
            add(kind, name, {**request(name, **fields), field: value}, "bad_request", field)
    for name, extra in (("colour", {"colour": "red"}), ("model", {"model": "/etc/passwd"}),
                        ("model-path", {"model_path": "../models/other"}), ("provider", {"provider": "cuda"}),
                        ("device", {"device": "/dev/sda"}), ("file", {"file": "/etc/shadow"}),
                        ("path", {"path": "/var/lib/edge-agent/edge-agent.db"})):
        add("unknown fields", f"unknown-{name}", request(f"unknown-{name}", **extra), "bad_request",
            "unknown field")
    add("wrong types for every field", "neither-prompt-nor-messages", {"id": rid("neither")}, "bad_request",
        "exactly one")
    add("wrong types for every field", "prompt-and-messages",
        request("both", messages=[{"role": "user", "content": "x"}]), "bad_request", "exactly one")
    add("unknown template", "template-unknown", {"id": rid("tpl"), "template": "door"}, "bad_request",
        "unknown template")
    # --- cameras: names only from the settings ------------------------------------------------------
    for name, camera in (("unknown", "garage"), ("dotdot", "../"), ("dotdot-front", "../front"),
                         ("etc-passwd", "../../../../etc/passwd"), ("dev-sda", "/dev/sda"),
                         ("dev-video0", "/dev/video0"), ("v4l2-index", "0"), ("file-url", "file:///etc/passwd"),
                         ("rtsp-url", "rtsp://192.0.2.1/stream"), ("pipeline", "videotestsrc ! appsink"),
                         ("subdir", "front/../front"), ("nul", "front\x00"), ("newline", "front\n"),
                         ("case", "FRONT")):
        add("unknown camera / path-like camera", f"camera-{name}", request(f"cam-{name}", camera=camera),
            "bad_request", "unknown camera")
    add("unknown camera / path-like camera", "camera-list-with-path",
        request("cam-list", camera=[CAMERA, "/dev/sda"]), "bad_request", "unknown camera")
    add("unknown camera / path-like camera", "camera-twice", request("cam-twice", camera=[CAMERA, CAMERA]),
        "bad_request", "twice")
    add("too many images", "frames-over-max-images", request("frames5", camera=CAMERA, frames=5), "too_large",
        "limit is 4")
    # --- images -------------------------------------------------------------------------------------
    good = jpeg()
    for name, image, code, words in (
            ("invalid-base64", "not base64 at all!!", "bad_image", "not valid base64"),
            ("base64-of-text", b64(b"definitely not an image"), "bad_image", ""),
            ("truncated-jpeg", b64(good[: len(good) // 3]), "bad_image", ""),
            ("jpeg-header-only", b64(good[:200]), "bad_image", ""),
            ("png-0x0", b64(png_header(0, 0)), "bad_image", "declares 0x0 pixels"),
            ("png-60000x60000", b64(png_header(60000, 60000)), "too_large", "pixels"),
            ("png-1x60000000", b64(png_header(1, 60_000_000)), "too_large", "pixels"),
            ("gif-garbage", b64(b"GIF89a" + b"\x00" * 20), "bad_image", ""),
            ("bmp-garbage", b64(b"BM" + b"\xff" * 60), "bad_image", ""),
            ("data-url-bad", "data:text/plain;base64," + b64(good), "bad_image", "data URL")):
        add("images", f"image-{name}", request(f"img-{name}", images=[image]), code, words)
    add("images", "images-too-many", request("img-many", images=[b64(good)] * 5), "too_large", "limit is 4")
    return cases


def good_request(rid: str) -> bytes:
    return json.dumps({"id": rid, "prompt": "Still there?", "max_tokens": 2}).encode()


def new_id() -> str:
    return uuid.uuid4().hex
