"""What crosses the process boundary between the daemon and the inference child. Pure: the
daemon imports this module and never onnxruntime_genai (nor numpy)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.errors import ModelLoadError

WARMUP_TOKENS = 4
# Batching defaults, here so that both processes share them without the runtime: how long a
# request that finds the static engine idle waits for company, and the engine's cache length
# (its static cache is sized from it: 8192 for SmolLM2 ran 2x slower than 1024).
DEFAULT_BATCH_WAIT_S = 0.005
DEFAULT_BATCH_MAX_LENGTH = 1024
# How a generation ended: the model's end token, the token budget, a cancel.
FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED = "stop", "length", "cancelled"


@dataclass(frozen=True)
class Guidance:
    """Constrained decoding for ORT GenAI's `set_guidance`: kind is `json_schema`, `regex` or
    `lark_grammar`; data is the schema (JSON text), the pattern or the grammar."""

    kind: str
    data: str
    json_answer: bool  # the answer is JSON: parse it into the answer's "json"


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    guidance: Guidance | None = None

    @property
    def sampling(self) -> bool:
        return bool(self.temperature) or self.top_p is not None or self.top_k is not None

    def search_options(self) -> dict[str, Any]:
        """ORT GenAI search options; greedy unless the request asks for sampling."""
        options: dict[str, Any] = {"do_sample": self.sampling}
        if self.temperature:
            options["temperature"] = float(self.temperature)
        if self.top_p is not None:
            options["top_p"] = float(self.top_p)
        if self.top_k is not None:
            options["top_k"] = int(self.top_k)
        if self.seed is not None:
            options["random_seed"] = int(self.seed)
        return options


@dataclass(frozen=True)
class Generation:
    text: str
    finish_reason: str  # FINISH_STOP, FINISH_LENGTH or FINISH_CANCELLED
    prompt_tokens: int
    completion_tokens: int
    ttft_ms: float | None
    generate_ms: float
    path: str = "single"  # "single" (its own generator), "batch" (shared with others), "remote"
    model: str | None = None  # the model as a remote server names it (None: the local model)
    cached_tokens: int = 0  # prompt tokens taken from a cache instead of being computed again

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: tokens after the first over the time after the first (prefill excluded)."""
        if self.ttft_ms is None or self.completion_tokens < 2 or self.generate_ms <= self.ttft_ms:
            return 0.0
        return (self.completion_tokens - 1) / ((self.generate_ms - self.ttft_ms) / 1000)


@dataclass(frozen=True, kw_only=True)  # by name: two branches each added a field at the end
class LoadSpec:
    """What the child loads: the daemon's first message to it."""

    folder: str
    provider: str
    fallback: tuple[str, ...]
    provider_options: dict[str, Any]
    log_level: str
    log_format: str
    batching: bool = True
    batch_wait_s: float = DEFAULT_BATCH_WAIT_S
    batch_max_length: int = DEFAULT_BATCH_MAX_LENGTH
    # The memory plan's share for requests' own caches, and what a token of cache takes:
    # a request starts generating only when its cache fits (None: no budget).
    cache_budget_bytes: int | None = None
    kv_bytes_per_token: int = 0
    prefix_cache: bool = True  # keep finished generators' caches to continue a shared prompt prefix
    logits_bytes_per_token: int = 0  # a prompt's logits, held while it is read
    planned_load_bytes: int = 0  # what the plan expects the load to take: more comes off the caches' budget


@dataclass(frozen=True)
class LoadedInfo:
    """What the child loaded: its answer to LoadSpec."""

    provider: str
    provider_reason: str
    provider_attempts: tuple[Any, ...]
    context_length: int | None
    supports_images: bool
    batching: str  # "dynamic", "static" or "off"
    batching_reason: str
    batch_group: int
    loaded_bytes: int = 0  # what the load took (resident memory), the batching engine's warm group included


@dataclass(frozen=True)
class Work:
    """One request handed to the child."""

    messages: tuple[dict[str, str], ...]
    params: GenerationParams
    deadline: float | None = None  # time.monotonic(): the same clock in both processes
    images: tuple[bytes, ...] = ()
    stream: bool = False  # send each piece of text as it is decoded


def read_genai_config(folder: Path) -> dict[str, Any]:
    config_file = folder / "genai_config.json"
    try:
        return json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{folder} is not a model folder: no genai_config.json") from None
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {config_file}: {exc}") from exc


def takes_images(genai_config: dict[str, Any]) -> bool:
    """Phi-3(.5)-vision packages say type "phi3v"; they carry a vision session and processor."""
    model_section = genai_config.get("model", {})
    return model_section.get("type") == "phi3v" or "vision" in model_section
