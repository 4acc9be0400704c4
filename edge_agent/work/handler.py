"""Request -> frames -> engine -> answer payload. Imports none of paho, cv2 or onnxruntime_genai."""

from __future__ import annotations

import time
from typing import Any, Callable, Protocol

from edge_agent.errors import AgentError, ErrorCode, Timeout, Unsupported
from edge_agent.inference.types import FINISH_CANCELLED, Generation, GenerationParams, Guidance, Work
from edge_agent.work.jobs import Job, RunningRequest
from edge_agent.log import get_logger
from edge_agent.protocol import Request, answer_payload, error_payload
from edge_agent.protocol.structured import json_value

log = get_logger("handler")


class Inference(Protocol):
    """The model behind a handler: the local inference process or an OpenAI-compatible server."""

    name: str
    provider: str
    supports_images: bool

    def submit(self, work: Work, on_token: Callable[[str], None] | None = None) -> RunningRequest: ...


class Gatherer(Protocol):
    def gather(self, request: Request) -> tuple[list[bytes], list[dict[str, Any]] | None]: ...


class StreamSink:
    """Coalesces a streamed answer's text into chunks at least `interval_s` apart."""

    def __init__(self, publish: Callable[[int, str], None], interval_s: float) -> None:
        self._publish = publish  # (seq, delta)
        self._interval_s = interval_s
        self._pending: list[str] = []
        self._sent_at = float("-inf")  # the first piece goes out at once
        self.seq = 0

    def add(self, text: str) -> None:
        self._pending.append(text)
        if time.monotonic() - self._sent_at >= self._interval_s:
            self.flush()

    def flush(self) -> None:
        delta = "".join(self._pending)
        if not delta:
            return
        self._pending.clear()
        self.seq += 1
        self._sent_at = time.monotonic()
        self._publish(self.seq, delta)


class RequestHandler:
    """Turns a job into the payload of its answer; every failure becomes an error payload."""

    def __init__(self, engine: Inference, max_new_tokens: int, gatherer: Gatherer | None = None,
                 on_generated: Callable[[Generation, float], None] | None = None,
                 stream_interval_s: float = 0.1) -> None:
        self._engine = engine
        self._max_new_tokens = max_new_tokens
        self._gatherer = gatherer
        self._on_generated = on_generated  # each engine result and its queue wait (stats, metrics)
        self._stream_interval_s = stream_interval_s

    @property
    def engine(self) -> Inference:
        return self._engine

    def handle(self, job: Job, publish_chunk: Callable[[int, str], None] | None = None) -> tuple[bytes, str]:
        """Returns (payload, outcome) where outcome is "ok" or an error code. `publish_chunk`
        sends a streamed request's chunks (seq, delta)."""
        request = job.request
        started = time.monotonic()
        if job.expired(started):
            return self._error(request, Timeout("deadline passed while the request was queued"))
        sink = StreamSink(publish_chunk, self._stream_interval_s) if request.stream and publish_chunk else None
        frames = None
        try:
            if job.cancelled:
                result = _nothing_generated()
            else:
                images, frames = self._images(request)
                handle = self._engine.submit(self._work(job, images), sink.add if sink else None)
                job.running(handle)
                result = handle.result()
        except AgentError as exc:
            return self._error(request, exc)
        except Exception as exc:  # noqa: BLE001 - one failing request must not stop the worker
            log.exception("request.failed")
            return error_payload(request.id, ErrorCode.INTERNAL, f"internal error: {type(exc).__name__}",
                                 done=request.stream), ErrorCode.INTERNAL.value
        if sink is not None:
            sink.flush()
        finished = time.monotonic()
        if self._on_generated is not None:
            self._on_generated(result, started - job.received_at)
        log.info("request.done", finish_reason=result.finish_reason, path=result.path,
                 prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                 cached_tokens=result.cached_tokens, ms=round((finished - job.received_at) * 1000, 1))
        return answer_payload(
            request.id, text=result.text, finish_reason=result.finish_reason,
            model=result.model or self._engine.name, provider=self._engine.provider,
            prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
            cached_tokens=result.cached_tokens, queue_ms=(started - job.received_at) * 1000, ttft_ms=result.ttft_ms,
            total_ms=(finished - job.received_at) * 1000, tokens_per_s=result.tokens_per_s,
            frames=frames, extra=self._extra(request, result),
        ), "ok"

    def _work(self, job: Job, images: list[bytes]) -> Work:
        request, rf = job.request, job.request.response_format
        params = GenerationParams(
            max_new_tokens=request.max_tokens or self._max_new_tokens, temperature=request.temperature,
            top_p=request.top_p, top_k=request.top_k, seed=request.seed,
            guidance=Guidance(rf.kind, rf.data, rf.json_answer) if rf is not None else None)
        return Work(request.messages, params, job.deadline, tuple(images), request.stream)

    @staticmethod
    def _extra(request: Request, result: Generation) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if request.response_format is not None and request.response_format.json_answer:
            parsed, value = json_value(result.text)
            if parsed:
                extra["json"] = value
        if request.history_counts is not None:
            given, matched = request.history_counts
            extra["history"] = {"events_given": given, "events_matched": matched}
        if request.stream:
            extra["done"] = True
        return extra

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
    def _error(request: Request, exc: AgentError) -> tuple[bytes, str]:
        log.info("request.rejected", code=exc.code.value, reason=exc.message)
        return error_payload(request.id, exc.code, exc.message, done=request.stream), exc.code.value


def _nothing_generated() -> Generation:
    """The answer of a request cancelled before it started."""
    return Generation(text="", finish_reason=FINISH_CANCELLED, prompt_tokens=0, completion_tokens=0,
                      ttft_ms=None, generate_ms=0.0)
