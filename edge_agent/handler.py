"""Request -> engine -> answer payload. Imports none of paho, cv2 or onnxruntime_genai."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from edge_agent.errors import AgentError, ErrorCode, Timeout, Unsupported
from edge_agent.log import get_logger
from edge_agent.protocol import Request, answer_payload, error_payload

log = get_logger("handler")


class Engine(Protocol):
    name: str
    provider: str
    supports_images: bool

    def generate(self, messages: tuple[dict[str, str], ...], params: Any,
                 deadline: float | None = None, images: Sequence[bytes] = ()) -> Any: ...


class Gatherer(Protocol):
    def gather(self, request: Request) -> tuple[list[bytes], list[dict[str, Any]] | None]: ...


@dataclass
class Job:
    """An accepted request on its way through the queue."""

    request: Request
    reply_topic: str
    correlation_data: bytes | None = None
    received_at: float = field(default_factory=time.monotonic)
    deadline: float | None = None  # time.monotonic() after which it must not run
    message: Any = None  # the MQTT message it came in, acknowledged once the answer is safe

    def expired(self, now: float | None = None) -> bool:
        return self.deadline is not None and (now or time.monotonic()) > self.deadline


class RequestHandler:
    """Turns a job into the payload of its answer; every failure becomes an error payload."""

    def __init__(self, engine: Engine, make_params: Any, max_new_tokens: int,
                 gatherer: Gatherer | None = None,
                 on_generated: Callable[[Any], None] | None = None) -> None:
        self._engine = engine
        self._make_params = make_params  # GenerationParams constructor, kept out of this module
        self._max_new_tokens = max_new_tokens
        self._gatherer = gatherer
        self._on_generated = on_generated  # sees each engine result (stats: decode speed)

    def handle(self, job: Job) -> tuple[bytes, str]:
        """Returns (payload, outcome) where outcome is "ok" or an error code."""
        request = job.request
        started = time.monotonic()
        if job.expired(started):
            return self._error(request.id, Timeout("deadline passed while the request was queued"))
        params = self._make_params(
            max_new_tokens=request.max_tokens or self._max_new_tokens,
            temperature=request.temperature, top_p=request.top_p, top_k=request.top_k,
            seed=request.seed)
        try:
            images, frames = self._images(request)
            result = self._engine.generate(request.messages, params, job.deadline, images)
        except AgentError as exc:
            return self._error(request.id, exc)
        except Exception as exc:  # noqa: BLE001 - one failing request must not stop the worker
            log.exception("request.failed")
            return error_payload(request.id, ErrorCode.INTERNAL,
                                 f"internal error: {type(exc).__name__}"), ErrorCode.INTERNAL.value
        finished = time.monotonic()
        if self._on_generated is not None:
            self._on_generated(result)
        log.info("request.done", finish_reason=result.finish_reason,
                 prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                 ms=round((finished - job.received_at) * 1000, 1))
        return answer_payload(
            request.id, text=result.text, finish_reason=result.finish_reason,
            model=self._engine.name, provider=self._engine.provider,
            prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
            queue_ms=(started - job.received_at) * 1000, ttft_ms=result.ttft_ms,
            total_ms=(finished - job.received_at) * 1000, tokens_per_s=result.tokens_per_s,
            frames=frames,
        ), "ok"

    def _images(self, request: Request) -> tuple[list[bytes], list[dict[str, Any]] | None]:
        if not request.image_count:
            return [], None
        if not self._engine.supports_images:
            raise Unsupported(f"model {self._engine.name} takes no images; use a vision model "
                              "such as Phi-3.5-vision")
        if self._gatherer is None:
            raise Unsupported("this agent has no image support configured")
        return self._gatherer.gather(request)

    @staticmethod
    def _error(request_id: str, exc: AgentError) -> tuple[bytes, str]:
        log.info("request.rejected", code=exc.code.value, reason=exc.message)
        return error_payload(request_id, exc.code, exc.message), exc.code.value
