"""End to end with a real small instruct model (SmolLM2-135M-Instruct, ChatML template):
the check that chat template, tokenizer and stop tokens are right. Built once, cached."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from support import AgentProcess, Broker, Client

pytestmark = pytest.mark.slow
LONG_STORY = "Write a long story about a lighthouse keeper and his cat."


def ask_cli(agent: AgentProcess, broker: Broker, prompt: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_agent", "ask", prompt, "--config", str(agent.config),
                           "--host", "127.0.0.1", "--port", str(broker.port), "--timeout", "60", *extra],
                          capture_output=True, text=True, timeout=90, env=os.environ.copy())


@pytest.fixture
def real_agent(broker: Broker, client: Client, smollm2_model: Path,
               start_agent: Callable[..., AgentProcess]) -> AgentProcess:
    return start_agent(broker, client, model=smollm2_model, model__max_new_tokens=128)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_capital_of_france_over_mqtt(real_agent: AgentProcess, broker: Broker, protocol: str) -> None:
    result = ask_cli(real_agent, broker, "What is the capital of France?", "--protocol", protocol, "--json")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert "Paris" in answer["text"]
    assert answer["finish_reason"] == "stop"  # <|im_end|> ended it, not the token cap
    assert answer["text"].strip() and "<|im_end|>" not in answer["text"]
    assert answer["usage"]["completion_tokens"] < 40


def test_ask_prints_the_text(real_agent: AgentProcess, broker: Broker) -> None:
    result = ask_cli(real_agent, broker, "What is the capital of France?")
    assert result.returncode == 0 and "Paris" in result.stdout


def test_system_prompt_and_history_go_through_the_chat_template(real_agent: AgentProcess,
                                                                 client: Client) -> None:
    client.subscribe(real_agent.response_topic)
    client.publish(real_agent.request_topic, json.dumps({
        "id": "hist", "system": "You are a helpful assistant.",
        "messages": [{"role": "user", "content": "What is the capital of France?"},
                     {"role": "assistant", "content": "The capital of France is Paris."},
                     {"role": "user", "content": "What is the capital of France? Answer again."}]}))
    doc = client.wait_for(lambda d: d.get("id") == "hist", 60)
    assert doc["ok"] and "Paris" in doc["text"] and doc["finish_reason"] == "stop"


def test_ask_exit_codes(real_agent: AgentProcess, broker: Broker) -> None:
    error = ask_cli(real_agent, broker, "hi", "--max-tokens", "100000")
    assert error.returncode == 1 and "bad_request" in error.stderr
    nobody = subprocess.run([sys.executable, "-m", "edge_agent", "ask", "hi", "--port", str(broker.port),
                             "--device", "nobody-home", "--timeout", "1"], capture_output=True, text=True)
    assert nobody.returncode == 2 and "no answer" in nobody.stderr


def test_waiting_request_times_out_behind_a_long_one(broker: Broker, client: Client, smollm2_model: Path,
                                                     start_agent: Callable[..., AgentProcess]) -> None:
    # One request at a time (inference.max_batch = 1): the second waits in the queue.
    real_agent = start_agent(broker, client, model=smollm2_model, model__max_new_tokens=128, inference__max_batch=1)
    client.subscribe(real_agent.response_topic)
    client.publish(real_agent.request_topic, json.dumps({"id": "long", "prompt": LONG_STORY, "max_tokens": 128}))
    client.publish(real_agent.request_topic, json.dumps({"id": "hurry", "prompt": "hi", "timeout_s": 0.05}))
    answers = {d["id"]: d for d in (client.wait_for(lambda d: "id" in d, 60) for _ in range(2))}
    assert answers["long"]["ok"]
    assert answers["hurry"]["error"]["code"] == "timeout"
    assert "queued" in answers["hurry"]["error"]["message"]


def test_sigterm_finishes_running_answers_queued_unavailable(
        broker: Broker, client: Client, smollm2_model: Path, start_agent: Callable[..., AgentProcess]) -> None:
    # One request at a time (inference.max_batch = 1): one runs, two wait in the queue.
    agent = start_agent(broker, client, model=smollm2_model, model__max_new_tokens=128, shutdown_grace_s=30,
                        inference__max_batch=1)
    client.subscribe(agent.response_topic)
    for n in range(3):
        client.publish(agent.request_topic, json.dumps({"id": f"s{n}", "prompt": LONG_STORY, "max_tokens": 128}))
    _wait_for_log(agent, lambda line: line.get("event") == "request.accepted" and line.get("request_id") == "s2")
    assert agent.stop(signal.SIGTERM) == 0
    answers: dict[str, Any] = {}
    while len(answers) < 3:
        doc = client.wait_for(lambda d: "id" in d, 10)
        assert doc["id"] not in answers
        answers[doc["id"]] = doc
    assert answers["s0"]["ok"] is True  # was running: finished within the grace period
    assert answers["s1"]["error"]["code"] == "unavailable"
    assert answers["s2"]["error"]["code"] == "unavailable"


def _wait_for_log(agent: AgentProcess, predicate: Callable[[dict[str, Any]], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not any(predicate(line) for line in agent.log_lines()):
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_second_sigint_forces_exit(broker: Broker, client: Client, smollm2_model: Path,
                                   start_agent: Callable[..., AgentProcess]) -> None:
    agent = start_agent(broker, client, model=smollm2_model, model__max_new_tokens=128, shutdown_grace_s=60)
    client.subscribe(agent.response_topic)
    for n in range(3):
        client.publish(agent.request_topic, json.dumps({"id": f"i{n}", "prompt": LONG_STORY}))
    _wait_for_log(agent, lambda line: line.get("event") == "request.accepted" and line.get("request_id") == "i2")
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGINT)
    time.sleep(0.3)  # the first SIGINT has started the graceful stop
    agent.proc.send_signal(signal.SIGINT)
    assert agent.proc.wait(10) == 130
