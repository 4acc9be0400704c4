"""What every settings module shares: the strict frozen base model, the name check for topic
levels and table names, and URL credential redaction. Imports nothing of settings/."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict

# One pattern for a topic level and the names requests use (cameras, templates, rules).
from edge_agent.protocol.requests import CAMERA_NAME as TOPIC_SEGMENT

URL_CREDENTIALS = re.compile(r"(://)[^/@]*@")


class StrictModel(BaseModel):
    """Unknown keys are errors; a built value never changes."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def redact(text: str | int) -> str:
    """`text` as it may be shown or logged: a URL's user name and password become ***."""
    return URL_CREDENTIALS.sub(r"\1***@", str(text))


def check_segment(value: str, what: str) -> str:
    if not TOPIC_SEGMENT.fullmatch(value):  # not match: "$" also matches before a final newline
        raise ValueError(f"{what} must be 1-64 characters of [A-Za-z0-9_.-], starting with a letter or digit (no '/', '+', '#', '$')")
    return value


def check_names(table: dict[str, Any], what: str) -> dict[str, Any]:
    """Names of [<section>.<name>] tables: requests name them, so no paths and no wildcards."""
    for name in table:
        check_segment(name, f"{what} name {name!r}")
    return table
