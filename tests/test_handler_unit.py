"""RequestHandler and deadlines with a stand-in engine (pure logic; the real engine is tested
in test_engine.py and over MQTT)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from edge_agent.app import Agent
from edge_agent.errors import TooLarge
from edge_agent.handler import Job, RequestHandler
from edge_agent.inference import Generation, GenerationParams
from edge_agent.protocol import Request

REQUEST = Request(id="r1", messages=({"role": "user", "content": "hi"},))


@dataclass
class StandInEngine:
    failure: Exception | None = None
    name: str = "stand-in"
    provider: str = "cpu"
    supports_images: bool = False

    def generate(self, messages, params, deadline=None, images=()):  # noqa: ANN001 - mirrors OrtGenaiEngine
        if self.failure:
            raise self.failure
        return Generation("ok", "stop", 3, params.max_new_tokens, 1.0, 2.0)


def handle(engine: StandInEngine, job: Job) -> tuple[dict, str]:
    payload, outcome = RequestHandler(engine, GenerationParams, 32).handle(job)
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
    assert Agent._deadline(100.0, 5.0, 2) == 102.0
    assert Agent._deadline(100.0, 5.0, None) == 105.0
    assert Agent._deadline(100.0, None, None) is None
