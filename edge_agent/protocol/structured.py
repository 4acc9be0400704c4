"""Structured output: a request's `response_format` (the shape OpenAI-compatible servers take)
becomes one constraint for the runtime's guided decoding. Pure: no runtime here.

Defaults made for small models (FACTS.md: with a plain schema SmolLM2 wrote whitespace, or
invented properties, until max_tokens): JSON is compact (`"x-guidance": {"whitespace_flexible":
false}`) unless the schema says otherwise, and an object that lists its `properties` takes only
those unless it sets `additionalProperties` itself, as OpenAI's strict mode does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from edge_agent.errors import BadRequest
from edge_agent.protocol.strictjson import json_type

MAX_FORMAT_CHARS = 64_000
SCHEMA_MAPS = frozenset({"properties", "$defs", "definitions", "patternProperties", "dependentSchemas"})
FORMAT_TYPES = ("text", "json_object", "json_schema", "regex", "lark")
_FIELDS = {"text": set(), "json_object": set(), "json_schema": {"json_schema"}, "regex": {"regex"},
           "lark": {"grammar"}}


@dataclass(frozen=True)
class ResponseFormat:
    """`kind` is the runtime's guidance type: json_schema, regex or lark_grammar."""

    kind: str
    data: str
    json_answer: bool


def parse_response_format(value: Any) -> ResponseFormat | None:
    """None for {"type": "text"}; BadRequest naming the problem for anything malformed."""
    if not isinstance(value, dict):
        raise BadRequest(f"'response_format' must be an object, got {json_type(value)}")
    kind = value.get("type")
    if kind not in FORMAT_TYPES:
        raise BadRequest(f"response_format.type must be one of {', '.join(FORMAT_TYPES)}")
    unknown = sorted(set(value) - {"type"} - _FIELDS[kind])
    if unknown:
        raise BadRequest(f"response_format of type {kind!r} has unknown field(s): "
                         + ", ".join(repr(k[:64]) for k in unknown[:5]))
    missing = sorted(_FIELDS[kind] - set(value))
    if missing:
        raise BadRequest(f"response_format of type {kind!r} needs {', '.join(repr(m) for m in missing)}")
    if kind == "text":
        return None
    if kind == "json_object":
        return ResponseFormat("json_schema", _schema_text({"type": "object"}), True)
    if kind == "json_schema":
        return ResponseFormat("json_schema", _schema_text(_named_schema(value["json_schema"])), True)
    field = "regex" if kind == "regex" else "grammar"
    text = value[field]
    if not isinstance(text, str) or not text.strip():
        raise BadRequest(f"response_format.{field} must be a non-empty string")
    if len(text) > MAX_FORMAT_CHARS:
        raise BadRequest(f"response_format.{field} is over {MAX_FORMAT_CHARS} characters")
    return ResponseFormat("regex" if kind == "regex" else "lark_grammar", text, False)


def _named_schema(block: Any) -> dict[str, Any]:
    if not isinstance(block, dict):
        raise BadRequest(f"response_format.json_schema must be an object, got {json_type(block)}")
    unknown = sorted(set(block) - {"name", "schema", "strict", "description"})
    if unknown:
        raise BadRequest("response_format.json_schema has unknown field(s): "
                         + ", ".join(repr(k[:64]) for k in unknown[:5]))
    schema = block.get("schema")
    if not isinstance(schema, dict):
        raise BadRequest("response_format.json_schema.schema must be a JSON Schema object")
    return schema


def _schema_text(schema: dict[str, Any]) -> str:
    robust = _closed_objects(schema)
    robust.setdefault("x-guidance", {"whitespace_flexible": False})
    text = json.dumps(robust, ensure_ascii=False, separators=(",", ":"))
    if len(text) > MAX_FORMAT_CHARS:
        raise BadRequest(f"response_format schema is over {MAX_FORMAT_CHARS} characters")
    return text


def _closed_objects(node: Any) -> Any:
    """A copy where every object schema listing `properties` gets additionalProperties: false
    unless it says otherwise."""
    if isinstance(node, list):
        return [_closed_objects(item) for item in node]
    if not isinstance(node, dict):
        return node
    copy = {key: _closed_map(value) if key in SCHEMA_MAPS else _closed_objects(value)
            for key, value in node.items()}
    if isinstance(node.get("properties"), dict) and "additionalProperties" not in node:
        copy["additionalProperties"] = False
    return copy


def _closed_map(mapping: Any) -> Any:
    """`properties`, `$defs`...: a name -> schema mapping, itself no schema."""
    if not isinstance(mapping, dict):
        return mapping
    return {name: _closed_objects(schema) for name, schema in mapping.items()}


def json_value(text: str) -> tuple[bool, Any]:
    """(True, value) when the answer text is one JSON value, else (False, None): an answer cut
    by max_tokens is not valid JSON."""
    try:
        return True, json.loads(text)
    except ValueError:
        return False, None
