"""RequestHandler and deadlines with a stand-in engine (pure logic; the real engine is tested
in test_engine.py and over MQTT)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from typing import Any

from edge_agent.daemon.app import Agent
from edge_agent.work.intake import deadline
from edge_agent.errors import TooLarge
from edge_agent.work.handler import Job, RequestHandler, StreamSink
from edge_agent.inference import Generation, GenerationParams, Work
from edge_agent.protocol import Request

REQUEST = Request(id="r1", messages=({"role": "user", "content": "hi"},))


@dataclass
class StandInEngine:
    failure: Exception | None = None
    name: str = "stand-in"
    provider: str = "cpu"
    supports_images: bool = False

    def submit(self, work: Work, on_token=None) -> "StandInRun":  # noqa: ANN001 - mirrors LocalInference
        if self.failure:
            raise self.failure
        return StandInRun(work, on_token)


@dataclass
class StandInRun:
    work: Work
    on_token: Any
    cancelled: bool = False

    def result(self) -> Generation:
        if self.on_token is not None:
            for piece in ("o", "k"):
                self.on_token(piece)
        return Generation("ok", "cancelled" if self.cancelled else "stop", 3,
                          self.work.params.max_new_tokens, 1.0, 2.0)

    def cancel(self) -> None:
        self.cancelled = True


def handle(engine: StandInEngine, job: Job, chunks: list[tuple[int, str]] | None = None) -> tuple[dict, str]:
    publish = (lambda seq, delta: chunks.append((seq, delta))) if chunks is not None else None
    payload, outcome = RequestHandler(engine, 32, stream_interval_s=0).handle(job, publish)
    return json.loads(payload), outcome


def test_answer_uses_the_default_token_cap() -> None:
    doc, outcome = handle(StandInEngine(), Job(REQUEST, "t"))
    assert outcome == "ok" and doc["usage"]["completion_tokens"] == 32 and doc["model"] == "stand-in"


def test_unexpected_exception_is_answered_internal() -> None:
    doc, outcome = handle(StandInEngine(RuntimeError("boom")), Job(REQUEST, "t"))
    assert outcome == "internal" and doc["error"] == {"code": "internal", "message": "internal error: RuntimeError"}


def test_agent_error_keeps_its_code() -> None:
    doc, _ = handle(StandInEngine(TooLarge("prompt is 900 tokens")), Job(REQUEST, "t"))
    assert doc["error"]["code"] == "too_large" and doc["id"] == "r1"


def test_expired_job_is_not_run() -> None:
    engine = StandInEngine(RuntimeError("must not run"))
    doc, outcome = handle(engine, Job(REQUEST, "t", deadline=time.monotonic() - 0.1))
    assert outcome == "timeout" and "queued" in doc["error"]["message"]


def test_images_for_a_text_model_are_unsupported() -> None:
    with_image = Request(id="v", messages=REQUEST.messages, images=("aGk=",))
    doc, outcome = handle(StandInEngine(RuntimeError("must not run")), Job(with_image, "t"))
    assert outcome == "unsupported" and "takes no images" in doc["error"]["message"]


def test_deadline_is_the_smaller_of_timeout_and_message_expiry() -> None:
    assert deadline(100.0, 5.0, 2) == 102.0
    assert deadline(100.0, 5.0, None) == 105.0
    assert deadline(100.0, None, None) is None


def test_a_streamed_answer_sends_chunks_and_ends_with_done() -> None:
    chunks: list[tuple[int, str]] = []
    doc, outcome = handle(StandInEngine(), Job(replace(REQUEST, stream=True), "t"), chunks)
    assert outcome == "ok" and doc["done"] is True and chunks == [(1, "o"), (2, "k")]
    plain, _ = handle(StandInEngine(), Job(REQUEST, "t"), [])
    assert "done" not in plain  # a request that did not ask to stream gets today's answer


def test_stream_sink_coalesces_within_its_interval() -> None:
    sent: list[tuple[int, str]] = []
    sink = StreamSink(lambda seq, delta: sent.append((seq, delta)), interval_s=3600)
    for piece in ("a", "b", "c"):
        sink.add(piece)
    sink.flush()
    sink.flush()  # nothing pending: no empty chunk
    assert sent == [(1, "a"), (2, "bc")]


def test_a_job_cancelled_before_it_runs_is_answered_cancelled_without_generating() -> None:
    job = Job(REQUEST, "t")
    job.cancel()
    doc, outcome = handle(StandInEngine(RuntimeError("must not run")), job)
    assert outcome == "ok" and doc["finish_reason"] == "cancelled" and doc["text"] == ""


def test_a_cancel_reaches_the_running_request() -> None:
    job = Job(REQUEST, "t")
    run = StandInRun(Work(REQUEST.messages, GenerationParams(4)), None)
    job.running(run)
    job.cancel()
    assert run.cancelled
    late = StandInRun(run.work, None)
    job.running(late)  # handed over after the cancel came: cancelled at once
    assert late.cancelled
