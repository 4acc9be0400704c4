"""Strict JSON decoding for untrusted payloads: bounded size, depth and number of values, no
NaN/Infinity, no huge integers, no duplicate keys, no lone surrogates; linear time in the
payload's size.
Every refusal is a BadRequest or TooLarge."""

from __future__ import annotations

import json
import math
import re
from itertools import accumulate
from typing import Any

from edge_agent.errors import BadRequest, TooLarge

MAX_INT_DIGITS = 20
MAX_JSON_DEPTH = 32
MAX_JSON_ITEMS = 10_000  # counted by their separating commas
# Linear-time on any input: an escape pair, then a string free of escapes. A single pattern for
# strings with escapes inside (`"(?:[^"\\]|\\.)*"`) backtracks quadratically on an unterminated
# string of escaped quotes (40 kB took 3 s) and keeps a stack entry per character (4 MB: 400 MB).
JSON_ESCAPE = re.compile(r"\\.", re.DOTALL)
JSON_PLAIN_STRING = re.compile(r'"[^"]*"')
NOT_BRACKET = re.compile(r"[^\[\]{}]+")
# Valid UTF-8 cannot hold a surrogate, but a JSON escape can (`"\ud800"`): json.loads makes a
# str that no UTF-8 encoder takes (SQLite, paho, the tokenizer all raise). Pairs are fine.
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
BRACKET_DEPTH = {"[": 1, "{": 1, "]": -1, "}": -1}


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


def _check_shape(text: str) -> None:
    """Refuse deep nesting and huge numbers of values before json.loads sees them: its
    recursion limit differs between Python versions, a request needs only three levels and a
    few dozen values, and 4 MB of `{},` would build a million dicts (about 120 MB)."""
    outside_strings = JSON_PLAIN_STRING.sub("", JSON_ESCAPE.sub("", text))
    if outside_strings.count(",") > MAX_JSON_ITEMS:
        raise TooLarge(f"JSON has more than {MAX_JSON_ITEMS} array elements and object members")
    brackets = NOT_BRACKET.sub("", outside_strings)
    if brackets.count("[") + brackets.count("{") <= MAX_JSON_DEPTH:
        return
    if max(accumulate(map(BRACKET_DEPTH.__getitem__, brackets))) > MAX_JSON_DEPTH:
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
    _check_shape(text)
    try:
        obj = json.loads(text, parse_constant=_reject_constant, parse_int=_parse_int,
                         parse_float=_parse_float, object_pairs_hook=_object_without_duplicates)
    except RecursionError:
        raise BadRequest(f"JSON is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except json.JSONDecodeError as exc:
        raise BadRequest(f"payload is not JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    except ValueError as exc:  # int() digit limits and friends
        raise BadRequest(f"payload has an invalid number: {str(exc)[:80]}") from None
    if not isinstance(obj, dict):
        raise BadRequest(f"request must be a JSON object, got {json_type(obj)}")
    if SURROGATE_ESCAPE.search(text):
        _reject_lone_surrogates(obj)
    return obj


def _reject_lone_surrogates(value: Any, where: str = "") -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise BadRequest(f"{where or 'a key'} holds an unpaired surrogate escape "
                             f"(\\u{ord(value[exc.start]):04x}): not valid Unicode") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _reject_lone_surrogates(key)
            _reject_lone_surrogates(item, f"{where}.{key}" if where else f"'{key}'")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _reject_lone_surrogates(item, f"{where}[{index}]")


def json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return {dict: "object", list: "array", str: "string", int: "integer", float: "number"}[type(value)]
