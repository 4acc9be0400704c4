"""Topic names, and the rules for the topics a request may ask its answer to go to. Pure."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from edge_agent.errors import BadRequest
from edge_agent.protocol.strictjson import json_type

MAX_TOPIC_CHARS = 512
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# A camera's, rule's, zone's or template's name: one topic segment (settings check names by it).
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


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

    @property
    def stats(self) -> str:
        return f"{self.base}/stats"

    @property
    def cancel(self) -> str:
        """`{"id": ...}` here ends that request, queued or running."""
        return f"{self.base}/cancel"

    @property
    def fleet_cancel(self) -> str:
        """Every member subscribes (not shared): whichever took the request ends it."""
        return f"{self.prefix}/fleet/cancel"

    @property
    def fleet_request(self) -> str:
        """Requests any agent of a shared group may take (`mqtt.shared_group`)."""
        return f"{self.prefix}/fleet/request"

    @property
    def fleet_response(self) -> str:
        return f"{self.prefix}/fleet/response"

    @property
    def events(self) -> str:
        """Not retained: a watch rule's value changed."""
        return f"{self.base}/events"

    def watch(self, rule: str) -> str:
        """Retained: a watch rule's last published state."""
        return f"{self.base}/watch/{rule}"

    def motion(self, camera: str) -> str:
        """Retained: `ON` or `OFF`."""
        return f"{self.base}/camera/{camera}/motion"

    def zone_motion(self, camera: str, zone: str) -> str:
        """Retained: `ON` or `OFF` for one zone of a camera."""
        return f"{self.base}/camera/{camera}/zone/{zone}/motion"

    def watch_snapshot(self, rule: str) -> str:
        """Retained: the JPEG (raw bytes) the model saw at the rule's last published run; the
        history's answers name an event's snapshot by this topic too."""
        return f"{self.base}/watch/{rule}/snapshot"

    @property
    def ha_prompt(self) -> str:
        """Home Assistant's `text` entity publishes a prompt here (plain text)."""
        return f"{self.base}/ha/prompt"

    @property
    def ha_answer(self) -> str:
        """Retained: the answer to the last Home Assistant prompt."""
        return f"{self.base}/ha/answer"

    def shared_fleet_request(self, group: str) -> str:
        """The shared subscription: the broker hands each fleet request to one group member."""
        return f"$share/{group}/{self.fleet_request}"


def check_topic_name(topic: Any, what: str = "reply topic") -> str:
    """A topic we may publish to: no wildcards, no `$` topics, no empty levels."""
    if not isinstance(topic, str):
        raise BadRequest(f"{what} must be a string, got {json_type(topic)}")
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
