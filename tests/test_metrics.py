"""/metrics and /healthz from the outside: a real agent on a real broker, scraped over HTTP the
way Prometheus does (tests/test_prometheus_real.py has the real Prometheus server)."""

from __future__ import annotations

import json
import signal
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

from prometheus_client.parser import text_string_to_metric_families

from faults import fault_hooks_env
from support import AgentProcess, Broker, Client, ask, free_port, until

WAIT_S = 30


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape by (name, sorted labels)."""
    status, body = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body.decode()) for sample in family.samples}


def value(samples: dict[Any, float], name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def health(port: int) -> tuple[int, str]:
    try:
        status, body = get(f"http://127.0.0.1:{port}/healthz")
    except OSError:
        return 0, "unreachable"
    return status, json.loads(body)["state"]


def test_requests_tokens_and_state_are_scraped(broker: Broker, client: Client,
                                               start_agent: Callable[..., AgentProcess]) -> None:
    port = free_port()
    agent = start_agent(broker, client, metrics__listen=f"127.0.0.1:{port}")
    client.subscribe(agent.response_topic)
    answers = [ask(client, agent, {"prompt": f"hello {n}", "max_tokens": 5}) for n in range(3)]
    assert all(doc["ok"] for doc in answers)
    bad = ask(client, agent, {"prompt": 7})
    assert bad["error"]["code"] == "bad_request"
    samples = scrape(port)
    assert value(samples, "edge_agent_requests_total", outcome="ok") == 3
    assert value(samples, "edge_agent_requests_total", outcome="bad_request") == 1
    assert value(samples, "edge_agent_time_to_first_token_seconds_count") == 3  # not the warm-up
    assert value(samples, "edge_agent_request_duration_seconds_count") == 3
    generated = value(samples, "edge_agent_generated_tokens_total")
    assert generated is not None and generated >= 15
    assert value(samples, "edge_agent_ready") == 1 and value(samples, "edge_agent_broker_connected") == 1
    assert value(samples, "edge_agent_queue_depth") == 0
    model = [labels for (name, labels) in samples if name == "edge_agent_model_info"]
    assert model and dict(model[0])["provider"] == "cpu", model
    rss = value(samples, "edge_agent_inference_resident_memory_bytes")
    assert rss is not None and rss > 10_000_000
    assert value(samples, "edge_agent_inference_restarts_total") == 0
    assert health(port) == (200, "ready")
    assert get(f"http://127.0.0.1:{port}/nothing")[0] == 404


def test_healthz_follows_starting_ready_stopping(broker: Broker, client: Client,
                                                 start_agent: Callable[..., AgentProcess], tmp_path: Path) -> None:
    port = free_port()
    agent = start_agent(broker, client, wait_ready=False, metrics__listen=f"127.0.0.1:{port}",
                        shutdown_grace_s=5, env=fault_hooks_env(tmp_path / "hooks", slow_load_s=3.0))
    assert until(lambda: health(port) == (503, "starting"), "starting", WAIT_S)
    assert until(lambda: health(port) == (200, "ready"), "ready")
    client.subscribe(agent.response_topic)
    client.publish(agent.request_topic, json.dumps({"id": "slow", "prompt": "SLOW", "max_tokens": 2}))
    until(lambda: scrape(port).get(("edge_agent_requests_running", ())) == 1, "the request running")
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGTERM)
    assert until(lambda: health(port) == (503, "stopping"), "stopping")
    assert agent.proc.wait(30) == 0
    assert health(port) == (0, "unreachable")


def test_a_port_in_use_is_a_settings_error_naming_it(broker: Broker, client: Client,
                                                    start_agent: Callable[..., AgentProcess]) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        agent = start_agent(broker, client, wait_ready=False, metrics__listen=f"127.0.0.1:{port}")
        assert agent.proc is not None and agent.proc.wait(30) == 78
        assert f"metrics.listen: cannot listen on 127.0.0.1:{port}" in agent.log_path.read_text()
    finally:
        taken.close()


def test_reload_moves_and_stops_the_listener(broker: Broker, client: Client,
                                             start_agent: Callable[..., AgentProcess]) -> None:
    first, second = free_port(), free_port()
    agent = start_agent(broker, client, reload_debounce_s=0.1, metrics__listen=f"127.0.0.1:{first}")
    assert health(first) == (200, "ready")
    # the file watcher starts just after `ready`: an edit before it would go unseen
    until(lambda: any(line["event"] == "reload.watching" for line in agent.log_lines()), "the file watcher")
    agent.rewrite(metrics__listen=f"127.0.0.1:{second}")
    until(lambda: health(second) == (200, "ready"), "the new port")
    assert health(first) == (0, "unreachable")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:  # a port in use: the running listener stays, the status says why
        agent.rewrite(metrics__listen=f"127.0.0.1:{taken.getsockname()[1]}")
        status = client.wait_for(lambda d: d.get("device_id") == agent.device_id and d.get("config_error"), WAIT_S)
        assert "metrics.listen" in status["config_error"][0]
        assert health(second) == (200, "ready")
    finally:
        taken.close()
    agent.rewrite(metrics__listen="")
    until(lambda: health(second) == (0, "unreachable"), "the listener stopped")
    client.subscribe(agent.response_topic)
    assert ask(client, agent, {"prompt": "still there?", "max_tokens": 2})["ok"]
