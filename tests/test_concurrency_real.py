"""Many requests at once, streaming, cancel and structured output with a real small instruct
model (SmolLM2-135M-Instruct), where answers are long enough to overlap and facts can be read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

from support import AgentProcess, Broker, Client
from test_concurrency import answers_for, collect, finals, send

pytestmark = pytest.mark.slow
FRANCE = "What is the capital of France?"
STORY = "Write a long story about a lighthouse keeper and his cat."


@pytest.fixture
def real_agent(broker: Broker, client: Client, smollm2_model: Path,
               start_agent: Callable[..., AgentProcess]) -> AgentProcess:
    agent = start_agent(broker, client, model=smollm2_model, model__max_new_tokens=200, limits__queue_size=16)
    client.subscribe(agent.response_topic)
    return agent


QUESTIONS = [FRANCE, "What is the capital of Italy?", "Is the door open?", "Say hello to the new neighbours, please."]


def test_eight_at_once_share_the_batch_and_answer_as_alone(real_agent: AgentProcess, client: Client) -> None:
    """Prompts of different lengths in one batched generator (padded on the right) get the
    answers they get alone."""
    alone = {}
    for n, question in enumerate(QUESTIONS):
        send(client, real_agent, id=f"alone{n}", prompt=question, max_tokens=40)
        alone[n] = answers_for(client, real_agent, [f"alone{n}"])[f"alone{n}"]
    assert "Paris" in alone[0]["text"] and alone[0]["finish_reason"] == "stop"
    ids = [f"q{n}" for n in range(8)]
    for n, rid in enumerate(ids):
        send(client, real_agent, id=rid, prompt=QUESTIONS[n % 4], max_tokens=40)
    got = answers_for(client, real_agent, ids)
    for n, rid in enumerate(ids):
        assert got[rid]["text"] == alone[n % 4]["text"], (got[rid], alone[n % 4])
        for count in ("prompt_tokens", "completion_tokens"):  # cached_tokens: what was kept then
            assert got[rid]["usage"][count] == alone[n % 4]["usage"][count]
    paths = [line["path"] for line in real_agent.log_lines()
             if line.get("event") == "request.done" and line.get("request_id") in ids]
    # together: one batched generator ("group"); at most the first runs alone
    assert paths.count("group") >= 7, paths


def test_one_of_a_batch_is_cancelled_and_one_times_out_the_others_go_on(
        real_agent: AgentProcess, client: Client) -> None:
    # The first of a burst to an idle engine may start alone (no company was coming): the three
    # after it share a batch.
    send(client, real_agent, id="lead", prompt=STORY, max_tokens=120)
    send(client, real_agent, id="keep", prompt=STORY, max_tokens=120)
    send(client, real_agent, id="stop", prompt=STORY, max_tokens=120, stream=True)
    send(client, real_agent, id="late", prompt=STORY, max_tokens=120, timeout_s=1.0)
    collect(client, lambda ms: any(m.get("id") == "stop" and m.get("seq") == 3 for m in ms))
    client.publish(f"{real_agent.prefix}/{real_agent.device_id}/cancel", json.dumps({"id": "stop"}))
    got = answers_for(client, real_agent, ["lead", "keep", "stop", "late"])
    assert got["stop"]["finish_reason"] == "cancelled" and 0 < got["stop"]["usage"]["completion_tokens"] < 120
    assert got["late"]["error"]["code"] == "timeout" and "generated tokens" in got["late"]["error"]["message"]
    assert got["keep"]["ok"] and got["keep"]["usage"]["completion_tokens"] == 120, got["keep"]
    paths = {line["request_id"]: line["path"] for line in real_agent.log_lines() if line.get("event") == "request.done"}
    assert paths["stop"] in ("group", "batch") and paths["keep"] in ("group", "batch"), paths  # shared


def test_a_running_request_is_cancelled_with_the_text_so_far(real_agent: AgentProcess, client: Client) -> None:
    send(client, real_agent, id="story", prompt=STORY, max_tokens=200, stream=True)
    got = collect(client, lambda ms: sum(1 for m in ms if m.get("seq")) >= 3)  # it is generating
    client.publish(f"{real_agent.prefix}/{real_agent.device_id}/cancel", json.dumps({"id": "story"}))
    got += collect(client, lambda ms: "story" in finals(ms))
    final = finals(got)["story"]
    chunks = [m["delta"] for m in got if m.get("seq")]
    assert final["ok"] and final["finish_reason"] == "cancelled" and final["done"] is True, final
    assert 0 < final["usage"]["completion_tokens"] < 200 and final["text"].startswith("".join(chunks[:3]))
    assert "".join(chunks) == final["text"]


@pytest.mark.parametrize("response_format,check", [
    ({"type": "json_object"}, lambda value: isinstance(value, dict)),
    ({"type": "json_schema", "json_schema": {"name": "capital", "schema": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 40}}, "required": ["city"]}}},
     lambda value: set(value) == {"city"} and isinstance(value["city"], str)),
])
def test_json_answers_parse_and_hold_to_the_schema(real_agent: AgentProcess, client: Client,
                                                   response_format: dict[str, Any],
                                                   check: Callable[[Any], bool]) -> None:
    ids = [f"j{n}" for n in range(3)]
    for rid in ids:
        send(client, real_agent, id=rid, prompt=FRANCE, max_tokens=120, response_format=response_format)
    got = answers_for(client, real_agent, ids)
    for rid in ids:
        doc = got[rid]
        assert doc["ok"] and doc["finish_reason"] == "stop" and check(doc["json"]), doc
        assert json.loads(doc["text"]) == doc["json"]


def test_ask_stream_prints_the_text_as_it_comes(real_agent: AgentProcess, broker: Broker) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "edge_agent", "ask", STORY, "--stream", "--max-tokens", "200",
                             "--config", str(real_agent.config), "--host", "127.0.0.1", "--port", str(broker.port)],
                            stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    assert proc.stdout is not None
    first = proc.stdout.read(1)
    # the first text is out while the answer is still being generated (200 tokens: seconds)
    assert first and real_agent.count_events("request.done") == 0
    rest = proc.stdout.read()
    assert proc.wait(60) == 0 and len((first + rest).strip()) > 100
    assert real_agent.count_events("request.done") == 1
