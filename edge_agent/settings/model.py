"""Settings: one immutable snapshot built from a TOML file overridden by the environment.

Precedence (highest first): environment `EDGE_AGENT_*` (`__` nests: `EDGE_AGENT_MQTT__PORT`),
the TOML file, defaults. Unknown keys and bad values are errors naming the file and key. This
module holds the models; files.py reads and merges the files.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from edge_agent.protocol.prompts import template_fields
from edge_agent.settings.base import StrictModel, check_names, check_segment
from edge_agent.settings.remote import OverflowSettings, RemoteServerSettings
from edge_agent.settings.watch import (HomeAssistantSettings, MotionSettings, WatchRuleSettings, checked_response_format,
                                       watch_problems)
from edge_agent.settings.zones import ZoneSettings

ENV_PREFIX = "EDGE_AGENT_"
CROSS_TABLE_MARK = "across tables:\n"  # a model-level error: one problem per line, each named
PROVIDERS = ("auto", "cpu", "cuda", "NvTensorRtRtx", "openvino", "qnn", "dml")
# Keys holding paths; relative values are taken relative to the config file's folder (so is a
# camera's file source: see _resolve_paths).
PATH_KEYS = (("model", "path"), ("state_dir",), ("mqtt", "password_file"), ("mqtt", "tls", "ca_file"),
             ("mqtt", "tls", "cert_file"), ("mqtt", "tls", "key_file"), ("openai", "api_key_file"),
             ("openai", "ca_file"), ("overflow", "api_key_file"), ("overflow", "ca_file"))


def _default_device_id() -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:64] or "edge"


class TlsSettings(StrictModel):
    ca_file: Path | None = Field(None, description="CA certificate that signed the broker's certificate")
    cert_file: Path | None = Field(None, description="client certificate, for mutual TLS")
    key_file: Path | None = Field(None, description="client private key, for mutual TLS")


class MqttSettings(StrictModel):
    host: str = Field("localhost", description="broker host name or address")
    port: int = Field(1883, ge=1, le=65535, description="broker port")
    topic_prefix: str = Field("edge-agent", description="first topic level of every topic")
    protocol: Literal["5", "3.1.1"] = Field("5", description="MQTT protocol version")
    client_id: str | None = Field(None, max_length=128, description="default: edge-agent-<device_id>")
    keepalive: int = Field(30, ge=5, le=3600, description="seconds between keep-alive pings")
    username: str | None = Field(None, description="broker user name")
    password_file: Path | None = Field(None, description="file holding the broker password")
    tls: TlsSettings | None = Field(None, description="TLS to the broker; absent = plain TCP")
    reply_topic_allow: tuple[str, ...] = Field(
        ("#",), description="topic filters a reply topic must match ('$' topics never allowed)")
    session_expiry_s: int = Field(3600, ge=0, le=2**32 - 1, description="how long the broker keeps "
                                  "our session and queued requests while we are away; 0 = clean session")
    shared_group: str | None = Field(None, description="also take requests from the MQTT 5 shared "
                                     "subscription $share/<group>/<prefix>/fleet/request")
    fleet_max_hops: int = Field(4, ge=0, le=64, description="MQTT 5: a fleet request that finds the queue "
                                "full goes back to the pool (re-published) unless members passed it on this "
                                "often already; then the overflow server or `busy`. 0 = never pass on")
    receive_maximum: int | None = Field(None, ge=1, le=65535, description="MQTT 5: most requests the "
                                        "broker may hand us unacknowledged; default queue_size + 32 (room "
                                        "to answer `busy` to the excess; a backlog comes paced, not at once)")
    reconnect_min_s: float = Field(1.0, gt=0, le=60, description="first reconnect delay")
    reconnect_max_s: float = Field(30.0, gt=0, le=3600, description="reconnect delay cap")

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value

    @field_validator("topic_prefix")
    @classmethod
    def _prefix_is_segment(cls, value: str) -> str:
        return check_segment(value, "topic_prefix")

    @field_validator("shared_group")
    @classmethod
    def _group_is_segment(cls, value: str | None) -> str | None:
        return None if value is None else check_segment(value, "shared_group")


class ModelSettings(StrictModel):
    backend: Literal["onnxruntime-genai", "openai"] = Field(
        "onnxruntime-genai", description="onnxruntime-genai: the local model below; openai: the "
        "OpenAI-compatible server of [openai] (the local model settings are then unused)")
    path: Path = Field(Path("/var/lib/edge-agent/models/default"),
                       description="folder holding genai_config.json, or a catalog model name "
                       "(`edge-agent models list`) pulled under state_dir/models")
    provider: Literal[PROVIDERS] = Field("auto", description="execution provider")  # type: ignore[valid-type]
    provider_options: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="options passed to the chosen provider (e.g. device_id)")
    fallback: tuple[Literal[PROVIDERS], ...] = Field(  # type: ignore[valid-type]
        ("cpu",), description="providers tried, in order, when the chosen one fails; empty = strict")
    max_new_tokens: int = Field(256, ge=1, le=32768, description="default and cap of max_tokens")
    warmup: bool = Field(True, description="run one short generation before reporting ready")


class CameraSettings(StrictModel):
    source: str | int = Field(description="V4L2 index or /dev/videoN, a file (looped), an rtsp/http(s)/"
                              "udp/tcp URL, or a GStreamer pipeline (contains '!')")
    mode: Literal["continuous", "on_demand"] = Field(
        "continuous", description="continuous: a thread decodes every frame and keeps the latest; "
        "on_demand: open and grab only when a request needs a frame (saves CPU)")
    width: int | None = Field(None, ge=16, le=8192, description="requested capture width")
    height: int | None = Field(None, ge=16, le=8192, description="requested capture height")
    fps: float | None = Field(None, gt=0, le=240, description="requested capture rate")
    rotate: Literal[0, 90, 180, 270] = Field(0, description="clockwise rotation applied to frames")
    max_frame_age_ms: int = Field(1000, ge=1, le=600_000, description="older frames are never used")
    fresh_wait_ms: int = Field(2000, ge=0, le=60_000, description="how long a request waits for a fresh frame")
    open_timeout_s: float = Field(10.0, gt=0, le=120, description="give up opening the source after this")
    read_timeout_s: float = Field(5.0, gt=0, le=120, description="a read slower than this counts as a "
                                  "failure; V4L2 reads all wait the largest of the V4L2 cameras' (OpenCV has "
                                  "one for the process), so a shorter one fails on time but reopens after that")
    reconnect_min_s: float = Field(0.5, gt=0, le=60, description="first reopen delay")
    reconnect_max_s: float = Field(30.0, gt=0, le=3600, description="reopen delay cap")
    motion: MotionSettings = Field(default_factory=MotionSettings, description="[cameras.<name>.motion]")
    zones: dict[str, ZoneSettings] = Field(default_factory=dict, description="[cameras.<name>.zones.<zone>]: "
                                           "motion tracked and published per zone (needs motion enabled)")

    @field_validator("zones")
    @classmethod
    def _zone_names(cls, value: dict[str, ZoneSettings]) -> dict[str, ZoneSettings]:
        return check_names(value, "zone")


class ImageSettings(StrictModel):
    max_image_bytes: int = Field(3 * 1024 * 1024, ge=1024, description="encoded size cap of one image")
    max_image_pixels: int = Field(40_000_000, ge=1024, description="declared width*height cap")
    max_images: int = Field(4, ge=1, le=16, description="images (all sources) in one request")
    longest_side: int = Field(1008, ge=64, le=8192, description="images are downscaled to this")
    jpeg_quality: int = Field(90, ge=30, le=100, description="quality of the re-encoded JPEG")


class DeliverySettings(StrictModel):
    outbox_max_items: int = Field(10000, ge=1, description="answers kept on disk until the broker has them")
    outbox_max_age_s: float = Field(86400.0, gt=0, description="older unsent answers are dropped (counted)")
    dedup_window_s: float = Field(3600.0, ge=0, description="a request id seen this recently is not run again")
    answer_qos: Literal[1, 2] = Field(2, description="QoS of answers: 2 = no copies on a hop whose both "
                                      "ends keep their state; 1 for brokers without QoS 2 (AWS IoT Core)")


class HistorySettings(StrictModel):
    enabled: bool = Field(True, description="keep every published rule state, with the frame the model "
                          "saw, in state_dir (history.db, history/<id>.jpg); ask about it with a "
                          "request's `history` or `edge-agent events`")
    max_events: int = Field(10_000, ge=1, le=10_000_000, description="events kept; the oldest go first")
    max_age_days: float = Field(30.0, gt=0, le=3650, description="older events are deleted")
    max_mb: float = Field(500.0, gt=0, le=1_048_576, description="the events and their snapshot files, in "
                          "MB (10^6 bytes); the oldest go first")


class LimitsSettings(StrictModel):
    queue_size: int = Field(8, ge=1, le=10000, description="requests waiting for a free inference slot")
    max_payload_bytes: int = Field(4 * 1024 * 1024, ge=512, le=64 * 1024 * 1024,
                                   description="request size cap (base64 images count: 4/3 of their bytes)")
    max_prompt_chars: int = Field(16000, ge=1, description="prompt (all messages) length cap")
    max_timeout_s: float = Field(3600.0, gt=0, description="largest timeout_s a request may ask")


class InferenceSettings(StrictModel):
    max_batch: int | None = Field(None, ge=1, le=256, description="requests generating at once "
                                  "(the rest wait in the queue); default 8 on CPU, 16 on an accelerator")
    batching: bool = Field(True, description="let requests share the runtime's batching engine "
                           "(og.Engine, onnxruntime-genai 0.16+); false: each its own generator, interleaved")
    batch_wait_ms: float = Field(5.0, ge=0, le=1000, description="CPU (static) batching: how long a "
                                 "request that finds the engine idle waits for others to start with it")
    memory_mb: float = Field(0, ge=0, le=16_777_216, description="memory for the model and its caches, "
                             "in MB; 0: the box's (cgroup limit or available memory at start, less a reserve; a "
                             "discrete GPU's free memory with provider cuda or trt-rtx)")
    batch_max_length: int = Field(1024, ge=64, le=131072, description="the batching engine's cache per "
                                  "request (prompt + answer tokens); longer requests run on their own generator")
    prefix_cache: bool = Field(True, description="keep the caches of the last greedy requests (up to 4, "
                               "within the memory budget) and continue a new prompt from the longest shared "
                               "token prefix instead of computing it again (usage.cached_tokens); false: off")


class StreamSettings(StrictModel):
    interval_ms: int = Field(100, ge=0, le=60_000, description="chunks of a streamed answer are at "
                             "least this far apart (tokens in between are coalesced)")


class MetricsSettings(StrictModel):
    listen: str = Field("", description="HOST:PORT of the /metrics and /healthz listener "
                        "(Prometheus text format; no authentication); empty: off")

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if value:
            listen_address(value)
        return value


def listen_address(value: str) -> tuple[str, int]:
    """'HOST:PORT' (IPv6 in brackets) as (host, port); ValueError naming the problem."""
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not HOST:PORT with a port from 1 to 65535 (e.g. 127.0.0.1:9464)")
    return host, int(port)


class TemplateSettings(StrictModel):
    text: str = Field(min_length=1, description="the user message; each {name} is replaced by the "
                      "request's vars.name (plain {name} fields only; '{{' and '}}' for braces)")
    system: str | None = Field(None, min_length=1, description="system message sent before it")
    max_tokens: int | None = Field(None, ge=1, le=32768, description="default and cap of the "
                                   "request's max_tokens (at most model.max_new_tokens)")
    response_format: dict[str, Any] | None = Field(None, description="as a request's response_format "
                                                   "(docs/protocol.md); a request's own one wins")

    @field_validator("text")
    @classmethod
    def _plain_fields(cls, value: str) -> str:
        template_fields(value)  # ValueError names the bad field
        return value

    @field_validator("response_format")
    @classmethod
    def _known_format(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return checked_response_format(value)


class PromptSettings(StrictModel):
    allow_free_prompts: bool = Field(True, description="accept prompt, messages and system from "
                                     "requests; false: only the templates below ('forbidden' otherwise)")
    templates: dict[str, TemplateSettings] = Field(default_factory=dict,
                                                   description="[prompts.templates.<name>] tables")

    @field_validator("templates")
    @classmethod
    def _template_names(cls, value: dict[str, TemplateSettings]) -> dict[str, TemplateSettings]:
        return check_names(value, "template")

    @model_validator(mode="after")
    def _something_allowed(self) -> PromptSettings:
        if not self.allow_free_prompts and not self.templates:
            raise ValueError("allow_free_prompts = false needs at least one [prompts.templates.<name>]")
        return self


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__",
                                      extra="forbid", frozen=True)

    device_id: str = Field(default_factory=_default_device_id, description="this box's topic level")
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    cameras: dict[str, CameraSettings] = Field(default_factory=dict, description="[cameras.<name>] tables")
    images: ImageSettings = Field(default_factory=ImageSettings)
    delivery: DeliverySettings = Field(default_factory=DeliverySettings)
    history: HistorySettings = Field(default_factory=HistorySettings, description="[history]: rule events kept")
    prompts: PromptSettings = Field(default_factory=PromptSettings)
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    stream: StreamSettings = Field(default_factory=StreamSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    openai: RemoteServerSettings = Field(default_factory=RemoteServerSettings,
                                         description="the server when model.backend = \"openai\"")
    overflow: OverflowSettings = Field(default_factory=OverflowSettings, description="a server that takes "
                                       "what the local model cannot; off while base_url is empty")
    watch: dict[str, WatchRuleSettings] = Field(default_factory=dict, description="[watch.<name>] rules")
    homeassistant: HomeAssistantSettings = Field(default_factory=HomeAssistantSettings)
    shutdown_grace_s: float = Field(10.0, ge=0, le=600, description="time to finish the running requests")
    state_dir: Path = Field(Path("/var/lib/edge-agent"), description="models pulled from the catalog "
                            "and the state database (outbox, request ids seen) live here")
    stats_interval_s: float = Field(60.0, ge=0, le=86400, description="seconds between stats; 0 = off")
    reload_debounce_s: float = Field(1.0, ge=0, le=60, description="quiet time after a config edit "
                                     "before it is applied")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info")
    log_format: Literal["auto", "json", "console"] = Field("auto", description="auto: JSON unless a TTY")

    @field_validator("device_id")
    @classmethod
    def _device_is_segment(cls, value: str) -> str:
        if value == "fleet":  # <prefix>/fleet/request is the shared fleet topic
            raise ValueError("device_id 'fleet' is reserved for the fleet topics")
        return check_segment(value, "device_id")

    @field_validator("cameras")
    @classmethod
    def _camera_names(cls, value: dict[str, CameraSettings]) -> dict[str, CameraSettings]:
        return check_names(value, "camera")

    @field_validator("watch")
    @classmethod
    def _rule_names(cls, value: dict[str, WatchRuleSettings]) -> dict[str, WatchRuleSettings]:
        return check_names(value, "watch rule")

    @model_validator(mode="after")
    def _tables_agree(self) -> Settings:
        problems = [f"prompts.templates.{name}.max_tokens ({t.max_tokens}) is over "
                    f"model.max_new_tokens ({self.model.max_new_tokens})"
                    for name, t in self.prompts.templates.items()
                    if t.max_tokens is not None and t.max_tokens > self.model.max_new_tokens]
        problems += watch_problems(self)
        if self.model.backend == "openai" and not (self.openai.base_url and self.openai.model):
            problems.append("openai: model.backend = \"openai\" needs openai.base_url and openai.model")
        if self.overflow.base_url and not self.overflow.model:
            problems.append("overflow.model: the overflow server needs a model name")
        if problems:
            raise ValueError(CROSS_TABLE_MARK + "\n".join(problems))
        return self

    @property
    def motion_zones(self) -> list[tuple[str, str]]:
        """(camera, zone) of every zone whose motion is tracked: its camera watches for motion."""
        return [(name, zone) for name, cam in self.cameras.items() if cam.motion.enabled for zone in cam.zones]

    @property
    def client_id(self) -> str:
        return self.mqtt.client_id or f"edge-agent-{self.device_id}"

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings],
                                   init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's contents arrive as init kwargs; the environment must win over them.
        return (env_settings, init_settings)

