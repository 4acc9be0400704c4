"""Settings of OpenAI-compatible servers: the backend (`[openai]`, with `[model] backend =
"openai"`) and the overflow (`[overflow]`). Split from model.py to keep modules small."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from edge_agent.settings.base import StrictModel

CREDENTIAL_NAME = "openai-api-key"  # systemd LoadCredential= name read when api_key_file is unset
OVERFLOW_WHEN = ("busy", "unloaded")


class RemoteServerSettings(StrictModel):
    base_url: str = Field("", description="the server's API root, e.g. http://10.0.0.9:11434/v1 "
                          "(Ollama), http://10.0.0.9:8080/v1 (llama.cpp), https://models.github.ai/inference")
    model: str = Field("", description="the model name the server knows (e.g. phi3.5)")
    api_key_file: Path | None = Field(None, description="file holding the API key; unset: the systemd "
                                      f"credential {CREDENTIAL_NAME} if there is one, else no key")
    api_key_header: str = Field("Authorization", pattern=r"^[A-Za-z0-9-]{1,64}$", description="the header "
                                "that carries the key: Authorization (as `Bearer <key>`), or e.g. api-key "
                                "(Azure OpenAI) for the key alone")
    timeout_s: float = Field(120.0, gt=0, le=3600, description="longest wait for the server, per request "
                             "(a request's own deadline may be shorter)")
    connect_timeout_s: float = Field(5.0, gt=0, le=120, description="longest wait to connect")
    verify_tls: bool = Field(True, description="check the server's certificate (https)")
    ca_file: Path | None = Field(None, description="CA certificate for a private https server")
    images: bool = Field(False, description="the model takes images (camera frames and `images` are "
                         "sent as data URLs); false: such requests are answered `unsupported`")
    schema_format: Literal["json_schema", "json_object"] = Field(
        "json_schema", description="how a JSON response_format is sent: json_schema (OpenAI's shape: "
        "OpenAI, Azure, Ollama, NIM, llama.cpp's llama-server) or json_object with a `schema` field "
        "(llama-cpp-python's server)")
    max_in_flight: int = Field(8, ge=1, le=256, description="requests sent to the server at once")
    circuit_failures: int = Field(3, ge=1, le=1000, description="failures in a row that open the "
                                  "circuit: requests are answered `unavailable` at once for a while")
    circuit_open_s: float = Field(30.0, gt=0, le=3600, description="how long the circuit stays open "
                                  "before one request tries the server again")

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if value and not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("base_url must be an http:// or https:// URL")
        return value.rstrip("/")


class OverflowSettings(RemoteServerSettings):
    when: tuple[Literal[OVERFLOW_WHEN], ...] = Field(  # type: ignore[valid-type]
        ("busy",), description="busy: a request that finds the queue full goes to this server instead "
        "of the answer `busy`; unloaded: requests go there while the local model is not loaded")
    allow_images: bool = Field(False, description="send requests with camera frames or images there "
                               "(frames may be private: off by default)")
    allow_templates: bool = Field(True, description="send requests made from prompt templates there")
