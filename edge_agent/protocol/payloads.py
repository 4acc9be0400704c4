"""What the agent publishes: answers, errors, stream chunks. Pure."""

from __future__ import annotations

import json
from typing import Any, Mapping

from edge_agent.errors import ErrorCode


def encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def answer_payload(request_id: str, *, text: str, finish_reason: str, model: str, provider: str,
                   prompt_tokens: int, completion_tokens: int, queue_ms: float, ttft_ms: float | None,
                   total_ms: float, tokens_per_s: float, frames: list[dict[str, Any]] | None = None,
                   extra: Mapping[str, Any] | None = None, cached_tokens: int = 0) -> bytes:
    """`extra`: "json" (a structured answer's value), "done" (the end of a stream).
    `cached_tokens`: prompt tokens continued from a kept cache (OpenAI's
    prompt_tokens_details.cached_tokens)."""
    extra = {**(extra or {}), **({"frames": frames} if frames is not None else {})}
    return encode({
        "id": request_id, "ok": True, "text": text, "finish_reason": finish_reason,
        "model": model, "provider": provider,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "cached_tokens": cached_tokens},
        "timings": {"queue_ms": round(queue_ms, 1),
                    "ttft_ms": None if ttft_ms is None else round(ttft_ms, 1),
                    "total_ms": round(total_ms, 1), "tokens_per_s": round(tokens_per_s, 1)},
        **extra,
    })


def error_payload(request_id: str | None, code: ErrorCode, message: str, *, done: bool = False,
                  **extra: Any) -> bytes:
    """`done`: the request asked to stream; its error ends the stream too."""
    return encode({"id": request_id, "ok": False,
                   "error": {"code": code.value, "message": message, **extra},
                   **({"done": True} if done else {})})


def chunk_payload(request_id: str, seq: int, delta: str) -> bytes:
    """One piece of a streamed answer: `seq` counts from 1 without gaps."""
    return encode({"id": request_id, "seq": seq, "delta": delta, "done": False})
