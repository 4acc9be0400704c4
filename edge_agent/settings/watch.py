"""Settings of the agent's own looking: motion per camera, watch rules, Home Assistant discovery.

Split from model.py to keep modules small; `Settings` holds these tables and checks what
crosses tables (a rule's camera exists and runs continuously, its template's fields are filled).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from edge_agent.errors import AgentError
from edge_agent.protocol.prompts import template_fields
from edge_agent.protocol.structured import parse_response_format
from edge_agent.settings.base import StrictModel, check_segment
from edge_agent.settings.zones import Polygon, check_mask


def checked_response_format(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """A response_format from the settings, checked as a request's would be (ValueError)."""
    if value is not None:
        try:
            parse_response_format(value)
        except AgentError as exc:
            raise ValueError(exc.message) from None
    return value


class MotionSettings(StrictModel):
    """A Frigate-style detector on a small grayscale copy of the frames the capture thread grabs."""

    enabled: bool = Field(False, description="detect motion on this camera (mode = continuous only)")
    threshold: int = Field(30, ge=1, le=255, description="a pixel differing from the running average "
                           "by more than this (0-255, after contrast stretching) counts as changed")
    contour_area: int = Field(10, ge=1, le=100_000, description="a changed region counts as motion "
                              "when its area (pixels at frame_height) is over this")
    frame_height: int = Field(100, ge=16, le=1080, description="frames are scaled to this height first")
    frame_alpha: float = Field(0.01, gt=0, le=1, description="weight of each frame in the running average")
    fps: float = Field(5.0, gt=0, le=30, description="frames looked at per second (at most the camera's rate)")
    off_delay_s: float = Field(3.0, ge=0, le=3600, description="motion turns OFF after this long without any")
    mask: tuple[Polygon, ...] = Field((), description="[[[x, y], ...], ...]: polygons (relative 0-1 "
                                      "coordinates) where motion never counts: a tree, a clock, a road")

    @field_validator("mask", mode="before")
    @classmethod
    def _polygons(cls, value: Any) -> tuple[Polygon, ...]:
        return check_mask(value)


class WatchRuleSettings(StrictModel):
    """`[watch.<name>]`: look at a camera on a schedule or on motion, ask a fixed question."""

    camera: str = Field(description="a camera of [cameras]")
    prompt: str | None = Field(None, min_length=1, description="the question (or give template)")
    system: str | None = Field(None, min_length=1, description="system message sent before the prompt")
    template: str | None = Field(None, description="a [prompts.templates.<name>] instead of prompt")
    vars: dict[str, str] = Field(default_factory=dict, description="the template's {name} values")
    response_format: dict[str, Any] | None = Field(None, description="as a request's response_format; "
                                                   "absent: plain text (or the template's)")
    every_s: float | None = Field(None, ge=0.5, le=86400 * 7, description="run on this schedule")
    on_motion: bool = Field(False, description="run when the camera's motion turns ON "
                            "(needs [cameras.<camera>.motion] enabled = true)")
    zone: str | None = Field(None, description="a [cameras.<camera>.zones.<zone>]: on_motion fires on "
                             "that zone's motion only")
    crop: bool = Field(False, description="with zone: the model sees the zone's bounding box (plus a "
                       "margin) cut from the full-resolution frame instead of the whole frame")
    snapshot: bool = Field(True, description="publish the JPEG the model saw, retained, on "
                           "<prefix>/<device_id>/watch/<rule>/snapshot when the rule publishes")
    snapshot_max_bytes: int = Field(200_000, ge=2_000, le=5_000_000, description="a larger snapshot "
                                    "is re-encoded smaller (lower quality, then smaller size) until it fits")
    cooldown_s: float = Field(0.0, ge=0, le=86400, description="least time between two runs")
    publish: Literal["change", "always"] = Field("change", description="publish the state on every "
                                                 "run, or only when the value changed")
    change_key: tuple[str, ...] = Field((), description="JSON answers: the field(s) whose values count "
                                        "as a change (a name or a list); empty: the whole value")
    max_tokens: int | None = Field(None, ge=1, le=32768, description="answer length cap")
    enabled: bool = Field(True, description="false: the rule does not run (kept in the file)")

    @field_validator("change_key", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value

    @field_validator("response_format")
    @classmethod
    def _known_format(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return checked_response_format(value)

    @model_validator(mode="after")
    def _complete(self) -> WatchRuleSettings:
        if (self.prompt is None) == (self.template is None):
            raise ValueError("give exactly one of prompt and template")
        if self.template is None and self.vars:
            raise ValueError("vars needs template")
        if self.template is not None and self.system is not None:
            raise ValueError("system comes from the template; give it there")
        if self.every_s is None and not self.on_motion:
            raise ValueError("give every_s, on_motion = true, or both")
        if self.crop and self.zone is None:
            raise ValueError("crop needs zone")
        if self.change_key and self.response_format is not None \
                and self.response_format.get("type") not in ("json_object", "json_schema"):
            raise ValueError("change_key needs a JSON response_format (json_object or json_schema)")
        return self


class HomeAssistantSettings(StrictModel):
    enabled: bool = Field(False, description="announce this agent to Home Assistant (MQTT discovery)")
    discovery_prefix: str = Field("homeassistant", description="Home Assistant's discovery prefix")

    @field_validator("discovery_prefix")
    @classmethod
    def _prefix_is_segment(cls, value: str) -> str:
        return check_segment(value, "discovery_prefix")


def watch_problems(settings: Any) -> list[str]:
    """What ties rules to other tables; each problem names the rule and the key."""
    problems: list[str] = []
    for name, cam in settings.cameras.items():
        if cam.motion.enabled and cam.mode != "continuous":
            problems.append(f"cameras.{name}.motion: motion detection needs mode = \"continuous\" "
                            f"(an on_demand camera grabs no frames between requests)")
        if cam.zones and not cam.motion.enabled:
            problems.append(f"cameras.{name}.zones: zones track motion; set [cameras.{name}.motion] enabled = true")
    for name, rule in settings.watch.items():
        where = f"watch.{name}"
        camera = settings.cameras.get(rule.camera)
        if camera is None:
            known = ", ".join(sorted(settings.cameras)) or "none configured"
            problems.append(f"{where}.camera: unknown camera {rule.camera!r} ({known})")
        elif rule.on_motion and not camera.motion.enabled:
            problems.append(f"{where}.on_motion: camera {rule.camera!r} has no motion detection; "
                            f"set [cameras.{rule.camera}.motion] enabled = true")
        elif rule.zone is not None and rule.zone not in camera.zones:
            known = ", ".join(sorted(camera.zones)) or "none configured"
            problems.append(f"{where}.zone: camera {rule.camera!r} has no zone {rule.zone!r} ({known})")
        if rule.template is not None:
            problems.extend(_template_problems(where, rule, settings))
        cap = settings.model.max_new_tokens
        if rule.max_tokens is not None and rule.max_tokens > cap:
            problems.append(f"{where}.max_tokens: {rule.max_tokens} is over model.max_new_tokens ({cap})")
        format_type = (rule_response_format(rule, settings) or {}).get("type")
        if rule.change_key and format_type not in ("json_object", "json_schema"):
            problems.append(f"{where}.change_key: needs a JSON response_format (json_object or json_schema)")
    return problems


def _template_problems(where: str, rule: WatchRuleSettings, settings: Any) -> list[str]:
    template = settings.prompts.templates.get(rule.template)
    if template is None:
        known = ", ".join(sorted(settings.prompts.templates)) or "none configured"
        return [f"{where}.template: unknown template {rule.template!r} ({known})"]
    fields = set(template_fields(template.text))
    missing, unknown = sorted(fields - set(rule.vars)), sorted(set(rule.vars) - fields)
    problems = []
    if missing:
        problems.append(f"{where}.vars: template {rule.template!r} needs {', '.join(missing)}")
    if unknown:
        problems.append(f"{where}.vars: template {rule.template!r} has no field(s) {', '.join(unknown)}")
    return problems


def rule_response_format(rule: WatchRuleSettings, settings: Any) -> dict[str, Any] | None:
    """The rule's own response_format, else its template's."""
    if rule.response_format is not None:
        return rule.response_format
    template = settings.prompts.templates.get(rule.template) if rule.template else None
    return template.response_format if template is not None else None
