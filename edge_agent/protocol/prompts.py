"""Prompt templates: named prompts from the settings whose plain `{name}` fields requests fill.

Pure, and deliberately not str.format: no attribute or index access, no conversions, no format
specs, and a value is put in as text, never formatted again.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Any, Mapping

VAR_NAME = re.compile(r"[a-z_][a-z0-9_]*")  # used with fullmatch


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt named in the settings; requests fill its `{name}` fields from `vars`."""

    text: str
    system: str | None = None
    max_tokens: int | None = None  # default and cap of the request's max_tokens
    response_format: Any = None  # structured.ResponseFormat the answers are held to, if any


def template_fields(text: str) -> tuple[str, ...]:
    """The field names of a template, in order. Only plain `{name}` fields: no positional or
    empty fields, no attribute or index access, no conversion, no format spec (ValueError)."""
    names: list[str] = []
    try:
        parts = list(string.Formatter().parse(text))
    except ValueError as exc:  # a lone '{' or '}'
        raise ValueError(f"{exc} (write '{{{{' and '}}}}' for braces)") from None
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if not VAR_NAME.fullmatch(name) or spec or conversion:
            shown = name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            raise ValueError(f"field {{{shown}}} is not a plain {{name}} of [a-z_][a-z0-9_]*")
        names.append(name)
    return tuple(names)


def render_template(text: str, values: Mapping[str, str]) -> str:
    """Substitutes each field by its value, as plain text: values are never formatted or
    expanded again, so a value holding `{x}` stays `{x}`."""
    out: list[str] = []
    for literal, name, _, _ in string.Formatter().parse(text):
        out.append(literal)
        if name is not None:
            out.append(values[name])
    return "".join(out)
