"""The memory plan and admission by cache size, with real ORT GenAI and a real broker: the
plan's figures for two model shapes, a budget that holds two requests' caches, a request that
can never fit, a budget below the weights."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from edge_agent.inference.memory import MB, model_shape, plan, weights_bytes
from support import AgentProcess, Broker, Client, ask

PROMPT = "Tell me about the garden."
# Long enough that a cache (≈240 KB) dwarfs the 0.1 MB rounding of the status's loaded_mb.
MAX_TOKENS = 200


def genai_config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "genai_config.json").read_text())


@pytest.mark.slow
def test_cache_per_token_is_the_formula_for_two_shapes(tiny_model: Path, smollm2_model: Path) -> None:
    # 2 (key and value) x layers x KV heads x head size x 4 bytes (float32 on CPU), 2 on a GPU
    assert model_shape(genai_config(tiny_model), "cpu").kv_bytes_per_token == 2 * 2 * 4 * 16 * 4
    assert model_shape(genai_config(smollm2_model), "cpu").kv_bytes_per_token == 2 * 30 * 3 * 64 * 4
    assert model_shape(genai_config(smollm2_model), "cuda").kv_bytes_per_token == 2 * 30 * 3 * 64 * 2
    budget = plan(smollm2_model, "cpu", 300, True, 1024)
    # the batching engine's group of 4 would take 180 MB of the 215 the weights leave: shortened
    assert budget.batch_cache_bytes <= (budget.budget_bytes - budget.weights_bytes) // 2
    assert budget.batch_max_length < 1024 and budget.batching_note
    assert budget.weights_bytes == weights_bytes(smollm2_model)


def status_memory(client: Client, agent: AgentProcess) -> dict[str, Any]:
    status = client.wait_for(lambda d: d.get("device_id") == agent.device_id and d.get("state") == "ready", 30)
    return status["memory"]


def test_a_budget_for_two_caches_runs_two_at_once_and_answers_all(
        broker: Broker, client: Client, start_agent: Callable[..., AgentProcess], tiny_model: Path) -> None:
    probe = start_agent(broker, client, device_id="probe", model__max_new_tokens=MAX_TOKENS)
    client.subscribe(probe.response_topic)
    memory = status_memory(client, probe)
    assert memory["kv_bytes_per_token"] == 1024 and memory["logits_bytes_per_token"] == 645 * 4
    # the load takes far more than the 0.7 MB file (the runtime's session, the tokenizer): the
    # plan takes what it measured, and the caches get what is left
    assert memory["loaded_mb"] > 10 * memory["weights_mb"] > 0
    prompt_tokens = ask(client, probe, {"prompt": PROMPT, "max_tokens": MAX_TOKENS})["usage"]["prompt_tokens"]
    one_cache = (prompt_tokens + MAX_TOKENS) * memory["kv_bytes_per_token"] + prompt_tokens * memory[
        "logits_bytes_per_token"]
    budget_mb = memory["loaded_mb"] + 2.5 * one_cache / MB

    agent = start_agent(broker, client, device_id="two", inference__memory_mb=budget_mb, log_level="debug",
                        model__max_new_tokens=MAX_TOKENS, inference__max_batch=8)
    client.subscribe(agent.response_topic)
    ids = [f"m{n}" for n in range(8)]
    for rid in ids:
        client.publish(agent.request_topic, json.dumps({"id": rid, "prompt": PROMPT, "max_tokens": MAX_TOKENS}))
    answers: dict[str, dict[str, Any]] = {}
    client.wait_for(lambda d: bool(d.get("id") in ids and answers.setdefault(d["id"], d)) and len(answers) == 8, 60)
    assert all(doc["ok"] and doc["usage"]["completion_tokens"] == MAX_TOKENS for doc in answers.values())
    def started() -> list[dict[str, Any]]:  # the child's log lines: the warm-up's and the eight's
        return [line for line in agent.log_lines() if line["event"] == "inference.started"]

    deadline = time.monotonic() + 10
    while len(started()) < 9 and time.monotonic() < deadline:  # written by another process
        time.sleep(0.1)
    assert len(started()) == 9, started()
    assert max(line["running"] for line in started()) == 2, [line["running"] for line in started()]

    # one that could never fit: answered at once, and the next one is answered
    asked = time.monotonic()
    big = ask(client, agent, {"prompt": PROMPT + " Every flower, " * 60, "max_tokens": 64})
    assert big["error"]["code"] == "too_large" and "memory budget" in big["error"]["message"], big
    assert time.monotonic() - asked < 5
    assert ask(client, agent, {"prompt": PROMPT, "max_tokens": 4})["ok"]


def test_a_budget_below_the_weights_exits_78_naming_both(tmp_path: Path, tiny_model: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f'[model]\npath = "{tiny_model}"\n[inference]\nmemory_mb = 0.2\n')
    for command in (["check-config"], ["run"]):
        result = subprocess.run([sys.executable, "-m", "edge_agent", *command, "--config", str(config)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 78, result
        assert "the memory budget is 0.2 MB" in result.stderr and "weights alone, 0.7 MB" in result.stderr, result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("memory_mb", [0, 300])
def test_check_config_explain_shows_the_plan(tmp_path: Path, smollm2_model: Path, memory_mb: float) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f'[model]\npath = "{smollm2_model}"\n[inference]\nmemory_mb = {memory_mb}\n')
    result = subprocess.run([sys.executable, "-m", "edge_agent", "check-config", "--explain", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "# cache per token: 46080 bytes" in result.stdout
    assert "# model weights:" in result.stdout and "# memory budget:" in result.stdout
    if memory_mb:
        assert "# batching: batch_max_length 1024 -> " in result.stdout
