"""A pool of agents sharing one request stream through the broker (`mqtt.shared_group`)."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from faults import fault_hooks_env
from support import AgentProcess, Broker, Client

FLEET_REQUEST = "edge-agent/fleet/request"
FLEET_RESPONSE = "edge-agent/fleet/response"


def done_ids(agent: AgentProcess) -> list[str]:
    return [line["request_id"] for line in agent.log_lines() if line.get("event") == "request.done"]


def collect(client: Client, ids: list[str]) -> dict[str, dict[str, Any]]:
    answers: dict[str, dict[str, Any]] = {}
    while len(answers) < len(ids):
        doc = client.wait_for(lambda d: "id" in d and "ok" in d)
        assert doc["id"] not in answers, f"{doc['id']} answered twice"
        answers[doc["id"]] = doc
    return answers


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_each_fleet_request_is_answered_once_by_one_of_the_pool(
        broker: Broker, client: Client, start_agent: Callable[..., AgentProcess], protocol: str) -> None:
    # The burst arrives faster than the tiny model answers: each member's queue must hold its share
    # (a full member answers busy; the broker does not pass the request on to another member).
    # One group per run: a killed member's persistent session keeps its share queued until it
    # comes back or the session expires (mqtt.session_expiry_s), by design.
    pool = [start_agent(broker, client, mqtt__shared_group=f"pool-a{protocol.replace('.', '')}", mqtt__protocol=protocol,
                        limits__queue_size=30) for _ in range(3)]
    client.subscribe(FLEET_RESPONSE)
    ids = [f"fleet-{protocol}-{i}" for i in range(30)]
    for rid in ids:
        client.publish(FLEET_REQUEST, json.dumps({"id": rid, "prompt": "hi", "max_tokens": 4}))
    answers = collect(client, ids)
    assert all(a["ok"] for a in answers.values()), [a for a in answers.values() if not a["ok"]][:3]
    handled = {agent.device_id: done_ids(agent) for agent in pool}
    everyone = [rid for rids in handled.values() for rid in rids]
    assert sorted(everyone) == sorted(ids), "each request ran on exactly one agent"
    assert sum(1 for rids in handled.values() if rids) >= 2, handled

    # each agent still answers its own topic, on its own response topic
    own = pool[0]
    client.subscribe(own.response_topic)
    client.publish(own.request_topic, json.dumps({"id": "direct", "prompt": "hi", "max_tokens": 4}))
    assert client.wait_for(lambda d: d.get("id") == "direct")["ok"]
    assert "direct" in done_ids(own)


def test_fleet_reply_rules_and_a_stopped_member(
        broker: Broker, client: Client, start_agent: Callable[..., AgentProcess]) -> None:
    pool = [start_agent(broker, client, mqtt__shared_group="pool-b", limits__queue_size=30)
            for _ in range(2)]
    client.subscribe(FLEET_RESPONSE)
    client.subscribe("app/replies/#")
    client.publish(FLEET_REQUEST, json.dumps({"id": "r1", "prompt": "hi", "max_tokens": 4}),
                   response_topic="app/replies/1", correlation=b"c1")
    client.publish(FLEET_REQUEST, json.dumps({"id": "r2", "prompt": "hi", "reply_to": "app/replies/2",
                                              "max_tokens": 4}))
    client.publish(FLEET_REQUEST, json.dumps({"id": "bad", "prompt": "hi", "colour": "red"}))
    seen: dict[str, tuple[str, Any]] = {}
    while len(seen) < 3:
        topic, doc, props = client.next()
        if "id" in doc:
            seen[doc["id"]] = (topic, doc, props)
    assert seen["r1"][0] == "app/replies/1" and seen["r1"][2].CorrelationData == b"c1"
    assert seen["r2"][0] == "app/replies/2"
    assert seen["bad"][0] == FLEET_RESPONSE and seen["bad"][1]["error"]["code"] == "bad_request"

    # a member that stopped takes nothing more: the rest of the pool answers everything
    assert pool[0].stop(signal.SIGTERM) == 0
    ids = [f"after-{i}" for i in range(10)]
    for rid in ids:
        client.publish(FLEET_REQUEST, json.dumps({"id": rid, "prompt": "hi", "max_tokens": 4}))
    answers = collect(client, ids)
    assert all(a["ok"] for a in answers.values())
    assert set(ids) <= set(done_ids(pool[1]))


def test_fleet_is_a_reserved_device_id(tmp_path: Any) -> None:
    from edge_agent.errors import ConfigError
    from edge_agent.settings import load_settings

    config = tmp_path / "agent.toml"
    config.write_text('device_id = "fleet"\n')
    with pytest.raises(ConfigError, match="reserved"):
        load_settings(config)


def test_ask_fleet_is_answered_by_one_member(broker: Broker, client: Client,
                                             start_agent: Callable[..., AgentProcess]) -> None:
    import subprocess
    import sys

    pool = [start_agent(broker, client, mqtt__shared_group="pool-ask") for _ in range(2)]
    result = subprocess.run([sys.executable, "-m", "edge_agent", "ask", "hi", "--fleet", "--id", "ask-fleet",
                             "--port", str(broker.port), "--max-tokens", "4", "--json", "--timeout", "30"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["ok"] and answer["id"] == "ask-fleet"
    assert sorted(rid for agent in pool for rid in done_ids(agent)) == ["ask-fleet"]
    both = subprocess.run([sys.executable, "-m", "edge_agent", "ask", "hi", "--fleet", "--device", "x",
                           "--port", str(broker.port)], capture_output=True, text=True, timeout=60)
    assert both.returncode == 64


def test_a_fleet_cancel_reaches_whichever_member_holds_the_request(
        broker: Broker, client: Client, start_agent: Callable[..., AgentProcess], tmp_path: Path) -> None:
    """Every member hears <prefix>/fleet/cancel; the one running the request ends it (a SLOW
    prompt holds it a second: a fault hook in the child), the others find nothing."""
    pool = [start_agent(broker, client, mqtt__shared_group="pool-c", env=fault_hooks_env(tmp_path / f"hooks{n}"))
            for n in range(2)]
    client.subscribe(FLEET_RESPONSE)
    client.publish(FLEET_REQUEST, json.dumps({"id": "stop-me", "prompt": "SLOW story", "max_tokens": 16}))
    time.sleep(0.3)
    client.publish("edge-agent/fleet/cancel", json.dumps({"id": "stop-me"}))
    doc = collect(client, ["stop-me"])["stop-me"]
    assert doc["ok"] and doc["finish_reason"] == "cancelled", doc
    found = [line["found"] for agent in pool for line in agent.log_lines() if line.get("event") == "request.cancel"]
    assert sorted(found) == [False, True]
