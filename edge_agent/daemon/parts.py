"""The parts made from one settings snapshot: the request limits, the engine, the state store."""

from __future__ import annotations

from pathlib import Path

from edge_agent.delivery.history import Bounds
from edge_agent.delivery.store import Store
from edge_agent.inference.memory import MemoryPlan, plan
from edge_agent.inference.process import LocalInference
from edge_agent.inference.openai_client import OpenAIServer
from edge_agent.protocol import RequestLimits
from edge_agent.protocol.prompts import PromptTemplate
from edge_agent.protocol.structured import parse_response_format
from edge_agent.settings.catalog import is_catalog_name, resolve_model_path
from edge_agent.settings.model import Settings


def request_limits(settings: Settings) -> RequestLimits:
    templates = {name: PromptTemplate(t.text, t.system, t.max_tokens,
                                      parse_response_format(t.response_format) if t.response_format else None)
                 for name, t in settings.prompts.templates.items()}
    return RequestLimits(max_payload_bytes=settings.limits.max_payload_bytes,
                         max_prompt_chars=settings.limits.max_prompt_chars,
                         max_tokens_cap=settings.model.max_new_tokens, max_timeout_s=settings.limits.max_timeout_s,
                         max_images=settings.images.max_images, camera_names=frozenset(settings.cameras),
                         allow_free_prompts=settings.prompts.allow_free_prompts, templates=templates)


def make_engine(settings: Settings) -> LocalInference | OpenAIServer:
    if settings.model.backend == "openai":
        return OpenAIServer(settings.openai, role="backend")
    model = settings.model
    inference = settings.inference
    folder = resolve_model_path(settings)
    engine = LocalInference(folder, model.provider, model.fallback, model.provider_options,
                           log_level=settings.log_level, log_format=settings.log_format,
                           longest_s=settings.limits.max_timeout_s, batching=inference.batching,
                           batch_wait_s=inference.batch_wait_ms / 1000,
                           batch_max_length=inference.batch_max_length, memory=memory_plan(settings, folder),
                           prefix_cache=inference.prefix_cache)
    if is_catalog_name(str(model.path)):
        engine.name = str(model.path)  # answers say "phi-3.5-mini-instruct", not the variant folder
    return engine


def open_store(settings: Settings) -> Store:
    delivery = settings.delivery
    return Store(settings.state_dir / "edge-agent.db", outbox_max_items=delivery.outbox_max_items,
                 outbox_max_age_s=delivery.outbox_max_age_s, dedup_window_s=delivery.dedup_window_s)


def history_bounds(settings: Settings) -> Bounds:
    history = settings.history
    return Bounds(history.max_events, history.max_age_days * 86400, int(history.max_mb * 1_000_000))


def memory_plan(settings: Settings, folder: Path | None = None) -> MemoryPlan | None:
    """The plan for the configured local model (None for a remote backend; `folder`: its path,
    when already resolved); ConfigError when the budget cannot hold its weights."""
    if settings.model.backend == "openai":
        return None
    inference = settings.inference
    return plan(folder or resolve_model_path(settings), settings.model.provider, inference.memory_mb,
                inference.batching, inference.batch_max_length)
